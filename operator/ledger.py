"""What this operator last wrote into each model's status, until the watch shows it back. Pure code.

A pass reads the model from the watch-fed index, which lags the operator's own writes by one
watch event. A pass that starts inside that gap would compute the new status from the old one:
it would write the same change again and post its Events twice. The ledger closes the gap: a
status write is remembered under the model's uid with the resourceVersion the API server gave
it, and forgotten once the watch delivers that very version (the index then holds it, or
something newer). Nothing here compares resourceVersions, which Kubernetes keeps opaque.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

Status = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Written:
    """A status write: the merge patch sent and the resourceVersion the API server answered with."""

    resource_version: str
    status: Status


@dataclasses.dataclass(frozen=True)
class _Entry:
    written: Written
    at: float


class StatusLedger:
    def __init__(self, max_age: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: dict[str, _Entry] = {}
        self._max_age = max_age
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    def wrote(self, uid: str, written: Written) -> None:
        now = self._clock()
        # Entries past max_age count for nothing (``newest`` drops them when it meets them), but
        # one for a model that is gone is never met again: a pass that wrote just before its
        # model's deletion records its write after the DELETED event's ``forget``. Sweeping them
        # here keeps the ledger as large as the writes of the last minute (seen: 2 entries left
        # after 1,000 apply/edit/delete cycles, bench/operator_churn.py).
        for stale in [key for key, entry in self._entries.items() if now - entry.at > self._max_age]:
            del self._entries[stale]
        self._entries[uid] = _Entry(written, now)

    def seen(self, uid: str, resource_version: str) -> None:
        """The watch delivered this version of the model: a write at or before it is visible."""
        entry = self._entries.get(uid)
        if entry is not None and entry.written.resource_version == resource_version:
            del self._entries[uid]

    def forget(self, uid: str) -> None:
        self._entries.pop(uid, None)

    def newest(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        """The body as the index holds it, with the status this operator wrote if the index has
        not caught up yet. An entry the watch never confirmed (a lost event, another replica took
        over) stops counting after ``max_age`` seconds."""
        uid = str((body.get("metadata") or {}).get("uid") or "")
        entry = self._entries.get(uid)
        if entry is None:
            return body
        if self._clock() - entry.at > self._max_age:
            del self._entries[uid]
            return body
        return {**body, "status": entry.written.status}
