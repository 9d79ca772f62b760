"""The error catalogue: one stable code per failure, shared by server and clients.

Codes are part of the wire protocol (PROTOCOL.md's table): add new ones, never rename.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    BAD_MESSAGE = "bad_message"
    BAD_BASE64 = "bad_base64"
    UNKNOWN_UPLOAD = "unknown_upload"
    DUPLICATE_UPLOAD = "duplicate_upload"
    TOO_LARGE = "too_large"
    OFFSET_MISMATCH = "offset_mismatch"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    INVALID_IMAGE = "invalid_image"
    TOO_MANY_PIXELS = "too_many_pixels"
    TOO_MANY_UPLOADS = "too_many_uploads"
    UNKNOWN_TASK = "unknown_task"
    RATE_LIMITED = "rate_limited"
    BUSY = "busy"
    INTERNAL = "internal"
    # Additions to the v1 table.
    UNAUTHORIZED = "unauthorized"
    """HTTP only: a token is required and none (or a wrong one) was given."""
    UPLOAD_EXPIRED = "upload_expired"
    """A partial upload saw no chunk for the configured idle time and was discarded."""
    FORBIDDEN_ORIGIN = "forbidden_origin"
    """A browser Origin the server does not allow: a handshake, or an HTTP request that acts."""
    FORBIDDEN_HOST = "forbidden_host"
    """A ``Host`` the server does not answer to (DNS rebinding): any request or handshake."""


class ProtocolError(Exception):
    """The peer broke the protocol, or a request cannot be served: carries its stable code.

    ``upload_id`` (or ``stream``/``seq``) is set when the error concerns one upload or frame;
    ``expected`` is the offset the server holds, for offset errors; ``retry_after_ms`` for
    ``rate_limited`` and ``busy``.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        upload_id: str | None = None,
        stream: str | None = None,
        seq: int | None = None,
        expected: int | None = None,
        retry_after_ms: int | None = None,
        message_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.upload_id = upload_id
        self.stream = stream
        self.seq = seq
        self.expected = expected
        self.retry_after_ms = retry_after_ms
        self.message_type = message_type
        """The ``type`` of the message that caused it, when it was readable (not on the wire)."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields: rebuild through a helper so the error survives pickling.
        return (_rebuild, (self.code, self.message, dict(self.__dict__)))

    def __repr__(self) -> str:
        return f"ProtocolError({self.code.value!r}, {self.message!r})"


def _rebuild(code: ErrorCode, message: str, state: dict[str, Any]) -> ProtocolError:
    error = ProtocolError(code, message)
    error.__dict__.update(state)
    return error


class InvalidTransition(Exception):
    """The caller misused the API: an event that the upload's current state does not allow."""
