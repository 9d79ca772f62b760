"""Wire codec: JSON text frames (orjson) and binary frames, in both directions.

Binary frame layout: ``[2 bytes: header length H, big-endian][H bytes: JSON header][payload]``;
the header is the message's JSON form without ``data``. Only ``chunk`` and ``frame`` have one.

The server calls :func:`parse_client_text` / :func:`parse_client_binary` on what it receives and
:func:`encode_server` on what it sends; clients use :func:`encode_client_text` /
:func:`encode_client_binary` and :func:`parse_server`. Parsing validates every field and raises
:class:`~chunking.errors.ProtocolError` with the table's code; sizes are checked before any
Base64 is decoded, so an oversized chunk costs no memory beyond the frame already received.
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any, Final

import orjson
import pybase64

from chunking.errors import ErrorCode, ProtocolError
from chunking.limits import (
    MAX_BINARY_HEADER_BYTES,
    MAX_NAME_LENGTH,
    MAX_RESUME_TOKEN_LENGTH,
    MAX_TASK_LENGTH,
    Limits,
)
from chunking.messages import (
    Accepted,
    Cancel,
    Cancelled,
    Chunk,
    ClientMessage,
    Dropped,
    Error,
    Frame,
    Payload,
    Progress,
    Result,
    ServerMessage,
    Stage,
    UnknownMessage,
    Upload,
    Welcome,
)

ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
RESUME_PATTERN: Final = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_RESUME_TOKEN_LENGTH}}}")
SHA256_PATTERN: Final = re.compile(r"[0-9a-fA-F]{64}")
TASK_PATTERN: Final = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_TASK_LENGTH}}}")

_BINARY_TYPES: Final = frozenset({"chunk", "frame"})


# Errors -------------------------------------------------------------------------------------


def error_from_exception(exc: ProtocolError) -> Error:
    """The ``error`` message that answers ``exc``."""
    return Error(
        code=exc.code,
        message=exc.message,
        id=exc.upload_id,
        stream=exc.stream,
        seq=exc.seq,
        expected=exc.expected,
        retry_after_ms=exc.retry_after_ms,
    )


def exception_from_error(error: Error) -> ProtocolError:
    """The exception a client raises for an ``error`` message."""
    return ProtocolError(
        error.code,
        error.message,
        upload_id=error.id,
        stream=error.stream,
        seq=error.seq,
        expected=error.expected,
        retry_after_ms=error.retry_after_ms,
    )


# Parsing client messages (server side) ------------------------------------------------------


class _Fields:
    """Typed access to one JSON object's fields; every failure names the upload or frame."""

    __slots__ = ("obj", "seq", "stream", "upload_id")

    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj = obj
        self.upload_id: str | None = None
        self.stream: str | None = None
        self.seq: int | None = None

    def fail(self, code: ErrorCode, message: str, **extra: Any) -> ProtocolError:
        kind = self.obj.get("type")
        return ProtocolError(
            code, message, upload_id=self.upload_id, stream=self.stream, seq=self.seq,
            message_type=kind if isinstance(kind, str) else None, **extra
        )

    def bad(self, message: str) -> ProtocolError:
        return self.fail(ErrorCode.BAD_MESSAGE, message)

    def integer(self, key: str, *, minimum: int) -> int:
        value = self.obj.get(key)
        if value is None:
            raise self.bad(f"field {key!r} is missing")
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.bad(f"field {key!r} must be an integer")
        if value < minimum:
            raise self.bad(f"field {key!r} must be at least {minimum}")
        return value

    def string(self, key: str, pattern: re.Pattern[str], what: str) -> str:
        value = self.obj.get(key)
        if value is None:
            raise self.bad(f"field {key!r} is missing")
        return self._check_str(key, value, pattern, what)

    def optional_string(self, key: str, pattern: re.Pattern[str] | None, what: str) -> str | None:
        value = self.obj.get(key)
        if value is None:
            return None
        return self._check_str(key, value, pattern, what)

    def _check_str(self, key: str, value: Any, pattern: re.Pattern[str] | None, what: str) -> str:
        if not isinstance(value, str):
            raise self.bad(f"field {key!r} must be a string")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.bad(f"field {key!r} must be {what}")
        return value

    def options(self) -> dict[str, Any]:
        value = self.obj.get("options")
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.bad("field 'options' must be an object")
        return value

    def name(self) -> str | None:
        value = self.obj.get("name")
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.bad("field 'name' must be a string")
        if len(value) > MAX_NAME_LENGTH:
            raise self.bad(f"field 'name' must be at most {MAX_NAME_LENGTH} characters")
        return value


