"""What crosses between the gateway and inference workers: jobs in, events out.

Everything here is a small picklable dataclass; image bytes travel by spool-file path (or
inline, for small camera frames), never as a copy through the pipe.
"""

from __future__ import annotations

import asyncio
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


class Ticket:
    """One job's events, in order; iteration ends after its outcome (``JobDone``,
    ``JobFailed`` or ``TilesPlanned``).

    The queue that issued it feeds it with :meth:`put`; only the first outcome counts, so a
    job run twice (a worker died after finishing it) still yields exactly one.
    """

    def __init__(self, job: Job, on_cancel: Callable[[Ticket], None]) -> None:
        self.job = job
        self._on_cancel = on_cancel
        self._events: asyncio.Queue[JobEvent] = asyncio.Queue()
        self.finished = False

    def put(self, event: JobEvent) -> None:
        if not self.finished:
            self.finished = isinstance(event, (JobDone, JobFailed, TilesPlanned))
            self._events.put_nowait(event)

    def cancel(self) -> None:
        """Withdraw the job: it leaves the queue, or its outcome is ignored if running."""
        if not self.finished:
            self.finished = True
            self._on_cancel(self)

    async def __aiter__(self) -> AsyncIterator[JobEvent]:
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, (JobDone, JobFailed, TilesPlanned)):
                return
