"""One upload service for every transport: create, resume, write, finish, cancel, expire.

The WebSocket connection (:mod:`server.protocol`), the tus routes and the one-shot HTTP routes
(:mod:`server.transports`) all go through :class:`UploadService`, so every limit, reservation
and rule is enforced in one place and cannot be bypassed by switching transports::

    live = await uploads.create(request, caller, owner, store_owner)  # or a CachedResult
    live, held = await uploads.resume(token, caller, store_owner, check)
    uploads.adopt(live, owner, upload_id)                 # owner: who gets its messages
    event = await uploads.write(live, caller, store_owner, offset, data)
    await uploads.finish(live)                            # after the last byte: analysis
    uploads.cancel(live)
    payload, cached, timings = await uploads.analyze(task, options, image, sha256, principal)

An upload is *live* from creation until its outcome was delivered (or it was cancelled or
expired). Its owner (a socket) gets its progress and outcome; without an owner (the socket
dropped, or a tus upload, whose client asks over plain HTTP) the latest stage and the outcome
wait on the :class:`LiveUpload`, where :meth:`LiveUpload.changed` wakes whoever watches.
Analysis runs in a task owned by the app, not by any connection.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from chunking.codec import error_from_exception
from chunking.errors import ErrorCode, ProtocolError
from chunking.messages import Chunk, Error, Payload, Progress, Result, ServerMessage, Stage
from chunking.reassembler import (
    Appended,
    ChunkEvent,
    Lifecycle,
    Replayed,
    UploadEvent,
    UploadState,
)
from server.analysis import StageCallback, upload_job_id
from server.logs import bind_log_context
from server.storage.base import FinishedUpload, ImageRef, UploadHandle, UploadMeta
from server.storage.memory import new_resume_token
from server.tasks.contract import Task

if TYPE_CHECKING:
    from server.state import AppState

log = logging.getLogger("pixelstream.uploads")

_STAGE_EVENTS = {
    Stage.QUEUED: UploadEvent.QUEUED,
    Stage.DECODING: UploadEvent.DECODING,
    Stage.INFERENCE: UploadEvent.INFERENCE,
}

ENDED_REMEMBERED = 10_000
"""How many ended uploads' tokens are remembered (see :attr:`UploadService.ended`)."""


class UploadOwner(Protocol):
    """Who receives an upload's messages now (a WebSocket connection)."""

    def deliver(self, message: ServerMessage) -> None:
        """Send a message about one of this owner's uploads (already under its id)."""

    def drop(self, upload_id: str, live: LiveUpload) -> None:
        """``live`` (named ``upload_id`` here) is no longer this owner's: forget the name."""


@dataclass(frozen=True)
class Caller:
    """Whose budgets a request spends: ``client`` is the token's principal, else the address."""

    principal: str | None
    client: str


@dataclass(frozen=True)
class UploadRequest:
    """What a client declares for a new upload (an ``upload`` message, a tus creation)."""

    upload_id: str
    size: int
    task: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class CachedResult:
    """The server already had the result for the declared checksum: no bytes are needed."""

    payload: dict[str, Any]
    token: str
    """A fresh token that names nothing (the client's next step needs one)."""


@dataclass(eq=False)
class LiveUpload:
    """An upload from creation until its outcome is delivered (or it is cancelled)."""

    token: str
    meta: UploadMeta
    accepted_at: float
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    handle: UploadHandle | None = None
    """The store's handle while bytes are still arriving."""
    owner: UploadOwner | None = None
    """Who gets its messages now; None while nobody does (a dropped socket, a tus upload)."""
    upload_id: str = ""
    """The owner's name for it (a resume on another socket may pick another id)."""
    detached_at: float = 0.0
    """When it last lost its owner, or its outcome arrived without one (for expiry)."""
    last_stage: Progress | None = None
    undelivered: Result | Error | None = None
    """The outcome, when it came while no owner was there to take it."""
    ended: bool = False
    """Forgotten: cancelled, expired, delivered or terminated; its token names nothing."""
    analysis: asyncio.Task[None] | None = None
    store_owner: str = ""
    """The name that owns the upload in the store (what ``discard`` must name)."""
    reserved: int = 0
    """Bytes of the memory budget this upload holds: those it received, while this process
    keeps its bytes; given back when it is forgotten or its image released."""
    reserved_by: str | None = None
    """The client the reservation counts against (the one that began the upload)."""
    history: list[tuple[int, Progress | Result | Error]] = field(default_factory=list)
    """What was delivered, numbered, for watchers that follow it (server-sent events): every
    stage and the outcome, with consecutive ``upload`` progress folded into the latest."""
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _numbered: int = 0

    @property
    def received(self) -> int:
        """Bytes held: all of them once the last byte is in."""
        return self.handle.received if self.handle is not None else self.meta.size

    def changed(self) -> asyncio.Event:
        """An event set at the next change of stage, outcome or end. Take it, read the state,
        then wait on it: nothing that happens in between is missed."""
        return self._changed

    def notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def record(self, message: Progress | Result | Error) -> None:
        """Add ``message`` to :attr:`history` and wake the watchers."""
        self._numbered += 1
        history = self.history
        folds = (isinstance(message, Progress) and message.stage is Stage.UPLOAD and history
                 and isinstance(history[-1][1], Progress)
                 and history[-1][1].stage is Stage.UPLOAD)
        if folds:
            history[-1] = (self._numbered, message)
        else:
            history.append((self._numbered, message))
        self.notify()


