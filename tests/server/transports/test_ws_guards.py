"""The socket's guards against slow, silent and greedy peers, on the wire: the idle timeout,
ping/pong, trickled frames (slowloris), a peer that never reads, handshake refusals by reason.

Raw TCP clients (tests/support/raw_ws.py) send what a well-behaved client library never would.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server.exposure import UVICORN_NO_HANDSHAKE, RefusalNoise
from server.transports.ws import SEND_HIGH_WATER
from tests.conftest import WAIT_S, RunningServer, connect, unique_image
from tests.support.raw_ws import OP_CONT, OP_TEXT, RawWebSocket, frame_bytes


def sample(server: RunningServer, name: str, **labels: str) -> float:
    value = server.state.metrics.registry.get_sample_value(name, labels or None)
    return float(value or 0.0)


async def until(predicate: Any, what: str) -> None:
    """Bounded polling of server state (another thread's loop offers no event to wait on)."""
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# Handshake refusals -------------------------------------------------------------------------


async def test_handshake_refusals_are_counted_by_reason(server_factory, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="uvicorn.error")
    tokens = tmp_path / "tokens"
    tokens.write_text(hashlib.sha256(b"from-the-file").hexdigest() + "\n")
    server = server_factory(api_tokens_file=tokens, max_connections_per_client=1)
    url = server.ws_url
    for kwargs in ({}, {"origin": "http://evil.example"}):
        with pytest.raises(InvalidStatus):
            async with connect(url, **kwargs):
                pass
    async with connect(url + "?token=from-the-file") as first:  # the hashed file's token
        assert orjson.loads(await first.recv())["type"] == "welcome"
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url + "?token=from-the-file"):
                pass
        assert refused.value.response.status_code == 429
    assert sample(server, "pixelstream_handshake_refusals_total", reason="unauthorized") == 1
    assert sample(server, "pixelstream_handshake_refusals_total", reason="forbidden_origin") == 1
    assert sample(server, "pixelstream_handshake_refusals_total",
                  reason="too_many_connections") == 1
    # Refusals are answers, not faults: uvicorn's "without completing handshake" error is not
    # logged for them (its log of the refusal's status line is).
    assert not [r for r in caplog.records if UVICORN_NO_HANDSHAKE in r.getMessage()]
    assert [r for r in caplog.records if '"WebSocket /v1/ws" 401' in r.getMessage()]


def test_the_handshake_error_is_kept_outside_a_refusal() -> None:
    record = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1,
                               UVICORN_NO_HANDSHAKE + ".", None, None)
    assert RefusalNoise().filter(record)


# The idle timeout ---------------------------------------------------------------------------


async def test_a_silent_socket_is_closed_1001_after_the_idle_timeout(server_factory) -> None:
    server = server_factory(socket_idle_timeout_s=0.5)
    async with connect(server.ws_url) as ws:
        await ws.recv()  # welcome
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        elapsed = time.monotonic() - started
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "idle timeout")
    assert 0.4 < elapsed < 5
    await until(lambda: sample(server, "pixelstream_active_sockets") == 0, "the session's end")
    assert sample(server, "pixelstream_sockets_closed_total", reason="idle_timeout") == 1


async def test_a_socket_waiting_for_its_result_is_not_idle(server_factory, open_client,
                                                           gate) -> None:
    """The client says nothing while its job runs longer than the idle timeout: it is the
    server that owes a message, so the socket stays; idleness counts from the result."""
    server = server_factory(socket_idle_timeout_s=0.5)
    async with open_client(server.ws_url) as client:
        with gate.closed():
            await client.send_upload("slow", unique_image(), task="gate")
            await client.expect("progress", id="slow", stage="decoding")
            # A second socket, opened later and silent, is closed for idleness: the first,
            # quiet for longer, outlives it only because it waits for its result.
            async with connect(server.ws_url) as idle:
                await idle.recv()
                with pytest.raises(ConnectionClosed) as idle_closed:
                    await idle.recv()
                assert idle_closed.value.rcvd is not None
                assert idle_closed.value.rcvd.code == 1001
        result = await client.outcome("slow")
        assert result["type"] == "result"
        client.inbox.clear()
        with pytest.raises(ConnectionClosed) as closed:  # then its own idle timeout runs
            await drain_forever(client)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1001


async def drain_forever(client: Any) -> None:
    while True:
        await client.next()


# Ping/pong and trickled frames -------------------------------------------------------------------


async def test_a_peer_that_never_answers_pings_is_dropped(server_factory) -> None:
    server = server_factory(ws_ping_interval_s=0.3, socket_idle_timeout_s=60)
    async with RawWebSocket.connect(server.port) as raw:
        await raw.welcome()
        started = time.monotonic()
        async with asyncio.timeout(10):
            code = await raw.closed()
        assert raw.pings >= 1
    assert code == 1011  # uvicorn: "keepalive ping timeout"
    assert time.monotonic() - started < 5
    await until(lambda: sample(server, "pixelstream_active_sockets") == 0, "the session's end")


