"""A fault-injecting TCP proxy for the Python client's end-to-end tests (as tusd's tests put one
before the server). Runs on the test's own event loop, beside the client it tests.

It forwards bytes between a client and a real server on 127.0.0.1, counts them per connection
and direction, and applies a :class:`Fault` to chosen connections: cut the stream after a
number of client bytes (the server sees the socket end, the client a reset), freeze it (keep
it open and forward nothing more, either way: a stall), or refuse it outright::

    async with TcpProxy(server.port, faults={0: Fault(cut_after=300_000)}) as proxy:
        ... Client(proxy.ws_url) ...
        proxy.connections[1].up_bytes   # what the client sent on its second connection
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

_READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class Fault:
    cut_after: int | None = None
    """Forward this many client → server bytes, then close both sides."""
    freeze_after: int | None = None
    """Forward this many client → server bytes, then nothing more either way (it stays open)."""
    refuse: bool = False
    """Close the client's connection as soon as it is accepted."""


@dataclass(eq=False)
class ProxiedConnection:
    index: int
    fault: Fault | None
    up_bytes: int = 0
    """Client → server bytes forwarded."""
    down_bytes: int = 0
    """Server → client bytes forwarded."""
    faulted: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the fault was applied (the cut made, or the stream frozen)."""
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    muted: bool = False
    """Nothing more goes from the server to the client (the client's bytes still flow)."""
    _client: asyncio.StreamWriter | None = None
    _server: asyncio.StreamWriter | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def mute(self) -> None:
        """From now on deliver nothing from the server: the client's acknowledgements stop."""
        self.muted = True

    def cut(self) -> None:
        """Close both sides now: the client gets a reset, the server the bytes forwarded so far
        and then the end of the stream."""
        self.faulted.set()
        if self._client is not None:
            self._client.transport.abort()
        if self._server is not None:
            self._server.transport.close()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self.closed.set()


class TcpProxy:
    def __init__(self, target_port: int, *, faults: dict[int, Fault] | None = None,
                 fault_for: Callable[[int], Fault | None] | None = None) -> None:
        """``faults`` by connection index (0 = the first), or ``fault_for(index)``."""
        self.target_port = target_port
        self._faults = dict(faults or {})
        self._fault_for = fault_for
        self.connections: list[ProxiedConnection] = []
        self._opened = asyncio.Condition()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    @property
    def up_bytes(self) -> int:
        return sum(c.up_bytes for c in self.connections)

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for connection in self.connections:
            connection.cut()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    async def wait_for_connections(self, count: int) -> None:
        """Until ``count`` connections were opened (bound it with the caller's timeout)."""
        async with self._opened:
            await self._opened.wait_for(lambda: len(self.connections) >= count)

    def _fault(self, index: int) -> Fault | None:
        if self._fault_for is not None:
            return self._fault_for(index)
        return self._faults.get(index)

    async def _handle(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        connection = ProxiedConnection(len(self.connections), self._fault(len(self.connections)))
        connection._client = client_writer
        self.connections.append(connection)
        async with self._opened:
            self._opened.notify_all()
        if connection.fault is not None and connection.fault.refuse:
            connection.cut()
            return
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1",
                                                                         self.target_port)
        except OSError:
            connection.cut()
            return
        connection._server = server_writer
        up = asyncio.create_task(self._pump_up(connection, client_reader, server_writer))
        down = asyncio.create_task(self._pump_down(connection, server_reader, client_writer))
        connection._tasks += [up, down]
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        frozen = connection.fault is not None and connection.fault.freeze_after is not None
        if not (frozen and connection.faulted.is_set()):
            connection.cut()  # one side ended: end the other

    async def _pump_up(self, connection: ProxiedConnection, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        fault = connection.fault
        limit = None
        if fault is not None:
            limit = fault.cut_after if fault.cut_after is not None else fault.freeze_after
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(_READ_SIZE):
                if limit is not None and connection.up_bytes + len(data) >= limit:
                    data = data[: limit - connection.up_bytes]
                    writer.write(data)
                    connection.up_bytes += len(data)
                    await writer.drain()
                    assert fault is not None
                    if fault.cut_after is not None:
                        connection.cut()
                    else:
                        connection.faulted.set()
                        await connection.closed.wait()  # frozen: read nothing more
                    return
                writer.write(data)
                connection.up_bytes += len(data)
                await writer.drain()

    async def _pump_down(self, connection: ProxiedConnection, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(_READ_SIZE):
                if connection.faulted.is_set() or connection.muted:
                    await connection.closed.wait()  # frozen or muted: deliver nothing more
                    return
                writer.write(data)
                connection.down_bytes += len(data)
                await writer.drain()
