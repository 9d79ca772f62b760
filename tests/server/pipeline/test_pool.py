"""WorkerPool with real spawned workers: results, batching, queue positions, failures, shutdown.

Queue states are made deterministic with the test ``gate`` task (tests/support/gate.py): while
a test holds the gate closed, a worker running a gate job is stuck in it, so jobs submitted
meanwhile wait in the queue. Tests wait on ticket events, never on time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from chunking.errors import ErrorCode, ProtocolError
from chunking.messages import Stage
from server.metrics import Metrics
from server.pipeline.jobs import (
    Dispatched,
    JobDone,
    JobEvent,
    JobFailed,
    Queued,
    StageReached,
    TileSpec,
)
from server.pipeline.pool import Ticket, WorkerPool
from server.pipeline.spool import Spool
from server.pipeline.worker import WorkerConfig
from server.storage.base import ImageRef
from server.tasks.builtin.colors import Colors
from tests.conftest import make_image
from tests.support.broken import BrokenTask
from tests.support.gate import GateTask, gate_closed

pytestmark = pytest.mark.asyncio(loop_scope="function")

WAIT_S = 30.0
MAX_PIXELS = 40_000_000
PNG = make_image(80, 60, "PNG", seed=1)


def inline(data: bytes = PNG) -> ImageRef:
    return ImageRef(size=len(data), data=data)


class Events:
    """One ticket's events as the test reads them; every event read is kept in ``seen``."""

    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket
        self._events = aiter(ticket)
        self.seen: list[JobEvent] = []

    async def next(self) -> JobEvent:
        async with asyncio.timeout(WAIT_S):
            event = await anext(self._events)
        self.seen.append(event)
        return event

    async def until(self, predicate: Callable[[JobEvent], bool]) -> JobEvent:
        while True:
            event = await self.next()
            if predicate(event):
                return event

    async def outcome(self) -> JobDone | JobFailed:
        event = await self.until(lambda e: isinstance(e, (JobDone, JobFailed)))
        assert isinstance(event, (JobDone, JobFailed))
        return event

    def kinds(self) -> list[Any]:
        """The events seen, as comparable values: positions, stage names, class names."""
        out: list[Any] = []
        for event in self.seen:
            if isinstance(event, Queued):
                out.append(("queued", event.position))
            elif isinstance(event, StageReached):
                out.append(event.stage.value)
            else:
                out.append(type(event).__name__)
        return out


def stage(which: Stage) -> Callable[[JobEvent], bool]:
    return lambda e: isinstance(e, StageReached) and e.stage is which


def is_dispatched(event: JobEvent) -> bool:
    return isinstance(event, Dispatched)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def gate_path(tmp_path: Path) -> str:
    path = tmp_path / "gate.lock"
    path.touch()
    return str(path)


PoolFactory = Callable[..., Any]


@pytest.fixture
async def make_pool(gate_path: str) -> AsyncIterator[PoolFactory]:
    """Start pools (tasks ``colors`` and ``gate`` unless told); every one is stopped after."""
    pools: list[WorkerPool] = []

    async def factory(*, tasks: tuple[Any, ...] | None = None, workers: int = 1,
                      max_batch_size: int = 4, max_wait_ms: float = 0.0, max_queue: int = 64,
                      metrics: Metrics | None = None, ready: bool = True,
                      placement: dict[str, int] | None = None) -> WorkerPool:
        tasks = tasks if tasks is not None else (Colors(), GateTask(gate_path))
        pool = WorkerPool(WorkerConfig(tasks, placement=placement), workers=workers,
                          max_batch_size=max_batch_size,
                          max_wait_ms=max_wait_ms, max_queue=max_queue, metrics=metrics)
        pools.append(pool)
        await pool.start()
        if ready:
            async with asyncio.timeout(WAIT_S):
                await pool.wait_ready()
        return pool

    yield factory
    for pool in pools:
        async with asyncio.timeout(WAIT_S):
            await pool.stop(grace_s=2)


def submit(pool: WorkerPool, task: str = "colors", image: ImageRef | None = None,
           options: dict[str, Any] | None = None) -> Events:
    ticket = pool.submit(task, options if options is not None else {"colors": 3},
                         image or inline(), MAX_PIXELS)
    return Events(ticket)


