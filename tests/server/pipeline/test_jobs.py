"""Tickets: one job's events in order, by iteration or by ``outcome`` with progress handed
over as it is put."""

from __future__ import annotations

import asyncio

import pytest

from chunking.errors import ErrorCode
from chunking.messages import Stage
from server.pipeline.jobs import (
    Dispatched,
    Job,
    JobDone,
    JobEvent,
    JobFailed,
    Queued,
    StageReached,
    Ticket,
)
from server.storage.base import ImageRef

JOB = Job("1", "classify", {}, ImageRef(size=3, data=b"abc"), 100)
DONE = JobDone("1", result={"labels": []}, image={"width": 1, "height": 1, "format": "PNG"})


def ticket(cancelled: list[Ticket] | None = None) -> Ticket:
    return Ticket(JOB, (cancelled if cancelled is not None else []).append)


async def test_iteration_yields_every_event_in_order_and_ends_at_the_outcome() -> None:
    t = ticket()
    t.put(Queued(2))
    t.put(Dispatched(queue_ms=1.5))
    seen: list[JobEvent] = []

    async def follow() -> None:
        async for event in t:
            seen.append(event)

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0)
    t.put(StageReached(["1"], Stage.DECODING))
    t.put(DONE)
    t.put(JobFailed("1", ErrorCode.INTERNAL, "a second outcome is ignored"))
    await follower
    assert seen == [Queued(2), Dispatched(1.5), StageReached(["1"], Stage.DECODING), DONE]
    assert t.finished


async def test_outcome_hands_progress_over_in_order_then_returns_the_outcome() -> None:
    t = ticket()
    t.put(Queued(3))  # before anyone follows: handed over first
    progress: list[JobEvent] = []
    waiting = asyncio.create_task(t.outcome(progress.append))
    await asyncio.sleep(0)
    assert progress == [Queued(3)]
    t.put(Queued(1))
    t.put(Dispatched(queue_ms=2.0))
    # Handed over as it is put: nothing waits for the follower's task to run.
    assert progress == [Queued(3), Queued(1), Dispatched(2.0)]
    t.put(StageReached(["1"], Stage.INFERENCE))
    assert not waiting.done()
    t.put(DONE)
    assert await waiting is DONE
    t.put(Queued(5))  # finished: ignored
    assert progress == [Queued(3), Queued(1), Dispatched(2.0),
                        StageReached(["1"], Stage.INFERENCE)]


async def test_an_outcome_put_before_following_is_returned_after_the_progress() -> None:
    t = ticket()
    t.put(Queued(1))
    t.put(StageReached(["1"], Stage.DECODING))
    failed = JobFailed("1", ErrorCode.INVALID_IMAGE, "not an image")
    t.put(failed)
    progress: list[JobEvent] = []
    assert await t.outcome(progress.append) is failed
    assert progress == [Queued(1), StageReached(["1"], Stage.DECODING)]


async def test_outcome_without_a_handler_ignores_progress() -> None:
    t = ticket()
    waiting = asyncio.create_task(t.outcome())
    await asyncio.sleep(0)
    t.put(Queued(1))
    t.put(StageReached(["1"], Stage.DECODING))
    t.put(DONE)
    assert await waiting is DONE


async def test_a_fault_in_the_progress_handler_is_raised_by_outcome_not_by_put() -> None:
    t = ticket()

    def fragile(event: JobEvent) -> None:
        if isinstance(event, StageReached):
            raise RuntimeError("the follower broke")

    waiting = asyncio.create_task(t.outcome(fragile))
    await asyncio.sleep(0)
    t.put(Queued(1))
    t.put(StageReached(["1"], Stage.DECODING))  # the queue that puts it is not disturbed
    t.put(StageReached(["1"], Stage.INFERENCE))
    with pytest.raises(RuntimeError, match="the follower broke"):
        await waiting


async def test_cancel_withdraws_once_and_ends_the_ticket() -> None:
    cancelled: list[Ticket] = []
    t = ticket(cancelled)
    t.cancel()
    t.cancel()
    assert cancelled == [t]
    t.put(DONE)  # too late: ignored
    assert t.finished
    waiting = asyncio.create_task(t.outcome())
    await asyncio.sleep(0)
    assert not waiting.done()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
