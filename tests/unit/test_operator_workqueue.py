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
        assert await queue.get() == "a"
        assert await queue.get() == "b"
        assert len(queue) == 0

    _run(scenario())


def test_a_key_in_work_is_not_handed_out_again_but_gets_exactly_one_more_pass() -> None:
    async def scenario() -> None:
        queue: workqueue.WorkQueue[str] = workqueue.WorkQueue()
        queue.add("a")
        key = await queue.get()
        for _ in range(5):  # events that arrive while the pass runs
            queue.add("a")
        assert len(queue) == 0, "a second worker must not get a key that is being worked on"
        queue.done(key)
        assert len(queue) == 1
        assert await queue.get() == "a"
        queue.done("a")
        assert len(queue) == 0

    _run(scenario())


def test_failures_back_off_and_success_resets_the_count() -> None:
    async def scenario() -> None:
        queue: workqueue.WorkQueue[str] = workqueue.WorkQueue(max_backoff=2.0)
        queue.add("a")
        waits = []
        for _ in range(4):
            key = await asyncio.wait_for(queue.get(), timeout=5)
            waits.append(queue.failed(key))
        assert waits == [0.5, 1.0, 2.0, 2.0]
        key = await asyncio.wait_for(queue.get(), timeout=5)
        queue.done(key)
        queue.add("a")
        key = await queue.get()
        assert queue.failed(key) == 0.5

    _run(scenario())


def test_forget_cancels_a_pending_retry_and_close_stops_intake() -> None:
    async def scenario() -> None:
        queue: workqueue.WorkQueue[str] = workqueue.WorkQueue()
        queue.add("a")
        queue.failed(await queue.get())
        queue.forget("a")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(queue.get(), timeout=1.0)
        queue.close()
        queue.add("b")
        assert len(queue) == 0

    _run(scenario())
