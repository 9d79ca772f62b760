"""``GET /v1/ws``: check the handshake, then read → feed the session → send, until the end."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter, WebSocket
from starlette.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect

from chunking.errors import ErrorCode, ProtocolError
from server.auth import TokenAuth, origin_allowed, presented_token
from server.errors import HTTP_STATUS
from server.session import Outbox, Session
from server.state import AppState

router = APIRouter()


async def _refuse(websocket: WebSocket, code: ErrorCode, message: str) -> None:
    """Refuse the handshake with an HTTP answer (or close 1008 where the server can't)."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
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
        await _refuse(websocket, ErrorCode.FORBIDDEN_ORIGIN, "this origin may not open the socket")
        return
    principal = None
    if auth.required:
        principal = auth.principal(presented_token(websocket.headers, websocket.query_params))
        if principal is None:
            await _refuse(websocket, ErrorCode.UNAUTHORIZED, "a valid API token is required")
            return
    client = principal or (websocket.client.host if websocket.client else "unknown")
    try:
        admitted = await app.client_limits.connect(client)
    except ProtocolError as exc:  # the shared rate-limit store is unreachable: busy
        await _refuse(websocket, exc.code, exc.message)
        return
    if not admitted:
        await _refuse(websocket, ErrorCode.RATE_LIMITED, "too many connections from this client")
        return
    try:
        await _serve(websocket, app, principal, client)
    finally:
        with contextlib.suppress(ProtocolError):
            await app.client_limits.disconnect(client)


async def _serve(websocket: WebSocket, app: AppState, principal: str | None, client: str) -> None:
    await websocket.accept()
    outbox = Outbox()
    session = Session(app, outbox, principal, client)
    sender = asyncio.create_task(outbox.run(websocket), name="ws-sender")
    app.metrics.active_sockets.inc()
    try:
        session.start()
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text")
            if text is not None:
                await session.receive_text(text)
            else:
                await session.receive_binary(message.get("bytes") or b"")
            if sender.done():
                break  # the socket failed under the sender
    except WebSocketDisconnect:
        pass
    finally:
        app.metrics.active_sockets.dec()
        session.close()
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender
