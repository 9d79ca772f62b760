"""Camera streams: frames read and JPEG-encoded off the event loop, paced, sent as they come.

The server keeps the latest frame of a stream (one running, one waiting) and reports the others
``dropped``: they are reported, never retried. Every frame sent ends as exactly one
:data:`FrameEvent`; :class:`FrameStats` holds counts, fps and latency percentiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from chunking.client.connection import Connection, Signal
from chunking.client.errors import (
    ConnectionLostError,
    PixelstreamError,
    TooLargeError,
    error_from_message,
)
from chunking.client.retry import Retrier
from chunking.errors import ErrorCode
from chunking.messages import Dropped, Error, Frame, Result

if TYPE_CHECKING:
    from chunking.client.client import Client

__all__ = [
    "LATENCY_WINDOW",
    "FrameDropped",
    "FrameEvent",
    "FrameFailed",
    "FrameResult",
    "FrameSource",
    "FrameStats",
    "FrameStream",
    "encode_frame",
]

LATENCY_WINDOW: Final = 10_000
"""Frame latencies kept for percentiles (the most recent ones)."""

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
            cv2 = _cv2()
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


def _cv2() -> Any:
    """OpenCV, which the ``camera`` extra installs: a clear error where it is missing."""
    try:
        import cv2
    except ImportError:
        raise ImportError(
            "reading cameras, video files and numpy frames needs OpenCV: "
            "pip install 'pixelstream-client[camera]'"
        ) from None
    return cv2


def encode_frame(frame: Any, quality: int = 85) -> bytes:
    """JPEG bytes of a frame: a numpy array (BGR or grey), a PIL image, or bytes as they are."""
    if isinstance(frame, (bytes, bytearray, memoryview)):
        return bytes(frame)
    if hasattr(frame, "shape"):
        cv2 = _cv2()
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
        self._conn: Connection | None = None
        self._producer: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._settled = Signal()
        self._fatal: BaseException | None = None
        self._pause_until = 0.0
        self._retrier = Retrier(client.retry_delays, client.on_should_retry)
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

    async def _connection(self) -> Connection:
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

    def _connection_lost(self, conn: Connection, error: ConnectionLostError) -> None:
        if conn is self._conn:
            self._conn = None
        for seq in list(self._outstanding):
            self._emit_lost(seq, "connection_lost")
        self._settled.pulse()
