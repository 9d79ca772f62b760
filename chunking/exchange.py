"""One upload's exchange with the server on one socket, the client's side, sans I/O.

The client's counterpart of the :class:`~chunking.reassembler.Reassembler`: it never reads
files, sockets or clocks. It builds the messages to send, and turns every server message for
the upload into events::

    exchange = UploadExchange("u1", size, chunk_size=1 << 20)
    send(exchange.announce(sha256=digest, task="classify"))
    for event in exchange.receive(message):      # every server message for "u1"
        ...                                      # Started, Acknowledged, ChunkRefused, Finished...
    while (span := exchange.next_span(window_free)):
        data = read(span.offset, span.length)    # I/O: the span may go stale meanwhile
        if (chunk := exchange.chunk(span, data)) is not None:
            send(chunk)
    exchange.rewind(refused.error.expected)      # after ChunkRefused, when retrying it

Replies are counted: the server answers every chunk with one ``progress`` or one ``error``, in
order. A rewind makes the answers still owed for chunks sent before it *stale*: their
recoverable errors are expected and ignored (their acknowledgements still count). Each rewind
starts a new *epoch*; a span planned in an older epoch is void (:meth:`chunk` returns None).
``replies_owed`` says when a silent server is stalling; ``in_flight`` is what the upload holds
of the socket's ``window_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

from chunking.errors import ErrorCode
from chunking.limits import MAX_NAME_LENGTH
from chunking.messages import (
    Accepted,
    Cancel,
    Cancelled,
    Chunk,
    Error,
    Payload,
    Progress,
    Result,
    Stage,
    Upload,
)
from chunking.splitter import UploadSender

RECOVERABLE_CHUNK_CODES: Final = frozenset({ErrorCode.OFFSET_MISMATCH, ErrorCode.RATE_LIMITED})
"""Chunk errors cured by resending from the server's ``expected`` offset."""


class Phase(Enum):
    IDLE = "idle"
    """Not announced yet, or the announcement was refused (announce again, or give up)."""
    ANNOUNCED = "announced"
    """``upload`` sent, its ``accepted`` (or ``error``) owed."""
    SENDING = "sending"
    """Accepted: chunks go out until the outcome arrives."""
    DONE = "done"
    """An outcome, a give-up or a lost socket: nothing more happens on this socket."""


# Events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    """The server accepted the upload and holds ``offset`` bytes of it (a resume when > 0)."""

    offset: int
    resume: str


@dataclass(frozen=True, slots=True)
class Acknowledged:
    """An ``upload`` progress: the server holds ``acknowledged`` bytes; ``advanced`` of them
    are new (0 for a late or repeated acknowledgement)."""

    sent: int
    acknowledged: int
    advanced: int


@dataclass(frozen=True, slots=True)
class StageReached:
    """A processing stage after the upload (``queued`` with ``position``, ``decoding``, ...)."""

    stage: Stage
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AnnounceRefused:
    """The ``upload`` was refused: the server holds nothing; :meth:`UploadExchange.announce`
    may try again (``unknown_upload`` for a stale resume token: start over)."""

    error: Error


@dataclass(frozen=True, slots=True)
class ChunkRefused:
    """A recoverable chunk error (:data:`RECOVERABLE_CHUNK_CODES`) with the offset the server
    holds: call :meth:`UploadExchange.rewind` to resend from there, or
    :meth:`UploadExchange.abandon` to give up."""

    error: Error


@dataclass(frozen=True, slots=True)
class Finished:
    result: Result


@dataclass(frozen=True, slots=True)
class Failed:
    """The upload ended with ``error`` (:meth:`UploadExchange.cancel` says whether the server
    may still hold it)."""

    error: Error


@dataclass(frozen=True, slots=True)
class Withdrawn:
    """The server confirmed a cancel."""


ExchangeEvent = (
    Started | Acknowledged | StageReached | AnnounceRefused | ChunkRefused | Finished | Failed
    | Withdrawn
)


@dataclass(frozen=True, slots=True)
class PlannedSpan:
    """A range to send, planned in ``epoch``: void once the exchange has rewound."""

    offset: int
    length: int
    epoch: int


