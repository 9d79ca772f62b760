"""The shared job queue, gateway side: jobs go into a Redis stream per task, events come back
on the gateway's own stream.

A job is one entry of its task's stream (``keys.task_jobs``), read by a consumer group of the
workers that serve the task (:mod:`server.pipeline.stream_worker`); a worker that dies holding
one loses nothing, as another worker serving the task claims it after ``claim_idle_ms``
(XAUTOCLAIM). Workers' heartbeats name the tasks they serve: a job of a task that no live
worker serves is refused ``busy`` at once rather than left waiting in its stream.

Events for a job go to the gateway named by ``keys.job_reply(job_id)``, which a gateway
re-points at itself when a client resumes there; the final event is also kept under
``keys.job_outcome`` so it is never missed. A job run twice still yields one outcome: a
Ticket takes the first.

Queue positions are real across gateways, per task: each job takes a sequence number from
its task's ``keys.task_jobs_added`` as it is queued, workers count what they take in
``keys.task_jobs_taken``, and a job's position is its number minus the taken count, sampled
a few times a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any

import orjson
from redis import asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from chunking.errors import ErrorCode, ProtocolError
from chunking.messages import Stage
from server.metrics import Metrics
from server.pipeline.jobs import (
    Dispatched,
    Job,
    JobDone,
    JobEvent,
    JobFailed,
    Queued,
    StageReached,
    Ticket,
    TileSpec,
    TilesPlanned,
)
from server.storage import keys
from server.storage.base import ImageRef

log = logging.getLogger("pixelstream.queue")

SAMPLE_INTERVAL_S = 0.25
"""How often queue depth, positions and worker heartbeats are read."""

_ENQUEUE = """
local generation = redis.call('GET', KEYS[5])
if not generation then
  generation = ARGV[6]
  redis.call('SET', KEYS[5], generation)
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[7], '0', 'MKSTREAM')
end
local seq = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
local id = redis.call('XADD', KEYS[2], '*', 'job', ARGV[1], 'data', ARGV[2], 'seq', seq,
                      'enqueued', ARGV[5], 'rank', ARGV[8])
return {seq, id, tonumber(redis.call('GET', KEYS[4]) or '0'), generation}
"""

_WITHDRAW = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('INCR', KEYS[2])
  return 1
end
return 0
"""


def _job_fields(job: Job) -> dict[str, Any]:
    image = {"size": job.image.size, "key": job.image.key}
    body: dict[str, Any] = {"job_id": job.job_id, "task": job.task, "options": job.options,
                            "max_pixels": job.max_pixels, "image": image}
    if job.tile is not None:
        body["tile"] = {"pixels": job.tile.pixels, "box": job.tile.box,
                        "original": job.tile.original, "index": job.tile.index}
    return body


def _job_from(fields: dict[str, Any], data: bytes) -> Job:
    image = fields["image"]
    tile = fields.get("tile")
    return Job(
        job_id=fields["job_id"], task=fields["task"], options=fields["options"],
        image=ImageRef(size=image["size"], key=image.get("key"), data=data or None),
        max_pixels=fields["max_pixels"],
        tile=None if tile is None else TileSpec(
            tile["pixels"], tuple(tile["box"]), tuple(tile["original"]), tile["index"]),
    )


def encode_job(job: Job) -> tuple[bytes, bytes]:
    """A job as stream fields: its JSON, and inline image bytes (frames) apart, unencoded."""
    return orjson.dumps(_job_fields(job)), job.image.data or b""


def decode_job(body: bytes, data: bytes) -> Job:
    return _job_from(orjson.loads(body), data)


def encode_event(event: JobEvent) -> bytes:
    if isinstance(event, StageReached):
        return orjson.dumps({"kind": "stage", "stage": event.stage.value})
    if isinstance(event, Dispatched):
        return orjson.dumps({"kind": "dispatched", "queue_ms": event.queue_ms})
    if isinstance(event, JobDone):
        return orjson.dumps({"kind": "done", "result": event.result, "image": event.image,
                             "timings_ms": event.timings_ms})
    if isinstance(event, JobFailed):
        return orjson.dumps({"kind": "failed", "code": event.code.value,
                             "message": event.message})
    if isinstance(event, TilesPlanned):
        return orjson.dumps({"kind": "tiles", "pixels": event.pixels, "boxes": event.boxes,
                             "original": event.original, "image": event.image,
                             "decode_ms": event.decode_ms, "parent": _job_fields(event.parent)})
    raise TypeError(f"not a worker event: {event!r}")


