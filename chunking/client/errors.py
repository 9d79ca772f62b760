"""The client's exceptions: one class per protocol error code, and the connection's own.

``except BusyError`` catches one code; ``except PixelstreamError as e`` with ``e.code``
catches every error the server reported. Failures of the socket are
:class:`ConnectionLostError` (a builtin ``ConnectionError``), a call's ``timeout`` is
:class:`UploadTimeoutError` (a ``TimeoutError``). :func:`is_retryable` is the default retry
decision, :func:`error_code` a stable string for any failure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Final

from chunking.errors import ErrorCode, ProtocolError
from chunking.messages import Error

__all__ = [
    "ERRORS",
    "RETRYABLE_CODES",
    "BadBase64Error",
    "BadMessageError",
    "BusyError",
    "ChecksumMismatchError",
    "ClientClosedError",
    "ConnectFailedError",
    "ConnectionLostError",
    "DuplicateUploadError",
    "ForbiddenHostError",
    "ForbiddenOriginError",
    "InternalError",
    "InvalidImageError",
    "OffsetMismatchError",
    "PixelstreamError",
    "RateLimitedError",
    "StalledError",
    "TooLargeError",
    "TooManyPixelsError",
    "TooManyUploadsError",
    "UnauthorizedError",
    "UnknownTaskError",
    "UnknownUploadError",
    "UploadExpiredError",
    "UploadTimeoutError",
    "error_code",
    "error_for_code",
    "error_from_message",
    "is_retryable",
]


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


class ForbiddenHostError(PixelstreamError):
    """The server does not answer to the name in the URL (its Host allow-list): connect by a
    name it is configured for, or add this one to its allowed hosts."""

    error_code = ErrorCode.FORBIDDEN_HOST


ERRORS: Final[Mapping[ErrorCode, type[PixelstreamError]]] = {
    cls.error_code: cls
    for cls in (
        BadMessageError, BadBase64Error, UnknownUploadError, DuplicateUploadError,
        TooLargeError, OffsetMismatchError, ChecksumMismatchError, InvalidImageError,
        TooManyPixelsError, TooManyUploadsError, UnknownTaskError, RateLimitedError,
        BusyError, InternalError, UnauthorizedError, UploadExpiredError, ForbiddenOriginError,
        ForbiddenHostError,
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


def error_for_code(code: str | None, message: str, retry_after_ms: int | None = None,
                   default: ErrorCode = ErrorCode.INTERNAL) -> PixelstreamError:
    """The typed exception for a code read off an HTTP body (``default`` when unknown)."""
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