async def hold(pool: WorkerPool) -> Events:
    """Submit a gate job and wait until a worker is inside it (call with the gate closed)."""
    held = submit(pool, "gate", options={})
    await held.until(stage(Stage.DECODING))
    return held


# Results -------------------------------------------------------------------------------------


async def test_inline_image_goes_through_every_stage(make_pool: PoolFactory) -> None:
    pool = await make_pool()
    events = submit(pool)
    done = await events.outcome()
    assert isinstance(done, JobDone), done
    assert events.kinds() == [("queued", 1), "Dispatched", "decoding", "inference", "JobDone"]
    assert done.image == {"width": 80, "height": 60, "format": "PNG"}
    assert 1 <= len(done.result["colors"]) <= 3
    assert 0 <= done.result["brightness"] <= 1
    assert set(done.timings_ms) == {"decode", "inference"}
    assert done.job_id == events.ticket.job.job_id
    assert pool.depth == 0


async def test_spool_file_image_gives_the_same_result(make_pool: PoolFactory,
                                                      tmp_path: Path) -> None:
    pool = await make_pool()
    spool = Spool(tmp_path / "spool")
    try:
        spool_file = spool.store(PNG)
        from_file = submit(pool, image=ImageRef(size=len(PNG), path=str(spool_file.path)))
        from_bytes = submit(pool, image=inline())
        by_path, by_data = await from_file.outcome(), await from_bytes.outcome()
        spool_file.close()
    finally:
        spool.close()
    assert isinstance(by_path, JobDone), by_path
    assert isinstance(by_data, JobDone), by_data
    assert by_path.result == by_data.result
    assert by_path.image == by_data.image == {"width": 80, "height": 60, "format": "PNG"}


# Batching ------------------------------------------------------------------------------------


def batch_sizes(metrics: Metrics) -> dict[str, float]:
    """The batch-size histogram: count, sum and the cumulative buckets up to 4."""
    registry = metrics.registry
    out = {
        "count": registry.get_sample_value("pixelstream_batch_size_count") or 0.0,
        "sum": registry.get_sample_value("pixelstream_batch_size_sum") or 0.0,
    }
    for le in ("1.0", "2.0", "3.0", "4.0"):
        out[le] = registry.get_sample_value("pixelstream_batch_size_bucket", {"le": le}) or 0.0
    return out


async def test_queued_jobs_run_in_batches_of_at_most_max_batch_size(
    make_pool: PoolFactory, gate_path: str
) -> None:
    metrics = Metrics()
    pool = await make_pool(max_batch_size=3, metrics=metrics)
    with gate_closed(gate_path):
        held = await hold(pool)
        jobs = [submit(pool) for _ in range(7)]
        assert [await job.next() for job in jobs] == [Queued(n) for n in range(1, 8)]
        assert pool.depth == 7
        assert pool.batches_sent == 1  # only the held gate job so far
    assert isinstance(await held.outcome(), JobDone)
    outcomes = [await job.outcome() for job in jobs]
    assert all(isinstance(o, JobDone) for o in outcomes), outcomes
    # The gate job alone, then 3 + 3 + 1 of the seven.
    assert pool.batches_sent == 4
    assert batch_sizes(metrics) == {"count": 4, "sum": 8, "1.0": 2, "2.0": 2, "3.0": 4, "4.0": 4}
    assert pool.depth == 0
    assert metrics.registry.get_sample_value("pixelstream_queue_depth") == 0


async def test_a_batch_that_fills_goes_before_max_wait(make_pool: PoolFactory) -> None:
    pool = await make_pool(max_batch_size=3, max_wait_ms=60_000)
    jobs = [submit(pool) for _ in range(3)]
    outcomes = [await job.outcome() for job in jobs]
    assert all(isinstance(o, JobDone) for o in outcomes), outcomes
    assert pool.batches_sent == 1
    dispatched = [e for job in jobs for e in job.seen if isinstance(e, Dispatched)]
    assert all(e.queue_ms < 60_000 for e in dispatched)


async def test_jobs_arriving_together_wait_up_to_max_wait_for_more(make_pool: PoolFactory
                                                                    ) -> None:
    pool = await make_pool(max_batch_size=8, max_wait_ms=100)
    jobs = [submit(pool), submit(pool)]  # close together: more may be on their way
    for job in jobs:
        assert isinstance(await job.outcome(), JobDone)
    assert pool.batches_sent == 1
    dispatched = [e for job in jobs for e in job.seen if isinstance(e, Dispatched)]
    assert len(dispatched) == 2
    assert all(e.queue_ms >= 100 for e in dispatched)  # they waited for company


