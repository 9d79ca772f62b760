"""One WebSocket's protocol session: uploads, camera streams, and what goes back.

The endpoint (:mod:`server.ws`) feeds each received frame to :meth:`Session.receive_text` or
:meth:`Session.receive_binary` and drains :class:`Outbox` to the socket. A handler either
sends its answers or raises ProtocolError; the error is sent with the ids of the message that
caused it, and the socket carries on. Analysis of a finished upload runs in a task owned by
the app, not the socket: if the socket drops, the upload's outcome waits for a resume.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.websockets import WebSocket

from chunking.codec import (
    encode_server,
    error_from_exception,
    parse_client_binary,
    parse_client_text,
)
from chunking.errors import ErrorCode, ProtocolError
from chunking.messages import (
    Accepted,
    Cancel,
    Cancelled,
    Chunk,
    ClientMessage,
    Dropped,
    Error,
    Frame,
    Progress,
    Result,
    ServerMessage,
    Stage,
    Upload,
    Welcome,
)
from chunking.reassembler import Appended, Lifecycle, UploadEvent, UploadState
from server.analysis import StageCallback, upload_job_id
from server.limits import TokenBucket
from server.logs import bind_log_context
from server.state import AppState
from server.storage.base import FinishedUpload, ImageRef, UploadHandle, UploadMeta
from server.storage.memory import new_resume_token
from server.tasks.contract import Task

log = logging.getLogger("pixelstream.session")

_STAGE_EVENTS = {
    Stage.QUEUED: UploadEvent.QUEUED,
    Stage.DECODING: UploadEvent.DECODING,
    Stage.INFERENCE: UploadEvent.INFERENCE,
}


class Outbox:
    """Messages waiting for one socket. Producers never block; the reader waits for
    :meth:`drained` so a client that does not read stops being read (backpressure)."""

    def __init__(self, high_water: int = 256) -> None:
        self.high_water = high_water
        self._messages: deque[bytes] = deque()
        self._ready = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()

    def send(self, message: ServerMessage) -> None:
        self._messages.append(encode_server(message))
        self._ready.set()
        if len(self._messages) > self.high_water:
            self._drained.clear()

    async def drained(self) -> None:
        await self._drained.wait()

    def __len__(self) -> int:
        return len(self._messages)

    async def run(self, websocket: WebSocket) -> None:
        """Send queued messages until cancelled (or the socket fails)."""
        try:
            while True:
                await self._ready.wait()
                while self._messages:
                    await websocket.send_text(self._messages.popleft().decode())
                    if len(self._messages) <= self.high_water // 2:
                        self._drained.set()
                self._ready.clear()
        finally:
            # Nothing will drain the queue now: wake a reader waiting on drained(), so it sees
            # the sender gone and ends the session (else it would wait for ever, holding the
            # connection's place and its uploads).
            self._messages.clear()
            self._drained.set()


@dataclass(eq=False)
class LiveUpload:
    """An upload from ``accepted`` until its outcome is delivered (or it is cancelled)."""

    token: str
    meta: UploadMeta
    accepted_at: float
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    handle: UploadHandle | None = None
    """The store's handle while bytes are still arriving."""
    session: Session | None = None
    """The socket that owns it now; None while no socket does (awaiting a resume)."""
    upload_id: str = ""
    """The owner's name for it (a resume on another socket may pick another id)."""
    detached_at: float = 0.0
    last_stage: Progress | None = None
    undelivered: Result | Error | None = None
    """The outcome, when it came while no socket owned the upload."""
    analysis: asyncio.Task[None] | None = None
    store_owner: str = ""
    """The session key that owns the upload in the store (what ``discard`` must name)."""
    reserved: int = 0
    """Bytes of the memory budget this upload holds (its size, while this process keeps its
    bytes); given back when it is forgotten or its image released."""
    reserved_by: str | None = None
    """The client the reservation counts against (the one that began the upload)."""
    ahead_job: str | None = None
    """The job id a worker decodes this upload ahead for, while its bytes arrive."""
    ahead_reported: int = 0
    """The byte count last reported to that worker."""


@dataclass(eq=False)
class _Stream:
    last_seq: int = -1
    running: asyncio.Task[None] | None = None
    waiting: tuple[Frame, Task, dict[str, Any]] | None = None


