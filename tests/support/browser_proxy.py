"""A loopback TCP proxy that injects faults into WebSocket connections, as tusd's tests do.

The browser talks to the proxy, the proxy to the real server. A test arms one fault for the
next WebSocket connection (``GET /v1/ws``):

* :meth:`CuttingProxy.cut_websocket_after` forwards exactly ``n`` client bytes, then resets
  both sides (the browser sees close code 1006, the server a dropped connection);
* :meth:`CuttingProxy.freeze_websocket_after` forwards ``n`` client bytes, then silently
  swallows the rest (a half-open connection: nothing arrives, nothing is refused).

With ``refuse_websockets`` set, every ``GET /v1/ws`` is answered ``502 Bad Gateway`` and closed,
as by a proxy that does not pass WebSockets; other requests go through.

Every connection's byte counts are kept, so a test can tell what a client sent again.
The proxy runs its own event loop in a thread and binds 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field
from typing import Literal

Fault = Literal["cut", "freeze"]
WAIT_S = 30.0


@dataclass(eq=False)
class ProxiedConnection:
    """One client connection through the proxy."""

    kind: str = "unknown"
    """``websocket`` (a ``GET /v1/ws`` request) or ``http``."""
    upstream_bytes: int = 0
    """Client → server bytes forwarded."""
    downstream_bytes: int = 0
    """Server → client bytes forwarded."""
    fault: Fault | None = None
    fault_at: int | None = None
    faulted: threading.Event = field(default_factory=threading.Event)
    closed: threading.Event = field(default_factory=threading.Event)
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def abort(self) -> None:
        for writer in self._writers:
            writer.transport.abort()


class CuttingProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.connections: list[ProxiedConnection] = []
        self._armed: tuple[Fault, int] | None = None
        self._faulted = threading.Event()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cutting-proxy", daemon=True)
        self.port = 0
        self.refuse_websockets = False

    # Life cycle -----------------------------------------------------------------------------

    def start(self) -> CuttingProxy:
        self._thread.start()
        if not self._started.wait(WAIT_S) or self._server is None:
            raise RuntimeError("the proxy failed to start")
        return self

    def stop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(WAIT_S)

    def __enter__(self) -> CuttingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # Faults -----------------------------------------------------------------------------------

    def cut_websocket_after(self, n_bytes: int) -> None:
        """Reset the next WebSocket connection once ``n_bytes`` came from the client."""
        self._arm("cut", n_bytes)

    def freeze_websocket_after(self, n_bytes: int) -> None:
        """Stop forwarding the next WebSocket connection's client bytes after ``n_bytes``."""
        self._arm("freeze", n_bytes)

    def _arm(self, fault: Fault, n_bytes: int) -> None:
        with self._lock:
            self._armed = (fault, n_bytes)
            self._faulted.clear()

    @property
    def websockets(self) -> list[ProxiedConnection]:
        return [c for c in self.connections if c.kind == "websocket"]

    def wait_fault(self, timeout: float = WAIT_S) -> ProxiedConnection:
        """The connection the armed fault hit, once it has (waits on an event, bounded)."""
        if not self._faulted.wait(timeout):
            raise TimeoutError("the armed fault never happened")
        return next(c for c in self.connections if c.faulted.is_set())

    # The proxy --------------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]

        try:
            self._loop.run_until_complete(start())
        finally:
            self._started.set()
        try:
            self._loop.run_forever()
        finally:
            if self._server is not None:
                self._server.close()
            for connection in self.connections:
                connection.abort()
            self._loop.run_until_complete(asyncio.sleep(0))
            self._loop.close()

    async def _accept(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        connection = ProxiedConnection()
        self.connections.append(connection)
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.transport.abort()
            connection.closed.set()
            return
        connection._writers = [client_writer, server_writer]
        upstream = asyncio.create_task(self._upstream(client_reader, server_writer, connection))
        downstream = asyncio.create_task(self._downstream(server_reader, client_writer, connection))
        await asyncio.wait({upstream, downstream}, return_when=asyncio.FIRST_COMPLETED)
        # Either side ended: end the other (a clean close, unless a fault aborted it already).
        for writer in connection._writers:
            with contextlib.suppress(Exception):
                writer.close()
        await asyncio.gather(upstream, downstream, return_exceptions=True)
        connection.closed.set()

    def _classify(self, connection: ProxiedConnection, first: bytes) -> None:
        connection.kind = "websocket" if first.startswith(b"GET /v1/ws") else "http"
        if connection.kind == "websocket":
            with self._lock:
                if self._armed is not None:
                    connection.fault, connection.fault_at = self._armed
                    self._armed = None

    async def _upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        connection: ProxiedConnection) -> None:
        frozen = False
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1 << 16):
                if connection.kind == "unknown":
                    self._classify(connection, data)
                    if connection.kind == "websocket" and self.refuse_websockets:
                        client = connection._writers[0]
                        client.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n"
                                     b"Connection: close\r\n\r\n")
                        await client.drain()
                        client.close()
                        return
                if frozen:
                    continue  # swallowed: the client's bytes go nowhere
                limit = connection.fault_at
                if limit is not None and connection.upstream_bytes + len(data) >= limit:
                    data = data[: limit - connection.upstream_bytes]
                    writer.write(data)
                    connection.upstream_bytes += len(data)
                    await writer.drain()
                    connection.faulted.set()
                    self._faulted.set()
                    if connection.fault == "cut":
                        connection.abort()
                        return
                    frozen = True
                    continue
                writer.write(data)
                connection.upstream_bytes += len(data)
                await writer.drain()
            if frozen:
                # The client left (e.g. the page reloaded): the server's side goes too.
                return

    async def _downstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          connection: ProxiedConnection) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                connection.downstream_bytes += len(data)
                await writer.drain()
