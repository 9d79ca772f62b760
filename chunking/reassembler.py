"""Reassembly of one upload, and the state table of an upload's life.

:class:`Reassembler` takes chunks and returns events. It writes into a buffer preallocated to
the declared size (the caller chooses it: a ``bytearray``, or a memory map that worker
processes can read without a copy), enforces PROTOCOL.md's offset rules and hashes the bytes
as they arrive, so the SHA-256 is ready when the last byte is::

    reassembler = Reassembler(size=upload.size, sha256=upload.sha256)
    event = reassembler.receive(chunk)   # Appended or Replayed; raises ProtocolError
    if reassembler.complete:
        digest = reassembler.finish()    # raises ProtocolError(checksum_mismatch)

:data:`TRANSITIONS` is the upload life cycle; :class:`Lifecycle` refuses any event the table
does not allow, so stages can be skipped but never reordered, and nothing follows a cancel.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Protocol

from chunking.errors import ErrorCode, InvalidTransition, ProtocolError
from chunking.messages import Chunk, Payload


class Hasher(Protocol):
    """What :class:`Reassembler` feeds each new chunk to: ``hashlib.sha256()``, or an object that
    computes one elsewhere (a server may hash on another thread, behind the writes)."""

    def update(self, data: Payload, /) -> None: ...

    def hexdigest(self) -> str: ...


class WritableBuffer(Protocol):
    """A preallocated, fixed-size, writable byte buffer (bytearray, mmap, memoryview)."""

    def __len__(self) -> int: ...

    def __setitem__(self, index: slice, value: Payload, /) -> None: ...


# Events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Appended:
    """The chunk was new and is now held; ``complete`` when it was the last one."""

    received: int
    total: int
    complete: bool


@dataclass(frozen=True, slots=True)
class Replayed:
    """The chunk lay entirely below the bytes held (a replay after a reconnect): ignored."""

    received: int
    total: int


ChunkEvent = Appended | Replayed


def is_append(chunk: Chunk, received: int, size: int) -> bool:
    """PROTOCOL.md's offset rule for a chunk, given ``received`` bytes held of ``size``.

    True: the chunk is next and must be appended. False: it lies entirely below the offset (a
    replay) and is ignored. Anything else raises ProtocolError(offset_mismatch) carrying
    ``expected``. Every upload store applies this one rule.
    """
    end = chunk.offset + len(chunk.data)
    if chunk.offset == received:
        if end > size:
            raise _mismatch(chunk.id, received, f"chunk runs past the upload's size ({size})")
        return True
    if end <= received:
        return False
    if chunk.offset < received:
        raise _mismatch(chunk.id, received, f"chunk overlaps the bytes held; expected {received}")
    raise _mismatch(chunk.id, received, f"chunk leaves a gap; expected offset {received}")


def _mismatch(upload_id: str, received: int, message: str) -> ProtocolError:
    return ProtocolError(
        ErrorCode.OFFSET_MISMATCH, message, upload_id=upload_id or None, expected=received
    )


class Reassembler:
    """Reassembles one upload of ``size`` bytes, in order, into a preallocated buffer.

    ``received`` may start above zero when the bytes so far were restored from a store (a
    resumed upload); then pass the ``hasher`` holding those bytes' hash state, or none, and
    the whole buffer is hashed once in :meth:`finish`. A ``hasher`` is fed each new chunk's
    bytes and asked for its ``hexdigest`` in :meth:`finish` (default: ``hashlib.sha256()``).

    ``writer(offset, data)``, when given, places the bytes instead of a copy into ``buffer``
    (which must then show what it wrote: ``os.pwrite`` to the file under a memory map does).
    Unlike a memoryview copy, ``os.pwrite`` and ``hashlib`` release the GIL for large buffers,
    so a caller may run :meth:`receive` in a thread, off its event loop; one call at a time.
    """

    __slots__ = (
        "_buffer", "_expected_sha256", "_hasher", "_view", "_writer", "received", "size",
        "upload_id",
    )

    def __init__(
        self,
        size: int,
        *,
        upload_id: str = "",
        sha256: str | None = None,
        buffer: WritableBuffer | None = None,
        received: int = 0,
        hasher: Hasher | None = None,
        writer: Callable[[int, Payload], object] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        if buffer is None:
            buffer = bytearray(size)
        if len(buffer) != size:
            raise ValueError(f"buffer holds {len(buffer)} bytes, the upload declares {size}")
        if not 0 <= received <= size:
            raise ValueError("received must lie within [0, size]")
        self.size = size
        self.upload_id = upload_id
        self.received = received
        self._buffer = buffer
        self._view = memoryview(buffer)  # type: ignore[arg-type]
        self._expected_sha256 = sha256.lower() if sha256 else None
        if hasher is None and received == 0:
            hasher = hashlib.sha256()
        self._hasher: Hasher | None = hasher
        self._writer = writer

    @property
    def complete(self) -> bool:
        return self.received == self.size

    @property
    def buffer(self) -> memoryview:
        """The bytes held so far (the whole image once complete). A view, not a copy."""
        return self._view[: self.received]

    def receive(self, chunk: Chunk) -> ChunkEvent:
        """Apply one chunk. Raises ProtocolError(offset_mismatch) carrying ``expected``.

        A rejected chunk changes nothing: the client can rewind to ``expected``.
        """
        if not is_append(chunk, self.received, self.size):
            return Replayed(received=self.received, total=self.size)
        end = chunk.offset + len(chunk.data)
        if end > chunk.offset:
            if self._writer is None:
                self._view[chunk.offset : end] = chunk.data
            else:
                self._writer(chunk.offset, chunk.data)
            if self._hasher is not None:
                self._hasher.update(chunk.data)
            self.received = end
        return Appended(received=self.received, total=self.size, complete=self.complete)

    def finish(self) -> str:
        """Return the SHA-256 (hex) of the complete upload, checking it against the declared one.

        Raises ProtocolError(checksum_mismatch); the caller must then discard the upload.
        """
        if not self.complete:
            raise InvalidTransition(f"finish() with {self.received} of {self.size} bytes held")
        if self._hasher is None:
            self._hasher = hashlib.sha256(self._view)
        digest = self._hasher.hexdigest()
        if self._expected_sha256 is not None and digest != self._expected_sha256:
            raise ProtocolError(
                ErrorCode.CHECKSUM_MISMATCH,
                "the bytes received do not hash to the declared sha256; the upload is discarded",
                upload_id=self.upload_id,
            )
        return digest

    def release(self) -> None:
        """Drop this object's view of the buffer, so a memory map under it can be closed."""
        self._view.release()


