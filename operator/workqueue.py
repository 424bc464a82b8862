"""A queue of models to reconcile that coalesces events. Pure asyncio: no kopf, no client.

Every watch event that concerns a model (its own, or one of a child's) asks for one pass over it.
A burst of events for one model (a Job's pod starting, the ConfigMap's progress lines, the
Deployment's status moves) therefore must not become a burst of passes: a key waits in the queue
at most once, and a key that is being worked on is never handed to a second worker; an event that
arrives meanwhile marks the key so that exactly one more pass follows. This is the contract of
controller-runtime's work queue, which is what makes a level-triggered operator scale with the
number of objects rather than the number of events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from typing import Generic, NamedTuple, TypeVar

K = TypeVar("K", bound=Hashable)


class Item(NamedTuple, Generic[K]):
    key: K
    waited: float
    """Seconds from the first request that queued the key to a worker taking it."""


class WorkQueue(Generic[K]):
    def __init__(self, base_backoff: float = 0.5, max_backoff: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ready: asyncio.Queue[K] = asyncio.Queue()
        self._queued: dict[K, float] = {}
        """Keys waiting in ``_ready``, with the time each was queued."""
        self._clock = clock
        self._active: set[K] = set()
        self._again: set[K] = set()
        self._failures: dict[K, int] = {}
        self._base_backoff, self._max_backoff = base_backoff, max_backoff
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._closed = False

    def __len__(self) -> int:
        return self._ready.qsize()

    def held(self) -> int:
        """Keys the queue keeps in its bookkeeping (queued, running, to run again, failing,
        waiting on a timer): with no model left this is 0, so growth over time is a leak."""
        return len(self._queued) + len(self._active) + len(self._again) + len(self._failures) + len(self._timers)

    def add(self, key: K) -> None:
        """Ask for a pass over ``key``: now, or right after the pass that is running."""
        if self._closed:
            return
        if key in self._active:
            self._again.add(key)
        elif key not in self._queued:
            self._queued[key] = self._clock()
            self._ready.put_nowait(key)

    def add_after(self, key: K, delay: float) -> None:
        """Ask for a pass in ``delay`` seconds; an earlier request for the key stands."""
        if self._closed or key in self._timers:
            return
        self._timers[key] = asyncio.get_running_loop().call_later(delay, self._fire, key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def get(self) -> Item[K]:
        """The next key to work on; the caller must call ``done`` or ``failed`` with it."""
        key = await self._ready.get()
        queued_at = self._queued.pop(key)
        self._active.add(key)
        return Item(key, self._clock() - queued_at)

    def done(self, key: K) -> None:
        self._failures.pop(key, None)
        self._release(key)

    def failed(self, key: K) -> float:
        """Retry ``key`` later, doubling the wait with each failure in a row; returns the wait."""
        count = self._failures[key] = self._failures.get(key, 0) + 1
        delay: float = min(self._max_backoff, self._base_backoff * 2.0 ** (count - 1))
        self._release(key)
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """The model is gone: drop its retries and timers (a pass that is queued finds nothing)."""
        self._failures.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def _release(self, key: K) -> None:
        self._active.discard(key)
        if key in self._again:
            self._again.discard(key)
            self.add(key)

    def close(self) -> None:
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