UPLOAD_START_TIMEOUT_S = 30.0
"""An accepted upload that receives no byte in this long is discarded (``upload_expired``),
however long ``upload_idle_timeout_s`` is."""


class UploadService:
    """The registry of live uploads and everything that happens to them (see the module)."""

    def __init__(self, app: AppState, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.clock = clock
        self.live: dict[str, LiveUpload] = {}
        """This process's live uploads by token."""
        self.ended: OrderedDict[str, None] = OrderedDict()
        """Tokens of uploads that ended here lately (an HTTP client is told 410, not 404)."""

    # Creation and resumption ----------------------------------------------------------------

    async def create(self, request: UploadRequest, caller: Caller, owner: UploadOwner | None,
                     store_owner: str, *, answer_from_cache: bool = True
                     ) -> LiveUpload | CachedResult:
        """Check the task, capacity, the client's rate and the memory budget, then store a new
        empty upload; or, with ``answer_from_cache``, answer from the cache when the declared
        checksum is known (a client that cannot skip its bytes passes False)."""
        app = self.app
        service = app.service
        spec, options = service.resolve(request.task, request.options)
        service.check_capacity(spec.name)
        await app.client_limits.upload_started(caller.client)
        meta = UploadMeta(
            upload_id=request.upload_id, size=request.size, task=spec.name, options=options,
            sha256=request.sha256, name=request.name, principal=caller.principal,
            client=caller.client,
        )
        if request.sha256 is not None and answer_from_cache:
            key = service.cache_key(request.sha256, spec, options, caller.principal)
            payload = await service.lookup(key)
            if payload is not None:
                app.metrics.uploads.labels("cached").inc()
                return CachedResult(payload=payload, token=new_resume_token())
        self._admit(request.size, caller.client)
        handle = await app.store.create(meta, store_owner)
        live = LiveUpload(token=handle.token, meta=meta, accepted_at=self.clock(),
                          handle=handle, store_owner=store_owner,
                          reserved_by=caller.client, upload_id=request.upload_id)
        self.live[live.token] = live
        if owner is not None:
            self.adopt(live, owner, request.upload_id)
        app.metrics.uploads.labels("accepted").inc()
        return live

    def _admit(self, size: int, client: str) -> None:
        """A new upload reserves nothing until its bytes arrive (one that never sends holds
        nothing), but is accepted only while its first chunk would fit."""
        app = self.app
        if app.uploads_in_memory:
            self._busy_unless(app.budget.fits(min(size, app.limits.max_chunk_bytes), client),
                              client)

    def _busy_unless(self, fits: bool, client: str) -> None:
        if fits:
            return
        budget = self.app.budget
        over_share = budget.owned(client) + self.app.limits.max_chunk_bytes > budget.share
        raise ProtocolError(
            ErrorCode.BUSY,
            "this client's unfinished uploads hold all the memory one client may; "
            "retry when one ends" if over_share
            else "the server holds all the upload bytes it may; retry later",
            retry_after_ms=self.app.service.pool.retry_after_ms(),
        )

    def _reserve_arrival(self, live: LiveUpload, offset: int, length: int) -> None:
        """Reserve bytes about to be appended (in-memory store), beyond what ``live`` holds:
        ``busy`` when the budget or the client's share has no room for them."""
        app = self.app
        if not app.uploads_in_memory or live.reserved_by is None:
            return
        needed = min(live.meta.size, offset + length) - live.reserved
        if needed > 0:
            self._busy_unless(app.budget.reserve(needed, live.reserved_by), live.reserved_by)
            live.reserved += needed

    async def resume(self, token: str, caller: Caller, store_owner: str,
                     check: Callable[[UploadHandle], None] | None = None
                     ) -> tuple[LiveUpload, int]:
        """Take the upload ``token`` names over for ``store_owner`` (from any process that
        shares the store). Returns it and the bytes held. Only the principal that began it may;
        ``check`` may refuse it further (by raising) before anything changes."""

        def checked(handle: UploadHandle) -> None:
            if handle.meta.principal != caller.principal:
                raise ProtocolError(ErrorCode.UNKNOWN_UPLOAD,
                                    "the resume token names no live upload")
            if check is not None:
                check(handle)

        handle = await self.app.store.claim(token, store_owner, checked)
        live = self.live.get(token)
        if live is None:
            # Begun on another gateway that shares the store.
            live = LiveUpload(token=token, meta=handle.meta, accepted_at=self.clock(),
                              upload_id=handle.meta.upload_id)
            self.live[token] = live
            if handle.complete:
                live.lifecycle = Lifecycle(UploadState.COMPLETE)
                live.analysis = self.app.spawn(self._follow(live), "follow-upload")
        elif handle.complete and live.handle is not None:
            # Known here while receiving, but its last byte arrived on another gateway: its
            # job runs there; follow it from here.
            live.handle = None
            live.lifecycle.advance(UploadEvent.LAST_BYTE)
            self._unreserve(live)
            live.analysis = self.app.spawn(self._follow(live), "follow-upload")
        live.store_owner = store_owner
        if not handle.complete:
            live.handle = handle
        return live, live.meta.size if handle.complete else handle.received

    def adopt(self, live: LiveUpload, owner: UploadOwner, upload_id: str) -> None:
        """Make ``owner`` the upload's owner under ``upload_id``; an older owner loses it."""
        previous = live.owner
        if previous is not None and previous is not owner:
            previous.drop(live.upload_id, live)
        live.owner = owner
        live.upload_id = upload_id

    def detach(self, live: LiveUpload) -> None:
        """Its owner is gone: the upload waits for a resume (or its expiry)."""
        live.owner = None
        live.detached_at = self.clock()

    def catch_up(self, live: LiveUpload) -> None:
        """Send a new owner what it missed: the outcome, else the latest stage."""
        if live.undelivered is not None:
            self.deliver_outcome(live, live.undelivered)
        elif live.last_stage is not None:
            self.deliver(live, live.last_stage)

    # Bytes ------------------------------------------------------------------------------------

    async def write(self, live: LiveUpload, caller: Caller, store_owner: str, offset: int,
                    data: Payload) -> ChunkEvent:
        """Apply bytes ``[offset, offset + len(data))`` by PROTOCOL.md's offset rules. Raises
        ProtocolError (offset_mismatch carries ``expected``). The last byte (an
        :class:`Appended` event, ``complete``) must be followed by :meth:`finish`."""
        app = self.app
        chunk = Chunk(id=live.upload_id, offset=offset, data=data)
        if live.handle is None:
            # Every byte is already held: replays are acknowledged, anything else refused.
            size = live.meta.size
            if offset + len(data) > size:
                raise ProtocolError(ErrorCode.OFFSET_MISMATCH, "the upload is complete",
                                    expected=size)
            return Replayed(received=size, total=size)
        if offset == live.handle.received and data:
            await app.client_limits.bytes_received(caller.client, len(data))
            self._reserve_arrival(live, offset, len(data))
        event = await app.store.write(live.handle, store_owner, chunk)
        if isinstance(event, Appended):
            app.metrics.upload_bytes.inc(len(data))
        return event

    async def finish(self, live: LiveUpload) -> None:
        """Once :meth:`write` appended the last byte: check the checksum and start the
        analysis. Raises ProtocolError(checksum_mismatch) after discarding the upload."""
        assert live.handle is not None
        upload_ms = (self.clock() - live.accepted_at) * 1000
        handle, live.handle = live.handle, None
        try:
            finished = await self.app.store.finish(handle)
        except ProtocolError:
            live.lifecycle.advance(UploadEvent.FAIL)
            self.forget(live)
            self.app.metrics.uploads.labels("failed").inc()
            raise
        live.lifecycle.advance(UploadEvent.LAST_BYTE)
        live.notify()
        live.analysis = self.app.spawn(
            self._analyze_upload(live, finished, round(upload_ms, 3)), "analyze-upload"
        )

    def cancel(self, live: LiveUpload) -> bool:
        """Cancel at any stage before the outcome; False when it is too late for that."""
        if not live.lifecycle.allows(UploadEvent.CANCEL):
            return False
        live.lifecycle.advance(UploadEvent.CANCEL)
        self.forget(live)
        live.handle = None
        if live.analysis is not None:
            live.analysis.cancel()
        self.app.metrics.uploads.labels("cancelled").inc()
        return True

    def _unreserve(self, live: LiveUpload) -> None:
        """Give the upload's share of the memory budget back (once)."""
        self.app.budget.unreserve(live.reserved, live.reserved_by)
        live.reserved = 0

    def forget(self, live: LiveUpload) -> None:
        """The upload is no longer live: its token and id name nothing from now on."""
        self._unreserve(live)
        if self.live.get(live.token) is live:
            del self.live[live.token]
            self.app.spawn(self.app.store.discard(live.token, live.store_owner), "discard-upload")
        live.ended = True
        self.ended[live.token] = None
        if len(self.ended) > ENDED_REMEMBERED:
            self.ended.popitem(last=False)
        owner = live.owner
        if owner is not None:
            owner.drop(live.upload_id, live)
        live.notify()

    # Outcomes ---------------------------------------------------------------------------------

    def deliver(self, live: LiveUpload, message: Progress | Result | Error) -> None:
        """Send a message about ``live`` to its current owner, under the owner's id for it."""
        if message.id != live.upload_id:
            message = replace(message, id=live.upload_id)
        if isinstance(message, Progress):
            live.last_stage = message
        live.record(message)  # messages are immutable: the history and the owner share it
        if live.owner is not None:
            live.owner.deliver(message)

    def deliver_outcome(self, live: LiveUpload, message: Result | Error) -> None:
        """Deliver the final message; without an owner, keep it for whoever asks for it."""
        if live.owner is None:
            live.undelivered = message
            live.detached_at = self.clock()  # it waits as long from now on
            live.record(replace(message, id=live.upload_id))
            return
        if isinstance(message, Error):
            self.app.metrics.errors.labels(message.code.value).inc()
        live.undelivered = None
        self.deliver(live, message)
        self.forget(live)

    async def analyze(
        self, task: Task, options: dict[str, Any], image: ImageRef, sha256: str,
        principal: str | None, on_stage: StageCallback | None = None,
        *, job_id: str | None = None,
    ) -> tuple[dict[str, Any], bool, dict[str, float]]:
        """The cache, else a job in the queue: (payload, cached, timings_ms)."""
        service = self.app.service
        key = service.cache_key(sha256, task, options, principal)
        payload = await service.lookup(key)
        if payload is not None:
            return payload, True, {}
        payload, timings = await service.run(task, options, image, key, on_stage,
                                             job_id=job_id)
        return payload, False, timings

    async def _analyze_upload(self, live: LiveUpload, finished: FinishedUpload,
                              upload_ms: float) -> None:
        """From the last byte to the outcome."""
        app = self.app
        meta = live.meta
        bind_log_context(upload=meta.upload_id)
        handed_back = False
        try:
            spec = app.service.specs[meta.task]
            payload, cached, job_timings = await self.analyze(
                spec, meta.options, finished.image, finished.sha256, meta.principal,
                self._stage_reporter(live), job_id=upload_job_id(live.token),
            )
            timings = {"upload": upload_ms, **job_timings}
            self._deliver_result(live, payload, cached, timings)
        except asyncio.CancelledError:
            # Shutting down with a shared queue: the job and its image stay in Redis, for the
            # workers and for whichever gateway the client resumes on (it follows the job).
            handed_back = app.stopping and not app.uploads_in_memory
            raise
        except Exception as exc:
            self._deliver_failure(live, exc)
        finally:
            if not handed_back:
                await app.store.release(finished.image)
            self._unreserve(live)

    async def _follow(self, live: LiveUpload) -> None:
        """An upload whose last byte arrived on another gateway: follow its job from here."""
        try:
            spec = self.app.service.specs.get(live.meta.task)
            if spec is None:
                raise ProtocolError(ErrorCode.UNKNOWN_TASK,
                                    f"this server lacks {live.meta.task!r}")
            payload, timings = await self.app.service.follow(
                spec, upload_job_id(live.token), self._stage_reporter(live)
            )
            self._deliver_result(live, payload, False, timings)
        except Exception as exc:
            self._deliver_failure(live, exc)

    def _stage_reporter(self, live: LiveUpload) -> StageCallback:
        def on_stage(stage: Stage, position: int | None,
                     counts: tuple[int, int] | None = None) -> None:
            queue_moved = stage is Stage.QUEUED and live.lifecycle.state is UploadState.QUEUED
            tiles_done = (stage is Stage.INFERENCE and counts is not None
                          and live.lifecycle.state is UploadState.INFERENCE)
            if not queue_moved and not tiles_done:
                event = _STAGE_EVENTS[stage]
                if not live.lifecycle.allows(event):
                    return  # never reordered: a stage from a retried job is not news
                live.lifecycle.advance(event)
            done, total = counts if counts is not None else (None, None)
            self.deliver(live, Progress(id=live.upload_id, stage=stage, position=position,
                                        done=done, total=total))

        return on_stage

    def _deliver_result(self, live: LiveUpload, payload: dict[str, Any], cached: bool,
                        timings: dict[str, float]) -> None:
        self.app.metrics.observe_timings(timings)
        if live.lifecycle.allows(UploadEvent.RESULT):
            live.lifecycle.advance(UploadEvent.RESULT)
            self.app.metrics.uploads.labels("cached" if cached else "completed").inc()
            self.deliver_outcome(live, Result(**payload, cached=cached, timings_ms=timings,
                                              id=live.upload_id))

    def _deliver_failure(self, live: LiveUpload, exc: Exception) -> None:
        """Called from an ``except`` block: cancellation propagates, faults become ``internal``."""
        if isinstance(exc, ProtocolError):
            error = exc
        else:
            reference = secrets.token_hex(4)
            log.exception("analysis of upload %s failed (ref %s)", live.meta.upload_id,
                          reference, extra={"ref": reference})
            error = ProtocolError(ErrorCode.INTERNAL, f"unexpected server fault (ref {reference})")
        if live.lifecycle.allows(UploadEvent.FAIL):
            live.lifecycle.advance(UploadEvent.FAIL)
            self.app.metrics.uploads.labels("failed").inc()
            error.upload_id = live.upload_id
            self.deliver_outcome(live, error_from_exception(error))

    # Expiry -----------------------------------------------------------------------------------

    async def expire_idle(self) -> int:
        """Discard partial uploads idle past the timeout, and outcomes nobody came back for."""
        app = self.app
        idle_s = app.settings.upload_idle_timeout_s
        expired = 0
        for handle in await app.store.expire_idle(idle_s):
            live = self.live.get(handle.token)
            if live is None:
                continue
            expired += 1
            self._expire(live, f"no chunk for {idle_s:g} s: the partial upload was discarded")
        # An upload that received nothing at all goes sooner: declaring costs a client nothing.
        start_s = min(idle_s, UPLOAD_START_TIMEOUT_S)
        unstarted = self.clock() - start_s
        for live in list(self.live.values()):
            if (live.handle is not None and live.handle.received == 0
                    and live.accepted_at <= unstarted):
                expired += 1
                self._expire(live, f"no byte in {start_s:g} s: the upload was discarded")
        deadline = self.clock() - idle_s
        for live in list(self.live.values()):
            if live.owner is None and live.undelivered is not None and live.detached_at <= deadline:
                self.forget(live)
                expired += 1
        return expired

    def _expire(self, live: LiveUpload, why: str) -> None:
        """End a partial upload that went quiet; its owner, if connected, is told ``why``."""
        live.handle = None
        live.lifecycle.advance(UploadEvent.FAIL)
        self.app.metrics.uploads.labels("expired").inc()
        if live.owner is not None:
            self.app.metrics.errors.labels(ErrorCode.UPLOAD_EXPIRED.value).inc()
            live.owner.deliver(error_from_exception(ProtocolError(
                ErrorCode.UPLOAD_EXPIRED, why, upload_id=live.upload_id)))
        self.forget(live)
