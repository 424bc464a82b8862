"""Free space on the storage claim, checked before a write starts, and the reason when it is short.

A 671B build writes 1.3 TB of 16-bit GGUF after 690 GB of download; finding out with ENOSPC hours
in, with a half-written file eating what space there was, is the worst way to learn the claim is too
small. Every large write (the download, the conversion, each variant) asks :func:`check` first with
the bytes it will write, and a write that still runs out (an estimate that was low, another writer
on the same volume) removes its partial file and ends with :func:`full_message`, which says how
much was needed.

Sizes in messages are GiB (2^30 bytes), as a user writes ``spec.storage.pvc.size: 200Gi``.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

from kquant.quantizer import units

MARGIN = 1.02
"""Asked for beyond the planned bytes: GGUF alignment padding, metadata, the report."""

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class NoSpaceError(Exception):
    """The claim cannot hold what a step is about to write; the message says how much is needed."""


def gib(n: float) -> str:
    return f"{n / units.GiB:.2f} GiB"


def existing_folder(path: Path) -> Path:
    """``path`` or its nearest existing parent: where ``disk_usage`` can ask before anything is made."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(existing_folder(folder)).free


def same_volume(a: Path, b: Path) -> bool:
    return os.stat(existing_folder(a)).st_dev == os.stat(existing_folder(b)).st_dev


def shortage_message(folder: Path, free: int, needed: int, what: str, claim: str | None) -> str:
    where = f"storage claim {claim} ({folder})" if claim else f"storage at {folder}"
    short = max(needed - free, 0)
    return (
        f"{where} has {gib(free)} free, but {what} needs about {gib(needed)}: grow spec.storage.pvc.size "
        f"by at least {gib(short)} (or remove old variants)"
    )


def check(folder: Path, needed: int, what: str, claim: str | None = None) -> None:
    """Refuse to start a write of ``needed`` bytes into ``folder`` that cannot fit."""
    free = free_bytes(folder)
    want = int(needed * MARGIN)
    if free < want:
        raise NoSpaceError(shortage_message(folder, free, want, what, claim))


def full_message(folder: Path, needed: int | None, what: str, claim: str | None = None) -> str:
    """The reason after ENOSPC: the partial file is gone, here is what the write needed."""
    where = f"storage claim {claim} ({folder})" if claim else f"storage at {folder}"
    need = f"; it needs about {gib(needed)}" if needed else ""
    return (
        f"{where} is full while writing {what} (No space left on device; the partial file was removed)"
        f"{need}, {gib(free_bytes(folder))} are free: grow spec.storage.pvc.size"
    )


def is_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in FULL_ERRNOS


_FULL_PHRASES = ("No space left on device", "Not enough free space to write")
"""Python's ENOSPC text, and numpy's when ``tofile`` cannot preallocate the bytes it will write."""
_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")
"""numpy's ``tofile`` on a volume that filled mid-write: no errno, only the two counts."""


def says_full(line: str, free: int) -> bool:
    """Whether a writer's error line means the volume is full. A short write (gguf-py writes
    tensors with numpy's ``tofile``) counts as full when the bytes it could not write would not
    fit the ``free`` bytes the volume has, read before the partial file is removed."""
    if any(phrase in line for phrase in _FULL_PHRASES):
        return True
    short = _SHORT_WRITE.search(line)
    if short is None:
        return False
    return int(short[1]) - int(short[2]) > free
