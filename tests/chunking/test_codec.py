import base64
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunking.codec import (
    encode_client_binary,
    encode_client_text,
    encode_server,
    error_from_exception,
    exception_from_error,
    parse_client_binary,
    parse_client_text,
    parse_server,
    to_wire,
)
from chunking.errors import ErrorCode, ProtocolError
from chunking.limits import Limits
from chunking.messages import (
    Accepted,
    Cancel,
    Chunk,
    Error,
    Frame,
    Progress,
    Result,
    Stage,
    UnknownMessage,
    Upload,
    Welcome,
)

LIMITS = Limits(max_image_bytes=1000, max_chunk_bytes=300)
VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "codec.json").read_text())


def text(obj: Any) -> bytes:
    return orjson.dumps(obj)


def binary(header: Any, payload: bytes = b"", *, raw_header: bytes | None = None) -> bytes:
    encoded = raw_header if raw_header is not None else orjson.dumps(header)
    return len(encoded).to_bytes(2, "big") + encoded + payload


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# Round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        Upload(id="u1", size=1000, sha256="ab" * 32, name="x.jpg", task="classify",
               options={"top_k": 3}),
        Upload(id="a.b-c_9", size=1, resume="tok-_9"),
        Chunk(id="u1", offset=5, data=b"\x00\xff" * 10),
        Cancel(id="u1"),
        Frame(stream="cam0", seq=0, data=b"jpeg", task="classify", options={"top_k": 1}),
    ],
)
def test_client_messages_round_trip_as_text(message: Any) -> None:
    parsed = parse_client_text(encode_client_text(message), LIMITS)
    assert to_wire(parsed) == to_wire(message)
    if hasattr(message, "data"):
        assert bytes(parsed.data) == bytes(message.data)


@pytest.mark.parametrize(
    "message",
    [Chunk(id="u1", offset=7, data=b"\x01" * 300), Frame(stream="s", seq=3, data=b"\x02")],
)
def test_chunks_and_frames_round_trip_as_binary_with_a_zero_copy_payload(message: Any) -> None:
    wire = encode_client_binary(message)
    parsed = parse_client_binary(wire, LIMITS)
    assert to_wire(parsed) == to_wire(message)
    assert isinstance(parsed.data, memoryview)
    assert parsed.data.obj is wire
    assert bytes(parsed.data) == message.data


def test_sha256_is_normalised_to_lower_case() -> None:
    parsed = parse_client_text(text({"type": "upload", "id": "u", "size": 5, "sha256": "AB" * 32}),
                               LIMITS)
    assert isinstance(parsed, Upload)
    assert parsed.sha256 == "ab" * 32


def test_unknown_fields_are_ignored() -> None:
    parsed = parse_client_text(text({"type": "cancel", "id": "u", "later": [1, 2]}), LIMITS)
    assert parsed == Cancel(id="u")


def test_server_messages_round_trip_and_omit_absent_fields() -> None:
    wire = encode_server(Progress(id="u1", stage=Stage.QUEUED, position=2))
    assert orjson.loads(wire) == {"type": "progress", "id": "u1", "stage": "queued", "position": 2}
    assert parse_server(wire) == Progress(id="u1", stage=Stage.QUEUED, position=2)
    welcome = Welcome(session="s", limits=LIMITS, tasks=["classify"], default_task="classify")
    assert parse_server(encode_server(welcome)) == welcome


def test_a_result_names_the_revision_that_answered_only_when_there_is_one() -> None:
    answered = Result(task="ocr", result={"text": "", "lines": []}, image={}, cached=False,
                      model="rapidocr/PP-OCRv6-small", timings_ms={}, id="u1",
                      revision="3.10.0")
    assert orjson.loads(encode_server(answered))["revision"] == "3.10.0"
    assert parse_server(encode_server(answered)) == answered
    plain = Result(task="colors", result={}, image={}, cached=False, model="m", timings_ms={},
                   id="u2")
    assert "revision" not in orjson.loads(encode_server(plain))
    assert parse_server(encode_server(plain)) == plain


