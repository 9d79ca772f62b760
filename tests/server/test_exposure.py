"""The Host allow-list and Origin rule in front of every route (server.exposure), on a bare
ASGI app: what is refused never reaches it."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest

from server.auth import HostPolicy
from server.exposure import UVICORN_NO_HANDSHAKE, ExposureGuard, RefusalNoise

Message = dict[str, Any]


class Recorder:
    """An ASGI app that records the scopes it was called with and answers 200."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls.append(scope["path"])
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
        else:
            await send({"type": "websocket.accept"})


def scope(kind: str = "http", *, method: str = "GET", host: str | None = "127.0.0.1:8000",
          origin: str | None = None, scheme: str = "http",
          extensions: dict[str, Any] | None = None) -> dict[str, Any]:
    headers = []
    if host is not None:
        headers.append((b"host", host.encode()))
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    return {"type": kind, "method": method, "path": "/x", "headers": headers,
            "scheme": scheme if kind == "http" else {"http": "ws", "https": "wss"}[scheme],
            "extensions": extensions or {}}


async def call(scope: dict[str, Any], allowed_origins: tuple[str, ...] = ()
               ) -> tuple[Recorder, list[Message]]:
    inner = Recorder()
    guard = ExposureGuard(inner, hosts=HostPolicy("127.0.0.1", ["api.example"]),
                          allowed_origins=allowed_origins)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(message)

    await guard(scope, receive, send)
    return inner, sent


def answer(sent: list[Message]) -> tuple[int, dict[str, Any]]:
    return sent[0]["status"], orjson.loads(sent[1]["body"])


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost:8000", "api.example", None])
async def test_served_names_pass(host: str | None) -> None:
    inner, sent = await call(scope(host=host, method="POST"))
    assert inner.calls == ["/x"]
    assert sent[0]["status"] == 200


@pytest.mark.parametrize("method", ["GET", "POST", "OPTIONS"])
async def test_another_name_is_refused_before_the_app(method: str) -> None:
    inner, sent = await call(scope(host="evil.example:8000", method=method))
    assert inner.calls == []
    assert answer(sent) == (400, {"code": "forbidden_host",
                                  "message": "this server does not answer to that Host"})


async def test_a_foreign_origin_may_read_but_not_act() -> None:
    foreign = "http://evil.example"
    inner, sent = await call(scope(origin=foreign, method="GET"))
    assert sent[0]["status"] == 200  # CORS keeps its answer from the page
    inner, sent = await call(scope(origin=foreign, method="POST"))
    assert inner.calls == []
    assert answer(sent)[0] == 403
    assert answer(sent)[1]["code"] == "forbidden_origin"
    inner, sent = await call(scope(origin=foreign, method="POST"), allowed_origins=(foreign,))
    assert inner.calls == ["/x"]


@pytest.mark.parametrize(("origin", "scheme", "served"), [
    ("http://127.0.0.1:8000", "http", True),
    ("https://127.0.0.1:8000", "http", False),
    ("https://127.0.0.1:8000", "https", True),
    ("http://127.0.0.1:8000", "https", False),
])
async def test_the_own_origin_must_have_the_requests_scheme(origin: str, scheme: str,
                                                            served: bool) -> None:
    inner, _ = await call(scope(origin=origin, method="POST", scheme=scheme))
    assert bool(inner.calls) is served
    inner, _ = await call(scope("websocket", origin=origin, scheme=scheme))
    assert bool(inner.calls) is served


async def test_a_refused_handshake_gets_an_http_answer_or_a_1008_close() -> None:
    extensions = {"websocket.http.response": {}}
    inner, sent = await call(scope("websocket", host="evil.example", extensions=extensions))
    assert inner.calls == []
    assert sent[0]["type"] == "websocket.http.response.start"
    assert (sent[0]["status"], orjson.loads(sent[1]["body"])["code"]) == (400, "forbidden_host")
    # uvicorn's "returned without completing handshake" is noise after such an answer only.
    record = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1,
                               UVICORN_NO_HANDSHAKE, None, None)
    assert not RefusalNoise().filter(record)
    _, sent = await call(scope("websocket", origin="http://evil.example"))
    assert sent == [{"type": "websocket.close", "code": 1008}]


async def test_other_scopes_pass_through() -> None:
    inner = Recorder()
    guard = ExposureGuard(inner, hosts=HostPolicy("127.0.0.1"))
    seen: list[str] = []

    async def app_lifespan(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    guard.app = app_lifespan
    await guard({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
    assert seen == ["lifespan"]
