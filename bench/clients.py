"""Benchmark clients: a lean pixelstream uploader (messages built before the clock starts, so
the figures are the server's), and the clients of the alternatives."""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import websockets

from chunking.codec import encode_client_binary, encode_client_text
from chunking.messages import Chunk

CHUNK = 1 << 20


def chunk_messages(data: bytes, upload_id: str, *, base64: bool = False,
                   chunk: int = CHUNK) -> list[bytes | str]:
    """Every chunk of ``data`` as the frame a client sends (binary, or Base64 JSON text)."""
    view = memoryview(data)
    messages: list[bytes | str] = []
    for offset in range(0, len(data), chunk):
        message = Chunk(upload_id, offset, view[offset:offset + chunk])
        if base64:
            messages.append(encode_client_text(message).decode())
        else:
            messages.append(encode_client_binary(message))
    return messages


@dataclass
class UploadTiming:
    acked_s: float
    """From the ``upload`` message to the ``progress`` that acknowledges the last byte."""
    result_s: float
    """From the ``upload`` message to the ``result`` (or ``error``)."""
    outcome: dict[str, Any] = field(default_factory=dict)


async def pixelstream_upload(
    ws: Any, data: bytes, upload_id: str, *, messages: list[bytes | str] | None = None,
    base64: bool = False, chunk: int = CHUNK, task: str | None = None,
    sha256: bool = True, expect_error: bool = False,
) -> UploadTiming:
    """One upload on an open socket (its ``welcome`` already read), keeping within the
    server's window. ``messages``: prebuilt frames (:func:`chunk_messages`)."""
    if messages is None:
        messages = chunk_messages(data, upload_id, base64=base64, chunk=chunk)
    upload: dict[str, Any] = {"type": "upload", "id": upload_id, "size": len(data)}
    if sha256:
        upload["sha256"] = hashlib.sha256(data).hexdigest()
    if task is not None:
        upload["task"] = task
    window = 16 << 20
    started = time.perf_counter()
    await ws.send(orjson.dumps(upload).decode())
    acked = sent = index = 0
    acked_s = 0.0
    while True:
        while index < len(messages) and sent - acked < window - chunk:
            await ws.send(messages[index])
            index += 1
            sent = min(len(data), sent + chunk)
        message = orjson.loads(await ws.recv())
        kind = message["type"]
        if kind == "progress" and message.get("stage") == "upload":
            acked = message["received"]
            if acked == len(data):
                acked_s = time.perf_counter() - started
        elif kind in ("result", "error") and message.get("id") == upload_id:
            if kind == "error" and not expect_error:
                raise RuntimeError(f"pixelstream answered {message}")
            return UploadTiming(acked_s, time.perf_counter() - started, message)


async def pixelstream_connect(port: int) -> tuple[Any, dict[str, Any]]:
    """An open socket and its ``welcome``."""
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/v1/ws", compression=None,
                                  max_size=None)
    welcome = orjson.loads(await ws.recv())
    return ws, welcome


class RawWebSocket:
    """A lean blocking WebSocket client for ingest figures: frames are built (and masked)
    beforehand with websockets' sans-I/O protocol, then written with ``sendall``, so on a
    2-core machine the client takes as little CPU from the server as a client can."""

    def __init__(self, port: int, path: str) -> None:
        import socket

        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri

        self.protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}{path}"), max_size=None)
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.protocol.send_request(self.protocol.connect())
        self._flush()
        self._pending: list[Any] = []
        while self.protocol.handshake_exc is None and not self._handshake_done():
            self._read()
        if self.protocol.handshake_exc is not None:
            raise self.protocol.handshake_exc

    def _handshake_done(self) -> bool:
        from websockets.http11 import Response

        done = False
        for event in self.protocol.events_received():
            if isinstance(event, Response):
                done = True
            else:
                self._pending.append(event)  # frames that came with the response
        return done

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.sock.sendall(data)

    def _read(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            self.protocol.receive_eof()
        else:
            self.protocol.receive_data(data)

    def build(self, messages: list[bytes | str]) -> list[bytes]:
        """The wire bytes of ``messages`` (text for ``str``), ready to :meth:`send_raw`."""
        frames = []
        for message in messages:
            if isinstance(message, str):
                self.protocol.send_text(message.encode())
            else:
                self.protocol.send_binary(message)
            frames.append(b"".join(self.protocol.data_to_send()))
        return frames

    def send_raw(self, frame: bytes) -> None:
        self.sock.sendall(frame)

    def recv(self) -> str | bytes:
        """The next data message (text as ``str``)."""
        from websockets.frames import Opcode
        from websockets.protocol import State

        while True:
            while self._pending:
                event = self._pending.pop(0)
                if event.opcode is Opcode.TEXT:
                    return bytes(event.data).decode()
                if event.opcode is Opcode.BINARY:
                    return bytes(event.data)
            self._flush()  # pongs
            self._read()
            self._pending.extend(self.protocol.events_received())
            if self.protocol.state is State.CLOSED and not self._pending:
                raise self.protocol.close_exc

    def close(self) -> None:
        self.protocol.send_close()
        with contextlib.suppress(OSError):
            self._flush()
        self.sock.close()


def raw_pixelstream_upload(port: int, data: bytes, upload_id: str, *, base64: bool = False,
                           chunk: int = CHUNK) -> float:
    """One upload through :class:`RawWebSocket`; seconds from the ``upload`` message to the
    ``progress`` that acknowledges the last byte (the outcome is awaited, not timed)."""
    ws = RawWebSocket(port, "/v1/ws")
    try:
        welcome = orjson.loads(ws.recv())
        window = welcome["limits"]["window_bytes"]
        upload = orjson.dumps({"type": "upload", "id": upload_id, "size": len(data),
                               "sha256": hashlib.sha256(data).hexdigest()}).decode()
        frames = ws.build([upload, *chunk_messages(data, upload_id, base64=base64,
                                                   chunk=chunk)])
        started = time.perf_counter()
        ws.send_raw(frames[0])
        acked = sent = 0
        index = 1
        elapsed = 0.0
        while True:
            while index < len(frames) and sent + chunk - acked <= window:
                ws.send_raw(frames[index])
                index += 1
                sent = min(len(data), sent + chunk)
            message = orjson.loads(ws.recv())
            if message["type"] == "progress" and message.get("stage") == "upload":
                acked = message["received"]
                if acked == len(data):
                    elapsed = time.perf_counter() - started
            elif message["type"] in ("result", "error") and message.get("id") == upload_id:
                return elapsed
    finally:
        ws.close()


def raw_bare_upload(port: int, data: bytes, *, chunk: int = CHUNK) -> float:
    """The same bytes to :mod:`bench.servers`' bare endpoint, in ``chunk``-sized messages."""
    ws = RawWebSocket(port, "/ws")
    try:
        frames = ws.build([data[o:o + chunk] for o in range(0, len(data), chunk)] + ["done"])
        started = time.perf_counter()
        for frame in frames:
            ws.send_raw(frame)
        received = int(ws.recv())
        elapsed = time.perf_counter() - started
        assert received == len(data), (received, len(data))
        return elapsed
    finally:
        ws.close()
