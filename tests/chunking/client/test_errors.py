"""The client's exceptions (chunking.client.errors)."""

from __future__ import annotations

from chunking.client import (
    ERRORS,
    BadMessageError,
    BusyError,
    ConnectFailedError,
    ConnectionLostError,
    InternalError,
    OffsetMismatchError,
    PixelstreamError,
    StalledError,
    UploadTimeoutError,
    error_code,
    error_from_message,
)
from chunking.client.errors import error_for_code
from chunking.errors import ErrorCode, ProtocolError
from chunking.messages import Error


def test_every_error_code_has_its_exception_class() -> None:
    assert set(ERRORS) == set(ErrorCode)
    for code, cls in ERRORS.items():
        error = cls("why")
        assert isinstance(error, PixelstreamError)
        assert isinstance(error, ProtocolError)
        assert error.code is code
        assert error_code(error) == code.value
        assert str(error) == f"{code.value}: why"
    assert len(set(ERRORS.values())) == len(ERRORS)


def test_every_failure_has_a_stable_code() -> None:
    assert error_code(ConnectionLostError()) == "connection_lost"
    assert error_code(StalledError()) == "stalled"
    assert error_code(ConnectFailedError()) == "connection_failed"
    assert error_code(UploadTimeoutError()) == "timeout"
    assert error_code(FileNotFoundError()) == "not_found"
    assert error_code(PermissionError()) == "os_error"
    assert error_code(ValueError()) == "client_error"


def test_http_codes_map_to_their_classes_and_unknown_ones_to_internal() -> None:
    busy = error_for_code("busy", "full", 250)
    assert isinstance(busy, BusyError)
    assert busy.retry_after_ms == 250
    assert isinstance(error_for_code("no_such_code", "?"), InternalError)
    assert isinstance(error_for_code(None, "?", default=ErrorCode.BAD_MESSAGE), BadMessageError)


def test_an_error_message_becomes_its_exception_with_every_field() -> None:
    error = error_from_message(Error(ErrorCode.OFFSET_MISMATCH, "gap", id="u3", expected=7))
    assert isinstance(error, OffsetMismatchError)
    assert (error.upload_id, error.expected, error.message) == ("u3", 7, "gap")