class Session:
    def __init__(self, app: AppState, outbox: Outbox, principal: str | None = None,
                 client: str = "unknown") -> None:
        self.app = app
        self.outbox = outbox
        self.principal = principal
        self.client = principal or client
        """Whose budgets this socket spends: the token's principal, else the address."""
        self.key = secrets.token_hex(12)
        self.uploads: dict[str, LiveUpload] = {}
        self.streams: dict[str, _Stream] = {}
        settings = app.settings
        self.bucket = TokenBucket(settings.messages_per_second, settings.message_burst)
        self.byte_bucket = TokenBucket(
            settings.socket_bytes_per_second,
            max(settings.socket_bytes_per_second, app.limits.max_message_bytes),
        )
        self.closed = False
        self.last_activity = time.monotonic()
        """When the client last sent a message or was sent an outcome (for the idle timeout)."""
        self.messages_received = 0

    # Entry points -----------------------------------------------------------------------------

    def start(self) -> None:
        service = self.app.service
        self.outbox.send(
            Welcome(session=self.key, limits=self.app.limits, tasks=service.tasks,
                    default_task=service.default_task)
        )

    async def receive_text(self, text: str) -> None:
        await self._receive(lambda: parse_client_text(text, self.app.limits), len(text))

    async def receive_binary(self, data: bytes) -> None:
        await self._receive(lambda: parse_client_binary(data, self.app.limits), len(data))

    @property
    def owes_replies(self) -> bool:
        """True while the server owes this socket an outcome it is working on (an upload past
        its last byte, a frame being analysed): the client may well be silent meanwhile."""
        return any(
            live.lifecycle.state is not UploadState.RECEIVING for live in self.uploads.values()
        ) or any(stream.running is not None for stream in self.streams.values())

    def close(self) -> None:
        """The socket is gone: uploads wait for a resume, streams stop."""
        self.closed = True
        now = time.monotonic()
        for live in self.uploads.values():
            if live.session is self:
                live.session = None
                live.detached_at = now
        self.uploads.clear()
        for stream in self.streams.values():
            if stream.waiting is not None:
                self.app.budget.release(len(stream.waiting[0].data))
                stream.waiting = None
            if stream.running is not None:
                stream.running.cancel()  # its task gives its frame's bytes back
        self.streams.clear()

    # Dispatch -----------------------------------------------------------------------------------

    async def _receive(self, parse: Callable[[], ClientMessage], size: int) -> None:
        self.messages_received += 1
        self.last_activity = time.monotonic()
        wait_ms = self.bucket.take()  # every message counts, bad ones too
        what = "messages"
        if not wait_ms:
            wait_ms = self.byte_bucket.take(size)
            what = "bytes"
        message: ClientMessage | None = None
        try:
            message = parse()
            if wait_ms:
                raise ProtocolError(
                    ErrorCode.RATE_LIMITED, f"too many {what} on this socket; slow down",
                    retry_after_ms=wait_ms,
                )
            if isinstance(message, Chunk):
                await self._on_chunk(message)
            elif isinstance(message, Upload):
                await self._on_upload(message)
            elif isinstance(message, Frame):
                self._on_frame(message)
            elif isinstance(message, Cancel):
                await self._on_cancel(message)
        except ProtocolError as exc:
            self.send_error(self._with_ids(exc, message))
        except Exception:
            reference = secrets.token_hex(4)
            log.exception("unexpected fault handling a message (ref %s)", reference,
                          extra={"ref": reference})
            fault = ProtocolError(ErrorCode.INTERNAL, f"unexpected server fault (ref {reference})")
            self.send_error(self._with_ids(fault, message))
        await self.outbox.drained()

    def _with_ids(self, exc: ProtocolError, message: ClientMessage | None) -> ProtocolError:
        """Name the upload or frame an error concerns, and, for a chunk refused before the
        offset rules (too large, bad Base64, rate-limited), where the client must resume."""
        if isinstance(message, (Upload, Chunk, Cancel)) and exc.upload_id is None:
            exc.upload_id = message.id
        if isinstance(message, Frame) and exc.stream is None:
            exc.stream, exc.seq = message.stream, message.seq
        is_chunk = isinstance(message, Chunk) or exc.message_type == "chunk"
        if (
            is_chunk
            and exc.expected is None
            and exc.upload_id is not None
            and (live := self.uploads.get(exc.upload_id)) is not None
        ):
            exc.expected = live.handle.received if live.handle is not None else live.meta.size
        return exc

    def send(self, message: ServerMessage) -> None:
        if not self.closed:
            if not isinstance(message, Progress):
                self.last_activity = time.monotonic()  # an outcome: idleness counts from here
            self.outbox.send(message)

    def send_error(self, exc: ProtocolError) -> None:
        self.app.metrics.errors.labels(exc.code.value).inc()
        self.send(error_from_exception(exc))

    # Uploads ------------------------------------------------------------------------------------

    def _receiving(self) -> int:
        return sum(
            1 for live in self.uploads.values() if live.lifecycle.state is UploadState.RECEIVING
        )

    def _check_can_receive(self) -> None:
        if self._receiving() >= self.app.limits.max_uploads:
            raise ProtocolError(
                ErrorCode.TOO_MANY_UPLOADS,
                f"this socket already receives {self.app.limits.max_uploads} uploads",
            )

    async def _on_upload(self, message: Upload) -> None:
        if message.id in self.uploads:
            raise ProtocolError(
                ErrorCode.DUPLICATE_UPLOAD, f"id {message.id!r} already names a live upload"
            )
        if message.resume is not None:
            await self._resume(message, message.resume)
            return
        self._check_can_receive()
        service = self.app.service
        spec, options = service.resolve(message.task, message.options)
        service.check_capacity()
        await self.app.client_limits.upload_started(self.client)
        meta = UploadMeta(
            upload_id=message.id, size=message.size, task=spec.name, options=options,
            sha256=message.sha256, name=message.name, principal=self.principal,
        )
        if message.sha256 is not None:
            key = service.cache_key(message.sha256, spec, options, self.principal)
            payload = await service.lookup(key)
            if payload is not None:
                # The client sends no chunks: its token names nothing, nothing is held.
                self.send(Accepted(id=message.id, offset=message.size, resume=new_resume_token()))
                self.send(Result(**payload, cached=True, timings_ms={}, id=message.id))
                self.app.metrics.uploads.labels("cached").inc()
                return
        reserved = 0
        budget = self.app.budget
        if self.app.uploads_in_memory:
            if not budget.reserve(message.size, self.client):
                over_share = budget.owned(self.client) + message.size > budget.share
                raise ProtocolError(
                    ErrorCode.BUSY,
                    "this client's unfinished uploads hold all the memory one client may; "
                    "retry when one ends" if over_share
                    else "the server holds all the upload bytes it may; retry later",
                    retry_after_ms=self.app.service.pool.retry_after_ms(),
                )
            reserved = message.size
        try:
            handle = await self.app.store.create(meta, self.key)
        except BaseException:
            budget.release(reserved, self.client)
            raise
        live = LiveUpload(token=handle.token, meta=meta, accepted_at=time.monotonic(),
                          handle=handle, store_owner=self.key, reserved=reserved,
                          reserved_by=self.client)
        job_id = upload_job_id(live.token)
        if service.begin_decode_ahead(job_id, spec.name, handle.local_path, message.size):
            live.ahead_job = job_id
        self.app.live[live.token] = live
        self._adopt(live, message.id)
        self.app.metrics.uploads.labels("accepted").inc()
        self.send(Accepted(id=message.id, offset=0, resume=live.token))

    async def _resume(self, message: Upload, token: str) -> None:
        def check(handle: UploadHandle) -> None:
            if handle.meta.principal != self.principal:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_UPLOAD, "the resume token names no live upload"
                )
            if message.size != handle.meta.size or message.sha256 != handle.meta.sha256:
                raise ProtocolError(
                    ErrorCode.BAD_MESSAGE, "size and sha256 must match the upload being resumed"
                )
            if not handle.complete:
                self._check_can_receive()

        handle = await self.app.store.claim(token, self.key, check)
        live = self.app.live.get(token)
        if live is None:
            # Begun on another gateway that shares the store.
            live = LiveUpload(token=token, meta=handle.meta, accepted_at=time.monotonic())
            self.app.live[token] = live
            if handle.complete:
                live.lifecycle = Lifecycle(UploadState.COMPLETE)
                live.analysis = self.app.spawn(follow_upload(self.app, live), "follow-upload")
        live.store_owner = self.key
        if not handle.complete:
            live.handle = handle
        self._adopt(live, message.id)
        held = live.meta.size if handle.complete else handle.received
        self.send(Accepted(id=message.id, offset=held, resume=token))
        if live.undelivered is not None:
            deliver_outcome(self.app, live, live.undelivered)
        elif live.last_stage is not None:
            deliver(self.app, live, live.last_stage)

    def _adopt(self, live: LiveUpload, upload_id: str) -> None:
        """Make this socket the upload's owner; an older socket loses it."""
        previous = live.session
        if previous is not None and previous.uploads.get(live.upload_id) is live:
            del previous.uploads[live.upload_id]
        live.session = self
        live.upload_id = upload_id
        self.uploads[upload_id] = live

    async def _on_chunk(self, chunk: Chunk) -> None:
        live = self.uploads.get(chunk.id)
        if live is None:
            raise ProtocolError(ErrorCode.UNKNOWN_UPLOAD, f"no live upload {chunk.id!r}")
        if live.handle is None:
            # Every byte is already held: replays are acknowledged, anything else refused.
            size = live.meta.size
            if chunk.offset + len(chunk.data) > size:
                raise ProtocolError(
                    ErrorCode.OFFSET_MISMATCH, "the upload is complete", expected=size
                )
            self.send(Progress(id=chunk.id, stage=Stage.UPLOAD, received=size, total=size))
            return
        if chunk.offset == live.handle.received and chunk.data:
            await self.app.client_limits.bytes_received(self.client, len(chunk.data))
        try:
            event = await self.app.store.write(live.handle, self.key, chunk)
        except ProtocolError as exc:
            if exc.code is ErrorCode.UNKNOWN_UPLOAD:
                self.uploads.pop(chunk.id, None)
            raise
        if isinstance(event, Appended):
            self.app.metrics.upload_bytes.inc(len(chunk.data))
            report_arrival(self.app, live, event.received)
        self.send(Progress(id=chunk.id, stage=Stage.UPLOAD, received=event.received,
                           total=event.total))
        if isinstance(event, Appended) and event.complete:
            await self._finish(live)

    async def _finish(self, live: LiveUpload) -> None:
        assert live.handle is not None
        upload_ms = (time.monotonic() - live.accepted_at) * 1000
        handle, live.handle = live.handle, None
        try:
            finished = await self.app.store.finish(handle)
        except ProtocolError:
            live.lifecycle.advance(UploadEvent.FAIL)
            self._forget(live)
            self.app.metrics.uploads.labels("failed").inc()
            raise
        live.lifecycle.advance(UploadEvent.LAST_BYTE)
        live.analysis = self.app.spawn(
            analyze_upload(self.app, live, finished, round(upload_ms, 3)), "analyze-upload"
        )

    async def _on_cancel(self, message: Cancel) -> None:
        live = self.uploads.get(message.id)
        if live is None or not live.lifecycle.allows(UploadEvent.CANCEL):
            raise ProtocolError(ErrorCode.UNKNOWN_UPLOAD, f"no live upload {message.id!r}")
        live.lifecycle.advance(UploadEvent.CANCEL)
        self._forget(live)
        live.handle = None
        if live.analysis is not None:
            live.analysis.cancel()
        self.app.metrics.uploads.labels("cancelled").inc()
        self.send(Cancelled(id=message.id))

    def _forget(self, live: LiveUpload) -> None:
        forget(self.app, live)

    # Camera frames ------------------------------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        spec, options = self.app.service.resolve(frame.task, frame.options)
        stream = self.streams.get(frame.stream)
        if stream is None:
            if len(self.streams) >= self.app.limits.max_uploads:
                raise ProtocolError(
                    ErrorCode.TOO_MANY_UPLOADS,
                    f"this socket already has {self.app.limits.max_uploads} camera streams",
                )
            stream = self.streams[frame.stream] = _Stream()
        if frame.seq <= stream.last_seq:
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE,
                f"seq must grow within a stream (last was {stream.last_seq})",
            )
        stream.last_seq = frame.seq
        # Own the bytes: the received message's buffer is not ours to keep. They count against
        # the memory budget until the frame is analysed or dropped.
        frame = replace(frame, data=bytes(frame.data))
        self.app.budget.charge(len(frame.data))
        if stream.running is None:
            self._run_frame(stream, frame, spec, options)
            return
        if stream.waiting is not None:
            superseded = stream.waiting[0]
            self.app.budget.release(len(superseded.data))
            self.send(Dropped(stream=superseded.stream, seq=superseded.seq, reason="superseded"))
            self.app.metrics.frames.labels("dropped").inc()
        stream.waiting = (frame, spec, options)

    def _run_frame(
        self, stream: _Stream, frame: Frame, spec: Task, options: dict[str, Any]
    ) -> None:
        stream.running = asyncio.create_task(
            self._analyze_frame(stream, frame, spec, options), name="analyze-frame"
        )
        # A done callback, not the task's own ``finally``: a task cancelled before its first
        # step (its socket closed at once) never runs its body, finally blocks included.
        size = len(frame.data)
        stream.running.add_done_callback(lambda _: self.app.budget.release(size))

    async def _analyze_frame(
        self, stream: _Stream, frame: Frame, spec: Task, options: dict[str, Any]
    ) -> None:
        service = self.app.service
        try:
            data = bytes(frame.data)
            key = service.cache_key(hashlib.sha256(data).hexdigest(), spec, options,
                                    self.principal)
            payload = await service.lookup(key)
            cached = payload is not None
            timings: dict[str, float] = {}
            if payload is None:
                image = ImageRef(size=len(data), data=data)
                payload, timings = await service.run(spec, options, image, key)
            self.app.metrics.observe_timings(timings)
            self.app.metrics.frames.labels("processed").inc()
            self.send(Result(**payload, cached=cached, timings_ms=timings, stream=frame.stream,
                             seq=frame.seq))
        except ProtocolError as exc:
            exc.stream, exc.seq = frame.stream, frame.seq
            self.app.metrics.frames.labels("failed").inc()
            self.send_error(exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("frame %s/%d failed", frame.stream, frame.seq)
            self.send_error(ProtocolError(ErrorCode.INTERNAL, "unexpected server fault",
                                          stream=frame.stream, seq=frame.seq))
        finally:
            stream.running = None
            if stream.waiting is not None and not self.closed:
                waiting, stream.waiting = stream.waiting, None
                self._run_frame(stream, *waiting)


# Upload outcomes: module functions, since an upload can outlive the socket that began it. -------


def unreserve(app: AppState, live: LiveUpload) -> None:
    """Give the upload's share of the memory budget back (once)."""
    app.budget.release(live.reserved, live.reserved_by)
    live.reserved = 0


ARRIVAL_STEP = 1 << 20
"""Bytes between reports to a worker decoding an upload ahead (one message per MiB)."""


def report_arrival(app: AppState, live: LiveUpload, received: int) -> None:
    """Tell the worker decoding ``live`` ahead that its first ``received`` bytes are in."""
    if live.ahead_job is None:
        return
    if received - live.ahead_reported >= ARRIVAL_STEP or received == live.meta.size:
        live.ahead_reported = received
        app.service.bytes_arrived(live.ahead_job, received)


def end_decode_ahead(app: AppState, live: LiveUpload) -> None:
    """The upload's decode ahead is no longer wanted (a no-op once its job took it)."""
    if live.ahead_job is not None:
        app.service.drop_decode(live.ahead_job)
        live.ahead_job = None


def forget(app: AppState, live: LiveUpload) -> None:
    """The upload is no longer live: its token and id name nothing from now on."""
    unreserve(app, live)
    end_decode_ahead(app, live)
    if app.live.get(live.token) is live:
        del app.live[live.token]
        app.spawn(app.store.discard(live.token, live.store_owner), "discard-upload")
    session = live.session
    if session is not None and session.uploads.get(live.upload_id) is live:
        del session.uploads[live.upload_id]


def deliver(app: AppState, live: LiveUpload, message: Progress | Result | Error) -> None:
    """Send a message about ``live`` to its current owner, under the owner's id for it."""
    if isinstance(message, Progress):
        live.last_stage = message
    if live.session is not None:
        live.session.send(replace(message, id=live.upload_id))


def deliver_outcome(app: AppState, live: LiveUpload, message: Result | Error) -> None:
    """Deliver the final message; without an owner, keep it for the resume that will ask."""
    if live.session is None:
        live.undelivered = message
        return
    if isinstance(message, Error):
        app.metrics.errors.labels(message.code.value).inc()
    deliver(app, live, message)
    forget(app, live)


async def analyze_upload(
    app: AppState, live: LiveUpload, finished: FinishedUpload, upload_ms: float
) -> None:
    """From the last byte to the outcome: the cache, else a job in the queue."""
    service = app.service
    meta = live.meta
    bind_log_context(upload=meta.upload_id)
    handed_back = False
    try:
        spec = service.specs[meta.task]
        key = service.cache_key(finished.sha256, spec, meta.options, meta.principal)
        payload = await service.lookup(key)
        cached = payload is not None
        timings = {"upload": upload_ms}
        if payload is None:
            payload, job_timings = await service.run(
                spec, meta.options, finished.image, key, _stage_reporter(app, live),
                job_id=upload_job_id(live.token),
            )
            timings.update(job_timings)
        _deliver_result(app, live, payload, cached, timings)
    except asyncio.CancelledError:
        # Shutting down with a shared queue: the job and its image stay in Redis, for the
        # workers and for whichever gateway the client resumes on (it follows the job).
        handed_back = app.stopping and not app.uploads_in_memory
        raise
    except Exception as exc:
        _deliver_failure(app, live, exc)
    finally:
        end_decode_ahead(app, live)
        if not handed_back:
            await app.store.release(finished.image)
        unreserve(app, live)


async def follow_upload(app: AppState, live: LiveUpload) -> None:
    """An upload whose last byte arrived on another gateway: follow its job from here."""
    try:
        spec = app.service.specs.get(live.meta.task)
        if spec is None:
            raise ProtocolError(ErrorCode.UNKNOWN_TASK, f"this server lacks {live.meta.task!r}")
        payload, timings = await app.service.follow(
            spec, upload_job_id(live.token), _stage_reporter(app, live)
        )
        _deliver_result(app, live, payload, False, timings)
    except Exception as exc:
        _deliver_failure(app, live, exc)


def _stage_reporter(app: AppState, live: LiveUpload) -> StageCallback:
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
        deliver(app, live, Progress(id=live.upload_id, stage=stage, position=position,
                                    done=done, total=total))

    return on_stage


def _deliver_result(app: AppState, live: LiveUpload, payload: dict[str, Any], cached: bool,
                    timings: dict[str, float]) -> None:
    app.metrics.observe_timings(timings)
    if live.lifecycle.allows(UploadEvent.RESULT):
        live.lifecycle.advance(UploadEvent.RESULT)
        app.metrics.uploads.labels("cached" if cached else "completed").inc()
        deliver_outcome(app, live, Result(**payload, cached=cached, timings_ms=timings,
                                          id=live.upload_id))


def _deliver_failure(app: AppState, live: LiveUpload, exc: Exception) -> None:
    """Called from an ``except`` block: cancellation propagates, faults become ``internal``."""
    if isinstance(exc, ProtocolError):
        error = exc
    else:
        reference = secrets.token_hex(4)
        log.exception("analysis of upload %s failed (ref %s)", live.meta.upload_id, reference,
                      extra={"ref": reference})
        error = ProtocolError(ErrorCode.INTERNAL, f"unexpected server fault (ref {reference})")
    if live.lifecycle.allows(UploadEvent.FAIL):
        live.lifecycle.advance(UploadEvent.FAIL)
        app.metrics.uploads.labels("failed").inc()
        error.upload_id = live.upload_id
        deliver_outcome(app, live, error_from_exception(error))


async def expire_idle_uploads(app: AppState) -> int:
    """Discard partial uploads idle past the timeout, and outcomes nobody came back for."""
    idle_s = app.settings.upload_idle_timeout_s
    expired = 0
    for handle in await app.store.expire_idle(idle_s):
        live = app.live.get(handle.token)
        if live is None:
            continue
        expired += 1
        live.handle = None
        live.lifecycle.advance(UploadEvent.FAIL)
        app.metrics.uploads.labels("expired").inc()
        if live.session is not None:
            live.session.send_error(ProtocolError(
                ErrorCode.UPLOAD_EXPIRED,
                f"no chunk for {idle_s:g} s: the partial upload was discarded",
                upload_id=live.upload_id,
            ))
        forget(app, live)
    deadline = time.monotonic() - idle_s
    for live in list(app.live.values()):
        if live.session is None and live.undelivered is not None and live.detached_at <= deadline:
            forget(app, live)
            expired += 1
    return expired
