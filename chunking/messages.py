"""The messages of protocol v1, as frozen dataclasses.

Client → server: :class:`Upload`, :class:`Chunk`, :class:`Cancel`, :class:`Frame`.
Server → client: :class:`Welcome`, :class:`Accepted`, :class:`Progress`, :class:`Result`,
:class:`Cancelled`, :class:`Dropped`, :class:`Error`.

``data`` fields hold raw bytes: Base64 exists only on the wire, in :mod:`chunking.codec`.
Optional fields left ``None`` are omitted from the wire form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from chunking.errors import ErrorCode
from chunking.limits import Limits

PROTOCOL_VERSION = 1

Payload = bytes | bytearray | memoryview


class Stage(StrEnum):
    """The ``stage`` of a ``progress`` message, in the only order they may be sent."""

    UPLOAD = "upload"
    QUEUED = "queued"
    DECODING = "decoding"
    INFERENCE = "inference"


# Client → server ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Upload:
    """Announces an upload (or resumes one, with ``resume``)."""

    id: str
    size: int
    sha256: str | None = None
    name: str | None = None
    task: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    resume: str | None = None
    type: str = field(default="upload", init=False)


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes ``[offset, offset + len(data))`` of upload ``id``."""

    id: str
    offset: int
    data: Payload
    type: str = field(default="chunk", init=False)


@dataclass(frozen=True, slots=True)
class Cancel:
    id: str
    type: str = field(default="cancel", init=False)


@dataclass(frozen=True, slots=True)
class Frame:
    """One whole camera frame of ``stream``; ``seq`` grows within the stream."""

    stream: str
    seq: int
    data: Payload
    task: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    type: str = field(default="frame", init=False)


ClientMessage = Upload | Chunk | Cancel | Frame


# Server → client ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Welcome:
    session: str
    limits: Limits
    tasks: list[str]
    default_task: str
    protocol: int = PROTOCOL_VERSION
    type: str = field(default="welcome", init=False)


@dataclass(frozen=True, slots=True)
class Accepted:
    id: str
    offset: int
    resume: str
    type: str = field(default="accepted", init=False)


@dataclass(frozen=True, slots=True)
class Progress:
    """``stage`` upload carries ``received``/``total``; queued carries ``position`` (1 = next);
    inference over tiles carries ``done``/``total`` (tiles finished, of all)."""

    id: str
    stage: Stage
    received: int | None = None
    total: int | None = None
    position: int | None = None
    done: int | None = None
    type: str = field(default="progress", init=False)


@dataclass(frozen=True, slots=True)
class Result:
    """The answer for an upload (``id``) or a frame (``stream`` and ``seq``)."""

    task: str
    result: dict[str, Any]
    image: dict[str, Any]
    cached: bool
    model: str
    timings_ms: dict[str, float]
    id: str | None = None
    stream: str | None = None
    seq: int | None = None
    revision: str | None = None
    """The revision of the weights that answered, where the model has one (additive)."""
    type: str = field(default="result", init=False)


@dataclass(frozen=True, slots=True)
class Cancelled:
    id: str
    type: str = field(default="cancelled", init=False)


@dataclass(frozen=True, slots=True)
class Dropped:
    stream: str
    seq: int
    reason: str = "superseded"
    type: str = field(default="dropped", init=False)


@dataclass(frozen=True, slots=True)
class Error:
    code: ErrorCode
    message: str
    id: str | None = None
    stream: str | None = None
    seq: int | None = None
    expected: int | None = None
    retry_after_ms: int | None = None
    type: str = field(default="error", init=False)


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    """A server message of a type this client does not know: v1 clients ignore it."""

    raw: dict[str, Any]
    type: str = field(default="unknown", init=False)


ServerMessage = (
    Welcome | Accepted | Progress | Result | Cancelled | Dropped | Error | UnknownMessage
)
