"""What crosses between the gateway and inference workers: jobs in, events out.

Everything here is a small picklable dataclass; image bytes travel by spool-file path (or
inline, for small camera frames), never as a copy through the pipe.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from chunking.errors import ErrorCode
from chunking.messages import Stage
from server.storage.base import ImageRef


@dataclass(frozen=True)
class TileSpec:
    """One tile of a tiled analysis: the full-resolution ``box`` of the original image
    (``original``: its displayed size) to read from the pixels decoded once for the whole
    image (``pixels``: a handle any worker on that machine can attach; see
    :mod:`server.runtime.pixels`)."""

    pixels: str
    box: tuple[int, int, int, int]
    original: tuple[int, int]
    index: int


@dataclass(frozen=True)
class Job:
    job_id: str
    task: str
    options: dict[str, Any]
    image: ImageRef
    max_pixels: int
    tile: TileSpec | None = None
    """Set for one tile of a tiled analysis (``image`` is still the whole upload: a worker
    that cannot attach the decoded pixels decodes it once for all its tiles)."""

    @property
    def rank(self) -> int:
        """How many jobs of its analysis come before it (a tile's index; 0 for a whole image):
        the batching policy serves lower ranks first."""
        return self.tile.index if self.tile is not None else 0


@dataclass(frozen=True)
class Batch:
    """Jobs of one task, run through the model together."""

    jobs: list[Job]


@dataclass(frozen=True)
class Shutdown:
    """Asks a worker to exit after its current batch."""


@dataclass(frozen=True)
class ReleasePixels:
    """A tiled analysis ended: close the decoded image ``pixels`` names (its owner removes
    the file)."""

    pixels: str


# Worker → gateway ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerReady:
    pid: int
    models: dict[str, str]  # task -> model id


@dataclass(frozen=True)
class StageReached:
    job_ids: list[str]
    stage: Stage


@dataclass(frozen=True)
class JobDone:
    job_id: str
    result: dict[str, Any]
    image: dict[str, Any]
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class JobFailed:
    job_id: str
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class TilesPlanned:
    """The outcome of a spatial task's job on an image larger than its tile: the worker
    decoded the image once (``pixels``) and the gateway is to run ``boxes`` as tile jobs,
    then merge their results (:mod:`server.runtime.tiling`)."""

    job_id: str
    pixels: str
    boxes: list[tuple[int, int, int, int]]
    original: tuple[int, int]
    image: dict[str, Any]
    decode_ms: float
    parent: Job
    """The job planned (its image without inline bytes), for a gateway that follows a job
    another gateway queued."""


WorkerEvent = WorkerReady | StageReached | JobDone | JobFailed | TilesPlanned
Outcome = JobDone | JobFailed | TilesPlanned
"""The events that end a job."""


# Gateway-side events for one job ------------------------------------------------------------


@dataclass(frozen=True)
class Queued:
    position: int


@dataclass(frozen=True)
class Dispatched:
    """The job left the queue for a worker (no message: it precedes ``decoding``)."""

    queue_ms: float


JobEvent = Queued | Dispatched | StageReached | JobDone | JobFailed | TilesPlanned


OUTCOMES = (JobDone, JobFailed, TilesPlanned)


class Ticket:
    """One job's events, in order; iteration ends after its outcome (``JobDone``,
    ``JobFailed`` or ``TilesPlanned``).

    The queue that issued it feeds it with :meth:`put`; only the first outcome counts, so a
    job run twice (a worker died after finishing it) still yields exactly one.

    A follower that only acts on the progress events (stages, queue positions) and awaits the
    outcome uses :meth:`outcome`: progress is then handed to it as it is put, so its task
    wakes once per job instead of once per event.
    """

    def __init__(self, job: Job, on_cancel: Callable[[Ticket], None]) -> None:
        self.job = job
        self._on_cancel = on_cancel
        self._events: deque[JobEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._on_progress: Callable[[JobEvent], None] | None = None
        self._fault: BaseException | None = None
        self.finished = False

    def put(self, event: JobEvent) -> None:
        if self.finished:
            return
        self.finished = isinstance(event, OUTCOMES)
        on_progress = self._on_progress
        if on_progress is not None and not self.finished:
            try:
                on_progress(event)
            except Exception as exc:  # the follower's fault, raised in the follower
                self._on_progress = None
                self._fault = exc
                self._wake()
            return
        self._events.append(event)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def cancel(self) -> None:
        """Withdraw the job: it leaves the queue, or its outcome is ignored if running."""
        if not self.finished:
            self.finished = True
            self._on_cancel(self)

    async def __aiter__(self) -> AsyncIterator[JobEvent]:
        while True:
            while not self._events:
                await self._wait()
            event = self._events.popleft()
            yield event
            if isinstance(event, OUTCOMES):
                return

    async def outcome(self, on_progress: Callable[[JobEvent], None] | None = None) -> Outcome:
        """Wait for the job's outcome. Every event before it (``Queued``, ``Dispatched``,
        ``StageReached``) goes to ``on_progress`` in order, those already put first, the rest
        as they are put; an exception ``on_progress`` raises is raised here. Not to be mixed
        with iteration."""
        handle = on_progress if on_progress is not None else _ignore
        self._on_progress = handle
        try:
            while True:
                if self._fault is not None:
                    raise self._fault
                if not self._events:
                    await self._wait()
                    continue
                event = self._events.popleft()  # put before this call, or after a fault
                if isinstance(event, OUTCOMES):
                    return event
                handle(event)
        finally:
            self._on_progress = None


def _ignore(event: JobEvent) -> None:
    pass