def test_unknown_server_types_are_kept_for_the_client_to_ignore() -> None:
    assert parse_server(b'{"type": "hint", "x": 1}') == UnknownMessage(raw={"type": "hint", "x": 1})
    later_stage = {"type": "progress", "id": "u1", "stage": "resizing"}
    assert parse_server(orjson.dumps(later_stage)) == UnknownMessage(raw=later_stage)


def test_unknown_error_codes_from_a_newer_server_read_as_internal() -> None:
    parsed = parse_server(b'{"type": "error", "code": "from_the_future", "message": "m"}')
    assert isinstance(parsed, Error)
    assert parsed.code is ErrorCode.INTERNAL


def test_malformed_server_message_is_a_bad_message() -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_server(b'{"type": "accepted", "id": "u1"}')
    assert caught.value.code is ErrorCode.BAD_MESSAGE


def test_errors_convert_both_ways() -> None:
    exc = ProtocolError(ErrorCode.OFFSET_MISMATCH, "m", upload_id="u", expected=4)
    error = error_from_exception(exc)
    assert orjson.loads(encode_server(error)) == {
        "type": "error", "code": "offset_mismatch", "message": "m", "id": "u", "expected": 4,
    }
    back = exception_from_error(error)
    assert (back.code, back.upload_id, back.expected) == (ErrorCode.OFFSET_MISMATCH, "u", 4)


# Malformed client messages ------------------------------------------------------------------

