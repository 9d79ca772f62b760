"""pixelstream's Python client: resumable uploads and camera streams over one WebSocket.

The protocol logic is the sans-I/O core (:mod:`chunking.codec` for the wire,
:class:`chunking.splitter.UploadSender` for which bytes go next within the server's window);
this module adds the I/O, with the ``websockets`` library, and the resilience of tus-js-client::

    async with Client("ws://127.0.0.1:8000/v1/ws", token="...") as client:
        result = await client.analyze("scan.tif", task="classify", options={"top_k": 3},
                                      on_progress=lambda sent, acked, total: ...)
        async for event in client.stream_frames(0, fps=15):   # camera 0
            ...

* **One socket, many uploads.** ``analyze`` may run concurrently (``asyncio.gather``); every
  upload shares the socket, at most the server's ``max_uploads`` receive at once and all of
  them together keep at most ``window_bytes`` unacknowledged. One reader task dispatches the
  server's messages by upload id and stream name.
* **Files are streamed from disk**: each span is read (``os.pread``, in a thread) when it is
  about to be sent; nothing reads a whole file. The SHA-256, which ``upload`` must carry
  before the first byte, is computed first in a thread with a bounded buffer: it lets the
  server answer at once from its cache and catch corruption. ``checksum=False`` skips it (the
  file is then read once instead of twice).
* **Resilience**: a dropped connection, a stall (a reply owed and nothing heard for
  ``stall_timeout`` seconds), ``busy``, ``rate_limited`` (after ``retry_after_ms``) and the
  other transient codes are retried after ``retry_delays`` seconds each; the upload resumes
  by its token from the offset the server holds (even after its last byte: the result is
  then delivered). The retry counter resets whenever the upload makes progress.
  ``on_should_retry(error, retry_attempt)`` overrides the decision.
* **Typed errors**: every protocol code has its exception class (``BusyError``,
  ``InvalidImageError``, ...), all subclasses of :class:`PixelstreamError` (itself a
  :class:`chunking.errors.ProtocolError` with ``.code``). Failures of the connection are
  :class:`ConnectionLostError` (and :class:`StalledError`), a per-upload ``timeout`` is
  :class:`UploadTimeoutError`.

Callbacks run on the event loop and must not block: ``on_progress(sent, acknowledged,
total)``, ``on_stage(stage, detail)`` (``upload`` with ``{"offset", "resumed"}`` once
accepted, then ``queued`` with ``{"position"}``, ``decoding``, ``inference``, and the client's
own ``hashing`` (before the SHA-256 of the file is computed) and ``retrying`` with
``{"attempt", "delay", "error", "code"}``), ``on_result(result)`` and ``on_error(error)``: the
names and details of the JavaScript client (``client_js``), in snake_case.

:class:`SyncClient` and :func:`analyze_sync` wrap all this for scripts without asyncio;
:func:`analyze_http` uses the HTTP route instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from chunking.codec import encode_client_binary, encode_client_text, parse_server
from chunking.errors import ErrorCode, ProtocolError
from chunking.limits import MAX_NAME_LENGTH, Limits
from chunking.messages import (
    Accepted,
    Cancel,
    Cancelled,
    Chunk,
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
from chunking.splitter import UploadSender

__all__ = [
    "DEFAULT_HTTP_URL",
    "DEFAULT_RETRY_DELAYS",
    "DEFAULT_URL",
    "ERRORS",
    "RETRYABLE_CODES",
    "BadBase64Error",
    "BadMessageError",
    "BusyError",
    "ChecksumMismatchError",
    "Client",
    "ClientClosedError",
    "ConnectFailedError",
    "ConnectionLostError",
    "DuplicateUploadError",
    "ForbiddenOriginError",
    "FrameDropped",
    "FrameEvent",
    "FrameFailed",
    "FrameResult",
    "FrameStats",
    "FrameStream",
    "InternalError",
    "InvalidImageError",
    "OffsetMismatchError",
    "PixelstreamError",
    "RateLimitedError",
    "StalledError",
    "SyncClient",
    "SyncFrameStream",
    "TooLargeError",
    "TooManyPixelsError",
    "TooManyUploadsError",
    "UnauthorizedError",
    "UnknownTaskError",
    "UnknownUploadError",
    "UploadExpiredError",
    "UploadTimeoutError",
    "analyze_http",
    "analyze_sync",
    "error_code",
    "error_from_message",
    "is_retryable",
]

log = logging.getLogger("pixelstream.client")

DEFAULT_URL: Final = "ws://127.0.0.1:8000/v1/ws"
DEFAULT_HTTP_URL: Final = "http://127.0.0.1:8000"
DEFAULT_RETRY_DELAYS: Final[tuple[float, ...]] = (0.0, 1.0, 3.0, 5.0)
"""Seconds to wait before each retry (tus-js-client's ``[0, 1000, 3000, 5000]`` ms)."""
DEFAULT_CHUNK_SIZE: Final = 1 << 20
"""Largest chunk sent; also capped by the server's ``max_chunk_bytes`` and ``window_bytes``."""
HASH_BUFFER_BYTES: Final = 1 << 20
"""Read size while hashing a file: memory stays bounded whatever the file's size."""
LATENCY_WINDOW: Final = 10_000
"""Frame latencies kept for percentiles (the most recent ones)."""


# Errors -------------------------------------------------------------------------------------


class PixelstreamError(ProtocolError):
    """An error the server reported, by its stable code: one subclass per code.

    ``except BusyError`` catches one code; ``except PixelstreamError as e`` with ``e.code``
    catches them all. ``retry_after_ms`` is set for ``busy`` and ``rate_limited``;
    ``expected`` for offset errors.
    """

    error_code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    def __init__(
        self,
        message: str = "",
        *,
        upload_id: str | None = None,
        stream: str | None = None,
        seq: int | None = None,
        expected: int | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(
            self.error_code,
            message or self.error_code.value,
            upload_id=upload_id,
            stream=stream,
            seq=seq,
            expected=expected,
            retry_after_ms=retry_after_ms,
        )

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class BadMessageError(PixelstreamError):
    error_code = ErrorCode.BAD_MESSAGE


class BadBase64Error(PixelstreamError):
    error_code = ErrorCode.BAD_BASE64


class UnknownUploadError(PixelstreamError):
    error_code = ErrorCode.UNKNOWN_UPLOAD


class DuplicateUploadError(PixelstreamError):
    error_code = ErrorCode.DUPLICATE_UPLOAD


class TooLargeError(PixelstreamError):
    error_code = ErrorCode.TOO_LARGE


class OffsetMismatchError(PixelstreamError):
    error_code = ErrorCode.OFFSET_MISMATCH


class ChecksumMismatchError(PixelstreamError):
    error_code = ErrorCode.CHECKSUM_MISMATCH


class InvalidImageError(PixelstreamError):
    error_code = ErrorCode.INVALID_IMAGE


class TooManyPixelsError(PixelstreamError):
    error_code = ErrorCode.TOO_MANY_PIXELS


class TooManyUploadsError(PixelstreamError):
    error_code = ErrorCode.TOO_MANY_UPLOADS


class UnknownTaskError(PixelstreamError):
    error_code = ErrorCode.UNKNOWN_TASK


class RateLimitedError(PixelstreamError):
    error_code = ErrorCode.RATE_LIMITED


class BusyError(PixelstreamError):
    error_code = ErrorCode.BUSY


class InternalError(PixelstreamError):
    error_code = ErrorCode.INTERNAL


class UnauthorizedError(PixelstreamError):
    """A token is required and none (or a wrong one) was given: the handshake was refused."""

    error_code = ErrorCode.UNAUTHORIZED


class UploadExpiredError(PixelstreamError):
    error_code = ErrorCode.UPLOAD_EXPIRED


class ForbiddenOriginError(PixelstreamError):
    error_code = ErrorCode.FORBIDDEN_ORIGIN


ERRORS: Final[Mapping[ErrorCode, type[PixelstreamError]]] = {
    cls.error_code: cls
    for cls in (
        BadMessageError, BadBase64Error, UnknownUploadError, DuplicateUploadError,
        TooLargeError, OffsetMismatchError, ChecksumMismatchError, InvalidImageError,
        TooManyPixelsError, TooManyUploadsError, UnknownTaskError, RateLimitedError,
        BusyError, InternalError, UnauthorizedError, UploadExpiredError, ForbiddenOriginError,
    )
}
"""The exception class of every error code."""


def error_from_message(error: Error) -> PixelstreamError:
    """The typed exception for an ``error`` message (unknown codes arrive as ``internal``)."""
    return ERRORS[error.code](
        error.message,
        upload_id=error.id,
        stream=error.stream,
        seq=error.seq,
        expected=error.expected,
        retry_after_ms=error.retry_after_ms,
    )


def _error_for(code: str | None, message: str, retry_after_ms: int | None = None,
               default: ErrorCode = ErrorCode.INTERNAL) -> PixelstreamError:
    try:
        kind = ErrorCode(code) if code else default
    except ValueError:
        kind = default
    return ERRORS[kind](message, retry_after_ms=retry_after_ms)


class ConnectionLostError(ConnectionError):
    """The socket closed or failed under an upload or stream (retried by default)."""

    code: str = "connection_lost"


class StalledError(ConnectionLostError):
    """A reply was owed and nothing came for ``stall_timeout`` seconds: the socket is dropped."""

    code = "stalled"


class ConnectFailedError(ConnectionLostError):
    """The socket could not be opened (refused, unreachable, timed out, HTTP error)."""

    code = "connection_failed"


class ClientClosedError(ConnectionLostError):
    """The client was closed while the call was running (never retried)."""

    code = "closed"


class UploadTimeoutError(TimeoutError):
    """The call's ``timeout`` ran out (retries included); the upload was cancelled."""

    code: str = "timeout"


RETRYABLE_CODES: Final = frozenset({
    ErrorCode.BUSY,
    ErrorCode.RATE_LIMITED,
    ErrorCode.UPLOAD_EXPIRED,
    ErrorCode.UNKNOWN_UPLOAD,
    ErrorCode.TOO_MANY_UPLOADS,
    ErrorCode.OFFSET_MISMATCH,
})
"""Codes retried by default: transient, or cured by resuming or starting over."""


def is_retryable(error: BaseException) -> bool:
    """The default retry decision: lost connections and :data:`RETRYABLE_CODES`."""
    if isinstance(error, ClientClosedError):
        return False
    if isinstance(error, ProtocolError):
        return error.code in RETRYABLE_CODES
    return isinstance(error, ConnectionLostError)


def error_code(error: BaseException) -> str:
    """A stable string for any failure: the protocol code, or the client's own."""
    if isinstance(error, ProtocolError):
        return error.code.value
    code = getattr(error, "code", None)
    if isinstance(code, str):
        return code
    if isinstance(error, FileNotFoundError):
        return "not_found"
    if isinstance(error, OSError):
        return "os_error"
    return "client_error"


# Callbacks ----------------------------------------------------------------------------------

ProgressCallback = Callable[[int, int, int], None]
"""``on_progress(sent, acknowledged, total)``: bytes handed to the socket, and bytes the server
holds. ``sent`` goes back after a rewind or a resume; both go back to 0 when the server has
discarded the upload's bytes and it starts over."""
StageCallback = Callable[[str, dict[str, Any]], None]
"""``on_stage(stage, detail)``: see the module's docstring for the stages and details."""
ResultCallback = Callable[[Result], None]
ErrorCallback = Callable[[BaseException], None]
ShouldRetry = Callable[[BaseException, int], bool]
"""``on_should_retry(error, retry_attempt) -> bool``; ``retry_attempt`` counts from 0."""

Source = str | os.PathLike[str] | bytes | bytearray | memoryview
"""What ``analyze`` uploads: a file's path (streamed from disk) or the image's bytes."""

_T = TypeVar("_T")


class _Retrier:
    """tus-js-client's retry rule: ``delays[n]`` before retry ``n``; progress resets ``n``."""

    def __init__(self, delays: Sequence[float], should_retry: ShouldRetry | None) -> None:
        self.delays = tuple(delays)
        self.should_retry = should_retry
        self.attempt = 0
        self._progress = 0
        self._progress_at_retry = 0

    def progressed(self, amount: int = 1) -> None:
        self._progress += amount

    def next_delay(self, error: BaseException) -> float | None:
        """Seconds to wait before retrying after ``error``; None: give up."""
        if self._progress > self._progress_at_retry:
            self.attempt = 0
        if isinstance(error, ClientClosedError) or self.attempt >= len(self.delays):
            return None
        decide = self.should_retry or (lambda exc, attempt: is_retryable(exc))
        if not decide(error, self.attempt):
            return None
        delay = float(self.delays[self.attempt])
        self.attempt += 1
        self._progress_at_retry = self._progress
        retry_after = getattr(error, "retry_after_ms", None)
        if isinstance(retry_after, int) and retry_after > 0:
            delay = max(delay, retry_after / 1000)
        return delay


# Sources ------------------------------------------------------------------------------------


_pread = os.pread  # module-level, so tests can observe every read


class _ImageSource:
    """An image to upload: its size, a name, spans read on demand, and its SHA-256."""

    size: int
    name: str | None

    async def read(self, offset: int, length: int) -> bytes | memoryview:
        raise NotImplementedError

    async def sha256(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the source holds."""


class _BytesSource(_ImageSource):
    def __init__(self, data: bytes | bytearray | memoryview, name: str | None) -> None:
        self._view = memoryview(data).cast("B")
        self.size = self._view.nbytes
        self.name = name

    async def read(self, offset: int, length: int) -> memoryview:
        return self._view[offset : offset + length]

    async def sha256(self) -> str:
        if self.size <= HASH_BUFFER_BYTES:
            return hashlib.sha256(self._view).hexdigest()
        return await asyncio.to_thread(lambda: hashlib.sha256(self._view).hexdigest())


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(HASH_BUFFER_BYTES)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as fh:
        while count := fh.readinto(buffer):
            digest.update(view[:count])  # hashlib releases the GIL on large updates
    return digest.hexdigest()


class _FileSource(_ImageSource):
    def __init__(self, path: Path, name: str | None) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            self.size = os.fstat(self._fd).st_size
        except OSError:
            os.close(self._fd)
            raise
        self.name = name if name is not None else path.name

    async def read(self, offset: int, length: int) -> bytes:
        data = await asyncio.to_thread(_pread, self._fd, length, offset)
        if len(data) != length:
            raise OSError(f"{self.path} changed size while it was being uploaded")
        return data

    async def sha256(self) -> str:
        return await asyncio.to_thread(_hash_file, self.path)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def _open_source(source: Source, name: str | None) -> _ImageSource:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _BytesSource(source, name)
    if isinstance(source, (str, os.PathLike)):
        return _FileSource(Path(source), name)
    raise TypeError(f"cannot upload a {type(source).__name__}: pass a path or bytes")


# Signals ------------------------------------------------------------------------------------


class _Signal:
    """Wakes every current waiter on :meth:`pulse` (an edge, not a level: waiters re-check)."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def pulse(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, at_most: float | None = None) -> None:
        """Until the next pulse, or ``at_most`` seconds (then it just returns)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            if at_most is None:
                await waiter
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, at_most)):
                        await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)


def _settle(future: asyncio.Future[_T], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
        future.exception()  # retrieved: nobody may be awaiting it any more


# One socket ---------------------------------------------------------------------------------


class _Connection:
    """One WebSocket: its welcome, the uploads and streams on it, and the reader task."""

    def __init__(self, client: Client, ws: ClientConnection, welcome: Welcome) -> None:
        self.client = client
        self.ws = ws
        self.welcome = welcome
        self.limits: Limits = welcome.limits
        self.attempts: dict[str, _Attempt] = {}
        self.streams: dict[str, FrameStream] = {}
        self.receiving = 0
        self.error: ConnectionLostError | None = None
        self.signal = _Signal()
        self.reader: asyncio.Task[None] = asyncio.create_task(
            self._read(), name="pixelstream-reader"
        )

    # Window and slots -----------------------------------------------------------------------

    def window_free(self) -> int:
        in_flight = sum(a.in_flight for a in self.attempts.values())
        return self.limits.window_bytes - in_flight

    async def acquire_slot(self) -> None:
        """One of the server's ``max_uploads`` receiving slots on this socket."""
        while self.receiving >= self.limits.max_uploads:
            self.check()
            await self.signal.wait()
        self.check()
        self.receiving += 1

    def release_slot(self) -> None:
        self.receiving -= 1
        self.signal.pulse()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    # Sending --------------------------------------------------------------------------------

    async def send(self, message: Upload | Chunk | Cancel | Frame) -> None:
        self.check()
        try:
            if isinstance(message, (Chunk, Frame)) and not self.client.base64:
                await self.ws.send(encode_client_binary(message))
            else:
                await self.ws.send(encode_client_text(message), text=True)
        except ConnectionClosed as exc:
            self.fail(ConnectionLostError(f"the connection closed: {exc}"))
            self.check()

    # Receiving ------------------------------------------------------------------------------

    async def _read(self) -> None:
        reason: ConnectionLostError = ConnectionLostError("the server closed the connection")
        try:
            async for raw in self.ws:
                if isinstance(raw, bytes):
                    continue  # v1 servers send text only
                try:
                    message = parse_server(raw)
                except ProtocolError as exc:
                    log.warning("ignoring a malformed server message: %s", exc)
                    continue
                self._dispatch(message)
        except ConnectionClosed as exc:
            reason = ConnectionLostError(f"the connection closed: {exc}")
        except asyncio.CancelledError:
            reason = ClientClosedError("the client was closed")
            raise
        except Exception as exc:  # a bug in a callback must not hang every upload
            log.exception("the client's reader failed")
            reason = ConnectionLostError(f"the reader failed: {exc!r}")
        finally:
            self.fail(reason)

    def _dispatch(self, message: ServerMessage) -> None:
        if isinstance(message, (Accepted, Progress, Cancelled)):
            attempt = self.attempts.get(message.id)
            if attempt is not None:
                attempt.on_message(message)
        elif isinstance(message, Result):
            if message.id is not None:
                attempt = self.attempts.get(message.id)
                if attempt is not None:
                    attempt.on_message(message)
            elif message.stream is not None and (stream := self.streams.get(message.stream)):
                stream._on_result(message)
        elif isinstance(message, Dropped):
            if stream := self.streams.get(message.stream):
                stream._on_dropped(message)
        elif isinstance(message, Error):
            if message.id is not None:
                attempt = self.attempts.get(message.id)
                if attempt is not None:
                    attempt.on_message(message)
            elif message.stream is not None and (stream := self.streams.get(message.stream)):
                stream._on_error(message)
            else:
                log.warning("server error for no upload or stream: %s %s", message.code,
                            message.message)
        # Welcome again, unknown types: ignored, as a v1 client must.

    # Failure --------------------------------------------------------------------------------

    def fail(self, error: ConnectionLostError, *, abort: bool = True) -> None:
        """The socket is unusable: everything on it learns why, and the client forgets it."""
        if self.error is not None:
            return
        self.error = error
        for attempt in list(self.attempts.values()):
            attempt.fail(error)
        for stream in list(self.streams.values()):
            stream._connection_lost(self, error)
        self.signal.pulse()
        self.client._forget(self)
        if abort and not self.reader.done() and asyncio.current_task() is not self.reader:
            transport = self.ws.transport
            if transport is not None:
                transport.abort()

    def stalled(self, seconds: float) -> None:
        self.fail(StalledError(f"no answer from the server for {seconds:g} s"))

    async def close(self) -> None:
        self.fail(ClientClosedError("the client was closed"), abort=False)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), timeout=2)
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.reader


# One upload on one socket -------------------------------------------------------------------


_CHUNK_REPLY_RECOVERABLE: Final = frozenset({ErrorCode.OFFSET_MISMATCH, ErrorCode.RATE_LIMITED})


class _Attempt:
    """An upload's life on one socket, from ``upload`` to its outcome (or the socket's end).

    Replies are counted: the server answers every chunk with one ``progress`` or ``error``, in
    order. After a rewind, the answers still owed for chunks sent before it are stale: their
    errors are ignored (their acknowledgements still count).
    """

    def __init__(self, conn: _Connection, wire_id: str, job: _UploadJob, sender: UploadSender
                 ) -> None:
        loop = asyncio.get_running_loop()
        self.conn = conn
        self.wire_id = wire_id
        self.job = job
        self.sender = sender
        self.accepted: asyncio.Future[Accepted] = loop.create_future()
        self.outcome: asyncio.Future[Result] = loop.create_future()
        self.awaiting_accept = False
        self.sending = False
        self.live = False
        """The server holds this upload for us: a give-up must cancel it."""
        self.pending_replies = 0
        self.stale_replies = 0
        self.epoch = 0
        self.paused_until = 0.0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def in_flight(self) -> int:
        return self.sender.unacknowledged if self.sending else 0

    # Stall detection: armed while a reply is owed, re-armed by each reply. -----------------

    def _owed(self) -> bool:
        return self.awaiting_accept or self.pending_replies > 0

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        timeout = self.conn.client.stall_timeout
        if timeout is not None and self._owed() and self.conn.error is None:
            self._timer = asyncio.get_running_loop().call_later(
                timeout, self.conn.stalled, timeout
            )

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def announce(self, message: Upload) -> None:
        if self.accepted.done():
            self.accepted = asyncio.get_running_loop().create_future()
        was_owed = self._owed()
        self.awaiting_accept = True
        self.live = True  # from here a give-up cancels: the server may accept it
        if not was_owed:
            self._arm()
        await self.conn.send(message)

    async def send_chunk(self, chunk: Chunk) -> None:
        was_owed = self._owed()
        self.pending_replies += 1
        if not was_owed:
            self._arm()
        await self.conn.send(chunk)

    # Messages from the reader ----------------------------------------------------------------

    def on_message(self, message: Accepted | Progress | Cancelled | Result | Error) -> None:
        if isinstance(message, Accepted):
            self.awaiting_accept = False
            self._arm()
            if not self.accepted.done():
                self.accepted.set_result(message)
        elif isinstance(message, Progress):
            if message.stage is Stage.UPLOAD:
                self._on_ack(message)
            else:
                detail = {"position": message.position} if message.position is not None else {}
                self.job.emit_stage(message.stage.value, detail)
        elif isinstance(message, Result):
            self.live = False
            self._finish(None, message)
        elif isinstance(message, Error):
            self._on_error(message)
        else:  # Cancelled: only ever after our own cancel, by which time nobody waits
            self.live = False
            self._finish(ClientClosedError("the upload was cancelled"), None)

    def _reply(self) -> bool:
        """Count one answer to a chunk; True when it answers a chunk sent before a rewind."""
        if self.pending_replies > 0:
            self.pending_replies -= 1
        stale = self.stale_replies > 0
        if stale:
            self.stale_replies -= 1
        self._arm()
        return stale

    def _on_ack(self, progress: Progress) -> None:
        self._reply()
        received = progress.received if progress.received is not None else 0
        if not 0 <= received <= self.sender.size:
            return
        before = self.sender.acknowledged
        self.sender.on_progress(received)
        if self.sender.acknowledged > before:
            self.job.acknowledged(self.sender.acknowledged)
        self.job.emit_progress(self.sender.sent, self.sender.acknowledged)
        self.conn.signal.pulse()

    def _on_error(self, message: Error) -> None:
        error = error_from_message(message)
        if self.awaiting_accept:
            self.awaiting_accept = False
            self.live = False
            self._arm()
            _settle(self.accepted, error)
            self.conn.signal.pulse()
            return
        if self.pending_replies > 0:
            stale = self._reply()
            if stale and error.code in _CHUNK_REPLY_RECOVERABLE:
                return
            if error.code in _CHUNK_REPLY_RECOVERABLE and error.expected is not None:
                delay = self.job.retrier.next_delay(error)
                if delay is not None:
                    self._rewind(error.expected, delay, error)
                    return
        else:
            self.live = False  # an outcome: the server has forgotten the upload
        self._finish(error, None)

    def _rewind(self, expected: int, delay: float, error: PixelstreamError) -> None:
        expected = min(max(expected, 0), self.sender.size)
        self.sender.rewind(expected)
        self.stale_replies = self.pending_replies
        self.epoch += 1
        self.paused_until = asyncio.get_running_loop().time() + delay
        self.job.emit_stage("retrying", {"attempt": self.job.retrier.attempt, "delay": delay,
                                         "error": error, "code": error.code.value})
        self.conn.signal.pulse()

    def _finish(self, error: BaseException | None, result: Result | None) -> None:
        self.disarm()
        if error is not None:
            _settle(self.accepted, error)
            _settle(self.outcome, error)
        elif result is not None and not self.outcome.done():
            self.outcome.set_result(result)
        self.conn.signal.pulse()

    def fail(self, error: ConnectionLostError) -> None:
        self.live = False
        self._finish(error, None)


# One upload, across sockets ------------------------------------------------------------------


class _UploadJob:
    def __init__(
        self,
        client: Client,
        source: _ImageSource,
        *,
        task: str | None,
        options: Mapping[str, Any],
        sha256: str | None,
        on_progress: ProgressCallback | None,
        on_stage: StageCallback | None,
    ) -> None:
        self.client = client
        self.source = source
        self.task = task
        self.options = dict(options)
        self.sha256 = sha256
        self.on_progress = on_progress
        self.on_stage = on_stage
        self.retrier = _Retrier(client.retry_delays, client.on_should_retry)
        self.token: str | None = None
        self.held = 0
        self._last_stage: str | None = None

    # Callbacks, guarded: a failing callback is logged, never breaks the upload. --------------

    def emit_progress(self, sent: int, acknowledged: int) -> None:
        if self.on_progress is not None:
            try:
                self.on_progress(sent, acknowledged, self.source.size)
            except Exception:
                log.exception("on_progress raised")

    def emit_stage(self, stage: str, detail: dict[str, Any]) -> None:
        if self.on_stage is not None:
            try:
                self.on_stage(stage, detail)
            except Exception:
                log.exception("on_stage raised")

    def acknowledged(self, held: int) -> None:
        if held > self.held:
            self.retrier.progressed(held - self.held)
            self.held = held

    # The loop ---------------------------------------------------------------------------------

    async def run(self) -> Result:
        while True:
            try:
                return await self._attempt()
            except (PixelstreamError, ConnectionLostError) as error:
                delay = self.retrier.next_delay(error)
                if delay is None:
                    raise
                log.info("retrying upload in %.1f s after %s", delay, error_code(error))
                self.emit_stage("retrying", {"attempt": self.retrier.attempt, "delay": delay,
                                             "error": error, "code": error_code(error)})
                if delay > 0:
                    await asyncio.sleep(delay)

    async def _attempt(self) -> Result:
        conn = await self.client._connection()
        limits = conn.limits
        chunk_size = max(1, min(self.client.chunk_size, limits.max_chunk_bytes,
                                limits.window_bytes))
        sender = UploadSender(self.source.size, chunk_size=chunk_size)
        attempt = _Attempt(conn, self.client._next_id(), self, sender)
        conn.attempts[attempt.wire_id] = attempt
        slot = False
        try:
            await conn.acquire_slot()
            slot = True
            accepted = await self._announce(attempt)
            resumed = self.token is not None
            self.token = accepted.resume
            sender.on_accepted(accepted.offset)
            self.acknowledged(accepted.offset)
            self.emit_stage(Stage.UPLOAD.value, {"offset": accepted.offset, "resumed": resumed})
            self.emit_progress(sender.sent, sender.acknowledged)
            attempt.sending = True
            await self._send_all(attempt)
            attempt.sending = False
            conn.release_slot()
            slot = False
            result = await attempt.outcome
            self.token = None
            return result
        except PixelstreamError:
            if not attempt.live:
                self.token = None  # the server discarded it: a retry starts over
            raise
        finally:
            attempt.disarm()
            attempt.sending = False
            if slot:
                conn.release_slot()
            conn.attempts.pop(attempt.wire_id, None)
            conn.signal.pulse()
            if attempt.live and conn.error is None:
                # Giving up (a timeout, a cancel, retries spent): free the server's bytes. Sent
                # before the call returns, so anything the caller sends next comes after it.
                attempt.live = False
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await conn.send(Cancel(attempt.wire_id))

    async def _announce(self, attempt: _Attempt) -> Accepted:
        source = self.source
        while True:
            await attempt.announce(Upload(
                id=attempt.wire_id, size=source.size, sha256=self.sha256,
                name=source.name[:MAX_NAME_LENGTH] if source.name else None,
                task=self.task, options=self.options, resume=self.token,
            ))
            try:
                return await attempt.accepted
            except UnknownUploadError:
                if self.token is None:
                    raise
                self.token = None  # the server no longer holds it: start over, at once

    async def _send_all(self, attempt: _Attempt) -> None:
        conn, sender, loop = attempt.conn, attempt.sender, asyncio.get_running_loop()
        while not sender.all_acknowledged:
            if attempt.outcome.done():
                return  # an outcome before the last byte was acknowledged: a failure
            conn.check()
            wait = attempt.paused_until - loop.time()
            if wait > 0:
                await conn.signal.wait(wait)
                continue
            want = min(sender.chunk_size, sender.size - sender.sent)
            if want <= 0 or conn.window_free() < want:
                await conn.signal.wait()
                continue
            epoch = attempt.epoch
            span = sender.next_span(want)
            assert span is not None
            data = await self.source.read(span.offset, span.length)
            if epoch != attempt.epoch or attempt.outcome.done():
                continue  # rewound while reading: the span is void
            await attempt.send_chunk(Chunk(attempt.wire_id, span.offset, data))
            self.emit_progress(sender.sent, sender.acknowledged)


# Camera frames -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FrameResult:
    """A frame's result; ``latency_s`` is from handing the frame to the socket to its result."""

    stream: str
    seq: int
    result: Result
    latency_s: float
    type: Literal["result"] = "result"


@dataclass(frozen=True, slots=True)
class FrameDropped:
    """A frame that got no result: ``superseded`` by a newer one (latest frame wins), or lost
    with its connection (``connection_lost``) or not answered before the stream ended
    (``unanswered``). Never retried."""

    stream: str
    seq: int
    reason: str
    type: Literal["dropped"] = "dropped"


@dataclass(frozen=True, slots=True)
class FrameFailed:
    """A frame the server (or the client, for one over ``max_chunk_bytes``) refused."""

    stream: str
    seq: int
    error: PixelstreamError
    type: Literal["error"] = "error"


FrameEvent = FrameResult | FrameDropped | FrameFailed


def _percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty sequence."""
    rank = max(1, min(len(sorted_values), int(-(-fraction * len(sorted_values) // 1))))
    return sorted_values[rank - 1]


@dataclass
class FrameStats:
    """Counts and timings of one :class:`FrameStream` (latencies: the last 10,000 results)."""

    sent: int = 0
    results: int = 0
    dropped: int = 0
    """Superseded on the server (latest frame wins)."""
    lost: int = 0
    """Sent but never answered: their connection dropped, or the stream ended first."""
    errors: int = 0
    started: float | None = None
    ended: float | None = None
    latencies_s: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    @property
    def elapsed_s(self) -> float:
        if self.started is None:
            return 0.0
        end = self.ended if self.ended is not None else time.perf_counter()
        return max(0.0, end - self.started)

    @property
    def result_fps(self) -> float:
        """Results per second: the rate the analysis keeps up with."""
        elapsed = self.elapsed_s
        return self.results / elapsed if elapsed > 0 else 0.0

    @property
    def send_fps(self) -> float:
        elapsed = self.elapsed_s
        return self.sent / elapsed if elapsed > 0 else 0.0

    def latency_percentiles(self, points: Sequence[float] = (0.5, 0.9, 0.99)
                            ) -> dict[str, float]:
        """``{"p50": s, "p90": s, "p99": s, "max": s}`` in seconds (empty without results)."""
        values = sorted(self.latencies_s)
        if not values:
            return {}
        out = {f"p{round(p * 100):d}": _percentile(values, p) for p in points}
        out["max"] = values[-1]
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (latencies in milliseconds)."""
        return {
            "frames_sent": self.sent,
            "results": self.results,
            "dropped": self.dropped,
            "lost": self.lost,
            "errors": self.errors,
            "elapsed_s": round(self.elapsed_s, 3),
            "fps": round(self.result_fps, 2),
            "send_fps": round(self.send_fps, 2),
            "latency_ms": {k: round(v * 1000, 1) for k, v in self.latency_percentiles().items()},
        }


_FATAL_FRAME_CODES: Final = frozenset({
    ErrorCode.UNKNOWN_TASK, ErrorCode.BAD_MESSAGE, ErrorCode.TOO_MANY_UPLOADS,
    ErrorCode.UNAUTHORIZED,
})
"""Frame errors that every later frame would meet too: they end the stream."""

_END: Final = object()

FrameSource = Any
"""A camera index, a video file or URL, a ``cv2.VideoCapture``, or an iterable (sync or
async) of frames: numpy arrays (BGR, as OpenCV gives them), PIL images, or encoded bytes."""


class _Frames:
    """Reads and JPEG-encodes frames off the event loop; ``next()`` is None at the end."""

    def __init__(self, source: FrameSource, quality: int) -> None:
        self.source = source
        self.quality = quality
        self._capture: Any = None
        self._owned = False
        self._iterator: Iterator[Any] | None = None
        self._aiterator: AsyncIterator[Any] | None = None

    async def open(self) -> None:
        source = self.source
        if isinstance(source, (int, str, os.PathLike)):
            import cv2

            target: int | str = source if isinstance(source, int) else os.fspath(source)
            self._capture = await asyncio.to_thread(lambda: cv2.VideoCapture(target))
            self._owned = True
            if not self._capture.isOpened():
                self.close()
                raise OSError(f"cannot open video source {target!r}")
        elif hasattr(source, "read") and hasattr(source, "isOpened"):
            self._capture = source  # a cv2.VideoCapture the caller owns
        elif isinstance(source, AsyncIterable):
            self._aiterator = aiter(source)
        elif isinstance(source, Iterable):
            self._iterator = iter(source)
        else:
            raise TypeError(f"cannot read frames from a {type(source).__name__}")

    async def next(self) -> bytes | None:
        if self._capture is not None:
            return await asyncio.to_thread(self._read_capture)
        if self._iterator is not None:
            return await asyncio.to_thread(self._read_iterator)
        assert self._aiterator is not None
        try:
            item = await anext(self._aiterator)
        except StopAsyncIteration:
            return None
        if isinstance(item, (bytes, bytearray, memoryview)):
            return bytes(item)
        return await asyncio.to_thread(encode_frame, item, self.quality)

    def _read_capture(self) -> bytes | None:
        ok, frame = self._capture.read()
        return encode_frame(frame, self.quality) if ok else None

    def _read_iterator(self) -> bytes | None:
        assert self._iterator is not None
        item = next(self._iterator, _END)
        return None if item is _END else encode_frame(item, self.quality)

    def close(self) -> None:
        if self._owned and self._capture is not None:
            self._capture.release()
        self._capture = None


def encode_frame(frame: Any, quality: int = 85) -> bytes:
    """JPEG bytes of a frame: a numpy array (BGR or grey), a PIL image, or bytes as they are."""
    if isinstance(frame, (bytes, bytearray, memoryview)):
        return bytes(frame)
    if hasattr(frame, "shape"):
        import cv2

        ok, encoded = cv2.imencode(".jpg", frame, [int(cv2.IMWRITE_JPEG_QUALITY), quality])
        if not ok:
            raise ValueError("OpenCV could not encode the frame as JPEG")
        return bytes(encoded.tobytes())
    if hasattr(frame, "save"):
        out = io.BytesIO()
        frame.convert("RGB").save(out, "JPEG", quality=quality)
        return out.getvalue()
    raise TypeError(f"cannot encode a {type(frame).__name__} as a frame")


class FrameStream:
    """An async iterator of :data:`FrameEvent` for one camera stream (``Client.stream_frames``).

    Frames are read and encoded in threads, paced at ``fps`` and sent as they come; the server
    keeps the latest (one running, one waiting per stream) and reports the others ``dropped``:
    they are reported, never retried. Every frame sent ends as exactly one event. When the
    source ends (or :meth:`stop` is called) the iterator ends once the frames in flight are
    answered (at most ``drain_timeout`` seconds). ``stats`` holds counts, fps and latencies.
    Use ``async with`` (or :meth:`aclose`) when leaving early: it releases the source.
    """

    def __init__(
        self,
        client: Client,
        source: FrameSource,
        *,
        stream: str,
        fps: float | None,
        task: str | None,
        options: Mapping[str, Any],
        jpeg_quality: int,
        drain_timeout: float,
        max_frames: int | None = None,
    ) -> None:
        if fps is not None and fps <= 0:
            raise ValueError("fps must be positive (or None: as fast as the source gives)")
        self.client = client
        self.stream = stream
        self.fps = fps
        self.task = task
        self.options = dict(options)
        self.drain_timeout = drain_timeout
        self.max_frames = max_frames
        self.stats = FrameStats()
        self._frames = _Frames(source, jpeg_quality)
        self._events: asyncio.Queue[FrameEvent | object] = asyncio.Queue()
        self._outstanding: dict[int, float] = {}
        self._conn: _Connection | None = None
        self._producer: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._settled = _Signal()
        self._fatal: BaseException | None = None
        self._pause_until = 0.0
        self._retrier = _Retrier(client.retry_delays, client.on_should_retry)
        self._finished = False
        self._claimed = False

    # The iterator -------------------------------------------------------------------------------

    def __aiter__(self) -> FrameStream:
        return self

    async def __anext__(self) -> FrameEvent:
        if self._finished:
            raise StopAsyncIteration
        if self._producer is None:
            self.client._claim_stream(self.stream)
            self._claimed = True
            self._producer = asyncio.create_task(self._produce(), name=f"frames-{self.stream}")
        item = await self._events.get()
        if item is _END:
            self._finished = True
            self._release()
            if self._fatal is not None:
                raise self._fatal
            raise StopAsyncIteration
        assert isinstance(item, (FrameResult, FrameDropped, FrameFailed))
        return item

    async def __aenter__(self) -> FrameStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def stop(self) -> None:
        """Send no more frames; the iterator ends once the frames in flight are answered."""
        self._stopping.set()

    async def aclose(self) -> None:
        """Stop at once: no draining, the source released."""
        self._stopping.set()
        if self._producer is not None and not self._producer.done():
            self._producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._producer
        self._finished = True
        self._release()

    def _release(self) -> None:
        self._frames.close()
        if self._conn is not None and self._conn.streams.get(self.stream) is self:
            del self._conn.streams[self.stream]
        if self._claimed:
            self._claimed = False
            self.client._release_stream(self.stream)

    # Producing ----------------------------------------------------------------------------------

    async def _produce(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self._frames.open()
            self.stats.started = time.perf_counter()
            period = 1 / self.fps if self.fps else 0.0
            due = loop.time()
            while not self._stopping.is_set() and self._fatal is None:
                if self.max_frames is not None and self.stats.sent >= self.max_frames:
                    break
                data = await self._frames.next()
                if data is None:
                    break
                now = loop.time()
                due = max(due, self._pause_until)
                if due > now:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(due - now):
                            await self._stopping.wait()
                    if self._stopping.is_set():
                        break
                due = max(due + period, loop.time() - period) if period else due
                await self._send(data)
            await self._drain()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the consumer
            if self._fatal is None:
                self._fatal = exc
        finally:
            for seq in list(self._outstanding):
                self._emit_lost(seq, "unanswered")
            self.stats.ended = time.perf_counter()
            self._frames.close()
            self._events.put_nowait(_END)

    async def _connection(self) -> _Connection:
        while True:
            try:
                conn = await self.client._connection()
                break
            except (PixelstreamError, ConnectionLostError) as error:
                delay = self._retrier.next_delay(error)
                if delay is None:
                    raise
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stopping.wait()
                if self._stopping.is_set():
                    raise
        if conn is not self._conn:
            self._conn = conn
            conn.streams[self.stream] = self
        return conn

    async def _send(self, data: bytes) -> None:
        conn = await self._connection()
        seq = self.client._next_seq(self.stream)
        self.stats.sent += 1
        if len(data) > conn.limits.max_chunk_bytes:
            self.stats.errors += 1
            self._events.put_nowait(FrameFailed(self.stream, seq, TooLargeError(
                f"the frame's {len(data)} bytes exceed max_chunk_bytes "
                f"({conn.limits.max_chunk_bytes})", stream=self.stream, seq=seq)))
            return
        self._outstanding[seq] = time.perf_counter()
        with contextlib.suppress(ConnectionLostError):  # reported lost; never retried
            await conn.send(Frame(self.stream, seq, data, task=self.task, options=self.options))

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout
        while self._outstanding and self._fatal is None:
            remaining = deadline - loop.time()
            if remaining <= 0 or (self._conn is not None and self._conn.error is not None):
                break
            await self._settled.wait(remaining)

    # Messages -----------------------------------------------------------------------------------

    def _on_result(self, message: Result) -> None:
        sent_at = self._outstanding.pop(message.seq or 0, None)
        if sent_at is None:
            return
        latency = time.perf_counter() - sent_at
        self.stats.results += 1
        self.stats.latencies_s.append(latency)
        self._retrier.progressed()
        self._events.put_nowait(FrameResult(self.stream, message.seq or 0, message, latency))
        self._settled.pulse()

    def _on_dropped(self, message: Dropped) -> None:
        if self._outstanding.pop(message.seq, None) is None:
            return
        self.stats.dropped += 1
        self._events.put_nowait(FrameDropped(self.stream, message.seq, message.reason))
        self._settled.pulse()

    def _on_error(self, message: Error) -> None:
        error = error_from_message(message)
        seq = message.seq if message.seq is not None else -1
        if self._outstanding.pop(seq, None) is None and message.seq is not None:
            return
        self.stats.errors += 1
        if error.code is ErrorCode.RATE_LIMITED and error.retry_after_ms:
            loop = asyncio.get_running_loop()
            self._pause_until = max(self._pause_until,
                                    loop.time() + error.retry_after_ms / 1000)
        self._events.put_nowait(FrameFailed(self.stream, seq, error))
        if error.code in _FATAL_FRAME_CODES and self._fatal is None:
            self._fatal = error
            self._stopping.set()
        self._settled.pulse()

    def _emit_lost(self, seq: int, reason: str) -> None:
        if self._outstanding.pop(seq, None) is None:
            return
        self.stats.lost += 1
        self._events.put_nowait(FrameDropped(self.stream, seq, reason))

    def _connection_lost(self, conn: _Connection, error: ConnectionLostError) -> None:
        if conn is self._conn:
            self._conn = None
        for seq in list(self._outstanding):
            self._emit_lost(seq, "connection_lost")
        self._settled.pulse()


# The client ---------------------------------------------------------------------------------


class Client:
    """An asyncio client for one pixelstream server: ``async with Client(url) as client``.

    ``token`` is sent as ``Authorization: Bearer``. ``base64=True`` sends chunks and frames as
    Base64 JSON text instead of binary frames. ``retry_delays`` (seconds; ``None`` or ``[]``
    disables retries), ``on_should_retry``, ``stall_timeout`` (``None`` disables) and
    ``timeout`` (per ``analyze`` call, retries included) work as the module describes;
    ``checksum=False`` skips the SHA-256. The socket opens on entry (once, no retries: a wrong
    URL or token fails there) and reopens on demand after a failure.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        base64: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        retry_delays: Sequence[float] | None = DEFAULT_RETRY_DELAYS,
        on_should_retry: ShouldRetry | None = None,
        stall_timeout: float | None = 15.0,
        timeout: float | None = None,
        connect_timeout: float = 10.0,
        checksum: bool = True,
        ping_interval: float | None = 20.0,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        self.url = url
        self.token = token
        self.base64 = base64
        self.chunk_size = chunk_size
        self.retry_delays: tuple[float, ...] = tuple(retry_delays or ())
        self.on_should_retry = on_should_retry
        self.stall_timeout = stall_timeout
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.checksum = checksum
        self.ping_interval = ping_interval
        self.welcome: Welcome | None = None
        """The latest socket's ``welcome`` (limits, tasks, default task)."""
        self._conn: _Connection | None = None
        self._lock: asyncio.Lock | None = None
        self._closed = False
        self._ids = itertools.count(1)
        self._seqs: dict[str, int] = {}
        self._streams: set[str] = set()

    # Life cycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def connect(self) -> Welcome:
        """Open the socket now (else the first call does); returns the server's welcome."""
        return (await self._connection()).welcome

    async def close(self) -> None:
        """Close the socket; calls still running fail with :class:`ClientClosedError`."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    @property
    def limits(self) -> Limits | None:
        return self.welcome.limits if self.welcome is not None else None

    # Uploads ------------------------------------------------------------------------------------

    async def analyze(
        self,
        source: Source,
        *,
        task: str | None = None,
        options: Mapping[str, Any] | None = None,
        name: str | None = None,
        sha256: str | None = None,
        checksum: bool | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 -- per upload, retries included
        on_progress: ProgressCallback | None = None,
        on_stage: StageCallback | None = None,
        on_result: ResultCallback | None = None,
        on_error: ErrorCallback | None = None,
    ) -> Result:
        """Upload ``source`` (a path, streamed from disk, or bytes) and return its result.

        ``task`` defaults to the server's default task; ``options`` are the task's
        (``{"top_k": 3}``). ``sha256`` passes a known checksum (no hashing); ``checksum``
        overrides the client's setting. Raises the typed error of the code that ended it, a
        :class:`ConnectionLostError` once retries are spent, or :class:`UploadTimeoutError`.
        Cancelling the calling task cancels the upload on the server.
        """
        limit = timeout if timeout is not None else self.timeout
        scope = asyncio.timeout(limit)
        try:
            async with scope:
                result = await self._analyze(source, task, options or {}, name, sha256,
                                             self.checksum if checksum is None else checksum,
                                             on_progress, on_stage)
        except TimeoutError as exc:
            if not scope.expired():
                if on_error is not None:
                    on_error(exc)
                raise
            error = UploadTimeoutError(f"no result within {limit:g} s")
            if on_error is not None:
                on_error(error)
            raise error from None
        except Exception as exc:
            if on_error is not None:
                on_error(exc)
            raise
        if on_result is not None:
            on_result(result)
        return result

    async def _analyze(self, source: Source, task: str | None, options: Mapping[str, Any],
                       name: str | None, sha256: str | None, checksum: bool,
                       on_progress: ProgressCallback | None, on_stage: StageCallback | None
                       ) -> Result:
        image = _open_source(source, name)
        try:
            if image.size == 0:
                raise InvalidImageError("the image is empty (0 bytes)")
            if sha256 is None and checksum:
                if on_stage is not None:
                    on_stage("hashing", {})
                sha256 = await image.sha256()
            job = _UploadJob(self, image, task=task, options=options, sha256=sha256,
                             on_progress=on_progress, on_stage=on_stage)
            return await job.run()
        finally:
            image.close()

    # Frames -------------------------------------------------------------------------------------

    def stream_frames(
        self,
        source: FrameSource,
        *,
        stream: str = "cam0",
        fps: float | None = None,
        task: str | None = None,
        options: Mapping[str, Any] | None = None,
        jpeg_quality: int = 85,
        drain_timeout: float = 30.0,
        max_frames: int | None = None,
    ) -> FrameStream:
        """Stream frames from ``source`` as ``stream``; iterate the events::

            async with client.stream_frames("clip.mp4", fps=15) as frames:
                async for event in frames:
                    if event.type == "result": print(event.seq, event.latency_s)

        ``source``: a camera index, a video file or an RTSP/HTTP URL (opened with OpenCV), a
        ``cv2.VideoCapture``, or an iterable (sync or async) of numpy arrays (BGR), PIL images
        or encoded bytes. ``fps=None`` sends as fast as the source gives frames;
        ``max_frames`` ends the stream after that many.
        """
        return FrameStream(self, source, stream=stream, fps=fps, task=task,
                           options=options or {}, jpeg_quality=jpeg_quality,
                           drain_timeout=drain_timeout, max_frames=max_frames)

    def _claim_stream(self, stream: str) -> None:
        if stream in self._streams:
            raise ValueError(f"stream {stream!r} is already being sent on this client")
        self._streams.add(stream)

    def _release_stream(self, stream: str) -> None:
        self._streams.discard(stream)

    def _next_seq(self, stream: str) -> int:
        """Sequence numbers grow for the client's life: a stream name can be reused."""
        seq = self._seqs.get(stream, 0)
        self._seqs[stream] = seq + 1
        return seq

    # Sockets ------------------------------------------------------------------------------------

    def _next_id(self) -> str:
        return f"u{next(self._ids)}"

    def _forget(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None

    async def _connection(self) -> _Connection:
        if self._closed:
            raise ClientClosedError("the client is closed")
        conn = self._conn
        if conn is not None and conn.error is None:
            return conn
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            conn = self._conn
            if conn is None or conn.error is not None:
                conn = self._conn = await self._open()
            return conn

    async def _open(self) -> _Connection:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                ws = await connect(
                    self.url, additional_headers=headers, compression=None, max_size=None,
                    open_timeout=None, ping_interval=self.ping_interval,
                    ping_timeout=self.ping_interval, write_limit=1 << 20,
                    user_agent_header="pixelstream-python",
                )
                try:
                    raw = await ws.recv()
                except BaseException:
                    await ws.close()
                    raise
        except InvalidStatus as exc:
            raise _handshake_error(exc) from None
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == 1008:
                raise UnauthorizedError(
                    "the server closed the socket before its welcome (1008: policy violation)"
                ) from None
            raise ConnectFailedError(f"the server closed the socket before its welcome: {exc}"
                                     ) from None
        except InvalidURI as exc:
            raise ValueError(f"not a WebSocket URL: {self.url!r}") from exc
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise ConnectFailedError(f"cannot connect to {self.url}: {exc or type(exc).__name__}"
                                     ) from None
        try:
            welcome = parse_server(raw)
        except ProtocolError:
            welcome = None
        if not isinstance(welcome, Welcome):
            await ws.close()
            raise ConnectFailedError(f"{self.url} did not answer with a pixelstream welcome")
        if self._closed:
            await ws.close()
            raise ClientClosedError("the client is closed")
        self.welcome = welcome
        return _Connection(self, ws, welcome)


def _handshake_error(exc: InvalidStatus) -> BaseException:
    response = exc.response
    status = response.status_code
    code: str | None = None
    message = f"the server refused the handshake: HTTP {status}"
    with contextlib.suppress(Exception):
        body = orjson.loads(response.body or b"")
        code = body.get("code")
        message = body.get("message") or message
    if status == 401 or code == ErrorCode.UNAUTHORIZED:
        return UnauthorizedError(message)
    if status == 403 or code == ErrorCode.FORBIDDEN_ORIGIN:
        return ForbiddenOriginError(message)
    return ConnectFailedError(message)


# Scripts without asyncio ----------------------------------------------------------------------


class SyncClient:
    """:class:`Client` for scripts: its own event loop in a background thread.

    ``with SyncClient(url, token=...) as client: client.analyze("photo.jpg")``; arguments are
    the :class:`Client`'s and ``analyze``'s. Callbacks run in the background thread.
    ``analyze`` may be called from several threads at once: the uploads share the socket.
    """

    def __init__(self, url: str = DEFAULT_URL, **client_options: Any) -> None:
        self._client = Client(url, **client_options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SyncClient:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def client(self) -> Client:
        return self._client

    def connect(self) -> Welcome:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            self._thread = threading.Thread(target=run, name="pixelstream-client", daemon=True)
            self._thread.start()
            ready.wait()
            self._loop = loop
        return self._call(self._client.connect())

    def analyze(self, source: Source, **options: Any) -> Result:
        return self._call(self._client.analyze(source, **options))

    def stream_frames(self, source: FrameSource, **options: Any) -> SyncFrameStream:
        return SyncFrameStream(self, self._client.stream_frames(source, **options))

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self._client.close())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
            self._loop = self._thread = None

    def _call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None:
            coroutine.close()
            raise RuntimeError("the SyncClient is not connected (use `with SyncClient(...)`)")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise


class SyncFrameStream:
    """:class:`FrameStream` as a plain iterator (from :meth:`SyncClient.stream_frames`)."""

    def __init__(self, owner: SyncClient, frames: FrameStream) -> None:
        self._owner = owner
        self._frames = frames

    @property
    def stats(self) -> FrameStats:
        return self._frames.stats

    def __iter__(self) -> Iterator[FrameEvent]:
        try:
            while True:
                try:
                    yield self._owner._call(self._frames.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self.close()

    def __enter__(self) -> SyncFrameStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def stop(self) -> None:
        loop = self._owner._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._frames.stop)

    def close(self) -> None:
        if self._owner._loop is not None:
            self._owner._call(self._frames.aclose())


def analyze_sync(source: Source, *, url: str = DEFAULT_URL, token: str | None = None,
                 **options: Any) -> Result:
    """One upload from a script: ``analyze_sync("photo.jpg", task="classify")``.

    Keyword arguments go to :meth:`Client.analyze` (``task``, ``options``, callbacks, ...) or,
    for the client's own (``base64``, ``retry_delays``, ...), to :class:`Client`. Not for use
    inside a running event loop.
    """
    client_keys = {"base64", "chunk_size", "retry_delays", "on_should_retry", "stall_timeout",
                   "connect_timeout", "ping_interval"}
    client_options = {k: options.pop(k) for k in list(options) if k in client_keys}

    async def one() -> Result:
        async with Client(url, token=token, **client_options) as client:
            return await client.analyze(source, **options)

    return asyncio.run(one())


# HTTP ---------------------------------------------------------------------------------------


def http_base_url(url: str) -> str:
    """``http://host:port`` from an HTTP(S) or WebSocket URL (``ws://host:port/v1/ws``)."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme or "http")
    path = parts.path
    for suffix in ("/v1/ws", "/v1/analyze", "/api/analyze"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    return urlunsplit((scheme, parts.netloc, path.rstrip("/"), "", ""))


def analyze_http(source: Source, *, url: str = DEFAULT_HTTP_URL, token: str | None = None,
                 task: str | None = None, options: Mapping[str, Any] | None = None,
                 name: str | None = None, timeout: float = 120.0) -> Result:
    """The whole image in one request to ``POST /v1/analyze`` (multipart, streamed from the
    file); blocking. No resume and no retries: use :class:`Client` for large images. Raises
    the same typed errors as the WebSocket client."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    form: dict[str, str] = {}
    if task is not None:
        form["task"] = task
    if options:
        form["options"] = orjson.dumps(dict(options)).decode()
    endpoint = http_base_url(url) + "/v1/analyze"
    with contextlib.ExitStack() as stack:
        if isinstance(source, (bytes, bytearray, memoryview)):
            fileobj: Any = io.BytesIO(bytes(source))
            filename = name or "image"
        else:
            path = Path(source)
            fileobj = stack.enter_context(path.open("rb"))
            filename = name or path.name
        try:
            response = httpx.post(endpoint, files={"file": (filename, fileobj)}, data=form,
                                  headers=headers, timeout=timeout)
        except httpx.TransportError as exc:
            raise ConnectFailedError(f"cannot reach {endpoint}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200 or not isinstance(body, dict) or "result" not in body:
        code = body.get("code") if isinstance(body, dict) else None
        message = (body.get("message") if isinstance(body, dict) else None) or (
            f"HTTP {response.status_code}")
        retry_after = body.get("retry_after_ms") if isinstance(body, dict) else None
        if retry_after is None and "retry-after" in response.headers:
            with contextlib.suppress(ValueError):
                retry_after = int(float(response.headers["retry-after"]) * 1000)
        raise _error_for(code, str(message), retry_after)
    return Result(
        task=body.get("task", task or ""),
        result=body["result"],
        image=body.get("image", {}),
        cached=bool(body.get("cached", False)),
        model=body.get("model", ""),
        timings_ms=body.get("timings_ms", {}),
    )
