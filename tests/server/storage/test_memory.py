"""What only the embedded backends promise (the shared contract is in test_contract.py)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chunking.errors import ErrorCode, InvalidTransition, ProtocolError
from chunking.messages import Chunk
from server.pipeline.spool import Spool
from server.storage import memory
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


# Large chunks are written and hashed in a thread ------------------------------------------------


def big_meta(size: int, sha256: str | None = None) -> UploadMeta:
    return UploadMeta(upload_id="big", size=size, task="colors", sha256=sha256)


async def test_large_chunks_are_written_off_the_loop_and_hash_as_the_small_ones(
    store: MemoryUploadStore, spool: Spool,
) -> None:
    size = 3 * memory.OFF_LOOP_CHUNK_BYTES + 5
    data = os.urandom(size)
    handle = await store.create(big_meta(size, hashlib.sha256(data).hexdigest()), "s")
    writers: set[str] = set()
    original = handle.spool_file.write_at

    def spy(offset: int, chunk: bytes | bytearray | memoryview) -> None:
        writers.add(threading.current_thread().name)
        original(offset, chunk)

    handle.reassembler._writer = spy
    step = memory.OFF_LOOP_CHUNK_BYTES
    for offset in range(0, size, step):
        event = await store.write(handle, "s", Chunk("big", offset, data[offset:offset + step]))
        assert event.received == min(size, offset + step)
    finished = await store.finish(handle)
    assert finished.sha256 == hashlib.sha256(data).hexdigest()
    assert read(finished.image.path) == data
    # The three full chunks went through the I/O thread, the 5-byte tail stayed on the loop.
    assert any(name.startswith("upload-io") for name in writers)
    assert threading.current_thread().name in writers


async def test_a_write_cancelled_mid_thread_finishes_before_the_next_one_starts(
    store: MemoryUploadStore,
) -> None:
    step = memory.OFF_LOOP_CHUNK_BYTES
    data = os.urandom(2 * step)
    handle = await store.create(big_meta(len(data)), "s")
    entered, release = threading.Event(), threading.Event()
    original = handle.spool_file.write_at

    def slow(offset: int, chunk: bytes | bytearray | memoryview) -> None:
        if offset == 0:
            entered.set()
            release.wait(10)
        original(offset, chunk)

    handle.reassembler._writer = slow
    first = asyncio.create_task(store.write(handle, "s", Chunk("big", 0, data[:step])))
    await asyncio.to_thread(entered.wait, 10)
    first.cancel()  # the thread keeps writing: the next chunk must wait for it
    second = asyncio.create_task(store.write(handle, "s", Chunk("big", step, data[step:])))
    await asyncio.sleep(0.05)
    assert not second.done()
    release.set()
    event = await second
    assert event.received == len(data)
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_discarding_during_a_threaded_write_frees_the_file_once_it_ends(
    store: MemoryUploadStore, spool: Spool,
) -> None:
    data = os.urandom(memory.OFF_LOOP_CHUNK_BYTES)
    handle = await store.create(big_meta(len(data) * 2), "s")
    entered, release = threading.Event(), threading.Event()
    original = handle.spool_file.write_at

    def slow(offset: int, chunk: bytes | bytearray | memoryview) -> None:
        entered.set()
        release.wait(10)
        original(offset, chunk)

    handle.reassembler._writer = slow
    write = asyncio.create_task(store.write(handle, "s", Chunk("big", 0, data)))
    await asyncio.to_thread(entered.wait, 10)
    await store.discard(handle.token, "s")
    assert len(spool_files(spool)) == 1  # the write still runs: its descriptor stays open
    release.set()
    await write  # the thread closed the file before its result came back
    assert spool_files(spool) == []
