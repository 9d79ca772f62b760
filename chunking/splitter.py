"""The client's side of an upload: which bytes to send next, within the server's window.

:class:`UploadSender` is sans-I/O: it never reads files or sockets. The client asks it for the
next range to send, reads those bytes itself, and reports what the server answered::

    sender = UploadSender(size, chunk_size=1 << 20)
    sender.on_accepted(accepted.offset)            # 0, or where a resumed upload stands
    while (span := sender.next_span(window.free)):  # None: done, or the window is full
        send(Chunk(id, span.offset, read(span.offset, span.length)))
    sender.on_progress(progress.received)           # every ack frees window space
    sender.rewind(error.expected)                   # an offset_mismatch: resend from there

``unacknowledged`` is what counts against the socket's ``window_bytes``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from chunking.messages import Chunk, Payload


@dataclass(frozen=True, slots=True)
class Span:
    offset: int
    length: int


class UploadSender:
    """Tracks one upload's sent and acknowledged offsets."""

    __slots__ = ("acknowledged", "chunk_size", "sent", "size")

    def __init__(self, size: int, *, chunk_size: int) -> None:
        if size < 1 or chunk_size < 1:
            raise ValueError("size and chunk_size must be positive")
        self.size = size
        self.chunk_size = chunk_size
        self.sent = 0
        self.acknowledged = 0

    @property
    def unacknowledged(self) -> int:
        return self.sent - self.acknowledged

    @property
    def all_sent(self) -> bool:
        return self.sent >= self.size

    @property
    def all_acknowledged(self) -> bool:
        return self.acknowledged >= self.size

    def next_span(self, window_free: int) -> Span | None:
        """The next range to send, at most ``window_free`` bytes; marks it sent.

        Returns None when everything is sent or the window has no room. A span is never
        empty: an upload's chunk always advances it.
        """
        length = min(self.chunk_size, self.size - self.sent, window_free)
        if length <= 0:
            return None
        span = Span(self.sent, length)
        self.sent += length
        return span

    def on_accepted(self, offset: int) -> None:
        """The server holds ``offset`` bytes already (a resume): start from there."""
        self._check(offset)
        self.acknowledged = offset
        self.sent = offset

    def on_progress(self, received: int) -> None:
        """An ``upload`` progress: the server holds ``received`` bytes."""
        self._check(received)
        self.acknowledged = max(self.acknowledged, received)
        self.sent = max(self.sent, self.acknowledged)

    def rewind(self, expected: int) -> None:
        """An ``offset_mismatch``: the server holds ``expected`` bytes; resend from there."""
        self.on_accepted(expected)

    def _check(self, offset: int) -> None:
        if not 0 <= offset <= self.size:
            raise ValueError(f"offset {offset} outside [0, {self.size}]")


def iter_chunks(upload_id: str, data: Payload, chunk_size: int, start: int = 0) -> Iterator[Chunk]:
    """Split ``data[start:]`` into chunks of at most ``chunk_size`` bytes (zero-copy views)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    view = memoryview(data)
    for offset in range(start, len(view), chunk_size):
        yield Chunk(id=upload_id, offset=offset, data=view[offset : offset + chunk_size])
