"""One WebSocket's protocol, without the socket: messages in, messages out.

:class:`ServerConnection` is fed each received message (:meth:`receive_text`,
:meth:`receive_binary`) and queues what must go back, encoded, for :meth:`data_to_send`;
``on_output`` (when given) is called whenever something was queued, from a handler or from an
analysis finishing later. It reads time only from its ``clock``. The endpoint
(:mod:`server.transports.ws`) moves the bytes; tests drive a connection directly, in
milliseconds. Uploads live in the :class:`~server.uploads.UploadService`, so an upload
outlives the socket that began it and waits there for a resume.

A handler either queues its answers or raises ProtocolError; the error goes back with the ids
of the message that caused it, and the connection carries on.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

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
    Frame,
    Progress,
    Result,
    ServerMessage,
    Stage,
    Upload,
    Welcome,
)
from chunking.reassembler import Appended, UploadState
from server.bounded_json import check_fields_span
from server.limits import TokenBucket
from server.storage.base import ImageRef, UploadHandle
from server.tasks.contract import Task
from server.uploads import CachedResult, Caller, LiveUpload, UploadRequest

if TYPE_CHECKING:
    from server.state import AppState

log = logging.getLogger("pixelstream.session")


@dataclass(eq=False)
class _Stream:
    last_seq: int = -1
    running: asyncio.Task[None] | None = None
    waiting: tuple[Frame, Task, dict[str, Any]] | None = None


class ServerConnection:
    """The server side of one WebSocket (see the module). ``client`` names whose budgets it
    spends: the token's ``principal`` when there is one, else the peer's address."""

    def __init__(self, app: AppState, principal: str | None = None, client: str = "unknown",
                 *, clock: Callable[[], float] = time.monotonic,
                 on_output: Callable[[], None] | None = None) -> None:
        self.app = app
        self.uploads_service = app.uploads
        self.caller = Caller(principal=principal, client=principal or client)
        self.principal = principal
        self.client = self.caller.client
        self.key = secrets.token_hex(12)
        """The session id (``welcome.session``), and the owner's name in the upload store."""
        self.uploads: dict[str, LiveUpload] = {}
        self.streams: dict[str, _Stream] = {}
        self.clock = clock
        self.on_output = on_output
        settings = app.settings
        self.bucket = TokenBucket(settings.messages_per_second, settings.message_burst,
                                  clock=clock)
        self.byte_bucket = TokenBucket(
            settings.socket_bytes_per_second,
            max(settings.socket_bytes_per_second, app.limits.max_message_bytes),
            clock=clock,
        )
        self.closed = False
        self.last_activity = clock()
        """When the client last sent a message or was sent an outcome (for the idle timeout)."""
        self.messages_received = 0
        self._outgoing: deque[str] = deque()

    # Entry points -----------------------------------------------------------------------------

    def start(self) -> None:
        """Queue the ``welcome``."""
        service = self.app.service
        self.send(Welcome(session=self.key, limits=self.app.limits, tasks=service.tasks,
                          default_task=service.default_task))

    async def receive_text(self, text: str) -> None:
        def parse() -> ClientMessage:
            span = check_fields_span(text, "data")  # the scan finds the Base64 for the codec
            return parse_client_text(text, self.app.limits, data_span=span)

        await self._receive(parse, len(text))

    async def receive_binary(self, data: bytes) -> None:
        await self._receive(lambda: parse_client_binary(data, self.app.limits), len(data))

    def data_to_send(self, limit: int | None = None) -> list[str]:
        """The text frames queued since the last call, in order; at most ``limit`` of them
        (the rest stay queued and count in :attr:`pending`)."""
        if limit is None or limit >= len(self._outgoing):
            frames = list(self._outgoing)
            self._outgoing.clear()
            return frames
        return [self._outgoing.popleft() for _ in range(limit)]

    @property
    def pending(self) -> int:
        """Frames queued and not yet taken by :meth:`data_to_send`."""
        return len(self._outgoing)

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
        for live in self.uploads.values():
            if live.owner is self:
                self.uploads_service.detach(live)
        self.uploads.clear()
        for stream in self.streams.values():
            if stream.waiting is not None:
                self.app.budget.release(len(stream.waiting[0].data))
                stream.waiting = None
            if stream.running is not None:
                stream.running.cancel()  # its task gives its frame's bytes back
        self.streams.clear()
        self._outgoing.clear()

    # UploadOwner ------------------------------------------------------------------------------

    def deliver(self, message: ServerMessage) -> None:
        self.send(message)

    def drop(self, upload_id: str, live: LiveUpload) -> None:
        if self.uploads.get(upload_id) is live:
            del self.uploads[upload_id]

    # Dispatch -----------------------------------------------------------------------------------

    async def _receive(self, parse: Callable[[], ClientMessage], size: int) -> None:
        self.messages_received += 1
        self.last_activity = self.clock()
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
                self._on_cancel(message)
        except ProtocolError as exc:
            self.send_error(self._with_ids(exc, message))
        except Exception:
            reference = secrets.token_hex(4)
            log.exception("unexpected fault handling a message (ref %s)", reference,
                          extra={"ref": reference})
            fault = ProtocolError(ErrorCode.INTERNAL, f"unexpected server fault (ref {reference})")
            self.send_error(self._with_ids(fault, message))

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
            exc.expected = live.received
        return exc

    def send(self, message: ServerMessage) -> None:
        if self.closed:
            return
        if not isinstance(message, Progress):
            self.last_activity = self.clock()  # an outcome: idleness counts from here
        self._outgoing.append(encode_server(message).decode())
        if self.on_output is not None:
            self.on_output()

    def send_error(self, exc: ProtocolError) -> None:
        self.app.metrics.errors.labels(exc.code.value).inc()
        self.send(error_from_exception(exc))

    # Uploads ------------------------------------------------------------------------------------

    def _check_can_receive(self) -> None:
        receiving = sum(
            1 for live in self.uploads.values() if live.lifecycle.state is UploadState.RECEIVING
        )
        if receiving >= self.app.limits.max_uploads:
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
        request = UploadRequest(upload_id=message.id, size=message.size, task=message.task,
                                options=message.options, sha256=message.sha256,
                                name=message.name)
        created = await self.uploads_service.create(request, self.caller, self, self.key)
        if isinstance(created, CachedResult):
            # The client sends no chunks: its token names nothing, nothing is held.
            self.send(Accepted(id=message.id, offset=message.size, resume=created.token))
            self.send(Result(**created.payload, cached=True, timings_ms={}, id=message.id))
            return
        self.uploads[message.id] = created
        self.send(Accepted(id=message.id, offset=0, resume=created.token))

    async def _resume(self, message: Upload, token: str) -> None:
        def check(handle: UploadHandle) -> None:
            if message.size != handle.meta.size or message.sha256 != handle.meta.sha256:
                raise ProtocolError(
                    ErrorCode.BAD_MESSAGE, "size and sha256 must match the upload being resumed"
                )
            if not handle.complete:
                self._check_can_receive()

        service = self.uploads_service
        live, held = await service.resume(token, self.caller, self.key, check)
        service.adopt(live, self, message.id)
        self.uploads[message.id] = live
        self.send(Accepted(id=message.id, offset=held, resume=token))
        service.catch_up(live)

    async def _on_chunk(self, chunk: Chunk) -> None:
        live = self.uploads.get(chunk.id)
        if live is None:
            raise ProtocolError(ErrorCode.UNKNOWN_UPLOAD, f"no live upload {chunk.id!r}")
        try:
            event = await self.uploads_service.write(live, self.caller, self.key, chunk.offset,
                                                     chunk.data)
        except ProtocolError as exc:
            if exc.code is ErrorCode.UNKNOWN_UPLOAD:
                self.drop(chunk.id, live)
            raise
        self.send(Progress(id=chunk.id, stage=Stage.UPLOAD, received=event.received,
                           total=event.total))
        if isinstance(event, Appended) and event.complete:
            await self.uploads_service.finish(live)

    def _on_cancel(self, message: Cancel) -> None:
        live = self.uploads.get(message.id)
        if live is None or not self.uploads_service.cancel(live):
            raise ProtocolError(ErrorCode.UNKNOWN_UPLOAD, f"no live upload {message.id!r}")
        self.send(Cancelled(id=message.id))

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
        try:
            data = bytes(frame.data)
            image = ImageRef(size=len(data), data=data)
            payload, cached, timings = await self.uploads_service.analyze(
                spec, options, image, hashlib.sha256(data).hexdigest(), self.principal
            )
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
