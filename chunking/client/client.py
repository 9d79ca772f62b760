"""The asyncio client: one socket (reopened on demand), many uploads and camera streams on it."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from chunking.client.connection import Connection, open_connection
from chunking.client.errors import (
    ClientClosedError,
    ConnectFailedError,
    InvalidImageError,
    UploadTimeoutError,
)
from chunking.client.frames import FrameSource, FrameStream
from chunking.client.retry import DEFAULT_RETRY_DELAYS, ShouldRetry
from chunking.client.sources import Source, open_source
from chunking.client.tus import TUS_CHUNK_SIZE, TusUpload, tus_available
from chunking.client.upload import ProgressCallback, StageCallback, UploadJob
from chunking.limits import Limits
from chunking.messages import Result, Welcome

__all__ = ["DEFAULT_CHUNK_SIZE", "DEFAULT_URL", "TRANSPORTS", "Client", "ErrorCallback",
           "ResultCallback"]

DEFAULT_URL: Final = "ws://127.0.0.1:8000/v1/ws"
DEFAULT_CHUNK_SIZE: Final = 1 << 20
"""Largest chunk sent; also capped by the server's ``max_chunk_bytes`` and ``window_bytes``."""

TRANSPORTS: Final = ("auto", "websocket", "tus")
"""``websocket``: only the socket. ``tus``: uploads over tus 1.0 and results over HTTP.
``auto``: the socket, and tus from the moment the socket cannot be opened (a proxy that
blocks WebSockets)."""

ResultCallback = Callable[[Result], None]
ErrorCallback = Callable[[BaseException], None]


class Client:
    """An asyncio client for one pixelstream server: ``async with Client(url) as client``.

    ``token`` is sent as ``Authorization: Bearer``. ``base64=True`` sends chunks and frames as
    Base64 JSON text instead of binary frames. ``retry_delays`` (seconds; ``None`` or ``[]``
    disables retries), ``on_should_retry``, ``stall_timeout`` (``None`` disables) and
    ``timeout`` (per ``analyze`` call, retries included) work as :mod:`chunking.client`
    describes; ``checksum=False`` skips the SHA-256. The socket opens on entry (once, no
    retries: a wrong URL or token fails there) and reopens on demand after a failure.

    ``transport`` (:data:`TRANSPORTS`): with ``auto``, a socket that cannot be opened (a
    refused upgrade, a proxy that drops it) makes uploads go over tus (:mod:`chunking.client.tus`)
    with the same callbacks and errors; ``tus_chunk_size`` bytes per PATCH. Camera streams
    need the socket.
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
        transport: str = "auto",
        tus_chunk_size: int = TUS_CHUNK_SIZE,
    ) -> None:
        if chunk_size < 1 or tus_chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}")
        self.transport = transport
        self.tus_chunk_size = tus_chunk_size
        self.over_tus = transport == "tus"
        """Uploads go over tus: asked for, or the socket could not be opened (``auto``)."""
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
        self._conn: Connection | None = None
        self._lock: asyncio.Lock | None = None
        self._closed = False
        self._ids = itertools.count(1)
        self._seqs: dict[str, int] = {}
        self._streams: set[str] = set()

    # Life cycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        if self.transport != "tus":
            await self._open_or_fall_back()
        return self

    async def _open_or_fall_back(self) -> None:
        """Open the socket; with ``auto``, a socket that cannot be opened means tus."""
        try:
            await self.connect()
        except ConnectFailedError:
            if self.transport != "auto" or not await tus_available(self.url,
                                                                   self.connect_timeout):
                raise
            self.over_tus = True

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
        image = open_source(source, name)
        try:
            if image.size == 0:
                raise InvalidImageError("the image is empty (0 bytes)")
            if sha256 is None and checksum:
                if on_stage is not None:
                    on_stage("hashing", {})
                sha256 = await image.sha256()
            if not self.over_tus and self.transport == "auto" and self._conn is None:
                await self._open_or_fall_back()
            if self.over_tus:
                return await TusUpload(self, image, task=task, options=options, sha256=sha256,
                                       on_progress=on_progress, on_stage=on_stage).run()
            job = UploadJob(self, image, task=task, options=options, sha256=sha256,
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

    def _forget(self, conn: Connection) -> None:
        if self._conn is conn:
            self._conn = None

    async def _connection(self) -> Connection:
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

    async def _open(self) -> Connection:
        conn = await open_connection(
            self.url, token=self.token, base64=self.base64,
            connect_timeout=self.connect_timeout, ping_interval=self.ping_interval,
            on_closed=self._forget,
        )
        if self._closed:
            await conn.close()
            raise ClientClosedError("the client is closed")
        self.welcome = conn.welcome
        return conn
