"""One WebSocket to the server: the handshake and its welcome, one reader task that dispatches
the server's messages by upload id and stream name, the shared window and upload slots.

The uploads (:mod:`chunking.client.upload`) and frame streams (:mod:`chunking.client.frames`)
on the socket register as listeners; when the socket fails, each of them learns why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from chunking.client.errors import (
    ClientClosedError,
    ConnectFailedError,
    ConnectionLostError,
    ForbiddenHostError,
    ForbiddenOriginError,
    StalledError,
    UnauthorizedError,
)
from chunking.codec import encode_client_binary, encode_client_text, parse_server
from chunking.errors import ErrorCode, ProtocolError
from chunking.limits import Limits
from chunking.messages import (
    Accepted,
    Cancel,
    Cancelled,
    Chunk,
    Dropped,
    Error,
    Frame,
    Progress,
    Result,
    ServerMessage,
    Upload,
    Welcome,
)

__all__ = ["Connection", "Signal", "StreamListener", "UploadListener", "open_connection"]

log = logging.getLogger("pixelstream.client")

UploadReply = Accepted | Progress | Cancelled | Result | Error


class Signal:
    """Wakes every current waiter on :meth:`pulse` (an edge, not a level: waiters re-check)."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def pulse(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, at_most: float | None = None) -> None:
        """Until the next pulse, or ``at_most`` seconds (then it just returns)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            if at_most is None:
                await waiter
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, at_most)):
                        await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)


class UploadListener(Protocol):
    """An upload on the socket (:class:`chunking.client.upload.Attempt`)."""

    @property
    def in_flight(self) -> int:
        """Bytes sent and not acknowledged: its share of the socket's window."""
        ...

    def on_message(self, message: UploadReply) -> None: ...

    def fail(self, error: ConnectionLostError) -> None: ...


class StreamListener(Protocol):
    """A frame stream on the socket (:class:`chunking.client.frames.FrameStream`)."""

    def _on_result(self, message: Result) -> None: ...

    def _on_dropped(self, message: Dropped) -> None: ...

    def _on_error(self, message: Error) -> None: ...

    def _connection_lost(self, conn: Connection, error: ConnectionLostError) -> None: ...


class Connection:
    """One WebSocket: its welcome, the uploads and streams on it, and the reader task.

    ``on_closed(conn)`` runs once when the socket becomes unusable (the client forgets it).
    """

    def __init__(self, ws: ClientConnection, welcome: Welcome, *, base64: bool = False,
                 on_closed: Callable[[Connection], None] | None = None) -> None:
        self.ws = ws
        self.welcome = welcome
        self.base64 = base64
        self.limits: Limits = welcome.limits
        self.attempts: dict[str, UploadListener] = {}
        self.streams: dict[str, StreamListener] = {}
        self.receiving = 0
        self.error: ConnectionLostError | None = None
        self.signal = Signal()
        self._on_closed = on_closed
        self.reader: asyncio.Task[None] = asyncio.create_task(
            self._read(), name="pixelstream-reader"
        )

    # Window and slots -----------------------------------------------------------------------

    def window_free(self) -> int:
        in_flight = sum(a.in_flight for a in self.attempts.values())
        return self.limits.window_bytes - in_flight

    async def acquire_slot(self) -> None:
        """One of the server's ``max_uploads`` receiving slots on this socket."""
        while self.receiving >= self.limits.max_uploads:
            self.check()
            await self.signal.wait()
        self.check()
        self.receiving += 1

    def release_slot(self) -> None:
        self.receiving -= 1
        self.signal.pulse()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    # Sending --------------------------------------------------------------------------------

    async def send(self, message: Upload | Chunk | Cancel | Frame) -> None:
        self.check()
        try:
            if isinstance(message, (Chunk, Frame)) and not self.base64:
                await self.ws.send(encode_client_binary(message))
            else:
                await self.ws.send(encode_client_text(message), text=True)
        except ConnectionClosed as exc:
            self.fail(ConnectionLostError(f"the connection closed: {exc}"))
            self.check()

    # Receiving ------------------------------------------------------------------------------

    async def _read(self) -> None:
        reason: ConnectionLostError = ConnectionLostError("the server closed the connection")
        try:
            async for raw in self.ws:
                if isinstance(raw, bytes):
                    continue  # v1 servers send text only
                try:
                    message = parse_server(raw)
                except ProtocolError as exc:
                    log.warning("ignoring a malformed server message: %s", exc)
                    continue
                self._dispatch(message)
        except ConnectionClosed as exc:
            reason = ConnectionLostError(f"the connection closed: {exc}")
        except asyncio.CancelledError:
            reason = ClientClosedError("the client was closed")
            raise
        except Exception as exc:  # a bug in a callback must not hang every upload
            log.exception("the client's reader failed")
            reason = ConnectionLostError(f"the reader failed: {exc!r}")
        finally:
            self.fail(reason)

    def _dispatch(self, message: ServerMessage) -> None:
        if isinstance(message, (Accepted, Progress, Cancelled)):
            attempt = self.attempts.get(message.id)
            if attempt is not None:
                attempt.on_message(message)
        elif isinstance(message, Result):
            if message.id is not None:
                attempt = self.attempts.get(message.id)
                if attempt is not None:
                    attempt.on_message(message)
            elif message.stream is not None and (stream := self.streams.get(message.stream)):
                stream._on_result(message)
        elif isinstance(message, Dropped):
            if stream := self.streams.get(message.stream):
                stream._on_dropped(message)
        elif isinstance(message, Error):
            if message.id is not None:
                attempt = self.attempts.get(message.id)
                if attempt is not None:
                    attempt.on_message(message)
            elif message.stream is not None and (stream := self.streams.get(message.stream)):
                stream._on_error(message)
            else:
                log.warning("server error for no upload or stream: %s %s", message.code,
                            message.message)
        # Welcome again, unknown types: ignored, as a v1 client must.

    # Failure --------------------------------------------------------------------------------

    def fail(self, error: ConnectionLostError, *, abort: bool = True) -> None:
        """The socket is unusable: everything on it learns why, and the client forgets it."""
        if self.error is not None:
            return
        self.error = error
        for attempt in list(self.attempts.values()):
            attempt.fail(error)
        for stream in list(self.streams.values()):
            stream._connection_lost(self, error)
        self.signal.pulse()
        if self._on_closed is not None:
            self._on_closed(self)
        if abort and not self.reader.done() and asyncio.current_task() is not self.reader:
            transport = self.ws.transport
            if transport is not None:
                transport.abort()

    def stalled(self, seconds: float) -> None:
        self.fail(StalledError(f"no answer from the server for {seconds:g} s"))

    async def close(self) -> None:
        self.fail(ClientClosedError("the client was closed"), abort=False)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), timeout=2)
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.reader