_ID_FORM = "1-64 characters of A-Z a-z 0-9 . _ -"


def _load_object(data: str | bytes | memoryview) -> dict[str, Any]:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "message is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "message must be a JSON object")
    return obj


def _message_type(fields_: _Fields) -> str:
    kind = fields_.obj.get("type")
    if not isinstance(kind, str):
        raise fields_.bad("field 'type' is missing or not a string")
    return kind


def _decode_base64(fields_: _Fields, limits: Limits) -> bytes:
    text = fields_.obj.get("data")
    if text is None:
        raise fields_.bad("field 'data' is missing")
    if not isinstance(text, str):
        raise fields_.bad("field 'data' must be a Base64 string")
    # Checked on the encoded length, before decoding allocates anything.
    if len(text) > limits.max_base64_chunk_chars:
        raise fields_.fail(
            ErrorCode.TOO_LARGE, f"data exceeds max_chunk_bytes ({limits.max_chunk_bytes})"
        )
    try:
        raw = pybase64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise fields_.fail(ErrorCode.BAD_BASE64, "field 'data' is not valid Base64") from None
    if len(raw) > limits.max_chunk_bytes:
        raise fields_.fail(
            ErrorCode.TOO_LARGE, f"data exceeds max_chunk_bytes ({limits.max_chunk_bytes})"
        )
    return raw


def _check_payload(fields_: _Fields, payload: memoryview, limits: Limits) -> memoryview:
    if len(payload) > limits.max_chunk_bytes:
        raise fields_.fail(
            ErrorCode.TOO_LARGE, f"data exceeds max_chunk_bytes ({limits.max_chunk_bytes})"
        )
    return payload


def _parse_upload(f: _Fields, limits: Limits) -> Upload:
    size = f.integer("size", minimum=1)
    if size > limits.max_image_bytes:
        raise f.fail(
            ErrorCode.TOO_LARGE, f"size exceeds max_image_bytes ({limits.max_image_bytes})"
        )
    sha256 = f.optional_string("sha256", SHA256_PATTERN, "64 hexadecimal digits")
    return Upload(
        id=f.upload_id or "",
        size=size,
        sha256=sha256.lower() if sha256 is not None else None,
        name=f.name(),
        task=f.optional_string("task", TASK_PATTERN, "a task name"),
        options=f.options(),
        resume=f.optional_string("resume", RESUME_PATTERN, "a resume token"),
    )


