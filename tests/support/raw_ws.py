"""A WebSocket client over a bare TCP stream, for tests that must misbehave on the wire.

It uses websockets' sans-I/O ``ClientProtocol`` to make the handshake and to parse what the
server sends, but writes whatever bytes a test asks for: half a frame, one byte at a time, a
frame with a lying length. It answers the server's pings only when ``answer_pings`` is set
(an unresponsive peer by default)::

    async with RawWebSocket.connect(port) as raw:
        welcome = await raw.welcome()
        await raw.send_raw(frame_bytes(OP_TEXT, b'{"type":"upload"', fin=False))
        close = await raw.closed()            # the close frame's code, or None on a bare EOF
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import orjson
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame_bytes(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True,
                length: int | None = None) -> bytes:
    """One frame as a client sends it (masked). ``length`` lies about the payload's size."""
    size = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if mask else 0
    if size < 126:
        head += bytes([mask_bit | size])
    elif size < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack(">H", size)
    else:
        head += bytes([mask_bit | 127]) + struct.pack(">Q", size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(payload), "big") if payload else b""
    return head + key + masked


class RawWebSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 protocol: ClientProtocol) -> None:
        self.reader = reader
        self.writer = writer
        self.protocol = protocol
        self.answer_pings = False
        self.response: Response | None = None
        self.frames: list[Frame] = []
        self.close_code: int | None = None
        self.close_reason: str = ""
        self.eof = False
        self.pings = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, port: int, path: str = "/v1/ws", *,
                      headers: dict[str, str] | None = None,
                      rcvbuf: int | None = None) -> AsyncIterator[RawWebSocket]:
        sock = socket.socket()
        if rcvbuf is not None:  # before connecting, so the window is small from the start
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}{path}"), max_size=None)
        request = protocol.connect()
        for name, value in (headers or {}).items():
            if name in request.headers:  # replace (Host), not add a second one
                del request.headers[name]
            request.headers[name] = value
        protocol.send_request(request)
        raw = cls(reader, writer, protocol)
        writer.write(b"".join(protocol.data_to_send()))
        try:
            yield raw
        finally:
            writer.transport.abort()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_text(self, text: str | bytes) -> None:
        payload = text.encode() if isinstance(text, str) else text
        await self.send_raw(frame_bytes(OP_TEXT, payload))

    async def send_binary(self, payload: bytes) -> None:
        await self.send_raw(frame_bytes(OP_BINARY, payload))

    async def _pump(self) -> bool:
        """Read once from the socket into the parser; False at EOF."""
        data = await self.reader.read(65536)
        if not data:
            self.eof = True
            self.protocol.receive_eof()
            return False
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Response):
                self.response = event
            elif isinstance(event, Frame):
                if event.opcode is Opcode.PING:
                    self.pings += 1
                elif event.opcode is Opcode.CLOSE:
                    if len(event.data) >= 2:
                        self.close_code = struct.unpack(">H", event.data[:2])[0]
                        self.close_reason = event.data[2:].decode(errors="replace")
                    else:
                        self.close_code = 1005
                self.frames.append(event)
        pending = self.protocol.data_to_send()  # pongs (and close replies) it would send
        if self.answer_pings and pending and not self.writer.is_closing():
            self.writer.write(b"".join(pending))
        return True

    async def next_frame(self) -> Frame | None:
        """The next data frame (text or binary) from the server; None once the stream ends."""
        while True:
            while self.frames:
                frame = self.frames.pop(0)
                if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                    return frame
            if self.eof or not await self._pump():
                return None

    async def next_message(self) -> dict[str, Any] | None:
        frame = await self.next_frame()
        if frame is None:
            return None
        message: dict[str, Any] = orjson.loads(frame.data)
        return message

    async def handshake_response(self) -> Response:
        """The server's answer to the handshake (101, or the HTTP refusal with its body)."""
        while self.response is None:
            if self.eof or not await self._pump():
                break
        assert self.response is not None, "no handshake answer"
        return self.response

    async def welcome(self) -> dict[str, Any]:
        message = await self.next_message()
        assert self.response is not None
        assert self.response.status_code == 101, self.response
        assert message is not None
        assert message["type"] == "welcome", message
        return message

    async def closed(self) -> int | None:
        """Read until the server closes: its close code (None if it only dropped TCP)."""
        while self.close_code is None and not self.eof:
            with contextlib.suppress(ConnectionError):
                if not await self._pump():
                    break
                continue
            self.eof = True
        return self.close_code