BAD_TEXT: list[tuple[str, bytes, ErrorCode, dict[str, Any]]] = [
    ("not json", b"{nope", ErrorCode.BAD_MESSAGE, {}),
    ("not utf-8", b'{"type": "\xff"}', ErrorCode.BAD_MESSAGE, {}),
    ("array", b"[1, 2]", ErrorCode.BAD_MESSAGE, {}),
    ("string", b'"upload"', ErrorCode.BAD_MESSAGE, {}),
    ("no type", text({"id": "u1"}), ErrorCode.BAD_MESSAGE, {}),
    ("type not a string", text({"type": 5}), ErrorCode.BAD_MESSAGE, {}),
    ("unknown type", text({"type": "hello"}), ErrorCode.BAD_MESSAGE, {}),
    ("server type from a client", text({"type": "welcome"}), ErrorCode.BAD_MESSAGE, {}),
    ("upload without id", text({"type": "upload", "size": 5}), ErrorCode.BAD_MESSAGE, {}),
    ("id with a slash", text({"type": "upload", "id": "../etc", "size": 5}),
     ErrorCode.BAD_MESSAGE, {}),
    ("id too long", text({"type": "upload", "id": "a" * 65, "size": 5}), ErrorCode.BAD_MESSAGE,
     {}),
    ("id empty", text({"type": "upload", "id": "", "size": 5}), ErrorCode.BAD_MESSAGE, {}),
    ("id a number", text({"type": "upload", "id": 7, "size": 5}), ErrorCode.BAD_MESSAGE, {}),
    ("id with unicode", text({"type": "upload", "id": "é", "size": 5}), ErrorCode.BAD_MESSAGE,
     {}),
    ("size missing", text({"type": "upload", "id": "u1"}), ErrorCode.BAD_MESSAGE,
     {"upload_id": "u1"}),
    ("size zero", text({"type": "upload", "id": "u1", "size": 0}), ErrorCode.BAD_MESSAGE,
     {"upload_id": "u1"}),
    ("size negative", text({"type": "upload", "id": "u1", "size": -5}), ErrorCode.BAD_MESSAGE,
     {"upload_id": "u1"}),
    ("size a float", text({"type": "upload", "id": "u1", "size": 5.0}), ErrorCode.BAD_MESSAGE,
     {"upload_id": "u1"}),
    ("size a bool", text({"type": "upload", "id": "u1", "size": True}), ErrorCode.BAD_MESSAGE,
     {"upload_id": "u1"}),
    ("size a string", text({"type": "upload", "id": "u1", "size": "5"}), ErrorCode.BAD_MESSAGE,
     {"upload_id": "u1"}),
    ("size over the limit", text({"type": "upload", "id": "u1", "size": 1001}),
     ErrorCode.TOO_LARGE, {"upload_id": "u1"}),
    ("size huge", b'{"type": "upload", "id": "u1", "size": 1e400}', ErrorCode.BAD_MESSAGE, {}),
    ("sha256 short", text({"type": "upload", "id": "u1", "size": 5, "sha256": "ab"}),
     ErrorCode.BAD_MESSAGE, {"upload_id": "u1"}),
    ("sha256 not hex", text({"type": "upload", "id": "u1", "size": 5, "sha256": "zz" * 32}),
     ErrorCode.BAD_MESSAGE, {"upload_id": "u1"}),
    ("name not a string", text({"type": "upload", "id": "u1", "size": 5, "name": ["a"]}),
     ErrorCode.BAD_MESSAGE, {"upload_id": "u1"}),
    ("name too long", text({"type": "upload", "id": "u1", "size": 5, "name": "n" * 1025}),
     ErrorCode.BAD_MESSAGE, {"upload_id": "u1"}),
    ("task not a string", text({"type": "upload", "id": "u1", "size": 5, "task": 1}),
     ErrorCode.BAD_MESSAGE, {"upload_id": "u1"}),
    ("options not an object", text({"type": "upload", "id": "u1", "size": 5, "options": [1]}),
     ErrorCode.BAD_MESSAGE, {"upload_id": "u1"}),
    ("resume token with spaces", text({"type": "upload", "id": "u1", "size": 5, "resume": "a b"}),
     ErrorCode.BAD_MESSAGE, {"upload_id": "u1"}),
    ("chunk negative offset", text({"type": "chunk", "id": "u1", "offset": -1, "data": ""}),
     ErrorCode.BAD_MESSAGE, {"upload_id": "u1"}),
    ("chunk offset missing", text({"type": "chunk", "id": "u1", "data": ""}),
     ErrorCode.BAD_MESSAGE, {"upload_id": "u1"}),
    ("chunk data missing", text({"type": "chunk", "id": "u1", "offset": 0}),
     ErrorCode.BAD_MESSAGE, {"upload_id": "u1"}),
    ("chunk data not a string", text({"type": "chunk", "id": "u1", "offset": 0, "data": 5}),
     ErrorCode.BAD_MESSAGE, {"upload_id": "u1"}),
    ("chunk bad base64", text({"type": "chunk", "id": "u1", "offset": 0, "data": "@@@@"}),
     ErrorCode.BAD_BASE64, {"upload_id": "u1"}),
    ("chunk base64 missing padding", text({"type": "chunk", "id": "u1", "offset": 0,
                                           "data": "YWJjZA"}),
     ErrorCode.BAD_BASE64, {"upload_id": "u1"}),
    ("chunk base64 with whitespace", text({"type": "chunk", "id": "u1", "offset": 0,
                                           "data": "YWJj\nZA=="}),
     ErrorCode.BAD_BASE64, {"upload_id": "u1"}),
    ("chunk over max_chunk_bytes", text({"type": "chunk", "id": "u1", "offset": 0,
                                         "data": b64(b"x" * 301)}),
     ErrorCode.TOO_LARGE, {"upload_id": "u1"}),
    ("cancel without id", text({"type": "cancel"}), ErrorCode.BAD_MESSAGE, {}),
    ("frame without stream", text({"type": "frame", "seq": 1, "data": b64(b"x")}),
     ErrorCode.BAD_MESSAGE, {}),
    ("frame negative seq", text({"type": "frame", "stream": "c", "seq": -1, "data": b64(b"x")}),
     ErrorCode.BAD_MESSAGE, {"stream": "c"}),
    ("frame seq a string", text({"type": "frame", "stream": "c", "seq": "1", "data": b64(b"x")}),
     ErrorCode.BAD_MESSAGE, {"stream": "c"}),
    ("frame bad base64", text({"type": "frame", "stream": "c", "seq": 2, "data": "!"}),
     ErrorCode.BAD_BASE64, {"stream": "c", "seq": 2}),
    ("frame empty", text({"type": "frame", "stream": "c", "seq": 2, "data": ""}),
     ErrorCode.INVALID_IMAGE, {"stream": "c", "seq": 2}),
    ("frame too large", text({"type": "frame", "stream": "c", "seq": 2,
                              "data": b64(b"x" * 301)}),
     ErrorCode.TOO_LARGE, {"stream": "c", "seq": 2}),
]


