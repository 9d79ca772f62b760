"""JSON texts bounded before they are parsed: JSON bombs.

A JSON text's one large field (``image`` of an HTTP analyze body, ``data`` of a chunk or
frame sent as text) is a single string: parsing it costs one copy. Everything else is what can
explode: ``{"image": "AAAA", "x": [{}, {}, ...]}`` of 60 MB made millions of objects (84 MB →
1.9 GB) and held the event loop for 2.5 s. So the bytes outside that one string value are
bounded (:data:`FIELDS_LIMIT`) before anything is parsed, by a scan at memchr speed, and large
texts are parsed on a thread.

The scan finds the first ``"<key>"`` followed by ``:`` and a string, and counts the rest. It
cannot be fooled into skipping structure: text between two quotes that a parser would read as
structure needs the quote before the key to close a string, and then the key stands bare and
the parser stops there with an error, before it reaches what was skipped.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import orjson

from chunking.errors import ErrorCode, ProtocolError

FIELDS_LIMIT = 64 * 1024
"""Bytes of a JSON text allowed outside its one large string field."""
OFF_LOOP_BYTES = 1 << 20
"""JSON texts at least this long are parsed on a thread."""

Text = TypeVar("Text", str, bytes, bytearray)
_SPACE = frozenset(" \t\r\n")


def _skip_space(raw: str | bytes | bytearray, at: int) -> int:
    while at < len(raw) and _char(raw, at) in _SPACE:
        at += 1
    return at


def _char(raw: str | bytes | bytearray, at: int) -> str:
    value = raw[at]
    return chr(value) if isinstance(value, int) else value


def string_value_span(raw: Text, key: str) -> tuple[int, int] | None:
    """Where the string value of the first ``"key":`` lies in ``raw`` (start and end of its
    characters, without the quotes), or None when ``key`` has no string value there."""
    quote: Any = b'"' if isinstance(raw, (bytes, bytearray)) else '"'
    name: Any = f'"{key}"'.encode() if isinstance(raw, (bytes, bytearray)) else f'"{key}"'
    at = raw.find(name)
    if at < 0:
        return None
    at = _skip_space(raw, at + len(name))
    if at >= len(raw) or _char(raw, at) != ":":
        return None
    at = _skip_space(raw, at + 1)
    if at >= len(raw) or _char(raw, at) != '"':
        return None
    end = raw.find(quote, at + 1)
    if end < 0:
        return None
    return at + 1, end


def fields_size(raw: Text, key: str) -> int:
    """Characters of ``raw`` outside the string value of ``key`` (all of them without one)."""
    span = string_value_span(raw, key)
    return len(raw) if span is None else len(raw) - (span[1] - span[0])


def check_fields(raw: Text, key: str, limit: int = FIELDS_LIMIT) -> Text:
    """``raw`` itself, once what lies outside its ``key`` string is within ``limit``; else
    ProtocolError(too_large), before anything is parsed."""
    check_fields_span(raw, key, limit)
    return raw


def check_fields_span(raw: Text, key: str, limit: int = FIELDS_LIMIT) -> tuple[int, int] | None:
    """:func:`check_fields`, returning what its scan found: the :func:`string_value_span` of
    ``key`` in a text longer than ``limit`` (None for a shorter text, which is not scanned)."""
    if len(raw) <= limit:
        return None
    span = string_value_span(raw, key)
    if (len(raw) if span is None else len(raw) - (span[1] - span[0])) > limit:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"the fields besides {key!r} exceed {limit} bytes",
        )
    return span


async def loads(raw: bytes | bytearray) -> Any:
    """``orjson.loads``, on a thread for a large text (the event loop keeps serving)."""
    if len(raw) >= OFF_LOOP_BYTES:
        return await asyncio.to_thread(orjson.loads, raw)
    return orjson.loads(raw)
