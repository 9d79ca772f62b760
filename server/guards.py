"""Transport guards uvicorn lacks: a deadline for each HTTP request's head, and no Nagle delay.

uvicorn times out idle keep-alive connections, but not a request whose head (request line and
headers) never finishes: a client that trickles header bytes holds its connection for ever.
:func:`guarded_h11` returns uvicorn's h11 protocol with a deadline for every head, the first
and each one after a keep-alive response. h11 itself bounds the head's size
(``h11_max_incomplete_event_size``); uvicorn's httptools protocol bounds neither, so the server
runs on h11. WebSocket handshakes are HTTP requests too, so the deadline covers them; after the
upgrade the WebSocket protocol's ping timeout and the endpoint's idle timeout take over. The
body's deadline is the route's (``http_body_timeout_s`` in :mod:`server.transports.http`).

Every connection also gets ``TCP_NODELAY``. asyncio means to set it on every TCP transport,
but only for sockets whose ``proto`` is ``IPPROTO_TCP``, and the sockets uvicorn accepts say 0:
without it, a small message written while the previous one is unacknowledged waits for the
peer's delayed ACK (about 40 ms on Linux). That held every ``queued`` message and result
behind the last chunk's acknowledgement, on the socket and over HTTP alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("pixelstream.http")


class _HeadDeadline(H11Protocol):
    head_timeout_s: float = 10.0

    _head_timer: asyncio.TimerHandle | None = None
    _head_scope: Any = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        no_delay(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self._head_timer is not None and getattr(self, "scope", None) is not self._head_scope:
            self._cancel_head_deadline()  # a new request's head is in (each gets a new scope)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_deadline()  # the next request's head, if one comes, must be timely

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_scope = getattr(self, "scope", None)
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            log.debug("closing a connection whose request head took over %g s",
                      self.head_timeout_s)
            self.transport.close()


def no_delay(transport: asyncio.BaseTransport) -> None:
    """Send small writes at once (see the module): ``TCP_NODELAY`` on a TCP transport."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def guarded_h11(head_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections whose request head takes longer than
    ``head_timeout_s`` (pass it as ``uvicorn.Config(http=...)``)."""
    return type("GuardedH11Protocol", (_HeadDeadline,), {"head_timeout_s": head_timeout_s})