@pytest.mark.parametrize(
    ("wire", "code", "names"), [case[1:] for case in BAD_TEXT], ids=[case[0] for case in BAD_TEXT]
)
def test_malformed_text_messages_get_their_code(
    wire: bytes, code: ErrorCode, names: dict[str, Any]
) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_client_text(wire, LIMITS)
    assert caught.value.code is code
    assert caught.value.upload_id == names.get("upload_id")
    assert caught.value.stream == names.get("stream")
    assert caught.value.seq == names.get("seq")


def test_errors_name_the_type_of_the_message_that_caused_them() -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_client_text(text({"type": "chunk", "id": "u1", "offset": 0, "data": "!!"}), LIMITS)
    assert caught.value.message_type == "chunk"
    with pytest.raises(ProtocolError) as caught:
        parse_client_text(b"[]", LIMITS)
    assert caught.value.message_type is None


def test_protocol_errors_survive_pickling() -> None:
    import pickle

    error = ProtocolError(ErrorCode.BUSY, "later", upload_id="u", retry_after_ms=250)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.code, copy.message, copy.upload_id, copy.retry_after_ms) == (
        ErrorCode.BUSY, "later", "u", 250
    )


def test_an_oversized_base64_chunk_is_refused_before_it_is_decoded() -> None:
    # Not valid Base64 at all: only a size check made before decoding can answer too_large.
    wire = text({"type": "chunk", "id": "u1", "offset": 0, "data": "!" * 10_000})
    with pytest.raises(ProtocolError) as caught:
        parse_client_text(wire, LIMITS)
    assert caught.value.code is ErrorCode.TOO_LARGE


BAD_BINARY: list[tuple[str, bytes, ErrorCode]] = [
    ("empty", b"", ErrorCode.BAD_MESSAGE),
    ("one byte", b"\x00", ErrorCode.BAD_MESSAGE),
    ("zero header length", b"\x00\x00payload", ErrorCode.BAD_MESSAGE),
    ("header longer than the frame", b"\x01\x00{}", ErrorCode.BAD_MESSAGE),
    ("header not json", binary(None, b"x", raw_header=b"{oops"), ErrorCode.BAD_MESSAGE),
    ("header an array", binary([1], b"x"), ErrorCode.BAD_MESSAGE),
    ("upload in a binary frame", binary({"type": "upload", "id": "u", "size": 3}, b"x"),
     ErrorCode.BAD_MESSAGE),
    ("header carries data", binary({"type": "chunk", "id": "u", "offset": 0, "data": "eA=="},
                                   b"x"), ErrorCode.BAD_MESSAGE),
    ("payload too large", binary({"type": "chunk", "id": "u", "offset": 0}, b"x" * 301),
     ErrorCode.TOO_LARGE),
    ("frame payload too large", binary({"type": "frame", "stream": "c", "seq": 1}, b"x" * 301),
     ErrorCode.TOO_LARGE),
    ("frame payload empty", binary({"type": "frame", "stream": "c", "seq": 1}),
     ErrorCode.INVALID_IMAGE),
    ("lying header: negative offset", binary({"type": "chunk", "id": "u", "offset": -4}, b"x"),
     ErrorCode.BAD_MESSAGE),
]