def decode_event(job_id: str, raw: bytes) -> JobEvent:
    fields = orjson.loads(raw)
    kind = fields["kind"]
    if kind == "stage":
        return StageReached([job_id], Stage(fields["stage"]))
    if kind == "dispatched":
        return Dispatched(queue_ms=fields["queue_ms"])
    if kind == "done":
        return JobDone(job_id, result=fields["result"], image=fields["image"],
                       timings_ms=fields["timings_ms"])
    if kind == "tiles":
        return TilesPlanned(job_id, fields["pixels"], [tuple(box) for box in fields["boxes"]],
                            tuple(fields["original"]), fields["image"], fields["decode_ms"],
                            _job_from(fields["parent"], b""))
    return JobFailed(job_id, ErrorCode(fields["code"]), fields["message"])


class _Followed:
    """A job this gateway follows: its ticket and, while queued, its sequence number (in its
    task's stream)."""

    __slots__ = ("entry_id", "generation", "position", "seq", "ticket")

    def __init__(self, ticket: Ticket) -> None:
        self.ticket = ticket
        self.generation: bytes | None = None
        self.seq: int | None = None
        self.entry_id: bytes | None = None
        self.position = 0


class RedisJobQueue:
    def __init__(self, redis: aioredis.Redis, *, max_queue: int,
                 metrics: Metrics | None = None, gateway_id: str | None = None,
                 tasks: Sequence[str] = ()) -> None:
        self._redis = redis
        self.max_queue = max_queue
        self._metrics = metrics or Metrics()
        self.gateway_id = gateway_id or secrets.token_hex(8)
        self._events_key = keys.gateway_events(self.gateway_id)
        self._followed: dict[str, _Followed] = {}
        self._background: list[asyncio.Task[None]] = []
        self._enqueue = redis.register_script(_ENQUEUE)
        self._withdraw = redis.register_script(_WITHDRAW)
        self.tasks: list[str] = list(dict.fromkeys(tasks))
        """The tasks this gateway offers (and any other it queued a job of): their streams'
        depths and workers are sampled."""
        self._depths: dict[str, int] = {}
        self._taken: dict[str, int] = {}
        self._serving: dict[str, int] = {}
        """Per task, the live workers that serve it (as last sampled)."""
        self._workers_ready = 0
        self._reachable = False
        self._ready_changed = asyncio.Event()
        self.startup_error: str | None = None

    # State ----------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Jobs waiting, every task's together (``max_queue`` bounds this)."""
        return sum(self._depths.values())

    def depth_of(self, task: str) -> int:
        """Jobs of ``task`` waiting."""
        return self._depths.get(task, 0)

    @property
    def workers_ready(self) -> int:
        return self._workers_ready if self._reachable else 0

    @property
    def ready(self) -> bool:
        return self.workers_ready > 0

    def workers_serving(self, task: str) -> int:
        """Live workers that serve ``task`` (0 while Redis is unreachable)."""
        return self._serving.get(task, 0) if self._reachable else 0

    @property
    def unserved_tasks(self) -> list[str]:
        """The tasks no live worker serves."""
        return [task for task in self.tasks if not self.workers_serving(task)]

    def check_served(self, task: str) -> None:
        """Raise ProtocolError(busy) when no live worker serves ``task``: its jobs would only
        wait in the stream. Not while Redis is unreachable (submitting says so itself)."""
        if self._reachable and not self._serving.get(task):
            raise ProtocolError(
                ErrorCode.BUSY, f"no inference worker serves the task '{task}' now; retry later",
                retry_after_ms=max(1000, self.retry_after_ms()))

    def retry_after_ms(self) -> int:
        return 250 + 50 * self.depth // max(1, self._workers_ready)

    async def wait_ready(self, workers: int = 1) -> None:
        """Wait until ``workers`` workers send heartbeats."""
        while self.workers_ready < workers:
            self._ready_changed.clear()
            await self._ready_changed.wait()

    async def wait_served(self, task: str, workers: int = 1) -> None:
        """Wait until ``workers`` live workers serve ``task``."""
        while self.workers_serving(task) < workers:
            self._ready_changed.clear()
            await self._ready_changed.wait()

    async def start(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await ensure_groups(self._redis, self.tasks)
        self._background = [
            asyncio.create_task(self._read_events(), name="queue-events"),
            asyncio.create_task(self._sample(), name="queue-sampler"),
        ]

    async def stop(self, grace_s: float = 10.0) -> None:
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for followed in list(self._followed.values()):
            followed.ticket.put(JobFailed(followed.ticket.job.job_id, ErrorCode.BUSY,
                                          "the server is shutting down"))
        self._followed.clear()

    # Jobs -------------------------------------------------------------------------------------

    def submit(self, task: str, options: dict[str, Any], image: ImageRef, max_pixels: int,
               *, job_id: str | None = None, tile: TileSpec | None = None) -> Ticket:
        if tile is None:  # a tile's image was admitted already: its tiles are never refused
            if self.depth >= self.max_queue:
                raise ProtocolError(ErrorCode.BUSY, "the inference queue is full",
                                    retry_after_ms=self.retry_after_ms())
            self.check_served(task)
        if task not in self.tasks:
            self.tasks.append(task)
        job = Job(job_id or secrets.token_hex(12), task, options, image, max_pixels, tile)
        followed = self._follow(job)
        self._in_background(self._send(followed), "queue-send")
        return followed.ticket

    def attach(self, job_id: str) -> Ticket:
        followed = self._follow(Job(job_id, "", {}, ImageRef(size=0), 0))
        self._in_background(self._redirect(followed), "queue-attach")
        return followed.ticket

    def _in_background(self, work: Any, name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._background.append(task)
        task.add_done_callback(self._background.remove)

    def _follow(self, job: Job) -> _Followed:
        followed = _Followed(Ticket(job, self._cancel))
        self._followed[job.job_id] = followed
        return followed

    async def _send(self, followed: _Followed) -> None:
        job = followed.ticket.job
        body, data = encode_job(job)
        try:
            seq, entry_id, taken, generation = await self._enqueue(
                keys=[keys.task_jobs_added(job.task), keys.task_jobs(job.task),
                      keys.job_reply(job.job_id), keys.task_jobs_taken(job.task),
                      keys.GENERATION],
                args=[body, data, self.gateway_id, keys.JOB_TTL_S, time.time(),
                      secrets.token_hex(8), keys.JOBS_GROUP, job.rank],
            )
        except (RedisError, OSError):
            self._finish(job.job_id, JobFailed(job.job_id, ErrorCode.BUSY,
                                               "the shared queue is unreachable; retry shortly"))
            return
        followed.seq, followed.entry_id, followed.generation = int(seq), entry_id, generation
        followed.position = max(1, int(seq) - int(taken))
        followed.ticket.put(Queued(followed.position))

    async def _redirect(self, followed: _Followed) -> None:
        """Route a job's events here, then pick up its outcome if it already came."""
        job_id = followed.ticket.job.job_id
        try:
            await self._redis.set(keys.job_reply(job_id), self.gateway_id, ex=keys.JOB_TTL_S)
            outcome: Any = await self._redis.get(keys.job_outcome(job_id))
            generation: Any = await self._redis.get(keys.GENERATION)
            followed.generation = generation
        except (RedisError, OSError):
            self._finish(job_id, JobFailed(job_id, ErrorCode.BUSY,
                                           "the shared queue is unreachable; retry shortly"))
            return
        if outcome is not None:
            self._finish(job_id, decode_event(job_id, outcome))

    def _cancel(self, ticket: Ticket) -> None:
        followed = self._followed.pop(ticket.job.job_id, None)
        if followed is not None and followed.entry_id is not None:
            self._in_background(self._withdraw_entry(ticket.job.task, followed.entry_id),
                                "queue-withdraw")

    async def _withdraw_entry(self, task: str, entry_id: bytes) -> None:
        # Not yet taken by a worker: it leaves the stream (and counts as taken, for
        # positions). Taken already: the worker runs it and the outcome is ignored.
        with contextlib.suppress(RedisError, OSError):
            await self._withdraw(keys=[keys.task_jobs(task), keys.task_jobs_taken(task)],
                                 args=[entry_id])

    def _finish(self, job_id: str, event: JobEvent) -> None:
        followed = self._followed.pop(job_id, None)
        if followed is not None:
            followed.ticket.put(event)

    # Background -------------------------------------------------------------------------------

    async def _read_events(self) -> None:
        last_id = b"$"
        while True:
            try:
                replies: Any = await self._redis.xread({self._events_key: last_id}, count=256,
                                                  block=1000)
            except (RedisError, OSError):
                await asyncio.sleep(0.5)  # Redis is away: try again shortly
                continue
            for _, entries in replies or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    self._on_event(fields[b"job"].decode(), fields[b"event"])
            if replies:
                with contextlib.suppress(RedisError, OSError):
                    await self._redis.xtrim(self._events_key, minid=last_id)

    def _on_event(self, job_id: str, raw: bytes) -> None:
        followed = self._followed.get(job_id)
        if followed is None:
            return
        event = decode_event(job_id, raw)
        if isinstance(event, (JobDone, JobFailed, TilesPlanned)):
            self._finish(job_id, event)
            return
        if isinstance(event, Dispatched):
            followed.seq = None  # left the queue: no more positions
        followed.ticket.put(event)

    async def _sample(self) -> None:
        while True:
            try:
                await self._sample_once()
                self._reachable = True
            except (RedisError, OSError):
                self._reachable = False
            await asyncio.sleep(SAMPLE_INTERVAL_S)

    async def _sample_once(self) -> None:
        tasks = list(self.tasks)
        async with self._redis.pipeline(transaction=False) as pipe:
            for task in tasks:
                pipe.get(keys.task_jobs_added(task))
                pipe.get(keys.task_jobs_taken(task))
            pipe.hgetall(keys.WORKERS)
            pipe.expire(self._events_key, keys.EVENTS_TTL_S)
            pipe.get(keys.GENERATION)
            replies: Any = await pipe.execute()
        counts, (workers, _, generation) = replies[:-3], replies[-3:]
        if generation is None:  # Redis is new or was restarted empty
            await ensure_groups(self._redis, tasks)
            await self._redis.set(keys.GENERATION, secrets.token_hex(8), nx=True)
            generation = await self._redis.get(keys.GENERATION)
        self._fail_lost(generation)
        for index, task in enumerate(tasks):
            added, taken = int(counts[2 * index] or 0), int(counts[2 * index + 1] or 0)
            self._taken[task] = taken
            self._depths[task] = max(0, added - taken)
            self._metrics.task_queue_depth.labels(task).set(self._depths[task])
        self._metrics.queue_depth.set(self.depth)
        ready, serving = live_workers(workers, time.time())
        changed = ready != self._workers_ready or serving != self._serving
        self._workers_ready, self._serving = ready, serving
        if changed:
            self._ready_changed.set()
        self._metrics.workers_ready.set(self._workers_ready)
        for task in tasks:
            self._metrics.task_workers_ready.labels(task).set(serving.get(task, 0))
        for followed in self._followed.values():
            if followed.seq is not None:
                taken = self._taken.get(followed.ticket.job.task, 0)
                position = max(1, followed.seq - taken)
                if position != followed.position:
                    followed.position = position
                    followed.ticket.put(Queued(position))

    def _fail_lost(self, generation: bytes) -> None:
        """Jobs queued in an earlier life of Redis (it restarted empty) are gone with it."""
        lost = [job_id for job_id, followed in self._followed.items()
                if followed.generation is not None and followed.generation != generation]
        if lost:
            log.error("the shared queue was reset (Redis restarted); failing %d jobs", len(lost))
        for job_id in lost:
            self._finish(job_id, JobFailed(job_id, ErrorCode.BUSY,
                                           "the shared queue was reset; send the image again"))


def heartbeat(tasks: Sequence[str], now: float) -> bytes:
    """A worker's entry in ``keys.WORKERS``: when it last beat, and the tasks it serves."""
    return orjson.dumps({"beat": now, "tasks": sorted(tasks)})


def live_workers(beats: dict[bytes, bytes], now: float) -> tuple[int, dict[str, int]]:
    """From ``keys.WORKERS``: how many workers beat lately, and per task how many of those
    serve it. An entry that does not parse counts for nothing."""
    ready = 0
    serving: dict[str, int] = {}
    for raw in beats.values():
        try:
            beat = orjson.loads(raw)
            if now - float(beat["beat"]) >= keys.WORKER_STALE_S:
                continue
            tasks = [str(task) for task in beat["tasks"]]
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        ready += 1
        for task in tasks:
            serving[task] = serving.get(task, 0) + 1
    return ready, serving


async def ensure_groups(redis: aioredis.Redis, tasks: Sequence[str]) -> None:
    """Create the workers' consumer group (and the stream) of each task unless they exist."""
    for task in tasks:
        try:
            await redis.xgroup_create(keys.task_jobs(task), keys.JOBS_GROUP, id="0",
                                      mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
