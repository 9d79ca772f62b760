"""A scripted pixelstream server on 127.0.0.1, for what a real server cannot be made to do on
demand: any error code at any moment, a window that is never acknowledged, a handshake refused.

It speaks through the protocol core (``chunking.codec``), so what it receives is parsed exactly
as the real server parses it. A test gives a script, one coroutine per socket::

    async def script(peer: FakePeer) -> None:
        upload = await peer.expect(Upload)
        await peer.send(Error(ErrorCode.BUSY, "full", id=upload.id, retry_after_ms=5))

    async with FakeServer(script) as server:
        ... Client(server.url) ...
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, TypeVar

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from chunking.codec import encode_server, parse_client_binary, parse_client_text
from chunking.limits import Limits
from chunking.messages import (
    Accepted,
    Chunk,
    ClientMessage,
    Progress,
    Result,
    ServerMessage,
    Stage,
    Upload,
    Welcome,
)

M = TypeVar("M")


class FakePeer:
    """One client socket, as the script sees it."""

    def __init__(self, ws: ServerConnection, limits: Limits, index: int) -> None:
        self.ws = ws
        self.limits = limits
        self.index = index
        self.received: list[ClientMessage] = []
        self.binary_frames = 0
        self.text_frames = 0
        self.headers = ws.request.headers if ws.request is not None else Headers()

    async def recv(self) -> ClientMessage:
        raw = await self.ws.recv()
        if isinstance(raw, bytes):
            self.binary_frames += 1
            message: ClientMessage = parse_client_binary(raw, self.limits)
        else:
            self.text_frames += 1
            message = parse_client_text(raw, self.limits)
        if isinstance(message, Chunk):  # own the bytes beyond this frame
            message = Chunk(message.id, message.offset, bytes(message.data))
        self.received.append(message)
        return message

    async def expect(self, kind: type[M]) -> M:
        """The next message, which must be a ``kind``."""
        message = await self.recv()
        assert isinstance(message, kind), f"expected {kind.__name__}, got {message!r}"
        return message

    async def send(self, message: ServerMessage) -> None:
        await self.ws.send(encode_server(message).decode())

    async def serve_upload(self, upload: Upload, *, held: int = 0,
                           result: dict[str, Any] | None = None) -> bytes:
        """Behave as a real server for one upload: accept, acknowledge every chunk, answer a
        result once every byte is in. Returns the bytes."""
        await self.send(Accepted(upload.id, held, secrets.token_urlsafe(8)))
        data = bytearray(upload.size)
        received = held
        while received < upload.size:
            chunk = await self.expect(Chunk)
            assert chunk.offset == received, (chunk.offset, received)
            data[chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
            received += len(chunk.data)
            await self.send(Progress(upload.id, Stage.UPLOAD, received=received,
                                     total=upload.size))
        await self.send(fake_result(upload.id, result))
        return bytes(data)


def fake_result(upload_id: str | None = None, result: dict[str, Any] | None = None,
                **fields: Any) -> Result:
    return Result(task="colors", result=result or {"colors": []}, image={}, cached=False,
                  model="fake", timings_ms={}, id=upload_id, **fields)


Script = Callable[[FakePeer], Awaitable[None]]


class FakeServer:
    def __init__(self, script: Script, *, limits: Limits | None = None,
                 refuse: tuple[int, dict[str, Any]] | None = None,
                 close_before_welcome: int | None = None) -> None:
        """``refuse=(status, body)`` answers every handshake with that HTTP error;
        ``close_before_welcome=code`` closes each socket with that code at once."""
        self.script = script
        self.limits = limits or Limits(max_chunk_bytes=64 * 1024, window_bytes=256 * 1024,
                                       max_uploads=4)
        self.refuse = refuse
        self.close_before_welcome = close_before_welcome
        self.peers: list[FakePeer] = []
        self.failures: list[BaseException] = []
        """Exceptions scripts raised (assertions included): tests check it is empty."""
        self._server: Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = next(iter(self._server.sockets)).getsockname()[1]
        return f"ws://127.0.0.1:{port}/v1/ws"

    async def __aenter__(self) -> FakeServer:
        self._server = await serve(self._handle, "127.0.0.1", 0, compression=None,
                                   max_size=None, process_request=self._process_request)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await self._server.wait_closed()

    def _process_request(self, connection: ServerConnection, request: Request
                         ) -> Response | None:
        if self.refuse is None:
            return None
        status, body = self.refuse
        response = connection.respond(HTTPStatus(status), orjson.dumps(body).decode())
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = "application/json"
        return response

    async def _handle(self, ws: ServerConnection) -> None:
        peer = FakePeer(ws, self.limits, len(self.peers))
        self.peers.append(peer)
        if self.close_before_welcome is not None:
            await ws.close(self.close_before_welcome, "policy")
            return
        await peer.send(Welcome(session=f"fake{peer.index}", limits=self.limits,
                                tasks=["colors", "gate"], default_task="colors"))
        try:
            await self.script(peer)
        except Exception as exc:
            from websockets.exceptions import ConnectionClosed

            if not isinstance(exc, ConnectionClosed):
                self.failures.append(exc)
                raise