@pytest.mark.parametrize(
    ("wire", "code"), [case[1:] for case in BAD_BINARY], ids=[case[0] for case in BAD_BINARY]
)
def test_malformed_binary_frames_get_their_code(wire: bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_client_binary(wire, LIMITS)
    assert caught.value.code is code


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_yield_a_message_or_a_typed_error(data: bytes) -> None:
    for parse in (parse_client_text, parse_client_binary):
        try:
            parse(data, LIMITS)
        except ProtocolError as exc:
            assert isinstance(exc.code, ErrorCode)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                      children, max_size=3),
    max_leaves=8,
)
message_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["upload", "chunk", "cancel", "frame", "other"])},
    optional={
        "id": st.one_of(st.text(max_size=70), json_values),
        "stream": st.one_of(st.text(max_size=70), json_values),
        "size": st.one_of(st.integers(-5, 2000), json_values),
        "offset": st.one_of(st.integers(-5, 2000), json_values),
        "seq": st.one_of(st.integers(-5, 50), json_values),
        "data": st.one_of(st.binary(max_size=400).map(b64), st.text(max_size=30), json_values),
        "sha256": st.one_of(st.text(max_size=70), json_values),
        "task": json_values,
        "options": json_values,
        "resume": json_values,
        "name": json_values,
    },
)


@settings(max_examples=1000)
@given(message_like)
def test_any_message_shaped_object_parses_or_fails_with_a_typed_error(obj: dict[str, Any]) -> None:
    try:
        message = parse_client_text(orjson.dumps(obj), LIMITS)
    except ProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert exc.message
    else:
        assert message.type == obj["type"]


# The short path for Base64 data (parse_client_text's data_span) ----------------------------


def data_span(wire: str) -> tuple[int, int] | None:
    """Where the first ``"data":`` string's characters lie, found as the server finds them
    (server.bounded_json.string_value_span: the next quote ends it)."""
    at = wire.find('"data"')
    if at < 0:
        return None
    at += len('"data"')
    while at < len(wire) and wire[at] in " \t\r\n":
        at += 1
    if wire[at:at + 1] != ":":
        return None
    at += 1
    while at < len(wire) and wire[at] in " \t\r\n":
        at += 1
    if wire[at:at + 1] != '"':
        return None
    end = wire.find('"', at + 1)
    return None if end < 0 else (at + 1, end)


def outcome(wire: str, span: tuple[int, int] | None) -> Any:
    """The message parsed, or the error's code and names."""
    try:
        return parse_client_text(wire, LIMITS, data_span=span)
    except ProtocolError as exc:
        return (exc.code, exc.upload_id, exc.stream, exc.seq, exc.message_type)


SHORT_PATH_TEXTS = {
    "chunk, data last": '{"type":"chunk","id":"u1","offset":3,"data":"eHl6"}',
    "spaces around": '{ "type" : "chunk", "id":"u1", "offset":3, "data" : "eHl6" } \n',
    "frame, data last": '{"type":"frame","stream":"c","seq":2,"options":{"k":1},"data":"eHl6"}',
    "data first": '{"data":"eHl6","type":"chunk","id":"u1","offset":3}',
    "escaped slash": '{"type":"chunk","id":"u1","offset":0,"data":"\\/\\/\\/\\/"}',
    "escaped quote": '{"type":"chunk","id":"u1","offset":0,"data":"eH\\"l6"}',
    "data twice, last one wins": '{"data":"YWJj","type":"chunk","id":"u1","offset":0,'
                                 '"data":"eHl6"}',
    "escaped key first": '{"d\\u0061ta":"YWJj","type":"chunk","id":"u1","offset":0,'
                         '"data":"eHl6"}',
    "nested data last": '{"type":"frame","stream":"c","seq":2,"options":{"data":"eHl6"}}',
    "nested data first": '{"type":"chunk","options":{"data":"YWJj"},"id":"u1","offset":0,'
                         '"data":"eHl6"}',
    "nested data, empty data": '{"options":{"data":"YWJj"},"type":"chunk","id":"u1",'
                               '"offset":0,"data":""}',
    "data as an id": '{"type":"chunk","id":"data","offset":0,"data":"eHl6"}',
    "bad Base64": '{"type":"chunk","id":"u1","offset":0,"data":"e!l6"}',
    "control character": '{"type":"chunk","id":"u1","offset":0,"data":"eH\tl6"}',
    "not ASCII": '{"type":"chunk","id":"u1","offset":0,"data":"eHé6"}',
    "too large": '{"type":"chunk","id":"u1","offset":0,"data":"' + b64(b"x" * 301) + '"}',
    "empty data": '{"type":"chunk","id":"u1","offset":0,"data":""}',
    "empty frame": '{"type":"frame","stream":"c","seq":2,"data":""}',
    "unterminated": '{"type":"chunk","id":"u1","offset":0,"data":"eHl6"',
    "text after the object": '{"type":"chunk","id":"u1","offset":0,"data":"eHl6"}x',
    "two closing braces": '{"type":"chunk","id":"u1","offset":0,"data":"eHl6"}}',
    "bad JSON before": '{"type":"chunk","id":"u1","offset":0,,"data":"eHl6"}',
    "a field missing": '{"type":"chunk","id":"u1","data":"eHl6"}',
    "an upload": '{"type":"upload","id":"u1","size":5,"data":"eHl6"}',
    "bad id": '{"type":"chunk","id":"u 1","offset":0,"data":"eHl6"}',
}