def _parse_client(obj: dict[str, Any], payload: memoryview | None, limits: Limits) -> ClientMessage:
    f = _Fields(obj)
    kind = _message_type(f)
    if payload is not None and kind not in _BINARY_TYPES:
        raise f.bad(f"a binary frame cannot carry a {kind!r} message")
    if kind in ("upload", "chunk", "cancel"):
        f.upload_id = f.string("id", ID_PATTERN, _ID_FORM)
        if kind == "upload":
            return _parse_upload(f, limits)
        if kind == "cancel":
            return Cancel(id=f.upload_id)
        offset = f.integer("offset", minimum=0)
        if payload is None:
            return Chunk(id=f.upload_id, offset=offset, data=_decode_base64(f, limits))
        if "data" in obj:
            raise f.bad("a binary frame's header must not carry 'data'")
        return Chunk(id=f.upload_id, offset=offset, data=_check_payload(f, payload, limits))
    if kind == "frame":
        f.stream = f.string("stream", ID_PATTERN, _ID_FORM)
        seq = f.seq = f.integer("seq", minimum=0)
        task = f.optional_string("task", TASK_PATTERN, "a task name")
        options = f.options()
        if payload is None:
            data: Payload = _decode_base64(f, limits)
        elif "data" in obj:
            raise f.bad("a binary frame's header must not carry 'data'")
        else:
            data = _check_payload(f, payload, limits)
        if not data:
            raise f.fail(ErrorCode.INVALID_IMAGE, "frame data is empty")
        return Frame(stream=f.stream, seq=seq, data=data, task=task, options=options)
    raise f.bad(f"unknown message type {kind!r}")


def parse_client_text(data: str | bytes, limits: Limits, *,
                      data_span: tuple[int, int] | None = None) -> ClientMessage:
    """Parse one text frame from a client. Raises ProtocolError with the table's code.

    ``data_span``: where the characters of the first ``"data":`` string value lie in ``data``
    (without its quotes), when the caller has found them (the server bounds a text's other
    fields by that scan, see ``server.bounded_json``). When that string is the object's last
    member and holds no escape, as every client writes a chunk or frame, the JSON parser reads
    only the fields around it, and the Base64 goes to the decoder without a pass through the
    parser (a copy and a scan of every character). The answer is the same either way: anything
    the short path does not accept is parsed in full.
    """
    if data_span is not None and (message := _parse_data_last(data, data_span, limits)):
        return message
    return _parse_client(_load_object(data), None, limits)


def _parse_data_last(text: str | bytes, span: tuple[int, int], limits: Limits
                     ) -> ClientMessage | None:
    """:func:`parse_client_text`'s short path; None where the full parse must decide."""
    start, end = span
    if not isinstance(text, str):
        return None
    # The string ends the text (only "}" and spaces after it): it is the last member of the
    # top-level object, so no member besides it is skipped, nested or repeated after it.
    if not (0 < start <= end < len(text) and text[end] == '"'
            and text[end + 1:].strip() == "}"):
        return None
    # No scan for escapes ("\/", "\u0041"): the decoder's strict alphabet refuses a backslash,
    # and a refusal here hands the text to the full parse.
    try:
        obj = _load_object(text[:start] + text[end:])  # the message with "data": ""
        if obj.get("data") != "":
            return None  # the string emptied was not the value of the object's "data"
        obj["data"] = text[start:end]
        return _parse_client(obj, None, limits)
    except ProtocolError:
        return None  # the full parse names the fault (a bad JSON text, bad Base64, ...)


def parse_client_binary(frame: bytes | bytearray | memoryview, limits: Limits) -> Chunk | Frame:
    """Parse one binary frame from a client; ``data`` is a zero-copy view of ``frame``."""
    view = memoryview(frame)
    if len(view) < 2:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "binary frame shorter than its 2-byte header")
    header_length = int.from_bytes(view[:2], "big")
    if header_length == 0 or 2 + header_length > len(view):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, "binary frame header length does not fit the frame"
        )
    header = _load_object(view[2 : 2 + header_length])
    message = _parse_client(header, view[2 + header_length :], limits)
    assert isinstance(message, (Chunk, Frame))  # _parse_client refuses other binary types
    return message


# Encoding ---------------------------------------------------------------------------------


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def to_wire(message: Any) -> dict[str, Any]:
    """The JSON object of a message (``data`` excluded), ``None`` fields omitted."""
    cls = type(message)
    names = _FIELD_NAMES.get(cls)
    if names is None:
        # "type" first: it reads better on the wire and in logs.
        names = ("type", *(f.name for f in fields(cls) if f.name not in ("type", "data")))
        _FIELD_NAMES[cls] = names
    obj: dict[str, Any] = {}
    for name in names:
        value = getattr(message, name)
        if value is not None:
            obj[name] = value.to_dict() if isinstance(value, Limits) else value
    return obj


def encode_server(message: ServerMessage) -> bytes:
    """Serialize a server message as the UTF-8 JSON of a text frame."""
    return orjson.dumps(to_wire(message))


def encode_client_text(message: ClientMessage) -> bytes:
    """Serialize a client message as the UTF-8 JSON of a text frame (Base64 ``data``)."""
    obj = to_wire(message)
    if isinstance(message, (Chunk, Frame)):
        obj["data"] = pybase64.b64encode(message.data).decode("ascii")
    return orjson.dumps(obj)


def encode_binary_header(message: Chunk | Frame) -> bytes:
    """The first part of a binary frame: the length prefix and JSON header, without payload."""
    header = orjson.dumps(to_wire(message))
    if len(header) > MAX_BINARY_HEADER_BYTES:
        raise ValueError("binary frame header exceeds 65535 bytes")
    return len(header).to_bytes(2, "big") + header


def encode_client_binary(message: Chunk | Frame) -> bytes:
    """Serialize a chunk or frame as one binary frame."""
    return encode_binary_header(message) + message.data


# Parsing server messages (client side) -------------------------------------------------------


def _progress(obj: dict[str, Any]) -> Progress:
    return Progress(
        id=obj["id"],
        stage=Stage(obj["stage"]),
        received=obj.get("received"),
        total=obj.get("total"),
        position=obj.get("position"),
        done=obj.get("done"),
    )


def _error(obj: dict[str, Any]) -> Error:
    try:
        code = ErrorCode(obj["code"])
    except ValueError:
        # A code added after this client was written: keep it as the catalogue's nearest kin.
        code = ErrorCode.INTERNAL
    return Error(
        code=code,
        message=str(obj.get("message", "")),
        id=obj.get("id"),
        stream=obj.get("stream"),
        seq=obj.get("seq"),
        expected=obj.get("expected"),
        retry_after_ms=obj.get("retry_after_ms"),
    )


_STAGES: Final = frozenset(stage.value for stage in Stage)

_SERVER_PARSERS: Final[dict[str, Any]] = {
    "welcome": lambda o: Welcome(
        session=o["session"],
        limits=Limits.from_dict(o["limits"]),
        tasks=list(o["tasks"]),
        default_task=o["default_task"],
        protocol=o["protocol"],
    ),
    "accepted": lambda o: Accepted(id=o["id"], offset=o["offset"], resume=o["resume"]),
    "progress": _progress,
    "result": lambda o: Result(
        task=o["task"],
        result=o["result"],
        image=o.get("image", {}),
        cached=o.get("cached", False),
        model=o.get("model", ""),
        timings_ms=o.get("timings_ms", {}),
        id=o.get("id"),
        stream=o.get("stream"),
        seq=o.get("seq"),
        revision=o.get("revision"),
    ),
    "cancelled": lambda o: Cancelled(id=o["id"]),
    "dropped": lambda o: Dropped(stream=o["stream"], seq=o["seq"], reason=o.get("reason", "")),
    "error": _error,
}


def parse_server(data: str | bytes) -> ServerMessage:
    """Parse one text frame from the server. Unknown types, and progress stages added after
    this client was written, become :class:`UnknownMessage` (a v1 client ignores them).

    Raises ProtocolError(bad_message) when a known message lacks a required field.
    """
    obj = _load_object(data)
    parser = _SERVER_PARSERS.get(obj.get("type", ""))
    if parser is None or (obj["type"] == "progress" and obj.get("stage") not in _STAGES):
        return UnknownMessage(raw=obj)
    try:
        message: ServerMessage = parser(obj)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"malformed {obj['type']!r} message from server: {exc}"
        ) from None
    return message
