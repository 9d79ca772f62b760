"""The contract of the storage Protocols (server/storage/base.py), run against every backend.

Each backend is one entry in ``UPLOAD_STORES`` / ``RESULT_CACHES``: a factory, keyed by name,
that builds a fresh instance as an async context manager (and tears it down). To test another
backend (Redis), add its factory to those dicts: every test below then runs against it too.
An upload-store factory gets a directory it may use for spool files and a :class:`FakeClock`
that it must use for idleness (``expire_idle``).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

from chunking.errors import ErrorCode, ProtocolError
from chunking.messages import Chunk
from chunking.reassembler import Appended, Replayed
from server.pipeline.spool import Spool
from server.storage.base import ImageRef, ResultCache, UploadMeta, UploadStore
from server.storage.memory import LruResultCache, MemoryUploadStore

pytestmark = pytest.mark.asyncio(loop_scope="function")


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# Backends -------------------------------------------------------------------------------------

UploadStoreFactory = Callable[[Path, FakeClock], AbstractAsyncContextManager[UploadStore]]
ResultCacheFactory = Callable[[int], AbstractAsyncContextManager[ResultCache]]


@asynccontextmanager
async def memory_upload_store(directory: Path, clock: FakeClock) -> AsyncIterator[UploadStore]:
    spool = Spool(directory)
    store = MemoryUploadStore(spool, clock=clock)
    try:
        yield store
    finally:
        await store.close()
        spool.close()


@asynccontextmanager
async def memory_result_cache(max_entries: int) -> AsyncIterator[ResultCache]:
    yield LruResultCache(max_entries)


UPLOAD_STORES: dict[str, UploadStoreFactory] = {"memory": memory_upload_store}
RESULT_CACHES: dict[str, ResultCacheFactory] = {"memory": memory_result_cache}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=sorted(UPLOAD_STORES))
def store_factory(request: pytest.FixtureRequest) -> UploadStoreFactory:
    return UPLOAD_STORES[request.param]


@pytest.fixture
async def store(store_factory: UploadStoreFactory, tmp_path: Path,
                clock: FakeClock) -> AsyncIterator[UploadStore]:
    async with store_factory(tmp_path / "spool", clock) as store:
        yield store


MakeCache = Callable[[int], Awaitable[ResultCache]]


@pytest.fixture(params=sorted(RESULT_CACHES))
async def make_cache(request: pytest.FixtureRequest) -> AsyncIterator[MakeCache]:
    """``await make_cache(max_entries)``: a fresh, empty cache of the parametrized backend."""
    async with AsyncExitStack() as stack:

        async def make(max_entries: int) -> ResultCache:
            return await stack.enter_async_context(RESULT_CACHES[request.param](max_entries))

        yield make


# Helpers --------------------------------------------------------------------------------------

DATA = bytes(range(256)) * 4  # 1024 bytes


def meta(upload_id: str = "u1", data: bytes = DATA, sha256: str | None = None,
         **fields: object) -> UploadMeta:
    return UploadMeta(upload_id=upload_id, size=len(data), task="colors", sha256=sha256,
                      **fields)  # type: ignore[arg-type]


def image_bytes(image: ImageRef) -> bytes:
    if image.data is not None:
        return image.data
    assert image.path is not None
    return Path(image.path).read_bytes()


def image_gone(image: ImageRef) -> bool:
    return image.path is None or not Path(image.path).exists()


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


async def test_chunks_follow_the_offset_rules(store: UploadStore) -> None:
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
    assert image_bytes(finished.image) == DATA
    await store.release(finished.image)


async def test_finish_hands_the_image_over_and_release_frees_it(store: UploadStore) -> None:
    handle = await store.create(meta(sha256=hashlib.sha256(DATA).hexdigest()), "a")
    await store.write(handle, "a", Chunk("u1", 0, DATA))
    finished = await store.finish(handle)
    assert finished.sha256 == hashlib.sha256(DATA).hexdigest()
    assert finished.image.size == len(DATA)
    assert image_bytes(finished.image) == DATA
    # The store no longer holds the upload: its token names nothing.
    assert (await upload_error(store.claim(handle.token, "b"))).code is ErrorCode.UNKNOWN_UPLOAD
    error = await upload_error(store.write(handle, "a", Chunk("u1", 0, DATA)))
    assert error.code is ErrorCode.UNKNOWN_UPLOAD
    assert (await upload_error(store.finish(handle))).code is ErrorCode.UNKNOWN_UPLOAD
    await store.release(finished.image)
    assert image_gone(finished.image)
    await store.release(finished.image)  # twice is harmless


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


async def test_claim_moves_ownership_and_the_old_owner_is_refused(store: UploadStore) -> None:
    declared = meta(options={"colors": 2})
    old = await store.create(declared, "sock-a")
    await store.write(old, "sock-a", Chunk("u1", 0, DATA[:500]))
    new = await store.claim(old.token, "sock-b")
    assert new.token == old.token
    assert new.received == 500
    assert new.meta == declared
    # The old socket (maybe half-open) is refused, even for a replay.
    for chunk in (Chunk("u1", 500, DATA[500:600]), Chunk("u1", 0, DATA[:10])):
        error = await upload_error(store.write(old, "sock-a", chunk))
        assert error.code is ErrorCode.UNKNOWN_UPLOAD
    assert await store.write(new, "sock-b", Chunk("u1", 500, DATA[500:])) == Appended(
        1024, 1024, True
    )
    finished = await store.finish(new)
    assert image_bytes(finished.image) == DATA
    await store.release(finished.image)


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
    await store.discard(handle.token)
    assert (await upload_error(store.claim(handle.token, "a"))).code is ErrorCode.UNKNOWN_UPLOAD
    error = await upload_error(store.write(handle, "a", Chunk("u1", 100, DATA[100:])))
    assert error.code is ErrorCode.UNKNOWN_UPLOAD
    assert (await upload_error(store.finish(handle))).code is ErrorCode.UNKNOWN_UPLOAD
    await store.discard(handle.token)  # unknown tokens are ignored
    await store.discard("no-such-token")


async def test_expire_idle_discards_only_idle_partial_uploads(store: UploadStore,
                                                              clock: FakeClock) -> None:
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
    assert image_bytes(finished.image) == DATA  # handed out: not the store's to expire
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


async def test_close_frees_everything(store: UploadStore) -> None:
    partial = await store.create(meta("partial"), "a")
    await store.write(partial, "a", Chunk("partial", 0, DATA[:10]))
    done = await store.create(meta("done"), "a")
    await store.write(done, "a", Chunk("done", 0, DATA))
    finished = await store.finish(done)
    await store.close()
    assert image_gone(finished.image)
    await store.close()  # twice is harmless (the fixture closes it again, too)


# Result cache ---------------------------------------------------------------------------------


async def test_cache_get_and_set(make_cache: MakeCache) -> None:
    cache = await make_cache(10)
    assert await cache.get("k") is None
    await cache.set("k", {"task": "colors", "result": {"colors": [{"hex": "#000000"}]}})
    assert await cache.get("k") == {"task": "colors", "result": {"colors": [{"hex": "#000000"}]}}
    await cache.set("k", {"v": 2})
    assert await cache.get("k") == {"v": 2}
    assert await cache.get("other") is None


async def test_cache_evicts_the_least_recently_used(make_cache: MakeCache) -> None:
    cache = await make_cache(3)
    for key in "abc":
        await cache.set(key, {"key": key})
    await cache.set("d", {"key": "d"})
    assert await cache.get("a") is None
    assert [await cache.get(k) for k in "bcd"] == [{"key": k} for k in "bcd"]


async def test_cache_get_refreshes_recency(make_cache: MakeCache) -> None:
    cache = await make_cache(3)
    for key in "abc":
        await cache.set(key, {"key": key})
    assert await cache.get("a") == {"key": "a"}
    await cache.set("d", {"key": "d"})
    assert await cache.get("b") is None
    assert [await cache.get(k) for k in "acd"] == [{"key": k} for k in "acd"]


async def test_cache_set_refreshes_recency(make_cache: MakeCache) -> None:
    cache = await make_cache(2)
    await cache.set("a", {"v": 1})
    await cache.set("b", {"v": 1})
    await cache.set("a", {"v": 2})
    await cache.set("c", {"v": 1})
    assert await cache.get("b") is None
    assert await cache.get("a") == {"v": 2}


async def test_cache_with_no_entries_is_disabled(make_cache: MakeCache) -> None:
    cache = await make_cache(0)
    await cache.set("k", {"v": 1})
    assert await cache.get("k") is None


async def test_cache_ping(make_cache: MakeCache) -> None:
    cache = await make_cache(1)
    assert await cache.ping() is True
