"""pixelstream's Python client: resumable uploads and camera streams over one WebSocket.

The protocol logic is the sans-I/O core: :mod:`chunking.codec` for the wire,
:class:`chunking.exchange.UploadExchange` for one upload's state on a socket (which bytes go
next within the window, reply counting, stale replies after a rewind). This package adds the
I/O, with the ``websockets`` library, and the resilience of tus-js-client, one module per
concern::

    errors      one exception class per error code; the connection's own failures
    retry       the retry policy (delays, reset on progress, on_should_retry)
    sources     files streamed from disk span by span, or bytes; their SHA-256
    connection  one WebSocket: handshake, welcome, the reader task, window and upload slots
    upload      an upload's attempts over UploadExchange, and its retries across sockets
    frames      camera streams: read, encode, pace, count
    client      Client: the socket (reopened on demand) and the calls on it
    sync        SyncClient and analyze_sync, for scripts without asyncio
    http        analyze_http: one POST /v1/analyze
    tus         uploads over tus 1.0 and results over HTTP, where WebSockets are blocked

Use it as::

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
accepted, then ``queued`` with ``{"position"}``, ``decoding``, ``inference`` (repeated with
``{"done", "total"}`` as the tiles of a spatial task finish), and the client's
own ``hashing`` (before the SHA-256 of the file is computed) and ``retrying`` with
``{"attempt", "delay", "error", "code"}``), ``on_result(result)`` and ``on_error(error)``: the
names and details of the JavaScript client (``client_js``), in snake_case.

:class:`SyncClient` and :func:`analyze_sync` wrap all this for scripts without asyncio;
:func:`analyze_http` uses the HTTP route instead.
"""

from chunking.client.client import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_URL,
    TRANSPORTS,
    Client,
    ErrorCallback,
    ResultCallback,
)
from chunking.client.errors import (
    ERRORS,
    RETRYABLE_CODES,
    BadBase64Error,
    BadMessageError,
    BusyError,
    ChecksumMismatchError,
    ClientClosedError,
    ConnectFailedError,
    ConnectionLostError,
    DuplicateUploadError,
    ForbiddenHostError,
    ForbiddenOriginError,
    InternalError,
    InvalidImageError,
    OffsetMismatchError,
    PixelstreamError,
    RateLimitedError,
    StalledError,
    TooLargeError,
    TooManyPixelsError,
    TooManyUploadsError,
    UnauthorizedError,
    UnknownTaskError,
    UnknownUploadError,
    UploadExpiredError,
    UploadTimeoutError,
    error_code,
    error_from_message,
    is_retryable,
)
from chunking.client.frames import (
    FrameDropped,
    FrameEvent,
    FrameFailed,
    FrameResult,
    FrameSource,
    FrameStats,
    FrameStream,
    encode_frame,
)
from chunking.client.http import DEFAULT_HTTP_URL, analyze_http, http_base_url
from chunking.client.retry import DEFAULT_RETRY_DELAYS, ShouldRetry
from chunking.client.sources import Source
from chunking.client.sync import SyncClient, SyncFrameStream, analyze_sync
from chunking.client.upload import ProgressCallback, StageCallback

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_HTTP_URL",
    "DEFAULT_RETRY_DELAYS",
    "DEFAULT_URL",
    "ERRORS",
    "RETRYABLE_CODES",
    "TRANSPORTS",
    "BadBase64Error",
    "BadMessageError",
    "BusyError",
    "ChecksumMismatchError",
    "Client",
    "ClientClosedError",
    "ConnectFailedError",
    "ConnectionLostError",
    "DuplicateUploadError",
    "ErrorCallback",
    "ForbiddenHostError",
    "ForbiddenOriginError",
    "FrameDropped",
    "FrameEvent",
    "FrameFailed",
    "FrameResult",
    "FrameSource",
    "FrameStats",
    "FrameStream",
    "InternalError",
    "InvalidImageError",
    "OffsetMismatchError",
    "PixelstreamError",
    "ProgressCallback",
    "RateLimitedError",
    "ResultCallback",
    "ShouldRetry",
    "Source",
    "StageCallback",
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
    "encode_frame",
    "error_code",
    "error_from_message",
    "http_base_url",
    "is_retryable",
]
