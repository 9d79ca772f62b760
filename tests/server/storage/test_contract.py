"""The contract of the storage Protocols (server/storage/base.py), run against every backend.

Each backend is one entry in ``UPLOAD_STORES`` / ``RESULT_CACHES`` / ``RATE_LIMITERS``: a
factory, keyed by name, that builds a fresh instance as an async context manager (and tears it
down). The Redis backends run against the real Redis on 127.0.0.1:6379, in a database of
their own that each test empties first. An upload-store factory gets a directory it may use
for spool files and a :class:`FakeClock` that it must use for idleness (``expire_idle``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from chunking.errors import ErrorCode, ProtocolError
from chunking.messages import Chunk
from chunking.reassembler import Appended, Replayed
from server.pipeline.spool import Spool
from server.storage.base import ImageRef, RateLimiter, ResultCache, UploadMeta, UploadStore
from server.storage.memory import LruResultCache, MemoryRateLimiter, MemoryUploadStore
from server.storage.redis import (
    RedisRateLimiter,
    RedisResultCache,
    RedisUploadStore,
    TieredResultCache,
)
from server.storage.redis import connect as connect_redis

pytestmark = pytest.mark.asyncio(loop_scope="function")

# Parallel runs (several checkouts on one machine) each pick their own database.
REDIS_URL = os.environ.get("PIXELSTREAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
"""A database of the test Redis that only these tests use (each test flushes it first)."""


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# Backends -------------------------------------------------------------------------------------


@dataclass
class StoreUnderTest:
    store: UploadStore
    read: Callable[[ImageRef], Awaitable[bytes | None]]
    """The bytes an image refers to, or None once it is gone."""


UploadStoreFactory = Callable[[Path, FakeClock], AbstractAsyncContextManager[StoreUnderTest]]
ResultCacheFactory = Callable[[], AbstractAsyncContextManager[ResultCache]]
RateLimiterFactory = Callable[[FakeClock], AbstractAsyncContextManager[RateLimiter]]


@asynccontextmanager
async def fresh_redis() -> AsyncIterator[Any]:
    redis = connect_redis(REDIS_URL)
    await redis.flushdb()
    try:
        yield redis
    finally:
        await redis.aclose()


@asynccontextmanager
async def memory_upload_store(directory: Path, clock: FakeClock) -> AsyncIterator[StoreUnderTest]:
    spool = Spool(directory)
    store = MemoryUploadStore(spool, clock=clock)

    def read_file(path: Path) -> bytes | None:
        return path.read_bytes() if path.exists() else None

    async def read(image: ImageRef) -> bytes | None:
        assert image.path is not None
        return read_file(Path(image.path))

    try:
        yield StoreUnderTest(store, read)
    finally:
        await store.close()
        spool.close()


@asynccontextmanager
async def redis_upload_store(directory: Path, clock: FakeClock) -> AsyncIterator[StoreUnderTest]:
    async with fresh_redis() as redis:
        store = RedisUploadStore(redis, idle_s=3600, clock=clock)

        async def read(image: ImageRef) -> bytes | None:
            assert image.key is not None
            data: bytes | None = await redis.get(image.key)
            return data

        try:
            yield StoreUnderTest(store, read)
        finally:
            await store.close()


@asynccontextmanager
async def memory_result_cache() -> AsyncIterator[ResultCache]:
    yield LruResultCache(100)


@asynccontextmanager
async def redis_result_cache() -> AsyncIterator[ResultCache]:
    async with fresh_redis() as redis:
        yield RedisResultCache(redis, ttl_s=60)


@asynccontextmanager
async def tiered_result_cache() -> AsyncIterator[ResultCache]:
    async with fresh_redis() as redis:
        yield TieredResultCache(LruResultCache(100), RedisResultCache(redis, ttl_s=60))


@asynccontextmanager
async def memory_rate_limiter(clock: FakeClock) -> AsyncIterator[RateLimiter]:
    yield MemoryRateLimiter(clock=clock)


@asynccontextmanager
async def redis_rate_limiter(clock: FakeClock) -> AsyncIterator[RateLimiter]:
    async with fresh_redis() as redis:
        yield RedisRateLimiter(redis)


UPLOAD_STORES: dict[str, UploadStoreFactory] = {
    "memory": memory_upload_store, "redis": redis_upload_store,
}
RESULT_CACHES: dict[str, ResultCacheFactory] = {
    "memory": memory_result_cache, "redis": redis_result_cache, "tiered": tiered_result_cache,
}
RATE_LIMITERS: dict[str, RateLimiterFactory] = {
    "memory": memory_rate_limiter, "redis": redis_rate_limiter,
}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=sorted(UPLOAD_STORES))
async def backend(request: pytest.FixtureRequest, tmp_path: Path,
                  clock: FakeClock) -> AsyncIterator[StoreUnderTest]:
    async with UPLOAD_STORES[request.param](tmp_path / "spool", clock) as under_test:
        yield under_test


@pytest.fixture
def store(backend: StoreUnderTest) -> UploadStore:
    return backend.store


@pytest.fixture(params=sorted(RESULT_CACHES))
async def cache(request: pytest.FixtureRequest) -> AsyncIterator[ResultCache]:
    async with RESULT_CACHES[request.param]() as cache:
        yield cache


@pytest.fixture(params=sorted(RATE_LIMITERS))
async def limiter(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[RateLimiter]:
    async with RATE_LIMITERS[request.param](clock) as limiter:
        yield limiter


# Helpers --------------------------------------------------------------------------------------

DATA = bytes(range(256)) * 4  # 1024 bytes


def meta(upload_id: str = "u1", data: bytes = DATA, sha256: str | None = None,
         **fields: object) -> UploadMeta:
    return UploadMeta(upload_id=upload_id, size=len(data), task="colors", sha256=sha256,
                      **fields)  # type: ignore[arg-type]


async def upload_error(awaitable: Awaitable[object]) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        await awaitable
    return caught.value


# Uploads --------------------------------------------------------------------------------------


async def test_create_stores_an_empty_upload_under_an_unguessable_token(
    store: UploadStore,
) -> None:
    declared = meta(name="pano.jpg", options={"colors": 3}, principal="alice")
    first = await store.create(declared, "sock-a")
    second = await store.create(meta("u2"), "sock-a")
    assert first.received == 0
    assert first.meta == declared
    assert len(first.token) >= 32
    assert first.token != second.token


async def test_chunks_follow_the_offset_rules(store: UploadStore,
                                             backend: StoreUnderTest) -> None:
    handle = await store.create(meta(), "a")

    def chunk(offset: int, data: bytes) -> Chunk:
        return Chunk("u1", offset, data)

    assert await store.write(handle, "a", chunk(0, DATA[:300])) == Appended(300, 1024, False)
    # Entirely below the bytes held: a replay, ignored.
    assert await store.write(handle, "a", chunk(0, DATA[:300])) == Replayed(300, 1024)
    assert await store.write(handle, "a", chunk(100, DATA[100:200])) == Replayed(300, 1024)
    # A gap, a partial overlap, a chunk past the size: offset_mismatch with the true offset.
    for offset, data in [(400, DATA[400:500]), (200, DATA[200:400]), (300, DATA[300:] + b"!")]:
        error = await upload_error(store.write(handle, "a", chunk(offset, data)))
        assert error.code is ErrorCode.OFFSET_MISMATCH
        assert error.expected == 300
        assert error.upload_id == "u1"
    # Nothing was changed by the rejected chunks: the client rewinds to 300 and goes on.
    assert await store.write(handle, "a", chunk(300, DATA[300:700])) == Appended(700, 1024, False)
    assert await store.write(handle, "a", chunk(700, DATA[700:])) == Appended(1024, 1024, True)
    finished = await store.finish(handle)
    assert finished.sha256 == hashlib.sha256(DATA).hexdigest()
    assert await backend.read(finished.image) == DATA
    await store.release(finished.image)


async def test_finish_hands_the_image_over_and_release_frees_it(
    store: UploadStore, backend: StoreUnderTest
) -> None:
    handle = await store.create(meta(sha256=hashlib.sha256(DATA).hexdigest()), "a")
    await store.write(handle, "a", Chunk("u1", 0, DATA))
    finished = await store.finish(handle)
    assert finished.sha256 == hashlib.sha256(DATA).hexdigest()
    assert finished.image.size == len(DATA)
    assert await backend.read(finished.image) == DATA
    # The token still names the upload, now complete, so a resume can follow its analysis.
    claimed = await store.claim(handle.token, "b")
    assert claimed.complete
    assert claimed.received == len(DATA)
    assert (await upload_error(store.finish(claimed))).code is ErrorCode.UNKNOWN_UPLOAD
    await store.release(finished.image)
    assert await backend.read(finished.image) is None
    await store.release(finished.image)  # twice is harmless
    await store.discard(handle.token, "b")
    assert (await upload_error(store.claim(handle.token, "b"))).code is ErrorCode.UNKNOWN_UPLOAD


async def test_stage_image_holds_a_whole_image_until_released(
    store: UploadStore, backend: StoreUnderTest, tmp_path: Path
) -> None:
    staged = await store.stage_image(DATA, len(DATA))
    assert staged.sha256 == hashlib.sha256(DATA).hexdigest()
    assert await backend.read(staged.image) == DATA
    path = tmp_path / "image.bin"
    path.write_bytes(DATA[::-1])
    with path.open("rb") as source:
        from_file = await store.stage_image(source, len(DATA))
    assert await backend.read(from_file.image) == DATA[::-1]
    assert from_file.sha256 == hashlib.sha256(DATA[::-1]).hexdigest()
    for image in (staged.image, from_file.image):
        await store.release(image)
        assert await backend.read(image) is None


async def test_a_declared_checksum_is_case_insensitive(store: UploadStore) -> None:
    handle = await store.create(meta(sha256=hashlib.sha256(DATA).hexdigest().upper()), "a")
    await store.write(handle, "a", Chunk("u1", 0, DATA))
    finished = await store.finish(handle)
    assert finished.sha256 == hashlib.sha256(DATA).hexdigest()
    await store.release(finished.image)


async def test_a_checksum_mismatch_discards_the_upload(store: UploadStore) -> None:
    handle = await store.create(meta(sha256=hashlib.sha256(b"other").hexdigest()), "a")
    await store.write(handle, "a", Chunk("u1", 0, DATA))
    error = await upload_error(store.finish(handle))
    assert error.code is ErrorCode.CHECKSUM_MISMATCH
    assert (await upload_error(store.claim(handle.token, "a"))).code is ErrorCode.UNKNOWN_UPLOAD
    error = await upload_error(store.write(handle, "a", Chunk("u1", 1024, b"")))
    assert error.code is ErrorCode.UNKNOWN_UPLOAD


async def test_claim_moves_ownership_and_the_old_owner_is_refused(
    store: UploadStore, backend: StoreUnderTest
) -> None:
    declared = meta(options={"colors": 2}, principal="tok_1")
    old = await store.create(declared, "sock-a")
    await store.write(old, "sock-a", Chunk("u1", 0, DATA[:500]))
    new = await store.claim(old.token, "sock-b")
    assert new.token == old.token
    assert new.received == 500
    assert not new.complete
    assert new.meta == declared
    # The old socket (maybe half-open) is refused, even for a replay.
    for chunk in (Chunk("u1", 500, DATA[500:600]), Chunk("u1", 0, DATA[:10])):
        error = await upload_error(store.write(old, "sock-a", chunk))
        assert error.code is ErrorCode.UNKNOWN_UPLOAD
    # ... and cannot discard it either: it is the new owner's.
    await store.discard(old.token, "sock-a")
    assert await store.write(new, "sock-b", Chunk("u1", 500, DATA[500:])) == Appended(
        1024, 1024, True
    )
    finished = await store.finish(new)
    assert await backend.read(finished.image) == DATA
    await store.release(finished.image)


async def test_a_refused_claim_changes_nothing(store: UploadStore) -> None:
    handle = await store.create(meta(principal="tok_1"), "sock-a")

    def refuse(candidate: Any) -> None:
        assert candidate.meta.principal == "tok_1"
        raise ProtocolError(ErrorCode.UNKNOWN_UPLOAD, "not yours")

    assert (await upload_error(store.claim(handle.token, "sock-b", refuse))).code is (
        ErrorCode.UNKNOWN_UPLOAD
    )
    assert await store.write(handle, "sock-a", Chunk("u1", 0, DATA[:1])) == Appended(
        1, 1024, False
    )


async def test_claim_can_move_an_upload_back(store: UploadStore) -> None:
    handle = await store.create(meta(), "a")
    await store.claim(handle.token, "b")
    back = await store.claim(handle.token, "a")
    assert await store.write(back, "a", Chunk("u1", 0, DATA[:1])) == Appended(1, 1024, False)


async def test_claiming_an_unknown_token_fails(store: UploadStore) -> None:
    error = await upload_error(store.claim("no-such-token", "a"))
    assert error.code is ErrorCode.UNKNOWN_UPLOAD


async def test_discard_forgets_the_upload(store: UploadStore) -> None:
    handle = await store.create(meta(), "a")
    await store.write(handle, "a", Chunk("u1", 0, DATA[:100]))
    await store.discard(handle.token, "a")
    assert (await upload_error(store.claim(handle.token, "a"))).code is ErrorCode.UNKNOWN_UPLOAD
    error = await upload_error(store.write(handle, "a", Chunk("u1", 100, DATA[100:])))
    assert error.code is ErrorCode.UNKNOWN_UPLOAD
    await store.discard(handle.token, "a")  # unknown tokens are ignored
    await store.discard("no-such-token", "a")


async def test_expire_idle_discards_only_idle_partial_uploads(
    store: UploadStore, backend: StoreUnderTest, clock: FakeClock
) -> None:
    idle = await store.create(meta("idle"), "a")
    busy = await store.create(meta("busy"), "a")
    resumed = await store.create(meta("resumed"), "b")
    done = await store.create(meta("done"), "a")
    await store.write(idle, "a", Chunk("idle", 0, DATA[:10]))
    await store.write(done, "a", Chunk("done", 0, DATA))
    finished = await store.finish(done)
    clock.advance(40)
    await store.write(busy, "a", Chunk("busy", 0, DATA[:10]))
    resumed = await store.claim(resumed.token, "c")  # a resume counts as activity
    clock.advance(30)  # idle: 70 s without a write; busy and resumed: 30 s

    expired = await store.expire_idle(60)
    assert [h.token for h in expired] == [idle.token]

    assert (await upload_error(store.claim(idle.token, "a"))).code is ErrorCode.UNKNOWN_UPLOAD
    assert await store.write(busy, "a", Chunk("busy", 10, DATA[10:20])) == Appended(
        20, 1024, False
    )
    assert await store.write(resumed, "c", Chunk("resumed", 0, DATA[:5])) == Appended(
        5, 1024, False
    )
    assert await backend.read(finished.image) == DATA  # handed out: not the store's to expire
    assert (await store.claim(done.token, "a")).complete
    await store.release(finished.image)


async def test_expire_idle_returns_what_it_discarded(store: UploadStore,
                                                     clock: FakeClock) -> None:
    idle = await store.create(meta("idle"), "a")
    fresh = await store.create(meta("fresh"), "a")
    clock.advance(59)
    await store.write(fresh, "a", Chunk("fresh", 0, DATA[:1]))
    assert await store.expire_idle(60) == []
    clock.advance(1)
    expired = await store.expire_idle(60)
    assert [(h.token, h.meta.upload_id) for h in expired] == [(idle.token, "idle")]
    error = await upload_error(store.write(idle, "a", Chunk("idle", 0, DATA[:1])))
    assert error.code is ErrorCode.UNKNOWN_UPLOAD
    assert await store.expire_idle(60) == []


async def test_store_ping(store: UploadStore) -> None:
    assert await store.ping() is True


# Result cache ---------------------------------------------------------------------------------


async def test_cache_get_and_set(cache: ResultCache) -> None:
    assert await cache.get("k") is None
    await cache.set("k", {"task": "colors", "result": {"colors": [{"hex": "#000000"}]}})
    assert await cache.get("k") == {"task": "colors", "result": {"colors": [{"hex": "#000000"}]}}
    await cache.set("k", {"v": 2})
    assert await cache.get("k") == {"v": 2}
    assert await cache.get("other") is None


async def test_cache_ping(cache: ResultCache) -> None:
    assert await cache.ping() is True


# Rate limits ----------------------------------------------------------------------------------


async def test_spend_counts_within_the_window_and_says_when_to_retry(
    limiter: RateLimiter,
) -> None:
    assert await limiter.spend("uploads:alice", 2, 3, 60) == 0
    assert await limiter.spend("uploads:alice", 1, 3, 60) == 0
    wait_ms = await limiter.spend("uploads:alice", 1, 3, 60)
    assert 0 < wait_ms <= 60_000
    assert await limiter.spend("uploads:bob", 3, 3, 60) == 0  # budgets are per key


async def test_one_spend_larger_than_the_budget_passes_on_an_empty_window(
    limiter: RateLimiter,
) -> None:
    assert await limiter.spend("bytes:alice", 5000, 1000, 60) == 0
    assert await limiter.spend("bytes:alice", 1, 1000, 60) > 0


async def test_concurrent_places_are_taken_and_given_back(limiter: RateLimiter) -> None:
    assert await limiter.enter("conn:alice", 2)
    assert await limiter.enter("conn:alice", 2)
    assert not await limiter.enter("conn:alice", 2)
    assert await limiter.enter("conn:bob", 2)
    await limiter.leave("conn:alice")
    assert await limiter.enter("conn:alice", 2)
    for _ in range(5):
        await limiter.leave("conn:carol")  # more leaves than enters do not go negative
    assert await limiter.enter("conn:carol", 1)
    assert not await limiter.enter("conn:carol", 1)
