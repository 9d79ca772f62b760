"""Token buckets with a fake clock: refill, burst cap, exact retry-after; the LRU bound; the
memory budget's reservations, charges and waiting readers."""

from __future__ import annotations

import asyncio

import pytest

from chunking.errors import ErrorCode, ProtocolError
from server.limits import KeyedBuckets, MemoryBudget, Reservation, TokenBucket, client_key


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


# MemoryBudget -------------------------------------------------------------------------------


def test_reservations_fit_under_the_limit_or_change_nothing() -> None:
    changes: list[tuple[int, int]] = []
    budget = MemoryBudget(1000, on_change=lambda held, waiting: changes.append((held, waiting)))
    assert budget.reserve(600)
    assert not budget.reserve(401)  # would exceed: refused, nothing held
    assert budget.held == 600
    assert budget.reserve(400)
    assert not budget.over  # reservations alone never stop the readers
    budget.unreserve(1000)
    assert (budget.held, budget.peak) == (0, 1000)
    assert changes == [(600, 0), (1000, 0), (0, 0)]


def test_one_owner_holds_at_most_its_share_of_the_reservations() -> None:
    budget = MemoryBudget(1000, share=400)
    assert budget.reserve(300, "alice")
    assert not budget.reserve(101, "alice")  # over her share: refused, nothing held
    assert (budget.held, budget.owned("alice")) == (300, 300)
    assert budget.reserve(100, "alice")
    assert budget.reserve(400, "bob")  # the others' room is untouched
    assert budget.reserve(200)  # no owner: only the limit applies
    assert not budget.reserve(1, "carol")  # the limit still binds everyone
    budget.unreserve(300, "alice")
    assert budget.owned("alice") == 100
    assert budget.reserve(300, "alice")
    budget.unreserve(400, "alice")
    budget.unreserve(400, "bob")
    assert budget.owned("alice") == budget.owned("bob") == 0
    assert budget.held == 200


def test_charges_may_go_over_and_releases_never_go_negative() -> None:
    budget = MemoryBudget(100)
    budget.charge(150)
    assert budget.over
    budget.release(500)
    assert budget.held == 0
    budget.release(0)
    budget.release(-5)
    assert budget.held == 0


async def test_readers_wait_while_over_and_all_resume_when_released() -> None:
    budget = MemoryBudget(100)
    await budget.wait_for_room()  # under: at once
    budget.charge(120)
    readers = [asyncio.create_task(budget.wait_for_room()) for _ in range(3)]
    await asyncio.sleep(0)  # let them reach the wait (one loop turn, not a timed wait)
    assert budget.waiting == 3
    assert not any(reader.done() for reader in readers)
    budget.release(10)  # still at the limit: 110 >= 100
    await asyncio.sleep(0)
    assert budget.waiting == 3
    budget.release(20)
    async with asyncio.timeout(5):
        await asyncio.gather(*readers)
    assert budget.waiting == 0


async def test_a_cancelled_reader_stops_counting_as_waiting() -> None:
    budget = MemoryBudget(10)
    budget.charge(10)
    reader = asyncio.create_task(budget.wait_for_room())
    await asyncio.sleep(0)
    assert budget.waiting == 1
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert budget.waiting == 0


async def test_reservations_filling_the_budget_pause_no_reader() -> None:
    """A few clients' requests hold the whole budget: a message still passes (it is charged,
    and the readers wait only while it is being handled)."""
    budget = MemoryBudget(1000, share=500)
    assert budget.reserve(500, "a")
    assert budget.reserve(500, "b")
    await budget.wait_for_room()  # at once
    budget.charge(10)
    assert budget.over
    reader = asyncio.create_task(budget.wait_for_room())
    await asyncio.sleep(0)
    assert not reader.done()
    budget.release(10)
    async with asyncio.timeout(5):
        await reader
    assert not budget.over


def test_fits_says_what_reserve_would_do_and_holds_nothing() -> None:
    budget = MemoryBudget(1000, share=300)
    assert budget.fits(300, "a")
    assert not budget.fits(301, "a")
    assert budget.fits(1000)
    assert budget.held == 0


def test_a_reservation_takes_as_bytes_arrive_and_gives_all_back() -> None:
    budget = MemoryBudget(1000, share=400)
    with Reservation(budget, "a", lambda: 250) as hold:
        hold.take(300)
        hold.take(0)
        with pytest.raises(ProtocolError) as refused:
            hold.take(101)  # over a's share
        assert (refused.value.code, refused.value.retry_after_ms) == (ErrorCode.BUSY, 250)
        assert budget.owned("a") == 300
    assert budget.held == budget.owned("a") == 0


@pytest.mark.parametrize(("address", "key"), [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("unknown", "unknown"),
])
def test_ipv6_clients_are_grouped_by_their_64(address: str, key: str) -> None:
    assert client_key(address) == key