class UploadExchange:
    """One upload's messages on one socket: what to send, what the answers mean."""

    def __init__(self, upload_id: str, size: int, *, chunk_size: int) -> None:
        self.id = upload_id
        self.sender = UploadSender(size, chunk_size=chunk_size)
        self.phase = Phase.IDLE
        self.live = False
        """The server may hold this upload: giving up must :meth:`cancel` it."""
        self.pending_replies = 0
        """Chunks sent whose ``progress`` or ``error`` has not arrived."""
        self.stale_replies = 0
        """Of those, the ones sent before the latest rewind."""
        self.epoch = 0

    # State ------------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.sender.size

    @property
    def sent(self) -> int:
        return self.sender.sent

    @property
    def acknowledged(self) -> int:
        return self.sender.acknowledged

    @property
    def all_acknowledged(self) -> bool:
        return self.sender.all_acknowledged

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    @property
    def replies_owed(self) -> bool:
        """The server owes an answer: silence beyond a timeout means a stalled socket."""
        if self.phase is Phase.DONE:
            return False
        return self.phase is Phase.ANNOUNCED or self.pending_replies > 0

    @property
    def in_flight(self) -> int:
        """Bytes sent and not acknowledged while sending: this upload's share of the window."""
        return self.sender.unacknowledged if self.phase is Phase.SENDING else 0

    # Sending ----------------------------------------------------------------------------------

    def announce(
        self,
        *,
        sha256: str | None = None,
        name: str | None = None,
        task: str | None = None,
        options: dict[str, Any] | None = None,
        resume: str | None = None,
    ) -> Upload:
        """The ``upload`` message (again after :class:`AnnounceRefused`); an accept is owed."""
        if self.phase not in (Phase.IDLE, Phase.ANNOUNCED):
            raise RuntimeError(f"cannot announce upload {self.id!r} when {self.phase.value}")
        self.phase = Phase.ANNOUNCED
        self.live = True  # the server may accept it from here: a give-up must cancel
        return Upload(
            id=self.id, size=self.size, sha256=sha256,
            name=name[:MAX_NAME_LENGTH] if name else None,
            task=task, options=dict(options or {}), resume=resume,
        )

    def next_span(self, window_free: int) -> PlannedSpan | None:
        """The next whole chunk to send, marked sent; None while the window has no room for
        it, once everything is sent, or when not sending."""
        if self.phase is not Phase.SENDING:
            return None
        sender = self.sender
        want = min(sender.chunk_size, sender.size - sender.sent)
        if want <= 0 or window_free < want:
            return None
        span = sender.next_span(want)
        assert span is not None
        return PlannedSpan(span.offset, span.length, self.epoch)

    def chunk(self, span: PlannedSpan, data: Payload) -> Chunk | None:
        """The ``chunk`` for ``span`` read as ``data`` (a reply is owed from here); None when
        the exchange rewound or ended since the span was planned: do not send it."""
        if span.epoch != self.epoch or self.phase is not Phase.SENDING:
            return None
        if len(data) != span.length:
            raise ValueError(f"read {len(data)} bytes for a span of {span.length}")
        self.pending_replies += 1
        return Chunk(self.id, span.offset, data)

    def rewind(self, expected: int) -> None:
        """Resend from ``expected`` (after :class:`ChunkRefused`): answers still owed for
        chunks sent so far become stale, spans planned so far void."""
        expected = min(max(expected, 0), self.size)
        self.sender.rewind(expected)
        self.stale_replies = self.pending_replies
        self.epoch += 1

    def abandon(self) -> None:
        """Stop here (a give-up, a timeout): :meth:`cancel` says whether to tell the server."""
        self.phase = Phase.DONE

    def cancel(self) -> Cancel | None:
        """The ``cancel`` to send when the server may still hold the upload, else None."""
        self.phase = Phase.DONE
        if not self.live:
            return None
        self.live = False
        return Cancel(self.id)

    def connection_lost(self) -> None:
        """The socket is gone, and with it everything this exchange could still learn."""
        self.phase = Phase.DONE
        self.live = False

    # Receiving --------------------------------------------------------------------------------

    def receive(self, message: Accepted | Progress | Cancelled | Result | Error
                ) -> list[ExchangeEvent]:
        """What one server message about this upload means (an empty list: nothing)."""
        if self.phase is Phase.DONE:
            return []
        if isinstance(message, Accepted):
            return self._on_accepted(message)
        if isinstance(message, Progress):
            if message.stage is Stage.UPLOAD:
                return self._on_ack(message)
            detail: dict[str, int] = {}
            if message.position is not None:
                detail["position"] = message.position
            if message.done is not None and message.total is not None:
                detail.update(done=message.done, total=message.total)  # tiles of a spatial task
            return [StageReached(message.stage, detail)]
        if isinstance(message, Result):
            self._end(live=False)
            return [Finished(message)]
        if isinstance(message, Error):
            return self._on_error(message)
        # Cancelled: only ever after our own cancel.
        self._end(live=False)
        return [Withdrawn()]

    def _on_accepted(self, message: Accepted) -> list[ExchangeEvent]:
        if self.phase is not Phase.ANNOUNCED:
            return []  # a repeated accept: the first one counted
        self.sender.on_accepted(min(max(message.offset, 0), self.size))
        self.phase = Phase.SENDING
        return [Started(self.sender.acknowledged, message.resume)]

    def _count_reply(self) -> bool:
        """Count one answer to a chunk; True when it answers a chunk sent before a rewind."""
        if self.pending_replies > 0:
            self.pending_replies -= 1
        stale = self.stale_replies > 0
        if stale:
            self.stale_replies -= 1
        return stale

    def _on_ack(self, progress: Progress) -> list[ExchangeEvent]:
        self._count_reply()
        received = progress.received if progress.received is not None else 0
        if not 0 <= received <= self.size:
            return []  # a server bug; the stall timer covers a server that says nothing else
        before = self.sender.acknowledged
        self.sender.on_progress(received)
        return [Acknowledged(self.sender.sent, self.sender.acknowledged,
                             self.sender.acknowledged - before)]

    def _on_error(self, error: Error) -> list[ExchangeEvent]:
        if self.phase is Phase.ANNOUNCED:
            self.phase = Phase.IDLE
            self.live = False
            return [AnnounceRefused(error)]
        if self.pending_replies > 0:
            stale = self._count_reply()
            if error.code in RECOVERABLE_CHUNK_CODES:
                if stale:
                    return []  # expected: the chunk was sent before the rewind
                if error.expected is not None:
                    return [ChunkRefused(error)]
            self._end(live=self.live)  # the server may still hold it: a cancel frees it
            return [Failed(error)]
        self._end(live=False)  # an outcome: the server has forgotten the upload
        return [Failed(error)]

    def _end(self, *, live: bool) -> None:
        self.phase = Phase.DONE
        self.live = live