async def open_connection(
    url: str,
    *,
    token: str | None = None,
    base64: bool = False,
    connect_timeout: float = 10.0,
    ping_interval: float | None = 20.0,
    on_closed: Callable[[Connection], None] | None = None,
) -> Connection:
    """Open a socket and read its ``welcome``. A refused handshake raises its typed error
    (:class:`UnauthorizedError`, :class:`ForbiddenOriginError`); anything else that keeps the
    welcome from arriving, :class:`ConnectFailedError`. Never retried here."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        async with asyncio.timeout(connect_timeout):
            ws = await connect(
                url, additional_headers=headers, compression=None, max_size=None,
                open_timeout=None, ping_interval=ping_interval,
                ping_timeout=ping_interval, write_limit=1 << 20,
                user_agent_header="pixelstream-python",
            )
            try:
                raw = await ws.recv()
            except BaseException:
                await ws.close()
                raise
    except InvalidStatus as exc:
        raise handshake_error(exc) from None
    except ConnectionClosed as exc:
        if exc.rcvd is not None and exc.rcvd.code == 1008:
            raise UnauthorizedError(
                "the server closed the socket before its welcome (1008: policy violation)"
            ) from None
        raise ConnectFailedError(f"the server closed the socket before its welcome: {exc}"
                                 ) from None
    except InvalidURI as exc:
        raise ValueError(f"not a WebSocket URL: {url!r}") from exc
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        raise ConnectFailedError(f"cannot connect to {url}: {exc or type(exc).__name__}"
                                 ) from None
    try:
        welcome = parse_server(raw)
    except ProtocolError:
        welcome = None
    if not isinstance(welcome, Welcome):
        await ws.close()
        raise ConnectFailedError(f"{url} did not answer with a pixelstream welcome")
    return Connection(ws, welcome, base64=base64, on_closed=on_closed)


def handshake_error(exc: InvalidStatus) -> BaseException:
    """The typed error of a refused handshake, from its status and JSON body."""
    response = exc.response
    status = response.status_code
    code: str | None = None
    message = f"the server refused the handshake: HTTP {status}"
    with contextlib.suppress(Exception):
        body = orjson.loads(response.body or b"")
        code = body.get("code")
        message = body.get("message") or message
    if status == 401 or code == ErrorCode.UNAUTHORIZED:
        return UnauthorizedError(message)
    if status == 403 or code == ErrorCode.FORBIDDEN_ORIGIN:
        return ForbiddenOriginError(message)
    if code == ErrorCode.FORBIDDEN_HOST:
        return ForbiddenHostError(message)
    return ConnectFailedError(message)