async def test_slowloris_trickling_one_frame_is_dropped_by_ping_timeout(server_factory) -> None:
    """A frame's header, then a byte at a time: a pong cannot interrupt a frame, so the
    ping timeout ends it however patiently it answers."""
    server = server_factory(ws_ping_interval_s=0.3, socket_idle_timeout_s=60)
    payload = orjson.dumps({"type": "upload", "id": "slow", "size": 100}) + b" " * 400
    wire = frame_bytes(OP_TEXT, payload)
    async with RawWebSocket.connect(server.port) as raw:
        raw.answer_pings = True
        await raw.welcome()

        async def trickle() -> None:
            for byte in wire[:-1]:
                await raw.send_raw(bytes([byte]))
                await asyncio.sleep(0.05)  # the attack's pace, not a wait for anything

        trickler = asyncio.create_task(trickle())
        started = time.monotonic()
        try:
            async with asyncio.timeout(10):
                code = await raw.closed()
        finally:
            trickler.cancel()
    assert code == 1011
    assert time.monotonic() - started < 5
    assert not trickler.done() or trickler.cancelled()  # cut while still trickling
    await until(lambda: sample(server, "pixelstream_active_sockets") == 0, "the session's end")


async def test_slowloris_with_fragments_and_pongs_is_dropped_by_the_idle_timeout(
    server_factory,
) -> None:
    """One-byte continuation frames with pongs between them keep ping/pong happy; no
    complete message ever arrives, so the idle timeout closes the socket."""
    server = server_factory(ws_ping_interval_s=0.2, socket_idle_timeout_s=1.0)
    message = orjson.dumps({"type": "cancel", "id": "never-finished"}) + b" " * 500
    async with RawWebSocket.connect(server.port) as raw:
        raw.answer_pings = True
        await raw.welcome()

        async def trickle() -> None:
            await raw.send_raw(frame_bytes(OP_TEXT, message[:1], fin=False))
            for byte in message[1:-1]:
                await asyncio.sleep(0.05)  # the attack's pace
                await raw.send_raw(frame_bytes(OP_CONT, bytes([byte]), fin=False))

        trickler = asyncio.create_task(trickle())
        started = time.monotonic()
        try:
            async with asyncio.timeout(10):
                code = await raw.closed()
        finally:
            trickler.cancel()
        assert raw.pings >= 2  # answered, so ping/pong alone would have kept it
    assert code == 1001
    assert 0.9 < time.monotonic() - started < 6
    await until(lambda: sample(server, "pixelstream_active_sockets") == 0, "the session's end")


# A peer that never reads -------------------------------------------------------------------


def server_socket_of(server: RunningServer, client_port: int) -> socket.socket:
    """The server's end of a client connection (uvicorn's protocol objects hold them)."""
    for connection in list(server.server.server_state.connections):
        transport = getattr(connection, "transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None and sock.getpeername()[1] == client_port:
            return sock  # type: ignore[no-any-return]
    raise AssertionError("no server connection for that client")


async def test_a_peer_that_never_reads_is_not_read_either_and_memory_stays_bounded(
    server_factory,
) -> None:
    """Every message earns a reply; a client that reads none fills the (shrunken) TCP
    buffers, then uvicorn's write buffer, then the outbox, and the server stops reading it:
    its bytes wait in the kernel, not in the server. Reading again, every reply arrives.

    How many replies the buffers absorb before the outbox fills depends on the kernel, so
    the peer sends in rounds until the server stops reading (bounded)."""
    server = server_factory(ws_ping_interval_s=60, socket_idle_timeout_s=60)
    round_size, max_rounds = 500, 40
    async with RawWebSocket.connect(server.port, rcvbuf=4096) as raw:
        await raw.welcome()
        client_port = raw.writer.get_extra_info("sockname")[1]
        server_socket_of(server, client_port).setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                                         4096)
        message = frame_bytes(OP_TEXT, b"not json")
        (session,) = sessions(server)
        sent = 0
        while session.pending <= SEND_HIGH_WATER:
            assert sent < round_size * max_rounds, (
                f"the outbox never filled: {session.messages_received} read, "
                f"{session.pending} pending")
            raw.writer.write(message * round_size)
            sent += round_size
            # Either the server handled the whole round, or it stopped reading us.
            await until(lambda target=sent: session.pending > SEND_HIGH_WATER
                        or session.messages_received >= target, "the round to be read")
        assert session.messages_received < sent
        assert session.pending <= SEND_HIGH_WATER + 1
        assert server.state.budget.held <= len(b"not json")
        # Now read: the server resumes, and every message got exactly one reply.
        replies = 0
        async with asyncio.timeout(WAIT_S):
            while replies < sent:
                reply = await raw.next_message()
                assert reply is not None
                assert reply["type"] == "error", reply
                assert reply["code"] in ("bad_message", "rate_limited")
                replies += 1
    assert session.messages_received == sent


def sessions(server: RunningServer) -> list[Any]:
    return list(server.state.sessions)


async def test_a_reader_blocked_on_a_dead_peer_ends_its_session(server_factory) -> None:
    """A peer that stops reading and then vanishes: the sender fails, and the reader, parked
    until the outbox drains, must wake and end the session (else the connection's place and
    its uploads are held for ever)."""
    server = server_factory(ws_ping_interval_s=0.3, socket_idle_timeout_s=60,
                            max_connections_per_client=1)
    async with RawWebSocket.connect(server.port, rcvbuf=4096) as raw:
        await raw.welcome()
        client_port = raw.writer.get_extra_info("sockname")[1]
        server_socket_of(server, client_port).setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                                         4096)
        for _ in range(4000):
            raw.writer.write(frame_bytes(OP_TEXT, b"[]"))
        await raw.writer.drain()
        (session,) = sessions(server)
        await until(lambda: session.pending > SEND_HIGH_WATER, "the outbox to fill")
        # Never reading, the peer answers no ping either: uvicorn drops the connection.
    await until(lambda: sample(server, "pixelstream_active_sockets") == 0, "the session's end")
    assert session.closed
    async with connect(server.ws_url) as ws:  # its one connection place is free again
        assert orjson.loads(await ws.recv())["type"] == "welcome"
