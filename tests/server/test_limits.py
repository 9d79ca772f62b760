"""Token buckets with a fake clock: refill, burst cap, exact retry-after; the LRU bound."""

from __future__ import annotations

import pytest

from server.limits import KeyedBuckets, TokenBucket


class FakeClock:
    """A monotonic clock that only moves when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += ms / 1000


def drain(bucket: TokenBucket) -> int:
    """Take until refused; the number of successful takes."""
    taken = 0
    while bucket.take() == 0:
        taken += 1
        assert taken <= 10_000, "the bucket never ran dry"
    return taken


def test_a_new_bucket_starts_full_and_allows_exactly_its_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert drain(bucket) == 5


def test_refused_take_spends_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=1, clock=clock)
    assert bucket.take() == 0
    first = bucket.take()
    second = bucket.take()
    assert first == second == 100  # nothing spent by the first refusal


def test_refill_is_proportional_to_elapsed_time() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    drain(bucket)
    clock.advance_ms(300)  # 3 tokens at 10/s
    assert drain(bucket) == 3


def test_refill_is_capped_at_the_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    drain(bucket)
    clock.advance_ms(3_600_000)  # an hour idle
    assert drain(bucket) == 5


def test_cost_above_one() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=4, burst=4, clock=clock)
    assert bucket.take(3) == 0
    assert bucket.take(3) == 500  # 1 held, 2 missing at 4/s
    clock.advance_ms(500)
    assert bucket.take(3) == 0


@pytest.mark.parametrize("rate", [0.5, 1, 3, 7, 10, 20, 33.3, 1000])
@pytest.mark.parametrize("held", [0.0, 0.1, 0.3, 0.35, 0.7, 0.9])
@pytest.mark.parametrize("uptime_s", [1000.0, 2_000_000.0], ids=["fresh", "weeks up"])
def test_retry_after_is_exact_to_the_millisecond(rate: float, held: float,
                                                 uptime_s: float) -> None:
    """Waiting exactly ``retry_after`` ms succeeds; a millisecond less does not (float
    rounding must not turn an exact wait into another refusal)."""
    clock = FakeClock(uptime_s)
    bucket = TokenBucket(rate=rate, burst=1, clock=clock)
    assert bucket.take() == 0
    clock.advance_ms(held / rate * 1000)  # the bucket now holds ``held`` tokens
    wait_ms = bucket.take()
    assert wait_ms >= 1
    refused_at = clock.now

    clock.now = refused_at + (wait_ms - 1) / 1000
    assert bucket.take() > 0, f"retry_after {wait_ms} ms was more than needed"
    clock.now = refused_at + wait_ms / 1000
    assert bucket.take() == 0, f"retry_after {wait_ms} ms was not enough"


def test_retry_after_is_at_least_one_millisecond() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1_000_000, burst=1, clock=clock)
    assert bucket.take() == 0
    assert bucket.take() == 1


def test_keyed_buckets_are_independent_per_key() -> None:
    buckets = KeyedBuckets(rate=1e-6, burst=2)
    assert [buckets.take("a") for _ in range(2)] == [0, 0]
    assert buckets.take("a") > 0
    assert buckets.take("b") == 0


def test_keyed_buckets_forget_the_least_recently_used_key_past_max_keys() -> None:
    buckets = KeyedBuckets(rate=1e-6, burst=1, max_keys=2)  # no refill within a test
    assert buckets.take("a") == 0
    assert buckets.take("b") == 0
    assert buckets.take("a") > 0  # "a" is exhausted, and now the most recently used
    assert buckets.take("c") == 0  # a third key: "b", the least recently used, goes
    assert len(buckets._buckets) == 2
    assert buckets.take("a") > 0  # still remembered, still exhausted
    assert buckets.take("b") == 0  # forgotten, so it starts full again


def test_keyed_buckets_memory_stays_bounded_under_a_flood_of_keys() -> None:
    buckets = KeyedBuckets(rate=1.0, burst=1, max_keys=100)
    for n in range(1000):
        assert buckets.take(f"10.0.{n // 256}.{n % 256}") == 0
    assert len(buckets._buckets) == 100
