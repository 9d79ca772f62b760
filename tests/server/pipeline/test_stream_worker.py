"""``pixelstream worker``'s consumer, in this process against the test Redis: it batches by
the shared policy with per-task limits, and runs a tiled analysis's tile jobs."""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis as redis_sync
from PIL import Image

from server.pipeline.jobs import Job, JobDone, JobFailed, TileSpec, TilesPlanned
from server.pipeline.redis_queue import decode_event, encode_job
from server.pipeline.stream_worker import (
    MAX_DELIVERIES,
    StreamWorker,
    StreamWorkerConfig,
    ensure_groups_sync,
)
from server.pipeline.worker import load_tasks
from server.runtime.batching import BatchLimits
from server.storage import keys
from server.storage.base import ImageRef
from server.tasks.contract import Task
from tests.support.sample_tasks import MeanBrightness, Spots

REDIS_URL = os.environ.get("PIXELSTREAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
"""A database of the test Redis that only tests use (each test flushes it first)."""
MAX_PIXELS = 1_000_000


def spots_png(width: int, height: int, spots: list[list[int]]) -> bytes:
    pixels = np.zeros((height, width, 3), np.uint8)
    for x0, y0, x1, y1 in spots:
        pixels[y0:y1, x0:x1] = 255
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def redis() -> Iterator[redis_sync.Redis]:
    client = redis_sync.Redis.from_url(REDIS_URL)
    client.flushdb()
    ensure_groups_sync(client, ["spots", "mean"])
    yield client
    client.flushdb()
    client.close()


def make_worker(redis: redis_sync.Redis, *, tasks: tuple[Task, ...] | None = None,
                name: str = "test-worker", **config: Any) -> StreamWorker:
    tasks = tasks or (Spots(), MeanBrightness())
    worker = StreamWorker(StreamWorkerConfig(redis_url=REDIS_URL, tasks=tasks, **config),
                          {task.name: task for task in tasks}, redis=redis, name=name)
    for task in tasks:
        task.setup("cpu")
    return worker


def enqueue(redis: redis_sync.Redis, job: Job) -> None:
    body, data = encode_job(job)
    redis.xadd(keys.task_jobs(job.task),
               {"job": body, "data": data, "seq": 0, "enqueued": time.time(), "rank": job.rank})


def outcome(redis: redis_sync.Redis, job_id: str) -> Any:
    raw = redis.get(keys.job_outcome(job_id))
    assert raw is not None, job_id
    return decode_event(job_id, raw)


def test_jobs_run_in_batches_by_the_shared_policy_with_per_task_limits(
        redis: redis_sync.Redis) -> None:
    worker = make_worker(redis, max_batch_size=4, max_wait_ms=0,
                         per_task={"spots": BatchLimits(2, 0.0)})
    image = spots_png(40, 30, [[1, 1, 4, 4]])
    order = ["spots", "mean", "spots", "spots", "mean", "mean"]
    for index, task in enumerate(order):
        enqueue(redis, Job(f"j{index}", task, {}, ImageRef(len(image), data=image), MAX_PIXELS))
    # The oldest job's task first, up to its own limit; other tasks wait their turn.
    assert [worker.step() for _ in range(4)] == [2, 3, 1, 0]
    spots = [outcome(redis, f"j{index}") for index in (0, 2, 3)]
    assert all(isinstance(event, JobDone) for event in spots)
    assert [len(event.result["batch"]) for event in spots] == [2, 2, 1]
    assert isinstance(outcome(redis, "j4"), JobDone)
    # Every job acknowledged and removed.
    assert redis.xlen(keys.task_jobs("spots")) == redis.xlen(keys.task_jobs("mean")) == 0


def test_a_large_image_plans_tiles_and_its_tile_jobs_run_on_the_worker(
        redis: redis_sync.Redis) -> None:
    worker = make_worker(redis, max_batch_size=8, max_wait_ms=0)
    image = spots_png(150, 100, [[100, 60, 110, 70]])
    redis.set("image:big", image)
    ref = ImageRef(len(image), key="image:big")
    enqueue(redis, Job("big", "spots", {"tiles": True}, ref, MAX_PIXELS))
    assert worker.step() == 1
    planned = outcome(redis, "big")
    assert isinstance(planned, TilesPlanned)
    assert planned.original == (150, 100)
    assert planned.parent.image.key == "image:big"
    for index, box in enumerate(planned.boxes):
        tile = TileSpec(planned.pixels, box, planned.original, index)
        enqueue(redis, Job(f"big/t{index}", "spots", {"tiles": True}, ref, MAX_PIXELS, tile))
    assert worker.step() == len(planned.boxes)
    found = [box for index in range(len(planned.boxes))
             for box in outcome(redis, f"big/t{index}").result["spots"]]
    assert [100.0, 60.0, 110.0, 70.0] in found  # in original pixels
    assert worker.pixels.decodes == 0  # the tiles read the planned decode, never decoding again
    worker.pixels.close()


def test_a_whole_image_runs_before_tiles_read_ahead_of_it(redis: redis_sync.Redis) -> None:
    """The worker tells the batching policy each job's rank from its stream entry: tiles of
    another analysis queued first yield to a whole image."""
    worker = make_worker(redis, tasks=(MeanBrightness(),), max_batch_size=1, max_wait_ms=0)
    image = spots_png(40, 30, [[1, 1, 4, 4]])
    ref = ImageRef(len(image), data=image)
    for index in (4, 5):
        enqueue(redis, Job(f"huge/t{index}", "mean", {}, ref, MAX_PIXELS,
                           TileSpec("gone", (0, 0, 8, 8), (40, 30), index)))
    enqueue(redis, Job("victim", "mean", {}, ref, MAX_PIXELS))
    worker._take_in(worker._read(3, None))  # all three in hand, as under load
    assert worker.step() == 1
    assert isinstance(outcome(redis, "victim"), JobDone)
    assert redis.get(keys.job_outcome("huge/t4")) is None


def pending_of(redis: redis_sync.Redis, task: str) -> dict[str, int]:
    """Per consumer, the jobs of ``task`` it holds unacknowledged."""
    pending: Any = redis.xpending(keys.task_jobs(task), keys.JOBS_GROUP)
    return {c["name"].decode(): c["pending"] for c in pending["consumers"] or []}


def test_a_worker_reads_only_the_streams_of_the_tasks_it_serves(
        redis: redis_sync.Redis) -> None:
    spots_worker = make_worker(redis, tasks=(Spots(),), name="spots-worker", max_wait_ms=0)
    mean_worker = make_worker(redis, tasks=(MeanBrightness(),), name="mean-worker",
                              max_wait_ms=0)
    image = spots_png(40, 30, [[1, 1, 4, 4]])
    order = ["mean", "spots", "mean", "spots", "mean"]
    for index, task in enumerate(order):
        enqueue(redis, Job(f"j{index}", task, {}, ImageRef(len(image), data=image), MAX_PIXELS))
    assert spots_worker.step() == 2
    assert spots_worker.step() == 0  # nothing more of its own; the mean jobs are not its
    assert redis.get(keys.task_jobs_taken("mean")) is None
    assert redis.xlen(keys.task_jobs("mean")) == 3
    assert all(redis.get(keys.job_outcome(f"j{i}")) is None for i in (0, 2, 4))
    assert mean_worker.step() == 3
    assert all(isinstance(outcome(redis, f"j{i}"), JobDone) for i in range(5))
    assert redis.get(keys.task_jobs_taken("spots")) == b"2"
    assert redis.get(keys.task_jobs_taken("mean")) == b"3"


def test_a_dead_workers_jobs_are_claimed_only_by_a_worker_serving_their_task(
        redis: redis_sync.Redis) -> None:
    image = spots_png(40, 30, [[1, 1, 4, 4]])
    for index, task in enumerate(["spots", "mean", "mean"]):
        enqueue(redis, Job(f"j{index}", task, {}, ImageRef(len(image), data=image), MAX_PIXELS))
    dead = make_worker(redis, name="dead")
    assert len(dead._read(4, None)) == 3  # read, then killed before running them
    # claim_idle_ms=0: held jobs count as abandoned at once (no waiting in a test).
    mean_worker = make_worker(redis, tasks=(MeanBrightness(),), name="mean-worker",
                              claim_idle_ms=0)
    assert mean_worker.step() == 2
    assert pending_of(redis, "spots") == {"dead": 1}
    assert redis.get(keys.job_outcome("j0")) is None
    spots_worker = make_worker(redis, tasks=(Spots(),), name="spots-worker", claim_idle_ms=0)
    assert spots_worker.step() == 1
    assert [type(outcome(redis, f"j{i}")) for i in range(3)] == [JobDone] * 3
    assert pending_of(redis, "spots") == pending_of(redis, "mean") == {}


def test_a_job_delivered_too_often_fails_instead_of_running_again(
        redis: redis_sync.Redis) -> None:
    image = spots_png(40, 30, [[1, 1, 4, 4]])
    enqueue(redis, Job("doomed", "mean", {}, ImageRef(len(image), data=image), MAX_PIXELS))
    holders = [make_worker(redis, name=f"w{n}", claim_idle_ms=0) for n in range(MAX_DELIVERIES)]
    assert len(holders[0]._read(4, None)) == 1
    for holder in holders[1:]:  # each claims it from the one before, and dies too
        assert len(holder._claim_stale()) == 1
    assert make_worker(redis, name="last", claim_idle_ms=0).step() == 1
    failed = outcome(redis, "doomed")
    assert isinstance(failed, JobFailed)
    assert failed.code.value == "internal"
    assert redis.xlen(keys.task_jobs("mean")) == 0


def test_a_tasks_file_placement_loads_a_task_on_that_many_of_the_machines_workers(
        redis: redis_sync.Redis) -> None:
    spots, mean = Spots(), MeanBrightness()
    config = StreamWorkerConfig(redis_url=REDIS_URL, tasks=(spots, mean), device="cpu",
                                placement={"mean": 1})
    assert [t.name for t in config.worker_config(0).tasks] == ["spots", "mean"]
    second = load_tasks(config.worker_config(1))
    assert list(second) == ["spots"]
    assert mean.device is None  # never set up by the worker it is not placed on
    worker = StreamWorker(config, second, redis=redis)
    assert worker.streams == {keys.task_jobs("spots"): "spots"}


def test_jobs_held_behind_another_tasks_batch_stay_this_workers_unless_claimed_away(
        redis: redis_sync.Redis) -> None:
    image = spots_png(40, 30, [[1, 1, 4, 4]])
    for index, task in enumerate(["spots", "mean", "mean", "mean"]):
        enqueue(redis, Job(f"j{index}", task, {}, ImageRef(len(image), data=image), MAX_PIXELS))
    # claim_idle_ms=0: every held job is due to be kept at each step.
    holder = make_worker(redis, name="holder", max_wait_ms=0, claim_idle_ms=0)
    holder._last_claim = math.inf  # it claims nothing itself here
    assert holder.step() == 1  # spots ran; the mean jobs wait in its hands
    assert pending_of(redis, "mean") == {"holder": 3}
    holder._keep_held()
    details: Any = redis.xpending_range(keys.task_jobs("mean"), keys.JOBS_GROUP, "-", "+", 10)
    assert [(d["consumer"], d["times_delivered"]) for d in details] == [(b"holder", 1)] * 3
    # Another worker takes two of them over (as if the holder had stalled past claim_idle_ms).
    ids = [d["message_id"] for d in details]
    redis.xclaim(keys.task_jobs("mean"), keys.JOBS_GROUP, "other", 0, ids[:2])
    assert holder.step() == 1  # the one still its own; the others are left to "other"
    assert redis.get(keys.job_outcome("j3")) is not None
    assert redis.get(keys.job_outcome("j1")) is None
    assert pending_of(redis, "mean") == {"other": 2}


def test_jobs_held_when_redis_restarted_empty_are_dropped_and_the_groups_made_again(
        redis: redis_sync.Redis) -> None:
    image = spots_png(40, 30, [[1, 1, 4, 4]])
    for index, task in enumerate(["spots", "mean"]):
        enqueue(redis, Job(f"j{index}", task, {}, ImageRef(len(image), data=image), MAX_PIXELS))
    holder = make_worker(redis, name="holder", max_wait_ms=0, claim_idle_ms=0)
    holder._last_claim = math.inf
    assert holder.step() == 1  # the mean job waits in its hands
    redis.flushdb()  # as a restart without persistence leaves it
    holder._keep_held()
    assert holder.step() == 0  # nothing held, nothing new (the job went with Redis)
    assert redis.xinfo_groups(keys.task_jobs("mean"))[0]["name"] == keys.JOBS_GROUP.encode()
