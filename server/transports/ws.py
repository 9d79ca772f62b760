"""``GET /v1/ws``: check the handshake, then read → feed the connection → send, until the end.

The protocol itself is :class:`server.protocol.ServerConnection`; this module only moves
frames: one reader loop feeding it, one sender task flushing what it queues.

The reader loop is where the socket's limits live: before each read it waits for room in the
process's memory budget (so when the budget is spent no socket is read, and the kernel's TCP
window pushes back on clients), and each read has the idle deadline (a socket that sends no
complete message for ``socket_idle_timeout_s`` while the server owes it nothing is closed with
1001). Ping/pong (uvicorn's, ``ws_ping_interval_s``) drops peers that stop answering, a peer
trickling one frame among them, as a pong cannot interrupt a frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import MutableMapping
from typing import Any

from fastapi import APIRouter, WebSocket
from starlette.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect

from chunking.errors import ErrorCode, ProtocolError
from server.auth import TokenAuth, origin_allowed, presented_token
from server.errors import HTTP_STATUS
from server.exposure import HANDSHAKE_REFUSED
from server.limits import client_key
from server.logs import bind_log_context
from server.protocol import ServerConnection
from server.state import AppState

router = APIRouter()
log = logging.getLogger("pixelstream.ws")

IDLE_CLOSE_CODE = 1001
"""Close code for an idle socket: "going away", so clients reconnect (and resume) if they
still have something to send. (1008, policy violation, means "do not retry" to our clients.)"""
CLOSE_TIMEOUT_S = 5.0
"""How long the close frame may wait to be written to a peer that does not read."""


async def _refuse(websocket: WebSocket, code: ErrorCode, message: str,
                  reason: str | None = None) -> None:
    """Refuse the handshake with an HTTP answer (or close 1008 where the server can't), and
    count it by ``reason`` (default: the code)."""
    app = websocket.scope.get("app")
    state: AppState | None = getattr(getattr(app, "state", None), "pixelstream", None)
    if state is not None:
        state.metrics.handshake_refusals.labels(reason or code.value).inc()
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        HANDSHAKE_REFUSED.set(True)
        await websocket.send_denial_response(
            JSONResponse({"code": code.value, "message": message},
                         status_code=HTTP_STATUS[code])
        )
    else:
        await websocket.close(code=1008)


@router.websocket("/v1/ws")
async def websocket_endpoint(websocket: WebSocket) -> None:
    app: AppState = websocket.app.state.pixelstream
    auth: TokenAuth = websocket.app.state.auth
    if not origin_allowed(
        websocket.headers.get("origin"), websocket.headers.get("host"),
        app.settings.allowed_origins,
    ):
        await _refuse(websocket, ErrorCode.FORBIDDEN_ORIGIN, "this origin may not open the socket",
                      "forbidden_origin")
        return
    principal = None
    if auth.required:
        principal = auth.principal(presented_token(websocket.headers, websocket.query_params))
        if principal is None:
            await _refuse(websocket, ErrorCode.UNAUTHORIZED, "a valid API token is required",
                          "unauthorized")
            return
    client = principal or client_key(websocket.client.host if websocket.client else "unknown")
    try:
        admitted = await app.client_limits.connect(client)
    except ProtocolError as exc:  # the shared rate-limit store is unreachable: busy
        await _refuse(websocket, exc.code, exc.message, exc.code.value)
        return
    if not admitted:
        await _refuse(websocket, ErrorCode.RATE_LIMITED, "too many connections from this client",
                      "too_many_connections")
        return
    try:
        await _serve(websocket, app, principal, client)
    finally:
        with contextlib.suppress(ProtocolError):
            await app.client_limits.disconnect(client)


SEND_HIGH_WATER = 256
"""Frames a connection may queue for a peer that does not read before it is no longer read."""


class Sender:
    """Sends what the connection queues, in a task of its own. The reader waits for
    :meth:`drained` after each message, so a client that does not read stops being read
    (backpressure)."""

    def __init__(self, high_water: int = SEND_HIGH_WATER) -> None:
        self.high_water = high_water
        self.connection: ServerConnection | None = None
        self._ready = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()

    def wake(self) -> None:
        """The connection queued something (its ``on_output``)."""
        self._ready.set()
        if self.connection is not None and self.connection.pending > self.high_water:
            self._drained.clear()

    async def drained(self) -> None:
        await self._drained.wait()

    async def run(self, websocket: WebSocket) -> None:
        """Send queued frames until cancelled (or the socket fails)."""
        assert self.connection is not None
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                # A frame at a time: what the peer has not taken yet stays queued, so the
                # connection's pending count is what this socket holds for a slow reader.
                while frames := self.connection.data_to_send(limit=1):
                    await websocket.send_text(frames[0])
                    if self.connection.pending <= self.high_water // 2:
                        self._drained.set()
        finally:
            # Nothing will drain the queue now: wake a reader waiting on drained(), so it sees
            # the sender gone and ends the session (else it would wait for ever, holding the
            # connection's place and its uploads).
            self._drained.set()


async def _next_message(websocket: WebSocket, session: ServerConnection, idle_s: float
                        ) -> MutableMapping[str, Any] | None:
    """The next ASGI event, or None once the socket has been idle for ``idle_s``: no message
    from the client, no outcome sent to it, and nothing it waits for being worked on."""
    while True:
        now = time.monotonic()
        if session.owes_replies:
            session.last_activity = now  # waiting for us is not idleness
        delay = session.last_activity + idle_s - now
        if delay <= 0:
            return None
        try:
            async with asyncio.timeout(delay):
                return await websocket.receive()
        except TimeoutError:
            continue


async def _serve(websocket: WebSocket, app: AppState, principal: str | None, client: str) -> None:
    outbox = Sender()
    session = ServerConnection(app, principal, client, on_output=outbox.wake)
    outbox.connection = session
    bind_log_context(session=session.key)  # uvicorn's "accepted" line carries it too
    await websocket.accept()
    sender = asyncio.create_task(outbox.run(websocket), name="ws-sender")
    budget = app.budget
    idle_s = app.settings.socket_idle_timeout_s
    app.metrics.active_sockets.inc()
    app.sessions.add(session)
    reason = "closed"
    try:
        session.start()
        while True:
            await budget.wait_for_room()  # backpressure: no reads while the budget is spent
            if sender.done():
                reason = "send_failed"
                break
            message = await _next_message(websocket, session, idle_s)
            if message is None:
                reason = "idle_timeout"
                log.info("closing an idle socket (no message for %g s)", idle_s)
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):
                        await websocket.close(IDLE_CLOSE_CODE, "idle timeout")
                break
            if message["type"] == "websocket.disconnect":
                if message.get("code") == 1012:
                    reason = "shutdown"
                break
            text = message.get("text")
            data = message.get("bytes") or b""
            size = len(text) if text is not None else len(data)
            budget.charge(size)  # already in memory: counted until handled
            try:
                if text is not None:
                    await session.receive_text(text)
                else:
                    await session.receive_binary(data)
            finally:
                budget.release(size)
            await outbox.drained()
            del text, data, message
            if sender.done():
                reason = "send_failed"
                break  # the socket failed under the sender
    except WebSocketDisconnect:
        pass
    finally:
        app.sessions.discard(session)
        app.metrics.active_sockets.dec()
        app.metrics.sockets_closed.labels(reason).inc()
        session.close()
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender
