"""The analysis service: tasks, result cache and job queue behind one call.

Both the WebSocket session and the HTTP routes go through :class:`AnalysisService`::

    task, options = service.resolve(name, options)      # unknown_task / bad_message
    key = service.cache_key(sha256, task, options)
    payload = await service.lookup(key)                 # a cached result, or None
    payload = await service.run(task, options, image, key, on_stage=...)  # raises ProtocolError

Tasks are :class:`~server.tasks.contract.Task` objects from the server's
:class:`~server.tasks.registry.Registry`; ``service.describe()`` is ``GET /v1/tasks``.

A payload is the ``result`` message's body without ``id``/``stream``/``seq``/``cached``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Protocol

import orjson

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
    Ticket,
    TilesPlanned,
)
from server.runtime.tiling import run_tiles
from server.storage.base import ImageRef, JobQueue, ResultCache
from server.tasks.contract import OptionsError, Task, validate_options
from server.tasks.registry import Registry


class StageCallback(Protocol):
    """Called with each stage reached, the queue position for ``queued``, and for a tiled
    analysis, ``inference`` again with ``(done, total)`` tiles as they finish."""

    def __call__(self, stage: Stage, position: int | None,
                 counts: tuple[int, int] | None = None) -> None: ...


class AnalysisService:
    def __init__(
        self,
        registry: Registry,
        pool: JobQueue,
        cache: ResultCache,
        metrics: Metrics,
        max_pixels: int,
    ) -> None:
        self.registry = registry
        self.specs: dict[str, Task] = {entry.task.name: entry.task for entry in registry.entries}
        """The offered tasks by name."""
        for task in self.specs.values():
            task.model  # noqa: B018 -- read once now (its revision may stat a model folder)
        self.default_task = registry.default
        self.pool = pool
        self.cache = cache
        self.metrics = metrics
        self.max_pixels = max_pixels
        self.handing_back = False
        """Set when a gateway on a shared queue shuts down: analyses cancelled from then on
        leave their jobs queued (for the gateway their clients resume on) instead of
        withdrawing them."""

    @property
    def tasks(self) -> list[str]:
        return list(self.specs)

    def describe(self) -> list[dict[str, Any]]:
        """Every task's name, kind, model, revision and JSON Schemas (``GET /v1/tasks``)."""
        return self.registry.describe()

    def resolve(
        self, name: str | None, options: Mapping[str, Any]
    ) -> tuple[Task, dict[str, Any]]:
        """The task and its options checked against its schema, defaults filled in. Raises
        ProtocolError without an id: callers add the upload or frame it concerns."""
        name = name or self.default_task
        task = self.specs.get(name)
        if task is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_TASK,
                f"unknown task {name!r}; this server offers {', '.join(self.specs)}",
            )
        try:
            checked = validate_options(task, options)
            # A task serving several model revisions stamps the one that will answer.
            stamp = getattr(task, "resolve_options", None)
            return task, stamp(checked) if callable(stamp) else checked
        except OptionsError as exc:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, str(exc)) from None

    @staticmethod
    def cache_key(sha256: str, task: Task, options: Mapping[str, Any],
                  principal: str | None = None) -> str:
        """The result's key: the image, task, model (and its weights' revision) and options,
        and the principal when the server has tokens, so that a client cannot learn (from
        ``cached: true``, or from the answer to a bare checksum) what another client
        analysed."""
        info = task.model
        described: dict[str, Any] = {"task": task.name, "model": info.id, "options": options}
        if info.revision:
            described["revision"] = info.revision
        if principal is not None:
            described["principal"] = principal
        canonical = orjson.dumps(described, option=orjson.OPT_SORT_KEYS)
        return f"{sha256}:{hashlib.sha256(canonical).hexdigest()[:32]}"

    async def lookup(self, key: str) -> dict[str, Any] | None:
        payload = await self.cache.get(key)
        self.metrics.cache.labels("hit" if payload is not None else "miss").inc()
        return payload

    def check_capacity(self, task: str | None = None) -> None:
        """Raise ProtocolError(busy) when the queue cannot take more work now (or no worker
        serves ``task``, if given)."""
        if self.pool.depth >= self.pool.max_queue:
            raise ProtocolError(
                ErrorCode.BUSY, "the server is at capacity",
                retry_after_ms=self.pool.retry_after_ms(),
            )
        if task is not None:
            self.pool.check_served(task)

    async def run(
        self,
        task: Task,
        options: dict[str, Any],
        image: ImageRef,
        key: str | None,
        on_stage: StageCallback | None = None,
        *,
        job_id: str | None = None,
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """Queue the image, report its stages, and return (payload, timings_ms).

        Cancelling the awaiting task withdraws the job. Raises ProtocolError on failure.
        """
        ticket = self.pool.submit(task.name, options, image, self.max_pixels, job_id=job_id)
        return await self._outcome(ticket, task, key, on_stage,
                                   revision=options.get("revision") or None)

    async def follow(
        self, task: Task, job_id: str, on_stage: StageCallback | None = None
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """Like :meth:`run`, for a job another gateway queued (its client moved here)."""
        return await self._outcome(self.pool.attach(job_id), task, None, on_stage)

    async def _outcome(
        self, ticket: Ticket, task: Task, key: str | None, on_stage: StageCallback | None,
        *, revision: str | None = None,
    ) -> tuple[dict[str, Any], dict[str, float]]:
        timings: dict[str, float] = {}

        def on_progress(event: JobEvent) -> None:
            if isinstance(event, Queued):
                if on_stage is not None:
                    on_stage(Stage.QUEUED, event.position)
            elif isinstance(event, Dispatched):
                timings["queue"] = round(event.queue_ms, 3)
            elif isinstance(event, StageReached) and on_stage is not None:
                on_stage(event.stage, None)

        try:
            event = await ticket.outcome(on_progress)
            if isinstance(event, JobFailed):
                retry_after_ms = (
                    self.pool.retry_after_ms() if event.code is ErrorCode.BUSY else None
                )
                raise ProtocolError(event.code, event.message, retry_after_ms=retry_after_ms)
            if isinstance(event, JobDone):
                timings.update(event.timings_ms)
                result, image = event.result, event.image
            else:
                result, inference_ms = await self._run_tiles(ticket, task, event, on_stage)
                timings.update(decode=round(event.decode_ms, 3),
                               inference=round(inference_ms, 3))
                image = event.image
            payload = {
                "task": task.name,
                "result": result,
                "image": image,
                "model": task.model.id,
            }
            # The weights that answered: the job's own revision where it carries one (a
            # versioned model switching), else the task's.
            answered = revision or task.model.revision
            if answered:
                payload["revision"] = answered
            if key is not None:
                await self.cache.set(key, payload)
            return payload, timings
        finally:
            if not self.handing_back:
                ticket.cancel()

    async def _run_tiles(self, ticket: Ticket, task: Task, planned: TilesPlanned,
                         on_stage: StageCallback | None) -> tuple[dict[str, Any], float]:
        # A job followed from another gateway has only its id here: the plan names the rest.
        parent = ticket.job if ticket.job.task else planned.parent

        def on_counts(done: int, total: int) -> None:
            if on_stage is not None:
                on_stage(Stage.INFERENCE, None, (done, total))

        self.metrics.tiles.inc(len(planned.boxes))
        return await run_tiles(self.pool, task, parent, planned, on_counts)


def upload_job_id(token: str) -> str:
    """The job id of an upload's analysis: derived from its resume token, so any gateway the
    client resumes on can follow the job, without the token itself appearing in job data."""
    return "u-" + hashlib.sha256(token.encode()).hexdigest()[:32]
