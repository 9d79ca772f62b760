"""One-shot HTTP (chunking.client.http)."""

from __future__ import annotations

import pytest

from chunking.client import (
    InvalidImageError,
    UnknownTaskError,
    analyze_http,
    http_base_url,
)
from tests.support.pyclient_record import (
    padded,
    top_hex,
)


def test_analyze_http(colors_server) -> None:
    result = analyze_http(padded((70, 80, 90), 0), url=colors_server.http_url)
    assert top_hex(result) == "#46505a"
    # A WebSocket URL works too: the HTTP base is derived from it.
    result = analyze_http(padded((90, 80, 70), 0), url=colors_server.ws_url, task="colors",
                          options={"colors": 2})
    assert top_hex(result) == "#5a5046"
    with pytest.raises(InvalidImageError):
        analyze_http(b"not an image", url=colors_server.http_url)
    with pytest.raises(UnknownTaskError):
        analyze_http(padded((1, 1, 1), 0), url=colors_server.http_url, task="nope")


@pytest.mark.parametrize(("url", "base"), [
    ("ws://127.0.0.1:8000/v1/ws", "http://127.0.0.1:8000"),
    ("wss://example.org/pixelstream/v1/ws", "https://example.org/pixelstream"),
    ("http://h:1/api/analyze", "http://h:1"),
    ("https://h/v1/analyze?x=1", "https://h"),
    ("http://h:1/", "http://h:1"),
])
def test_the_http_base_comes_from_any_server_url(url: str, base: str) -> None:
    assert http_base_url(url) == base
