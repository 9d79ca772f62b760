"""Who may reach the server at all: the ``Host`` allow-list and the browser ``Origin`` rule,
checked once for every request and handshake before any route runs; and the refusal of a
WebSocket handshake with an HTTP answer.

The Host check is what defeats DNS rebinding (see :class:`server.auth.HostPolicy`); the Origin
check keeps other sites' pages off the socket and off the routes that act (browsers let any
page send a POST or open a WebSocket; only reading a plain HTTP answer is theirs to refuse,
by CORS). Safe methods (GET, HEAD, OPTIONS) carry no Origin check: their answers are CORS's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from chunking.errors import ErrorCode
from server.auth import HostPolicy, origin_allowed
from server.errors import HTTP_STATUS

HANDSHAKE_REFUSED: ContextVar[bool] = ContextVar("pixelstream_handshake_refused", default=False)
"""Set in the handshake's own task when it is refused with an HTTP answer."""

UVICORN_NO_HANDSHAKE = "ASGI callable returned without completing handshake"

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class RefusalNoise(logging.Filter):
    """uvicorn 0.54 logs ``ERROR ASGI callable returned without completing handshake`` after
    every handshake refused with an HTTP answer (its denial-response path never marks the
    handshake done), and it is logged in that handshake's task. This drops the record there
    only: an app that really returned without answering is still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (HANDSHAKE_REFUSED.get()
                    and record.getMessage().startswith(UVICORN_NO_HANDSHAKE))


UVICORN_INVALID_UTF8 = "Invalid UTF-8 sequence received from client"


class ClientFaultNoise(logging.Filter):
    """uvicorn logs a text frame that is not UTF-8 as an ERROR with a traceback, though it is
    the client's fault and fully handled (the socket is closed 1007): any client could fill
    the log with them. Such records are kept as one INFO line without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(UVICORN_INVALID_UTF8):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
            record.msg = "a client sent a text frame that is not UTF-8 (closed 1007)"
            record.args = ()
        return True


def quiet_refusals() -> None:
    """Install :class:`RefusalNoise` and :class:`ClientFaultNoise` on uvicorn's error logger
    (once per process)."""
    logger = logging.getLogger("uvicorn.error")
    for noise in (RefusalNoise, ClientFaultNoise):
        if not any(isinstance(f, noise) for f in logger.filters):
            logger.addFilter(noise())


def _error_body(code: ErrorCode, message: str) -> bytes:
    return orjson.dumps({"code": code.value, "message": message})


async def refuse_handshake(scope: Scope, send: Send, code: ErrorCode, message: str) -> None:
    """Answer a WebSocket handshake with an HTTP error (``{"code", "message"}`` with its
    code's status), or close it 1008 where the server cannot answer in HTTP."""
    if "websocket.http.response" in scope.get("extensions", {}):
        HANDSHAKE_REFUSED.set(True)
        body = _error_body(code, message)
        await send({"type": "websocket.http.response.start", "status": HTTP_STATUS[code],
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})


def _metrics(scope: Scope) -> Any:
    """The app's metrics, once its lifespan has started (None before)."""
    app = scope.get("app")
    state = getattr(getattr(app, "state", None), "pixelstream", None)
    return getattr(state, "metrics", None)


class ExposureGuard:
    """ASGI middleware: refuse a request whose ``Host`` the server does not answer to
    (``forbidden_host``, 400), and a browser's socket or acting request from an origin it does
    not allow (``forbidden_origin``, 403)."""

    def __init__(self, app: ASGIApp, *, hosts: HostPolicy,
                 allowed_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.hosts = hosts
        self.allowed_origins = tuple(allowed_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host")
        refusal: tuple[ErrorCode, str] | None = None
        if not self.hosts.allows(host):
            refusal = (ErrorCode.FORBIDDEN_HOST, "this server does not answer to that Host")
        elif (kind == "websocket" or scope.get("method") not in _SAFE_METHODS) and not (
            origin_allowed(headers.get("origin"), host, self.allowed_origins,
                           scheme=scope.get("scheme"))
        ):
            refusal = (ErrorCode.FORBIDDEN_ORIGIN, "this origin may not use the server")
        if refusal is None:
            await self.app(scope, receive, send)
            return
        code, message = refusal
        metrics = _metrics(scope)
        if kind == "websocket":
            if metrics is not None:
                metrics.handshake_refusals.labels(code.value).inc()
            await refuse_handshake(scope, send, code, message)
            return
        if metrics is not None:
            metrics.errors.labels(code.value).inc()
        body = _error_body(code, message)
        await send({"type": "http.response.start", "status": HTTP_STATUS[code],
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
