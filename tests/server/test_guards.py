"""The transport guards: every connection the server accepts sends small writes at once."""

from __future__ import annotations

import socket

from tests.conftest import RunningServer, connect


def server_sockets(server: RunningServer) -> list[socket.socket]:
    sockets = []
    for connection in list(server.server.server_state.connections):
        transport = getattr(connection, "transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            sockets.append(sock)
    return sockets


async def test_accepted_connections_have_nagle_off(colors_server: RunningServer) -> None:
    """asyncio skips TCP_NODELAY for accepted sockets whose proto is 0; without it a stage
    message written behind an unacknowledged one waits for the peer's delayed ACK."""
    async with connect(colors_server.ws_url) as ws:
        await ws.recv()  # the welcome: the connection is the server's now
        sockets = server_sockets(colors_server)
        assert sockets
        for sock in sockets:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
