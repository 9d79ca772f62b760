"""Rate limits: token buckets, per socket and per HTTP client; the process's memory budget."""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from chunking.errors import ErrorCode, ProtocolError
from server.storage.base import RateLimiter

_SLACK = 1e-6
"""Tokens of float rounding slack, so that a client that waits exactly the announced
retry-after is not refused again by a rounding error (0.7 + 0.3 < 1.0 in floats)."""


def client_key(address: str) -> str:
    """Whose per-client limits an address spends: an IPv4 address itself, an IPv6 address's
    /64 (one subscriber's usual allocation: changing the last 64 bits costs nothing, so
    per-address limits would not bind)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return address


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
    request. Two kinds:

    * **Reservations** (:meth:`reserve` / :meth:`unreserve`) for what can be refused: an
      upload's bytes as they arrive (never its declared size: an upload that sends nothing
      holds nothing), an HTTP body's as it arrives. False when it does not fit: ``busy``. A
      reservation names its ``owner`` (a client) and no owner may hold more than ``share``:
      one client cannot take the whole budget.
    * **Charges** (:meth:`charge` / :meth:`release`) for what is already here: a message just
      received, a frame kept to run next. A charge may go over the limit; then
      :meth:`wait_for_room`, which every socket's reader awaits before its next read, holds
      the readers (backpressure, down to the kernel's TCP window) until releases bring the
      total back under.

    Readers wait only while charges take the total over the limit: reservations alone, however
    many, never stop a socket from being read (so that a few clients' requests cannot freeze
    every socket). Everything charged is released by work that needs no further reads (a
    message handled, a frame analysed), so the readers always resume.
    """

    def __init__(self, limit: int, *, share: int | None = None,
                 on_change: Callable[[int, int], None] | None = None) -> None:
        self.limit = limit
        self.share = limit if share is None else share
        """The most one owner may hold in reservations."""
        self._owned: dict[str, int] = {}
        self.reserved = 0
        self.charged = 0
        self.peak = 0
        self.waiting = 0
        """Readers waiting for room now."""
        self._room = asyncio.Event()
        self._room.set()
        self._on_change = on_change

    @property
    def held(self) -> int:
        return self.reserved + self.charged

    @property
    def over(self) -> bool:
        """Readers must wait: charges take the total to the limit or beyond."""
        return self.charged > 0 and self.held >= self.limit

    def fits(self, amount: int, owner: str | None = None) -> bool:
        """Whether :meth:`reserve` of ``amount`` would succeed now (nothing is held)."""
        if self.held + amount > self.limit:
            return False
        return owner is None or self._owned.get(owner, 0) + amount <= self.share

    def reserve(self, amount: int, owner: str | None = None) -> bool:
        """Hold ``amount`` if it fits under the limit, and under ``share`` with what ``owner``
        holds already; False (nothing held) if not. Give it back with :meth:`unreserve`,
        naming the same owner."""
        if not self.fits(amount, owner):
            return False
        if owner is not None:
            self._owned[owner] = self._owned.get(owner, 0) + amount
        self.reserved += amount
        self._changed()
        return True

    def unreserve(self, amount: int, owner: str | None = None) -> None:
        if amount <= 0:
            return
        if owner is not None:
            owned = self._owned.get(owner, 0) - amount
            if owned > 0:
                self._owned[owner] = owned
            else:
                self._owned.pop(owner, None)
        self.reserved = max(0, self.reserved - amount)
        self._changed()

    def owned(self, owner: str) -> int:
        """What ``owner`` holds in reservations now."""
        return self._owned.get(owner, 0)

    def charge(self, amount: int) -> None:
        self.charged += amount
        if self.over:
            self._room.clear()
        self._changed()

    def release(self, amount: int) -> None:
        """Give back what :meth:`charge` took."""
        if amount <= 0:
            return
        self.charged = max(0, self.charged - amount)
        self._changed()

    async def wait_for_room(self) -> None:
        """Return at once unless charges hold the total over the limit; else once releases
        bring it under."""
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
        self.peak = max(self.peak, self.held)
        if not self.over:
            self._room.set()
        if self._on_change is not None:
            self._on_change(self.held, self.waiting)


def shared_client_share(limit: int, max_image_bytes: int) -> int:
    """The most of a shared byte cap one client may hold: a quarter, or as much as one largest
    upload needs up to half, so that a client alone never holds it all."""
    return max(limit // 4, min(max_image_bytes, limit // 2))


class Reservation:
    """What one request holds of the memory budget: taken as its bytes arrive (:meth:`take`,
    ``busy`` when the budget or its client's share has no room), all given back on exit.
    A request that declares a large body and sends nothing holds nothing."""

    def __init__(self, budget: MemoryBudget, owner: str,
                 retry_after_ms: Callable[[], int]) -> None:
        self.budget = budget
        self.owner = owner
        self.held = 0
        self._retry_after_ms = retry_after_ms

    def take(self, amount: int) -> None:
        if amount <= 0:
            return
        if not self.budget.reserve(amount, self.owner):
            over_share = self.budget.owned(self.owner) + amount > self.budget.share
            raise ProtocolError(
                ErrorCode.BUSY,
                "this client's requests hold all the memory one client may; retry when one "
                "ends" if over_share else "the server holds all the request bytes it may",
                retry_after_ms=self._retry_after_ms(),
            )
        self.held += amount

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.budget.unreserve(self.held, self.owner)
        self.held = 0