async def test_a_lone_job_does_not_wait_for_company(make_pool: PoolFactory) -> None:
    pool = await make_pool(max_batch_size=8, max_wait_ms=3_600_000)
    job = submit(pool)  # the first job: nothing says more will come
    assert isinstance(await job.outcome(), JobDone)  # within WAIT_S, not max_wait's hour
    assert pool.batches_sent == 1


async def test_a_bad_image_fails_alone_while_its_batch_succeeds(make_pool: PoolFactory) -> None:
    pool = await make_pool(max_batch_size=4)
    # Submitted without yielding to the loop: the batcher sees all four at once.
    jobs = [
        submit(pool),
        submit(pool, image=inline(b"this is not an image at all")),
        submit(pool, image=inline(PNG[: len(PNG) // 2])),
        submit(pool),
    ]
    good1, garbage, truncated, good2 = [await job.outcome() for job in jobs]
    assert pool.batches_sent == 1
    assert isinstance(good1, JobDone), good1
    assert isinstance(good2, JobDone), good2
    assert good1.result == good2.result
    for failed in (garbage, truncated):
        assert isinstance(failed, JobFailed), failed
        assert failed.code is ErrorCode.INVALID_IMAGE


# Queue positions, cancel, back-pressure ---------------------------------------------------------


async def test_queue_positions_are_one_based_and_count_down(make_pool: PoolFactory,
                                                           gate_path: str) -> None:
    pool = await make_pool(max_batch_size=1)
    with gate_closed(gate_path):
        held = await hold(pool)
        a, b, c = submit(pool), submit(pool), submit(pool)
    for job in (held, a, b, c):
        assert isinstance(await job.outcome(), JobDone)
    tail = ["Dispatched", "decoding", "inference", "JobDone"]
    assert a.kinds() == [("queued", 1), *tail]
    assert b.kinds() == [("queued", 2), ("queued", 1), *tail]
    assert c.kinds() == [("queued", 3), ("queued", 2), ("queued", 1), *tail]


async def test_cancelling_a_queued_job_removes_it_and_renumbers(make_pool: PoolFactory,
                                                               gate_path: str) -> None:
    pool = await make_pool(max_batch_size=4)
    with gate_closed(gate_path):
        held = await hold(pool)
        a, b, c, d = submit(pool), submit(pool), submit(pool), submit(pool)
        assert [await job.next() for job in (a, b, c, d)] == [Queued(n) for n in range(1, 5)]
        b.ticket.cancel()
        assert pool.depth == 3
        assert await c.next() == Queued(2)
        assert await d.next() == Queued(3)
        a.ticket.cancel()
        a.ticket.cancel()  # idempotent
        assert pool.depth == 2
        assert await c.next() == Queued(1)
        assert await d.next() == Queued(2)
        assert c.kinds() == [("queued", 3), ("queued", 2), ("queued", 1)]
        assert d.kinds() == [("queued", 4), ("queued", 3), ("queued", 2)]
    assert isinstance(await held.outcome(), JobDone)
    assert isinstance(await c.outcome(), JobDone)
    assert isinstance(await d.outcome(), JobDone)
    assert a.ticket.finished
    assert b.ticket.finished
    assert pool.batches_sent == 2  # the gate job, then c and d together


async def test_submit_answers_busy_when_the_queue_is_full(make_pool: PoolFactory,
                                                          gate_path: str) -> None:
    pool = await make_pool(max_queue=2)
    with gate_closed(gate_path):
        held = await hold(pool)  # running, so not counted against the queue
        first, second = submit(pool), submit(pool)
        with pytest.raises(ProtocolError) as caught:
            submit(pool)
        assert caught.value.code is ErrorCode.BUSY
        assert caught.value.retry_after_ms is not None
        assert caught.value.retry_after_ms > 0
        second.ticket.cancel()
        third = submit(pool)  # room again
    for job in (held, first, third):
        assert isinstance(await job.outcome(), JobDone)


# Worker deaths ---------------------------------------------------------------------------------


async def test_a_whole_image_runs_before_tiles_queued_ahead_of_it(
        make_pool: PoolFactory, gate_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another client's image does not wait behind a tiled analysis's queued tiles (the
    batching policy ranks a tile by its index; the pool must tell it)."""
    dispatched: list[str] = []
    put = Ticket.put

    def recording_put(ticket: Ticket, event: JobEvent) -> None:
        if isinstance(event, Dispatched):
            dispatched.append(ticket.job.job_id)
        put(ticket, event)

    monkeypatch.setattr(Ticket, "put", recording_put)
    pool = await make_pool(max_batch_size=1)
    with gate_closed(gate_path):
        held = await hold(pool)
        tiles = [Events(pool.submit("colors", {"colors": 3}, inline(), MAX_PIXELS,
                                    job_id=f"huge/t{index}",
                                    tile=TileSpec("gone", (0, 0, 8, 8), (16, 16), index)))
                 for index in (3, 4, 5)]
        whole = Events(pool.submit("colors", {"colors": 3}, inline(), MAX_PIXELS,
                                   job_id="victim"))
    assert isinstance(await whole.outcome(), JobDone)
    for tile in tiles:
        await tile.outcome()  # (their pixels are gone: how they end does not matter here)
    assert dispatched[1:] == ["victim", "huge/t3", "huge/t4", "huge/t5"]
    assert held.ticket.finished


async def test_a_killed_worker_is_replaced_and_its_job_retried(make_pool: PoolFactory,
                                                               gate_path: str) -> None:
    pool = await make_pool()
    with gate_closed(gate_path):
        held = await hold(pool)
        behind = submit(pool)
        (old_pid,) = pool.worker_pids
        os.kill(old_pid, signal.SIGKILL)
        # The replacement takes the job again and is stuck at the gate in turn.
        await held.until(is_dispatched)
        await held.until(stage(Stage.DECODING))
        (new_pid,) = pool.worker_pids
        assert new_pid != old_pid
        assert process_gone(old_pid)
    done = await held.outcome()
    assert isinstance(done, JobDone), done
    assert held.kinds() == [("queued", 1), "Dispatched", "decoding",
                            "Dispatched", "decoding", "inference", "JobDone"]
    # The retried job went back to the head of the queue, ahead of the one behind it.
    assert isinstance(await behind.outcome(), JobDone)
    assert behind.kinds()[:3] == [("queued", 1), ("queued", 2), ("queued", 1)]


async def test_a_job_whose_worker_dies_twice_fails_internal(make_pool: PoolFactory,
                                                            gate_path: str) -> None:
    pool = await make_pool()
    with gate_closed(gate_path):
        held = await hold(pool)
        os.kill(pool.worker_pids[0], signal.SIGKILL)
        await held.until(is_dispatched)
        await held.until(stage(Stage.DECODING))
        os.kill(pool.worker_pids[0], signal.SIGKILL)
        failed = await held.outcome()
    assert isinstance(failed, JobFailed), failed
    assert failed.code is ErrorCode.INTERNAL
    # The pool carries on with a third worker.
    after = submit(pool)
    assert isinstance(await after.outcome(), JobDone)
    assert pool.startup_error is None


async def test_a_task_placed_on_one_worker_runs_only_there_while_others_run_the_rest(
        make_pool: PoolFactory, gate_path: str) -> None:
    pool = await make_pool(workers=2, placement={"gate": 1}, ready=False)
    assert pool.unserved_tasks == ["colors", "gate"]  # nothing loaded yet
    async with asyncio.timeout(WAIT_S):
        await pool.wait_ready()
    assert pool.unserved_tasks == []
    assert sorted(pool.worker_tasks) == [["colors"], ["colors", "gate"]]
    with gate_closed(gate_path):
        held = await hold(pool)  # on the one worker that loaded gate
        second_gate = submit(pool, "gate", options={})
        assert await second_gate.next() == Queued(1)
        colors = submit(pool)
        assert isinstance(await colors.outcome(), JobDone)  # the other worker ran it meanwhile
        assert pool.depth == 1  # the gate job waits for its own worker, idle one or not
    assert isinstance(await held.outcome(), JobDone)
    assert isinstance(await second_gate.outcome(), JobDone)


# Shutdown and startup failures -----------------------------------------------------------------


async def test_a_worker_sent_sigterm_finishes_its_batch_and_stays(make_pool: PoolFactory,
                                                                  gate_path: str) -> None:
    metrics = Metrics()
    pool = await make_pool(metrics=metrics)
    with gate_closed(gate_path):
        held = await hold(pool)
        (pid,) = pool.worker_pids
        os.kill(pid, signal.SIGTERM)  # as a service manager signals the whole process group
        behind = submit(pool)
        assert await behind.next() == Queued(1)
    assert isinstance(await held.outcome(), JobDone)
    assert held.kinds().count("Dispatched") == 1  # not killed mid-job and run again
    assert isinstance(await behind.outcome(), JobDone)
    assert pool.worker_pids == [pid]
    assert metrics.registry.get_sample_value(
        "pixelstream_worker_restarts_total", {"reason": "died"}) is None


async def test_no_worker_is_replaced_once_stopping_began(make_pool: PoolFactory,
                                                         gate_path: str) -> None:
    metrics = Metrics()
    pool = await make_pool(metrics=metrics)
    with gate_closed(gate_path):
        held = await hold(pool)
        (pid,) = pool.worker_pids
        stopping = asyncio.create_task(pool.stop(grace_s=WAIT_S))
        await asyncio.sleep(0)  # one turn of the loop: stop() has begun, up to its first wait
        os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(WAIT_S):
            await stopping
    failed = await held.outcome()
    assert isinstance(failed, JobFailed)
    assert failed.code is ErrorCode.BUSY
    assert pool.worker_pids == []
    assert metrics.registry.get_sample_value(
        "pixelstream_worker_restarts_total", {"reason": "died"}) is None



async def test_stop_fails_queued_jobs_and_kills_stuck_workers(make_pool: PoolFactory,
                                                              gate_path: str) -> None:
    pool = await make_pool(max_batch_size=1)
    with gate_closed(gate_path):
        held = await hold(pool)
        queued = [submit(pool), submit(pool)]
        pids = pool.worker_pids
        started = time.monotonic()
        async with asyncio.timeout(WAIT_S):
            await pool.stop(grace_s=0.5)
        elapsed = time.monotonic() - started
        assert elapsed < 0.5 + 5  # the grace period, then a kill
        assert pool.worker_pids == []
        assert all(process_gone(pid) for pid in pids)
        for job in queued:
            failed = await job.outcome()
            assert isinstance(failed, JobFailed), failed
            assert failed.code is ErrorCode.BUSY
        # The job the killed worker held is answered too, not left hanging.
        failed = await held.outcome()
        assert isinstance(failed, JobFailed), failed
        assert failed.code is ErrorCode.BUSY


async def test_stop_terminates_every_worker(make_pool: PoolFactory, gate_path: str) -> None:
    pool = await make_pool(workers=2, max_batch_size=1)
    with gate_closed(gate_path):
        first = await hold(pool)
        second = await hold(pool)
        pids = pool.worker_pids
        assert len(pids) == 2
        async with asyncio.timeout(WAIT_S):
            await pool.stop(grace_s=0.5)
        assert all(process_gone(pid) for pid in pids)
        for job in (first, second):
            assert isinstance(await job.outcome(), JobFailed)


async def test_stop_lets_idle_workers_exit(make_pool: PoolFactory) -> None:
    pool = await make_pool(workers=2)
    assert isinstance(await submit(pool).outcome(), JobDone)
    pids = pool.worker_pids
    started = time.monotonic()
    async with asyncio.timeout(WAIT_S):
        await pool.stop(grace_s=10)
    assert time.monotonic() - started < 10  # they left on Shutdown, not by the kill
    assert all(process_gone(pid) for pid in pids)


async def test_a_worker_that_cannot_load_its_model_fails_jobs_internal(
    make_pool: PoolFactory,
) -> None:
    pool = await make_pool(tasks=(BrokenTask(),), ready=False)
    early = submit(pool, "broken", options={})  # queued before the worker gives up
    with pytest.raises(RuntimeError, match="exited while loading"):
        async with asyncio.timeout(WAIT_S):
            await pool.wait_ready()
    assert pool.startup_error is not None
    assert not pool.ready
    failed = await early.outcome()
    assert isinstance(failed, JobFailed), failed
    assert failed.code is ErrorCode.INTERNAL
    with pytest.raises(ProtocolError) as caught:
        submit(pool, "broken", options={})
    assert caught.value.code is ErrorCode.INTERNAL
