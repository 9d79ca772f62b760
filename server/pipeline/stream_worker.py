"""The inference worker for the shared queue: ``pixelstream worker``, on any machine.

Each worker process reads jobs from the Redis streams of the tasks it serves (one stream
per task, one XREADGROUP for them all) through their consumer groups, batches them by the
same policy as the in-process pool (:mod:`server.runtime.batching`), runs them with the same
:func:`~server.pipeline.worker.run_batch` as in-process workers, and
sends each event to the gateway that follows the job. It acknowledges a job only after its
outcome is published, so a worker killed mid-job loses nothing: another worker claims the
job once it has been idle ``claim_idle_ms`` (XAUTOCLAIM, on the same task's stream: only a
worker that serves the task) and runs it again; a job delivered ``MAX_DELIVERIES`` times
fails with ``internal`` instead of killing workers forever. Its heartbeat names the tasks it
serves, so gateways refuse at once a job that no worker would take.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import signal
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis as redis_sync
from redis.exceptions import RedisError, ResponseError

from chunking.errors import ErrorCode
from server.logs import configure_from_environment
from server.pipeline.jobs import (
    Batch,
    Dispatched,
    Job,
    JobDone,
    JobEvent,
    JobFailed,
    StageReached,
    TilesPlanned,
    WorkerEvent,
)
from server.pipeline.redis_queue import decode_job, encode_event, heartbeat
from server.pipeline.worker import WorkerConfig, load_tasks, run_batch
from server.runtime.batching import ArrivalGaps, BatchLimits, Limits, Waiting, next_batch
from server.runtime.pixels import PixelCache, attach_possible
from server.runtime.supervisor import Supervisor, ignore_stop_signals, on_stop_request
from server.storage import keys
from server.storage.base import ImageRef
from server.tasks.contract import Task
from server.tuning import tune_worker_malloc

log = logging.getLogger("pixelstream.stream_worker")

MAX_DELIVERIES = 3
"""A job handed out this many times (its workers kept dying) fails instead."""
HEARTBEAT_S = 2.0
BLOCK_MS = 1000

_KEEP_HELD = """
local kept = {}
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if pending[1] and pending[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept[#kept + 1] = ARGV[i]
  end
end
return kept
"""
"""Of the entries ARGV[3..] of stream KEYS[1], those consumer ARGV[2] of group ARGV[1] still
holds, their idle time reset (JUSTID: not counted as a delivery). Others were claimed away."""


@dataclass(frozen=True)
class StreamWorkerConfig:
    redis_url: str
    tasks: tuple[Task, ...]
    """The tasks this machine's workers serve (``pixelstream worker --task``; else all)."""
    torch_threads: int = 1
    device: str = "auto"
    devices: dict[str, str] | None = None
    max_batch_size: int = 4
    max_wait_ms: float = 5.0
    claim_idle_ms: int = 15000
    per_task: Mapping[str, BatchLimits] | None = None
    """Batch limits of tasks whose differ from ``max_batch_size``/``max_wait_ms``."""
    placement: dict[str, int] | None = None
    """Per task name, how many of this machine's workers load it (a tasks file's
    ``workers``; others: all), as in the in-process pool."""

    def worker_config(self, slot: int) -> WorkerConfig:
        """What the worker in ``slot`` (0, 1, ...) loads: the tasks placed on it."""
        return WorkerConfig(self.tasks, device=self.device, devices=self.devices,
                            placement=self.placement).for_slot(slot)

    @property
    def limits(self) -> Limits:
        return Limits(BatchLimits(self.max_batch_size, self.max_wait_ms / 1000),
                      dict(self.per_task or {}))


class Entry(NamedTuple):
    """A job as read from its task's stream."""

    stream: str
    entry_id: bytes
    fields: dict[bytes, bytes]


class StreamWorker:
    """One consumer of the job stream. :meth:`run` loops until :meth:`stop`."""

    def __init__(self, config: StreamWorkerConfig, analyzers: Mapping[str, Task],
                 redis: redis_sync.Redis | None = None, name: str | None = None) -> None:
        self.config = config
        self.analyzers = analyzers
        self.redis = redis or redis_sync.Redis.from_url(
            config.redis_url, socket_connect_timeout=2, socket_timeout=30)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self._stopping = threading.Event()
        self._last_claim = 0.0
        self.pixels = PixelCache()
        """Images decoded for tiled analyses, shared with this machine's other workers."""
        self.limits = config.limits
        self._waiting: list[tuple[Waiting, Entry]] = []
        """Jobs read from the stream that the batching policy has not run yet."""
        self._held_since: dict[tuple[str, bytes], float] = {}
        """When each waiting job was read or last kept (:meth:`_keep_held`)."""
        self._keep = self.redis.register_script(_KEEP_HELD)
        self._arrivals = ArrivalGaps()
        self.streams: dict[str, str] = {keys.task_jobs(task): task for task in analyzers}
        """The streams this worker reads (those of the tasks it serves), to their tasks."""

    @property
    def tasks(self) -> list[str]:
        """The tasks this worker serves (and loaded)."""
        return sorted(self.analyzers)

    def stop(self) -> None:
        self._stopping.set()

    # The loop ----------------------------------------------------------------------------------

    def run(self) -> None:
        heartbeat = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        heartbeat.start()
        while not self._stopping.is_set():
            try:
                self.step()
            except (RedisError, OSError) as exc:
                log.warning("the shared queue is unreachable (%s); retrying", exc)
                self._stopping.wait(1.0)
        if self._waiting:  # read already: run them rather than leave them to be claimed
            with contextlib.suppress(RedisError, OSError):
                self.process([entry for _, entry in self._waiting])
            self._waiting.clear()
            self._held_since.clear()
        with_suppressed(lambda: self.redis.hdel(keys.WORKERS, self.name))
        self.pixels.close()

    def step(self) -> int:
        """Run one batch: jobs claimed from dead workers first, else those the batching policy
        picks from the jobs read, reading more while it says to wait. The count run."""
        if not self.streams:  # placed on no task (a tasks file's ``workers``): nothing to read
            self._stopping.wait(BLOCK_MS / 1000)
            return 0
        entries = self._claim_stale()
        if entries:
            self.process(entries)
            return len(entries)
        self._keep_held()
        room = self.limits.largest_batch
        # Block for the first job; with jobs in hand, only top up with those already there.
        self._take_in(self._read(room - len(self._waiting),
                                 None if self._waiting else BLOCK_MS))
        while self._waiting and not self._stopping.is_set():
            waiting = [job for job, _ in self._waiting]
            batch = next_batch(waiting, time.monotonic(), self.limits, self._arrivals.average_s)
            if not batch.take and len(self._waiting) >= room:
                # Holding as many jobs as the largest batch, of other tasks: run the oldest's
                # rather than read more.
                batch = next_batch(waiting, math.inf, self.limits, None)
            if batch.take:
                chosen = set(batch.take)
                entries = [entry for i, (_, entry) in enumerate(self._waiting) if i in chosen]
                self._waiting = [item for i, item in enumerate(self._waiting) if i not in chosen]
                for entry in entries:
                    self._held_since.pop(entry[:2], None)
                self.process(entries)
                return len(entries)
            block_ms = max(1, math.ceil((batch.wait_s or 0.0) * 1000))
            self._take_in(self._read(room - len(self._waiting), block_ms))
        return 0

    def _take_in(self, entries: list[Entry]) -> None:
        for entry in entries:
            now = time.monotonic()
            self._arrivals.arrived(now)
            rank = int(entry.fields.get(b"rank", b"0"))  # read without decoding the job
            self._waiting.append((Waiting(self.streams[entry.stream], now, rank), entry))
            self._held_since[entry[:2]] = now

    def _keep_held(self) -> None:
        """Jobs read but waiting behind other tasks' batches (a read takes up to a batch from
        each stream) must not look abandoned: before they have been idle a third of
        ``claim_idle_ms``, reset their idle time, so no other worker claims (and runs again,
        counting a delivery) a job this one still means to run. One already claimed away
        (this worker was slower than ``claim_idle_ms``) is left to its new holder."""
        now = time.monotonic()
        due: dict[str, list[bytes]] = defaultdict(list)
        for _, entry in self._waiting:
            if now - self._held_since[entry[:2]] >= self.config.claim_idle_ms / 3000:
                due[entry.stream].append(entry.entry_id)
        if not due:
            return
        kept: set[tuple[str, bytes]] = set()
        for stream, ids in due.items():
            try:
                reply: Any = self._keep(keys=[stream], args=[keys.JOBS_GROUP, self.name, *ids])
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                ensure_groups_sync(self.redis, self.tasks)  # Redis restarted empty: all lost
                continue
            kept.update((stream, entry_id) for entry_id in reply)
        lost = {(stream, entry_id) for stream, ids in due.items() for entry_id in ids} - kept
        for held in kept:
            self._held_since[held] = now
        if lost:
            log.warning("%d job(s) this worker held were claimed by another", len(lost))
            self._waiting = [item for item in self._waiting if item[1][:2] not in lost]
            for held in lost:
                del self._held_since[held]

    def _read(self, count: int, block_ms: int | None) -> list[Entry]:
        """Up to ``count`` new jobs of each task, waiting up to ``block_ms`` for the first
        (None: not)."""
        if count <= 0:
            return []
        try:
            replies: Any = self.redis.xreadgroup(
                keys.JOBS_GROUP, self.name, dict.fromkeys(self.streams, ">"), count=count,
                block=block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            ensure_groups_sync(self.redis, self.tasks)  # Redis restarted empty
            return []
        entries = [Entry(stream.decode(), entry_id, fields)
                   for stream, batch in replies or [] for entry_id, fields in batch]
        # Oldest first across the streams, as the batching policy serves the oldest's task.
        entries.sort(key=lambda entry: float(entry.fields.get(b"enqueued", b"0")))
        if entries:
            pipe = self.redis.pipeline(transaction=False)
            for stream, batch in replies:
                pipe.incrby(keys.task_jobs_taken(self.streams[stream.decode()]), len(batch))
            pipe.execute()
        return entries

    def _claim_stale(self) -> list[Entry]:
        """Jobs of workers that died holding them, from the streams of the tasks this worker
        serves (checked once per claim interval)."""
        now = time.monotonic()
        if now - self._last_claim < self.config.claim_idle_ms / 2000:
            return []
        self._last_claim = now
        streams = list(self.streams)
        pipe = self.redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xautoclaim(stream, keys.JOBS_GROUP, self.name,
                            min_idle_time=self.config.claim_idle_ms, start_id="0-0",
                            count=self.config.max_batch_size)
        replies: Any = pipe.execute(raise_on_error=False)
        claimed: list[Entry] = []
        for stream, reply in zip(streams, replies, strict=True):
            if isinstance(reply, ResponseError):
                if "NOGROUP" not in str(reply):
                    raise reply
                ensure_groups_sync(self.redis, self.tasks)
                continue
            if isinstance(reply, Exception):
                raise reply
            claimed += [Entry(stream, entry_id, fields) for entry_id, fields in reply[1]
                        if fields]
        if claimed:
            log.warning("claimed %d job(s) from a worker that stopped answering", len(claimed))
        return claimed

    # Jobs ---------------------------------------------------------------------------------------

    def process(self, entries: Sequence[Entry]) -> None:
        by_task: dict[str, list[Job]] = defaultdict(list)
        for entry in entries:
            job = self._admit(entry)
            if job is not None:
                by_task[job.task].append(job)
        for jobs in by_task.values():
            for event in run_batch(self.analyzers, Batch(jobs), pixels=self.pixels):
                self.publish(event)
        done: dict[str, list[bytes]] = defaultdict(list)
        for entry in entries:
            done[entry.stream].append(entry.entry_id)
        pipe = self.redis.pipeline(transaction=False)
        for stream, ids in done.items():
            pipe.xack(stream, keys.JOBS_GROUP, *ids)
            pipe.xdel(stream, *ids)
        pipe.execute()

    def _admit(self, entry: Entry) -> Job | None:
        """The job of one entry with its image in memory, or None if it failed already."""
        fields = entry.fields
        job = decode_job(fields[b"job"], fields.get(b"data", b""))
        deliveries: Any = self.redis.xpending_range(
            entry.stream, keys.JOBS_GROUP, entry.entry_id, entry.entry_id, 1)
        if deliveries and deliveries[0]["times_delivered"] > MAX_DELIVERIES:
            self.publish(JobFailed(job.job_id, ErrorCode.INTERNAL,
                                   "the job stopped its workers repeatedly"))
            return None
        queue_ms = max(0.0, (time.time() - float(fields.get(b"enqueued", b"0"))) * 1000)
        self.publish_to(job.job_id, Dispatched(queue_ms=queue_ms))
        if job.tile is not None and (job.tile.pixels in self.pixels
                                     or attach_possible(job.tile.pixels)):
            return job  # its pixels are decoded on this machine: the upload is not needed
        if job.image.key is not None:
            data: Any = self.redis.get(job.image.key)
            if data is None:
                self.publish(JobFailed(job.job_id, ErrorCode.INTERNAL,
                                       "the image was released before it was analysed"))
                return None
            image = ImageRef(size=len(data), data=data, key=job.image.key)
            job = Job(job.job_id, job.task, job.options, image,
                      job.max_pixels, job.tile)
        return job

    def publish(self, event: WorkerEvent | JobEvent) -> None:
        if isinstance(event, StageReached):
            for job_id in event.job_ids:
                self.publish_to(job_id, StageReached([job_id], event.stage))
        elif isinstance(event, (JobDone, JobFailed, TilesPlanned)):
            self.publish_to(event.job_id, event)

    def publish_to(self, job_id: str, event: JobEvent) -> None:
        raw = encode_event(event)
        if isinstance(event, (JobDone, JobFailed, TilesPlanned)):
            # Kept first, so a gateway that moves the reply route after this still finds it.
            self.redis.set(keys.job_outcome(job_id), raw, ex=keys.JOB_TTL_S, nx=True)
        gateway: Any = self.redis.get(keys.job_reply(job_id))
        if gateway is not None:
            self.redis.xadd(keys.gateway_events(gateway.decode()), {"job": job_id, "event": raw},
                            maxlen=keys.EVENTS_MAXLEN, approximate=True)

    def _beat(self) -> None:
        while not self._stopping.is_set():
            with_suppressed(lambda: self.redis.hset(keys.WORKERS, self.name,
                                                    heartbeat(self.tasks, time.time())))
            self._stopping.wait(HEARTBEAT_S)


def with_suppressed(call: Callable[[], object]) -> None:
    with contextlib.suppress(RedisError, OSError):
        call()


def ensure_groups_sync(redis: redis_sync.Redis, tasks: Sequence[str]) -> None:
    """Create the workers' consumer group (and the stream) of each task unless they exist."""
    for task in tasks:
        try:
            redis.xgroup_create(keys.task_jobs(task), keys.JOBS_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


def stream_worker_main(config: StreamWorkerConfig, slot: int = 0) -> None:
    """Process entry point (``pixelstream worker`` runs one per ``--workers``, in slots 0,
    1, ...): loads the tasks placed on its slot, and runs until its
    :class:`~server.runtime.supervisor.Supervisor` asks it to stop."""
    ignore_stop_signals()
    configure_from_environment("stream-worker")  # --log-format, via the environment
    tune_worker_malloc()  # before the models load: see server.tuning
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(max(1, config.torch_threads))
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # decode() checks each header against the job's limit
    analyzers = load_tasks(config.worker_config(slot))
    worker = StreamWorker(config, analyzers)
    on_stop_request(worker.stop)
    with_suppressed(lambda: ensure_groups_sync(worker.redis, worker.tasks))
    log.info("worker %s ready, serving: %s", worker.name,
             ", ".join(worker.tasks) or "no task (none is placed on it)")
    worker.run()


def stream_supervisor(config: StreamWorkerConfig, count: int) -> Supervisor:
    return Supervisor(stream_worker_main, count, name="pixelstream-stream-worker",
                      args_for=lambda slot: (config, slot))


def spawn_worker(config: StreamWorkerConfig) -> Supervisor:
    """One stream worker, started, under a supervisor of its own that replaces nothing
    unless asked to :meth:`~Supervisor.watch` (tests stop it with ``stop``)."""
    supervisor = stream_supervisor(config, 1)
    supervisor.start()
    return supervisor


def supervise(config: StreamWorkerConfig, count: int, *, grace_s: float = 30.0) -> int:
    """``pixelstream worker``: run ``count`` worker processes, replacing any that die, until
    SIGTERM or SIGINT; then let each finish its batch (at most ``grace_s``)."""
    supervisor = stream_supervisor(config, count)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: supervisor.begin_stop())
    supervisor.start()
    while not supervisor.stopping:
        supervisor.watch(1.0)
    supervisor.stop(grace_s)
    return 0


class LocalStreamWorkers:
    """Stream workers started by a gateway (``serve`` with ``redis_url`` and ``workers`` > 0)."""

    def __init__(self, config: StreamWorkerConfig, count: int) -> None:
        self.config = config
        self.count = count
        self.supervisor = stream_supervisor(config, count)
        self._watcher: asyncio.Task[None] | None = None

    @property
    def processes(self) -> list[multiprocessing.process.BaseProcess]:
        return [p for p in self.supervisor.processes if p is not None]

    async def start(self) -> None:
        self.supervisor.start()
        if self.count:
            self._watcher = asyncio.create_task(self._watch(), name="stream-workers")

    async def _watch(self) -> None:
        while not self.supervisor.stopping:
            await asyncio.to_thread(self.supervisor.watch, 1.0)

    async def stop(self) -> None:
        self.supervisor.begin_stop()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await asyncio.to_thread(self.supervisor.stop, 30.0)
