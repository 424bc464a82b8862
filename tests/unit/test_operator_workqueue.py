"""The work queue's contract: one pending entry per key, never two workers on one key, retries
that back off. Pure asyncio, no cluster."""

from __future__ import annotations

import asyncio

import pytest
from kquant.operator import workqueue


def _run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_a_burst_of_requests_for_one_key_becomes_one_entry() -> None:
    async def scenario() -> None:
        queue: workqueue.WorkQueue[str] = workqueue.WorkQueue()
        for _ in range(20):
            queue.add("a")
        queue.add("b")
        assert len(queue) == 2
        assert (await queue.get()).key == "a"
        assert (await queue.get()).key == "b"
        assert len(queue) == 0

    _run(scenario())


def test_a_key_in_work_is_not_handed_out_again_but_gets_exactly_one_more_pass() -> None:
    async def scenario() -> None:
        queue: workqueue.WorkQueue[str] = workqueue.WorkQueue()
        queue.add("a")
        key = (await queue.get()).key
        for _ in range(5):  # events that arrive while the pass runs
            queue.add("a")
        assert len(queue) == 0, "a second worker must not get a key that is being worked on"
        queue.done(key)
        assert len(queue) == 1
        assert (await queue.get()).key == "a"
        queue.done("a")
        assert len(queue) == 0

    _run(scenario())


def test_failures_back_off_and_success_resets_the_count() -> None:
    async def scenario() -> None:
        queue: workqueue.WorkQueue[str] = workqueue.WorkQueue(base_backoff=0.01, max_backoff=0.04)
        queue.add("a")
        waits = []
        for _ in range(4):
            item = await asyncio.wait_for(queue.get(), timeout=5)
            waits.append(queue.failed(item.key))
        assert waits == [0.01, 0.02, 0.04, 0.04]
        queue.done((await asyncio.wait_for(queue.get(), timeout=5)).key)
        queue.add("a")
        assert queue.failed((await queue.get()).key) == 0.01

    _run(scenario())


def test_forget_cancels_a_pending_retry_and_close_stops_intake() -> None:
    async def scenario() -> None:
        queue: workqueue.WorkQueue[str] = workqueue.WorkQueue(base_backoff=0.1)
        queue.add("a")
        queue.failed((await queue.get()).key)
        queue.forget("a")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(queue.get(), timeout=0.3)
        queue.close()
        queue.add("b")
        assert len(queue) == 0

    _run(scenario())


def test_the_wait_is_counted_from_the_first_request() -> None:
    async def scenario() -> None:
        now = [10.0]
        queue: workqueue.WorkQueue[str] = workqueue.WorkQueue(clock=lambda: now[0])
        queue.add("a")
        now[0] = 12.5
        queue.add("a")  # coalesced: the wait still counts from 10.0
        now[0] = 13.0
        assert await queue.get() == ("a", 3.0)

    _run(scenario())