# Life cycle ---------------------------------------------------------------------------------


class UploadState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    QUEUED = "queued"
    DECODING = "decoding"
    INFERENCE = "inference"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


class UploadEvent(StrEnum):
    LAST_BYTE = "last_byte"  # every byte held and the checksum holds
    QUEUED = "queued"
    DECODING = "decoding"
    INFERENCE = "inference"
    RESULT = "result"
    CANCEL = "cancel"
    FAIL = "fail"


_S, _E = UploadState, UploadEvent
_ENDINGS: Final = {_E.RESULT: _S.DONE, _E.CANCEL: _S.CANCELLED, _E.FAIL: _S.FAILED}

TRANSITIONS: Final[dict[UploadState, dict[UploadEvent, UploadState]]] = {
    _S.RECEIVING: {_E.LAST_BYTE: _S.COMPLETE, _E.CANCEL: _S.CANCELLED, _E.FAIL: _S.FAILED},
    # A cached result goes from COMPLETE straight to DONE: stages may be skipped.
    _S.COMPLETE: {
        _E.QUEUED: _S.QUEUED,
        _E.DECODING: _S.DECODING,
        _E.INFERENCE: _S.INFERENCE,
        **_ENDINGS,
    },
    _S.QUEUED: {_E.DECODING: _S.DECODING, _E.INFERENCE: _S.INFERENCE, **_ENDINGS},
    _S.DECODING: {_E.INFERENCE: _S.INFERENCE, **_ENDINGS},
    _S.INFERENCE: dict(_ENDINGS),
    _S.DONE: {},
    _S.CANCELLED: {},
    _S.FAILED: {},
}
"""Upload life cycle: ``TRANSITIONS[state][event]`` is the next state; absent means refused."""

TERMINAL_STATES: Final = frozenset(state for state, moves in TRANSITIONS.items() if not moves)


class Lifecycle:
    """Tracks one upload's state through :data:`TRANSITIONS`."""

    __slots__ = ("state",)

    def __init__(self, state: UploadState = UploadState.RECEIVING) -> None:
        self.state = state

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES

    def allows(self, event: UploadEvent) -> bool:
        return event in TRANSITIONS[self.state]

    def advance(self, event: UploadEvent) -> UploadState:
        """Move to the next state. Raises InvalidTransition if the table has no such move."""
        try:
            self.state = TRANSITIONS[self.state][event]
        except KeyError:
            raise InvalidTransition(
                f"can't handle event {event.value!r} in state {self.state.value!r}"
            ) from None
        return self.state
