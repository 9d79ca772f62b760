"""Rate limits: token buckets, per socket and per HTTP client."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

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