@pytest.mark.parametrize("wire", SHORT_PATH_TEXTS.values(), ids=SHORT_PATH_TEXTS.keys())
def test_the_data_span_changes_no_answer(wire: str) -> None:
    assert outcome(wire, data_span(wire)) == outcome(wire, None)


def test_a_chunks_base64_skips_the_json_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    import chunking.codec

    parsed: list[int] = []
    load = chunking.codec._load_object

    def counted(data: Any) -> dict[str, Any]:
        parsed.append(len(data))
        return load(data)

    monkeypatch.setattr(chunking.codec, "_load_object", counted)
    payload = bytes(range(256)) * 1024
    wire = encode_client_text(Chunk(id="u1", offset=0, data=payload)).decode()
    message = parse_client_text(wire, Limits(), data_span=data_span(wire))
    assert message == Chunk(id="u1", offset=0, data=payload)
    assert parsed
    assert max(parsed) < 100  # the fields around the data only
    parsed.clear()
    parse_client_text(wire, Limits())  # without the span: the whole text
    assert parsed == [len(wire)]


@settings(max_examples=1000)
@given(message_like, st.booleans())
def test_any_message_answers_alike_with_its_data_span(obj: dict[str, Any],
                                                      data_last: bool) -> None:
    if data_last and "data" in obj:
        obj = {**{k: v for k, v in obj.items() if k != "data"}, "data": obj["data"]}
    wire = orjson.dumps(obj).decode()
    assert outcome(wire, data_span(wire)) == outcome(wire, None)


# Golden vectors shared with client_js -------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS["client_text"], ids=lambda v: v["message"]["type"])
def test_client_text_vectors(vector: dict[str, Any]) -> None:
    parsed = parse_client_text(vector["wire"], Limits())
    expected = dict(vector["message"])
    if "data" in expected:
        assert b64(bytes(parsed.data)) == expected.pop("data")
    assert to_wire(parsed) == expected
    assert encode_client_text(parsed).decode() == vector["wire"]


@pytest.mark.parametrize("vector", VECTORS["client_binary"], ids=lambda v: v["message"]["type"])
def test_client_binary_vectors(vector: dict[str, Any]) -> None:
    wire = base64.b64decode(vector["wire_base64"])
    parsed = parse_client_binary(wire, Limits())
    expected = dict(vector["message"])
    assert b64(bytes(parsed.data)) == expected.pop("data")
    assert to_wire(parsed) == expected
    assert encode_client_binary(parsed) == wire


@pytest.mark.parametrize("vector", VECTORS["server_text"], ids=lambda v: v["message"]["type"])
def test_server_text_vectors(vector: dict[str, Any]) -> None:
    parsed = parse_server(vector["wire"])
    assert to_wire(parsed) == {k: v for k, v in vector["message"].items()}
    assert encode_server(parsed).decode() == vector["wire"]


def test_progress_stage_values_are_the_protocol_names() -> None:
    assert [stage.value for stage in Stage] == ["upload", "queued", "decoding", "inference"]
    assert parse_server(encode_server(Accepted(id="u", offset=3, resume="r"))) == Accepted(
        id="u", offset=3, resume="r"
    )
