"""The in-process job queue: a FIFO of jobs, a dynamic batcher, and worker processes.

:meth:`WorkerPool.submit` returns a :class:`Ticket`, an async iterator of one job's events
(``Queued`` with the live queue position, ``Dispatched``, ``StageReached``, then ``JobDone`` or
``JobFailed``). When a worker is free, the batching policy (:mod:`server.runtime.batching`,
shared with ``pixelstream worker``) says which queued jobs it runs next, or how long to wait
for a batch to fill.

Workers are spawned processes (never forked: the gateway has threads and an event loop),
started and replaced by the :class:`~server.runtime.supervisor.Supervisor` shared with
``pixelstream worker``; each loads only the tasks placed on its slot (a tasks file's
``workers``), and a batch goes only to a worker that serves its task. A reader thread per
worker turns its pipe into calls on the event loop. A worker that dies is replaced; each job
it held is run once more, then failed with ``internal``. A worker that
hangs is made one that died: with ``job_timeout_s``, a batch still unfinished after that long
per job is ended by killing its worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from chunking.errors import ErrorCode, ProtocolError
from server.metrics import Metrics
from server.pipeline.jobs import (
    Batch,
    Dispatched,
    Job,
    JobFailed,
    Queued,
    ReleasePixels,
    Shutdown,
    StageReached,
    Ticket,
    TileSpec,
    WorkerEvent,
    WorkerReady,
)
from server.pipeline.worker import WorkerConfig, worker_main
from server.runtime.batching import ArrivalGaps, BatchLimits, Limits, Waiting, next_batch
from server.runtime.supervisor import Supervisor
from server.storage.base import ImageRef

log = logging.getLogger("pixelstream.pool")

MAX_ATTEMPTS = 2
"""A job whose worker died is run once more before it fails."""


@dataclass(eq=False)
class _Pending:
    ticket: Ticket
    enqueued: float
    attempts: int = 0
    position: int = 0


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    conn: Connection
    slot: int
    ready: bool = False
    in_flight: dict[str, _Pending] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)
    reader: threading.Thread | None = None
    deadline: asyncio.TimerHandle | None = None
    """Kills the worker if its batch is not done in time (``job_timeout_s``)."""
    hung: bool = False

    @property
    def idle(self) -> bool:
        return self.ready and not self.in_flight


class WorkerPool:
    def __init__(
        self,
        config: WorkerConfig,
        *,
        workers: int,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        metrics: Metrics | None = None,
        job_timeout_s: float | None = None,
        per_task: Mapping[str, BatchLimits] | None = None,
    ) -> None:
        self._config = config
        self.job_timeout_s = job_timeout_s
        self._size = workers
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.limits = Limits(BatchLimits(max_batch_size, self.max_wait_s), dict(per_task or {}))
        """Batch sizes and waits: the server's, and a tasks file's per task."""
        self.max_queue = max_queue
        self._metrics = metrics or Metrics()
        self._supervisor = Supervisor(worker_main, workers, name="pixelstream-worker",
                                      args_for=lambda slot: (config.for_slot(slot),))
        self._pending: deque[_Pending] = deque()
        self._workers: list[_Worker] = []
        self._job_ids = itertools.count(1)
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._stopping = False
        self._ready_changed = asyncio.Event()
        self._arrivals = ArrivalGaps()
        self.startup_error: str | None = None
        self.batches_sent = 0

    # Life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for slot in range(self._size):
            self._spawn(slot)
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="batcher")

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop the workers (after their current batch) and fail what is still queued.

        A worker still busy after ``grace_s`` is killed and its jobs are failed: every ticket
        gets an outcome.
        """
        self._stopping = True
        self._supervisor.begin_stop()  # from now on no worker is replaced
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        while self._pending:
            ticket = self._pending.popleft().ticket
            ticket.put(JobFailed(ticket.job.job_id, ErrorCode.BUSY, "the server is shutting down"))
        self._metrics.queue_depth.set(0)
        # A copy: _on_exit removes workers from the list while this awaits.
        workers = list(self._workers)
        for worker in workers:
            with contextlib.suppress(OSError):
                worker.conn.send(Shutdown())
        deadline = time.monotonic() + grace_s
        for worker in workers:
            await asyncio.to_thread(worker.process.join, max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                await asyncio.to_thread(worker.process.join, 5)
        for worker in workers:
            # Let the reader forward what the worker sent before it exited, then close.
            if worker.reader is not None:
                await asyncio.to_thread(worker.reader.join, 5)
            worker.conn.close()
            for pending in list(worker.in_flight.values()):
                pending.ticket.put(JobFailed(
                    pending.ticket.job.job_id, ErrorCode.BUSY, "the server is shutting down"
                ))
            worker.in_flight.clear()
        self._workers.clear()

    @property
    def ready(self) -> bool:
        return any(worker.ready for worker in self._workers)

    @property
    def workers_ready(self) -> int:
        return sum(worker.ready for worker in self._workers)

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def worker_tasks(self) -> list[list[str]]:
        """Per ready worker, the tasks it loaded."""
        return [sorted(w.models) for w in self._workers if w.ready]

    @property
    def unserved_tasks(self) -> list[str]:
        """Tasks that no ready worker has loaded (yet: the supervisor starts every slot's
        worker, and replaces one that dies)."""
        loaded = {task for worker in self._workers if worker.ready for task in worker.models}
        return [task.name for task in self._config.tasks if task.name not in loaded]

    def check_served(self, task: str) -> None:
        """Every task is placed on a slot whose worker is started and replaced here: its jobs
        wait for it rather than being refused."""

    @property
    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    async def wait_ready(self) -> None:
        """Wait until every worker has loaded its models (or one failed to)."""
        while self.workers_ready < self._size and self.startup_error is None:
            self._ready_changed.clear()
            await self._ready_changed.wait()
        if self.startup_error is not None:
            raise RuntimeError(self.startup_error)

    # Jobs -------------------------------------------------------------------------------------

    def submit(
        self, task: str, options: dict[str, Any], image: ImageRef, max_pixels: int,
        *, job_id: str | None = None, tile: TileSpec | None = None,
    ) -> Ticket:
        """Queue a job. Raises ProtocolError(busy) when the queue is full, (internal) when the
        workers could not start. ``job_id`` names the job (else a fresh number does). A tile
        (of an upload admitted already) is queued even when the queue is full."""
        if self.startup_error is not None:
            raise ProtocolError(ErrorCode.INTERNAL, "the inference workers failed to start")
        if tile is None and len(self._pending) >= self.max_queue:
            raise ProtocolError(
                ErrorCode.BUSY, "the inference queue is full", retry_after_ms=self.retry_after_ms()
            )
        job = Job(job_id or str(next(self._job_ids)), task, options, image, max_pixels, tile)
        ticket = Ticket(job, self._cancel)
        now = time.monotonic()
        self._arrivals.arrived(now)
        pending = _Pending(ticket, now)
        self._pending.append(pending)
        pending.position = len(self._pending)
        ticket.put(Queued(pending.position))
        self._metrics.queue_depth.set(len(self._pending))
        self._wakeup.set()
        return ticket

    @property
    def tile_window(self) -> int:
        """Tiles of one image to keep queued: enough to fill a batch on every worker twice."""
        return 2 * self.limits.largest_batch * max(1, self._size)

    def release_pixels(self, pixels: str) -> None:
        """A tiled analysis ended: every worker closes its image (the owner removes it)."""
        for worker in self._workers:
            self._post(worker, ReleasePixels(pixels))

    def attach(self, job_id: str) -> Ticket:
        """In-process jobs are followed through the gateway's own registry, never attached."""
        raise ProtocolError(ErrorCode.UNKNOWN_UPLOAD, "no shared queue holds this job")

    def retry_after_ms(self) -> int:
        """A rough time for the queue to drain by a batch: enough for clients to back off."""
        return 250 + 50 * len(self._pending) // max(1, self._size)

    def _cancel(self, ticket: Ticket) -> None:
        for pending in self._pending:
            if pending.ticket is ticket:
                self._pending.remove(pending)
                self._positions_changed()
                return
        # Running: the worker finishes it, and _on_event finds the ticket finished.

    def _post(self, worker: _Worker, message: ReleasePixels) -> None:
        with contextlib.suppress(OSError):  # a dying worker: its reader reports the exit
            worker.conn.send(message)

    def _positions_changed(self) -> None:
        for index, pending in enumerate(self._pending, start=1):
            if pending.position != index:
                pending.position = index
                pending.ticket.put(Queued(index))
        self._metrics.queue_depth.set(len(self._pending))

    # Batching ---------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            self._fail_unserved()
            while self._pending:
                idle = [w for w in self._workers if w.idle]
                served = {task for w in idle for task in w.models}
                # Only jobs an idle worker can run; the rest wait for a worker of theirs.
                runnable = [(i, p) for i, p in enumerate(self._pending)
                            if p.ticket.job.task in served]
                if not runnable:
                    break
                waiting = [Waiting(p.ticket.job.task, p.enqueued, p.ticket.job.rank)
                           for _, p in runnable]
                batch = next_batch(waiting, time.monotonic(), self.limits,
                                   self._arrivals.average_s)
                if not batch.take:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(batch.wait_s):
                            await self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                take = tuple(runnable[i][0] for i in batch.take)
                oldest = self._pending[take[0]].ticket.job
                worker = next(w for w in idle if oldest.task in w.models)
                self._send_batch(worker, take)

    def _fail_unserved(self) -> None:
        """Once every worker is up, jobs of a task none of them loaded fail at once."""
        if self.workers_ready < self._size:
            return
        known = {task for w in self._workers for task in w.models}
        unserved = [p for p in self._pending if p.ticket.job.task not in known]
        for pending in unserved:
            self._pending.remove(pending)
            job = pending.ticket.job
            pending.ticket.put(JobFailed(job.job_id, ErrorCode.UNKNOWN_TASK,
                                         f"no worker model for {job.task!r}"))
        if unserved:
            self._positions_changed()

    def _send_batch(self, worker: _Worker, take: tuple[int, ...]) -> None:
        chosen = set(take)
        taken = [p for index, p in enumerate(self._pending) if index in chosen]
        self._pending = deque(p for index, p in enumerate(self._pending) if index not in chosen)
        now = time.monotonic()
        for pending in taken:
            pending.attempts += 1
            worker.in_flight[pending.ticket.job.job_id] = pending
            pending.ticket.put(Dispatched(queue_ms=(now - pending.enqueued) * 1000))
        if self.job_timeout_s and self._loop is not None:
            worker.deadline = self._loop.call_later(
                self.job_timeout_s * len(taken), self._on_deadline, worker
            )
        try:
            worker.conn.send(Batch([p.ticket.job for p in taken]))
        except OSError:
            # The worker is dying: its reader thread reports the exit, which retries these.
            log.warning("worker %s pipe closed while sending a batch", worker.process.pid)
        except Exception:
            # A job that cannot be sent (say, unpicklable options) must not stop the batcher.
            log.exception("could not send a batch to worker %s", worker.process.pid)
            for pending in taken:
                worker.in_flight.pop(pending.ticket.job.job_id, None)
            self._fail_all(taken, "the job could not be handed to a worker")
        self.batches_sent += 1
        self._metrics.batch_size.observe(len(taken))
        self._positions_changed()

    # Worker events (on the event loop) ----------------------------------------------------------

    def _on_event(self, worker: _Worker, event: WorkerEvent) -> None:
        if isinstance(event, WorkerReady):
            worker.ready = True
            worker.models = event.models
            self._metrics.workers_ready.set(self.workers_ready)
            self._notify_ready()
            self._wakeup.set()
            return
        if isinstance(event, StageReached):
            for job_id in event.job_ids:
                pending = worker.in_flight.get(job_id)
                if pending is not None:
                    pending.ticket.put(StageReached([job_id], event.stage))
            return
        pending = worker.in_flight.pop(event.job_id, None)
        if pending is not None:
            pending.ticket.put(event)
        if not worker.in_flight:
            self._clear_deadline(worker)
            self._wakeup.set()

    def _on_deadline(self, worker: _Worker) -> None:
        """The batch overran ``job_timeout_s``: the worker hangs. Kill it; the reader thread
        sees it exit and :meth:`_on_exit` retries its jobs as for any worker that died."""
        worker.deadline = None
        if worker not in self._workers or not worker.in_flight or self._stopping:
            return
        worker.hung = True
        log.error("worker %s has held a batch of %d for over %g s per job; killing it",
                  worker.process.pid, len(worker.in_flight), self.job_timeout_s)
        worker.process.kill()

    @staticmethod
    def _clear_deadline(worker: _Worker) -> None:
        if worker.deadline is not None:
            worker.deadline.cancel()
            worker.deadline = None

    def _on_exit(self, worker: _Worker) -> None:
        if worker not in self._workers:
            return
        self._workers.remove(worker)
        self._clear_deadline(worker)
        worker.conn.close()
        self._metrics.workers_ready.set(self.workers_ready)
        if self._stopping:
            return
        if not worker.ready:
            self.startup_error = (
                f"an inference worker exited while loading its model (exit code "
                f"{worker.process.exitcode}); see the log"
            )
            log.error("%s", self.startup_error)
            self._notify_ready()
            self._fail_all(worker.in_flight.values(), "the inference workers failed to start")
            self._fail_all(self._pending, "the inference workers failed to start")
            self._pending.clear()
            return
        log.error("worker %s %s (exit code %s); replacing it", worker.process.pid,
                  "hung and was killed" if worker.hung else "died", worker.process.exitcode)
        self._metrics.worker_restarts.labels("hung" if worker.hung else "died").inc()
        retry = [p for p in worker.in_flight.values() if p.attempts < MAX_ATTEMPTS]
        self._fail_all(
            [p for p in worker.in_flight.values() if p.attempts >= MAX_ATTEMPTS],
            "the inference worker hung on this job" if worker.hung
            else "the inference worker stopped while running this job",
        )
        for pending in sorted(retry, key=lambda p: p.enqueued, reverse=True):
            if not pending.ticket.finished:
                self._pending.appendleft(pending)
        self._positions_changed()
        self._wakeup.set()  # another worker may be idle: it need not wait for the replacement
        self._spawn(worker.slot)

    @staticmethod
    def _fail_all(pendings: Any, message: str) -> None:
        for pending in list(pendings):
            pending.ticket.put(JobFailed(pending.ticket.job.job_id, ErrorCode.INTERNAL, message))

    def _notify_ready(self) -> None:
        self._ready_changed.set()

    def _spawn(self, slot: int) -> None:
        parent_end, child_end = self._supervisor.context.Pipe(duplex=True)
        process = self._supervisor.spawn(slot, child_end)
        child_end.close()
        if process is None:  # stopping
            parent_end.close()
            return
        worker = _Worker(process, parent_end, slot)
        self._workers.append(worker)
        worker.reader = threading.Thread(
            target=self._read_worker, args=(worker,), name="worker-reader", daemon=True
        )
        worker.reader.start()

    def _on_events(self, worker: _Worker, events: list[WorkerEvent]) -> None:
        for event in events:
            self._on_event(worker, event)

    def _read_worker(self, worker: _Worker) -> None:
        """Reader thread: forwards one worker's events (a list per message) to the loop until
        its pipe closes."""
        assert self._loop is not None
        loop = self._loop
        while True:
            try:
                events = worker.conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # an unpicklable event: a bug in the worker, not fatal here
                log.exception("unreadable event from worker %s", worker.process.pid)
                continue
            with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
                loop.call_soon_threadsafe(self._on_events, worker, events)
        worker.process.join()
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._on_exit, worker)
