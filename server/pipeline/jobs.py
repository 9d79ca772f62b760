"""What crosses between the gateway and inference workers: jobs in, events out.

Everything here is a small picklable dataclass; image bytes travel by spool-file path (or
inline, for small camera frames), never as a copy through the pipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chunking.errors import ErrorCode
from chunking.messages import Stage
from server.storage.base import ImageRef


@dataclass(frozen=True)
class Job:
    job_id: int
    task: str
    options: dict[str, Any]
    image: ImageRef
    max_pixels: int


@dataclass(frozen=True)
class Batch:
    """Jobs of one task, run through the model together."""

    jobs: list[Job]


@dataclass(frozen=True)
class Shutdown:
    """Asks a worker to exit after its current batch."""


# Worker → gateway ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerReady:
    pid: int
    models: dict[str, str]  # task -> model id


@dataclass(frozen=True)
class StageReached:
    job_ids: list[int]
    stage: Stage


@dataclass(frozen=True)
class JobDone:
    job_id: int
    result: dict[str, Any]
    image: dict[str, Any]
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class JobFailed:
    job_id: int
    code: ErrorCode
    message: str


WorkerEvent = WorkerReady | StageReached | JobDone | JobFailed


# Gateway-side events for one job ------------------------------------------------------------


@dataclass(frozen=True)
class Queued:
    position: int


@dataclass(frozen=True)
class Dispatched:
    """The job left the queue for a worker (no message: it precedes ``decoding``)."""

    queue_ms: float


JobEvent = Queued | Dispatched | StageReached | JobDone | JobFailed
