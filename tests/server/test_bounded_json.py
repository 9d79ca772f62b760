"""JSON texts bounded outside their one large string field, before parsing."""

from __future__ import annotations

import orjson
import pytest

from chunking.errors import ErrorCode, ProtocolError
from server.bounded_json import (
    FIELDS_LIMIT,
    check_fields,
    check_fields_span,
    fields_size,
    loads,
    string_value_span,
)

IMAGE = "A" * 200_000


@pytest.mark.parametrize("kind", [str, bytes])
def test_the_string_value_of_the_key_is_found(kind: type) -> None:
    text = '{"task": "colors", "image" :\n "QUJD", "options": {}}'
    raw = text if kind is str else text.encode()
    start, end = string_value_span(raw, "image")
    assert raw[start:end] == ("QUJD" if kind is str else b"QUJD")
    assert fields_size(raw, "image") == len(raw) - 4


@pytest.mark.parametrize("text", [
    '{"image": 5}', '{"image" "x"}', '{"images": "x"}', '["image"]', '{"image": "unclosed',
])
def test_without_a_string_value_everything_counts(text: str) -> None:
    assert string_value_span(text, "image") is None
    assert fields_size(text, "image") == len(text)


def test_a_large_image_with_small_fields_passes_untouched() -> None:
    body = orjson.dumps({"image": IMAGE, "task": "colors", "options": {"colors": 3}})
    assert check_fields(body, "image") is body


def test_the_check_returns_the_span_it_found_in_a_large_text() -> None:
    body = orjson.dumps({"task": "colors", "image": IMAGE})
    start, end = check_fields_span(body, "image") or (0, 0)
    assert body[start:end] == IMAGE.encode()
    assert check_fields_span(b'{"image": "QUJD"}', "image") is None  # short: not scanned
    with pytest.raises(ProtocolError):
        check_fields_span(orjson.dumps({"image": "AAAA", "x": [{}] * 40_000}), "image")


@pytest.mark.parametrize("body", [
    {"image": "AAAA", "x": [{}] * 40_000},  # the bomb: many small objects
    {"image": IMAGE, "options": {"k": "v" * (FIELDS_LIMIT + 1)}},
    {"data": IMAGE},  # no image at all: everything is "other fields"
    {"x": [{}] * 40_000, "image": IMAGE},  # the image last
])
def test_large_other_fields_are_refused_before_parsing(body: dict[str, object]) -> None:
    raw = orjson.dumps(body)
    with pytest.raises(ProtocolError) as refused:
        check_fields(raw, "image")
    assert refused.value.code is ErrorCode.TOO_LARGE


def test_hiding_structure_between_quotes_only_breaks_the_json() -> None:
    """The one way to make the scan skip structure leaves the key bare: invalid JSON, which
    the parser refuses at the key, before what was skipped."""
    bomb = b'{"x"image": "' + b"[{}," * 30_000 + b'{}]"}'
    assert fields_size(bomb, "image") < 100
    with pytest.raises(orjson.JSONDecodeError) as error:
        orjson.loads(bomb)
    assert error.value.pos < 10


async def test_large_texts_are_parsed_off_the_loop_with_the_same_result() -> None:
    body = orjson.dumps({"image": "A" * (2 << 20), "task": "t"})
    assert await loads(body) == orjson.loads(body)
    assert await loads(b'{"a": 1}') == {"a": 1}
