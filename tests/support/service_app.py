"""An app state with no server and no workers: the upload service over a memory store and a
scripted job queue, for tests of the protocol and transports that run in milliseconds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.analysis import AnalysisService
from server.limits import ClientLimits, KeyedBuckets, MemoryBudget
from server.metrics import Metrics
from server.pipeline.jobs import Job, JobDone, JobFailed, Queued, StageReached, Ticket
from server.pipeline.spool import Spool
from server.settings import Settings
from server.state import AppState
from server.storage.base import ImageRef
from server.storage.memory import LruResultCache, MemoryRateLimiter, MemoryUploadStore
from server.tasks.builtin.colors import Colors
from server.tasks.registry import Registry


@dataclass
class ScriptedQueue:
    """A JobQueue whose jobs wait until the test answers them (:meth:`answer`)."""

    max_queue: int = 16
    startup_error: str | None = None
    tickets: list[Ticket] = field(default_factory=list)
    withdrawn: list[str] = field(default_factory=list)

    @property
    def depth(self) -> int:
        return sum(1 for ticket in self.tickets if not ticket.finished)

    @property
    def ready(self) -> bool:
        return True

    @property
    def workers_ready(self) -> int:
        return 1

    @property
    def unserved_tasks(self) -> list[str]:
        return []

    def check_served(self, task: str) -> None:
        pass

    def submit(self, task: str, options: dict[str, Any], image: ImageRef, max_pixels: int,
               *, job_id: str | None = None) -> Ticket:
        job = Job(job_id=job_id or f"j{len(self.tickets)}", task=task, options=options,
                  image=image, max_pixels=max_pixels)
        ticket = Ticket(job, lambda t: self.withdrawn.append(t.job.job_id))
        self.tickets.append(ticket)
        ticket.put(Queued(position=len(self.tickets)))
        return ticket

    def attach(self, job_id: str) -> Ticket:
        raise NotImplementedError

    def retry_after_ms(self) -> int:
        return 100

    async def start(self) -> None:
        pass

    async def stop(self, grace_s: float = 10.0) -> None:
        pass

    def answer(self, ticket: Ticket, result: dict[str, Any] | None = None,
               error: JobFailed | None = None) -> None:
        """Run the job through its stages to ``result`` (or fail it with ``error``)."""
        from chunking.messages import Stage

        ticket.put(StageReached([ticket.job.job_id], Stage.DECODING))
        ticket.put(StageReached([ticket.job.job_id], Stage.INFERENCE))
        if error is not None:
            ticket.put(error)
        else:
            ticket.put(JobDone(ticket.job.job_id, result or {"colors": []},
                               {"width": 4, "height": 4, "format": "PNG"}, {"inference": 1.0}))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def service_app(spool_dir: Path, **overrides: Any) -> tuple[AppState, ScriptedQueue]:
    """An AppState like the embedded server's, without workers: jobs go to a ScriptedQueue."""
    settings = Settings(**{"max_image_bytes": 1 << 20, "max_chunk_bytes": 64 * 1024,
                           "max_uploads": 4, "workers": 1, **overrides})
    metrics = Metrics()
    queue = ScriptedQueue()
    registry = Registry([Colors()])
    service = AnalysisService(registry, queue, LruResultCache(16), metrics,
                              max_pixels=settings.max_pixels)
    state = AppState(
        settings=settings, limits=settings.limits, metrics=metrics,
        store=MemoryUploadStore(Spool(spool_dir)), service=service,
        http_buckets=KeyedBuckets(20.0, 40),
        client_limits=ClientLimits(MemoryRateLimiter(), max_connections=0,
                                   uploads_per_minute=settings.uploads_per_minute,
                                   bytes_per_minute=settings.bytes_per_minute),
        budget=MemoryBudget(settings.memory_budget_bytes,
                            share=max(settings.memory_budget_bytes // 4,
                                      settings.max_image_bytes)),
    )
    return state, queue
