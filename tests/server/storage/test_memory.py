"""What only the embedded backends promise (the shared contract is in test_contract.py)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chunking.errors import ErrorCode, InvalidTransition, ProtocolError
from chunking.messages import Chunk
from server.pipeline.spool import Spool
from server.storage.base import UploadMeta
from server.storage.memory import LruResultCache, MemoryUploadStore, new_resume_token

DATA = bytes(range(256)) * 4


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    spool = Spool(tmp_path)
    yield spool
    spool.close()


@pytest.fixture
async def store(spool: Spool) -> AsyncIterator[MemoryUploadStore]:
    store = MemoryUploadStore(spool)
    yield store
    await store.close()


def meta(upload_id: str = "u1", sha256: str | None = None) -> UploadMeta:
    return UploadMeta(upload_id=upload_id, size=len(DATA), task="colors", sha256=sha256)


def read(path: str | None) -> bytes:
    assert path is not None
    return Path(path).read_bytes()


def spool_files(spool: Spool) -> list[Path]:
    return sorted(spool.directory.iterdir())


def test_resume_tokens_are_url_safe_and_long() -> None:
    tokens = {new_resume_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{32}", t) for t in tokens)


async def test_len_counts_records_and_bytes_held_counts_partial_uploads(
    store: MemoryUploadStore,
) -> None:
    first = await store.create(meta("a"), "s")
    second = await store.create(meta("b"), "s")
    await store.write(first, "s", Chunk("a", 0, DATA[:100]))
    await store.write(second, "s", Chunk("b", 0, DATA[:24]))
    assert len(store) == 2
    assert store.bytes_held == 124
    await store.write(first, "s", Chunk("a", 100, DATA[100:]))
    finished = await store.finish(first)
    assert len(store) == 2  # the complete record stays until discarded
    assert store.bytes_held == 24
    await store.discard(first.token, "s")
    assert len(store) == 1
    await store.release(finished.image)


async def test_an_upload_is_one_spool_file_until_freed(store: MemoryUploadStore,
                                                       spool: Spool) -> None:
    kept = await store.create(meta("kept"), "s")
    dropped = await store.create(meta("dropped"), "s")
    assert len(spool_files(spool)) == 2
    await store.discard(dropped.token, "s")
    assert spool_files(spool) == [kept.spool_file.path]
    await store.write(kept, "s", Chunk("kept", 0, DATA))
    finished = await store.finish(kept)
    assert finished.image.data is None
    assert finished.image.path == str(kept.spool_file.path)  # handed over without a copy
    assert spool_files(spool) == [kept.spool_file.path]
    await store.release(finished.image)
    assert spool_files(spool) == []


async def test_a_checksum_mismatch_frees_the_spool_file(store: MemoryUploadStore,
                                                        spool: Spool) -> None:
    handle = await store.create(meta(sha256="0" * 64), "s")
    await store.write(handle, "s", Chunk("u1", 0, DATA))
    with pytest.raises(ProtocolError) as caught:
        await store.finish(handle)
    assert caught.value.code is ErrorCode.CHECKSUM_MISMATCH
    assert spool_files(spool) == []
    assert len(store) == 0


async def test_expired_and_closed_uploads_free_their_files(spool: Spool) -> None:
    now = [0.0]
    store = MemoryUploadStore(spool, clock=lambda: now[0])
    await store.create(meta("old"), "s")
    now[0] = 100.0
    fresh = await store.create(meta("fresh"), "s")
    await store.expire_idle(50)
    assert spool_files(spool) == [fresh.spool_file.path]
    await store.close()
    assert spool_files(spool) == []
    assert len(store) == 0


async def test_finishing_an_incomplete_upload_is_a_misuse_that_keeps_it(
    store: MemoryUploadStore, spool: Spool
) -> None:
    handle = await store.create(meta(), "s")
    await store.write(handle, "s", Chunk("u1", 0, DATA[:10]))
    with pytest.raises(InvalidTransition):
        await store.finish(handle)
    # Still held, still writable: nothing leaked out of the store's reach.
    assert len(store) == 1
    assert len(spool_files(spool)) == 1
    await store.write(handle, "s", Chunk("u1", 10, DATA[10:]))
    finished = await store.finish(handle)
    assert read(finished.image.path) == DATA
    await store.release(finished.image)
    assert spool_files(spool) == []


async def test_lru_cache_never_holds_more_than_max_entries() -> None:
    cache = LruResultCache(max_entries=5)
    for n in range(20):
        await cache.set(str(n), {"n": n})
        assert len(cache) == min(n + 1, 5)
    assert [await cache.get(str(n)) for n in range(15, 20)] == [{"n": n} for n in range(15, 20)]
