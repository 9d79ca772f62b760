"""The shared job queue's gateway side against the test Redis: one stream per task, queue
positions per task, and a job of a task that no live worker serves refused at once."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from redis import asyncio as aioredis

from chunking.errors import ErrorCode, ProtocolError
from server.metrics import Metrics
from server.pipeline.jobs import JobEvent, Queued, Ticket, TileSpec
from server.pipeline.redis_queue import RedisJobQueue, heartbeat, live_workers
from server.storage import keys
from server.storage.base import ImageRef
from tests.conftest import WAIT_S

REDIS_URL = os.environ.get("PIXELSTREAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
"""A database of the test Redis that only tests use (each test flushes it first)."""
IMAGE = ImageRef(size=3, data=b"png")


@pytest.fixture
async def redis() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


@pytest.fixture
async def queue(redis: aioredis.Redis) -> AsyncIterator[RedisJobQueue]:
    made = RedisJobQueue(redis, max_queue=8, metrics=Metrics(), tasks=["spots", "mean"])
    await made.start()
    yield made
    await made.stop()


async def beat(redis: aioredis.Redis, name: str, *tasks: str) -> None:
    """A heartbeat as a worker serving ``tasks`` sends it."""
    await redis.hset(keys.WORKERS, name, heartbeat(tasks, time.time()))


async def next_event(ticket: Ticket) -> JobEvent:
    async with asyncio.timeout(WAIT_S):
        return await anext(aiter(ticket))


async def withdrawals() -> None:
    """Wait for the withdrawals that cancelled tickets started."""
    await asyncio.gather(*[task for task in asyncio.all_tasks()
                           if task.get_name() == "queue-withdraw"])


async def entries(redis: aioredis.Redis, task: str) -> list[dict[str, Any]]:
    """The jobs in ``task``'s stream, as their JSON."""
    stream: Any = await redis.xrange(keys.task_jobs(task))
    return [orjson.loads(fields[b"job"]) for _, fields in stream]


async def test_a_job_goes_to_its_tasks_stream_and_positions_count_per_task(
        queue: RedisJobQueue, redis: aioredis.Redis) -> None:
    await beat(redis, "w1", "spots", "mean")
    async with asyncio.timeout(WAIT_S):
        await queue.wait_served("mean")
    spots = [queue.submit("spots", {}, IMAGE, 100) for _ in range(2)]
    mean = queue.submit("mean", {}, IMAGE, 100)
    assert [await next_event(t) for t in (*spots, mean)] == [Queued(1), Queued(2), Queued(1)]
    assert [job["job_id"] for job in await entries(redis, "spots")] == [
        t.job.job_id for t in spots]
    assert [job["job_id"] for job in await entries(redis, "mean")] == [mean.job.job_id]
    # A worker takes the first spots job: only the second moves up.
    await redis.incr(keys.task_jobs_taken("spots"))
    assert await next_event(spots[1]) == Queued(1)
    assert (queue.depth_of("spots"), queue.depth_of("mean"), queue.depth) == (1, 1, 2)
    metrics = queue._metrics.render().decode()
    assert 'pixelstream_task_queue_depth{task="spots"} 1.0' in metrics
    assert 'pixelstream_task_workers_ready{task="mean"} 1.0' in metrics


async def test_a_job_of_a_task_no_live_worker_serves_is_refused_busy_naming_it(
        queue: RedisJobQueue, redis: aioredis.Redis) -> None:
    await beat(redis, "spots-only", "spots")
    await redis.hset(keys.WORKERS, "stale", heartbeat(["mean"], time.time() - 60))
    async with asyncio.timeout(WAIT_S):
        await queue.wait_served("spots")
    assert queue.unserved_tasks == ["mean"]
    with pytest.raises(ProtocolError) as refused:
        queue.submit("mean", {}, IMAGE, 100)
    assert refused.value.code is ErrorCode.BUSY
    assert "'mean'" in refused.value.message
    assert refused.value.retry_after_ms is not None
    assert refused.value.retry_after_ms > 0
    assert await entries(redis, "mean") == []  # nothing waits in a stream no worker reads
    served = queue.submit("spots", {}, IMAGE, 100)
    assert await next_event(served) == Queued(1)


async def test_tiles_go_to_their_tasks_stream(queue: RedisJobQueue,
                                              redis: aioredis.Redis) -> None:
    await beat(redis, "w1", "spots")
    async with asyncio.timeout(WAIT_S):
        await queue.wait_served("spots")
    tile = TileSpec("pixels-1", (0, 0, 64, 64), (128, 64), 3)
    ticket = queue.submit("spots", {"tiles": True}, IMAGE, 100, job_id="big/t3", tile=tile)
    await next_event(ticket)
    (queued,) = await entries(redis, "spots")
    assert (queued["job_id"], queued["tile"]["box"]) == ("big/t3", [0, 0, 64, 64])
    assert await entries(redis, "mean") == []
    # The tile's rank, for the workers' batching policy, readable without decoding the job.
    ((_, fields),) = await redis.xrange(keys.task_jobs("spots"))
    assert fields[b"rank"] == b"3"


async def test_a_cancelled_job_leaves_its_tasks_stream_and_counts_as_taken(
        queue: RedisJobQueue, redis: aioredis.Redis) -> None:
    await beat(redis, "w1", "spots", "mean")
    async with asyncio.timeout(WAIT_S):
        await queue.wait_served("spots")
    first, second = (queue.submit("mean", {}, IMAGE, 100) for _ in range(2))
    assert [await next_event(t) for t in (first, second)] == [Queued(1), Queued(2)]
    first.cancel()
    await withdrawals()
    assert [job["job_id"] for job in await entries(redis, "mean")] == [second.job.job_id]
    assert await redis.get(keys.task_jobs_taken("mean")) == b"1"
    assert await redis.get(keys.task_jobs_taken("spots")) is None
    assert await next_event(second) == Queued(1)


def test_live_workers_counts_the_workers_of_each_task_that_beat_lately() -> None:
    now = 1000.0
    beats = {b"a": heartbeat(["spots", "mean"], now - 1), b"b": heartbeat(["mean"], now),
             b"gone": heartbeat(["spots"], now - keys.WORKER_STALE_S),
             b"garbled": b"1000.0"}
    assert live_workers(beats, now) == (2, {"spots": 1, "mean": 2})
