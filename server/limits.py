"""Rate limits: token buckets, per socket and per HTTP client; the process's memory budget."""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from chunking.errors import ErrorCode, ProtocolError
from server.storage.base import RateLimiter

_SLACK = 1e-6
"""Tokens of float rounding slack, so that a client that waits exactly the announced
retry-after is not refused again by a rounding error (0.7 + 0.3 < 1.0 in floats)."""


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``. Starts full."""

    __slots__ = ("_clock", "_stamp", "burst", "rate", "tokens")

    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self._clock = clock
        self._stamp = clock()

    def take(self, cost: float = 1.0) -> int:
        """Spend ``cost`` tokens. Returns 0 on success, else the milliseconds until it would
        succeed (nothing is spent then)."""
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self.tokens + _SLACK >= cost:
            self.tokens = max(0.0, self.tokens - cost)
            return 0
        return max(1, math.ceil((cost - self.tokens - _SLACK) / self.rate * 1000))


class KeyedBuckets:
    """One bucket per key (a client address), the least recently used forgotten past
    ``max_keys`` so a flood of addresses cannot grow memory without bound."""

    def __init__(self, rate: float, burst: int, *, max_keys: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, cost: float = 1.0) -> int:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(cost)


class ClientLimits:
    """Per-client budgets (a token's principal, else the client's address), shared by every
    gateway that shares the rate-limit backend. A limit of 0 is no limit."""

    WINDOW_S = 60.0

    def __init__(self, limiter: RateLimiter, *, max_connections: int, uploads_per_minute: int,
                 bytes_per_minute: int) -> None:
        self.limiter = limiter
        self.max_connections = max_connections
        self.uploads_per_minute = uploads_per_minute
        self.bytes_per_minute = bytes_per_minute

    async def connect(self, client: str) -> bool:
        """Take a connection place; False when the client has all of its places."""
        if not self.max_connections:
            return True
        return await self.limiter.enter(f"conn:{client}", self.max_connections)

    async def disconnect(self, client: str) -> None:
        if self.max_connections:
            await self.limiter.leave(f"conn:{client}")

    async def upload_started(self, client: str) -> None:
        await self._spend(f"uploads:{client}", 1, self.uploads_per_minute, "uploads")

    async def bytes_received(self, client: str, amount: int) -> None:
        await self._spend(f"bytes:{client}", amount, self.bytes_per_minute, "bytes")

    async def _spend(self, key: str, amount: int, limit: int, what: str) -> None:
        if not limit:
            return
        wait_ms = await self.limiter.spend(key, amount, limit, self.WINDOW_S)
        if wait_ms:
            raise ProtocolError(
                ErrorCode.RATE_LIMITED, f"over this client's budget of {limit} {what} per minute",
                retry_after_ms=wait_ms,
            )


class MemoryBudget:
    """Bytes this process holds for clients, against one limit shared by every socket and
    request. Two ways in:

    * :meth:`reserve` for what can be refused: an upload reserves its declared size when it is
      accepted (so every accepted upload can complete: nothing waits for memory it needs to
      free memory), an HTTP body its declared length. False when it does not fit: ``busy``.
      An upload's reservation names its ``owner`` (a client), and no owner may hold more than
      ``share``: one client declaring uploads it never sends cannot take the whole budget.
      (An HTTP body is held only until its deadline, ``http_body_timeout_s``.)
    * :meth:`charge` for what is already here: a message just received, a frame kept to run
      next. It may go over the limit; then :meth:`wait_for_room`, which every socket's reader
      awaits before reading its next message, holds the readers (backpressure, down to the
      kernel's TCP window) until :meth:`release` brings the total back under.

    Everything charged is released by work that needs no further reads (a message handled, a
    frame analysed, an upload analysed or discarded), so the readers always resume.
    """

    def __init__(self, limit: int, *, share: int | None = None,
                 on_change: Callable[[int, int], None] | None = None) -> None:
        self.limit = limit
        self.share = limit if share is None else share
        """The most one owner may hold in reservations."""
        self._owned: dict[str, int] = {}
        self.held = 0
        self.peak = 0
        self.waiting = 0
        """Readers waiting for room now."""
        self._room = asyncio.Event()
        self._room.set()
        self._on_change = on_change

    @property
    def over(self) -> bool:
        return self.held >= self.limit

    def reserve(self, amount: int, owner: str | None = None) -> bool:
        """Charge ``amount`` if it fits under the limit, and under ``share`` with what
        ``owner`` holds already; False (nothing charged) if not. Give it back with
        :meth:`release`, naming the same owner."""
        if self.held + amount > self.limit:
            return False
        if owner is not None:
            owned = self._owned.get(owner, 0) + amount
            if owned > self.share:
                return False
            self._owned[owner] = owned
        self.charge(amount)
        return True

    def owned(self, owner: str) -> int:
        """What ``owner`` holds in reservations now."""
        return self._owned.get(owner, 0)

    def charge(self, amount: int) -> None:
        self.held += amount
        self.peak = max(self.peak, self.held)
        if self.over:
            self._room.clear()
        self._changed()

    def release(self, amount: int, owner: str | None = None) -> None:
        if amount <= 0:
            return
        if owner is not None:
            owned = self._owned.get(owner, 0) - amount
            if owned > 0:
                self._owned[owner] = owned
            else:
                self._owned.pop(owner, None)
        self.held = max(0, self.held - amount)
        if not self.over:
            self._room.set()
        self._changed()

    async def wait_for_room(self) -> None:
        """Return at once while under the limit; else once releases bring it under."""
        if not self.over:
            return
        self.waiting += 1
        self._changed()
        try:
            while self.over:
                await self._room.wait()
        finally:
            self.waiting -= 1
            self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.held, self.waiting)


def shared_client_share(limit: int, max_image_bytes: int) -> int:
    """The most of a shared byte cap one client may hold: a quarter, or as much as one largest
    upload needs up to half, so that a client alone never holds it all."""
    return max(limit // 4, min(max_image_bytes, limit // 2))
