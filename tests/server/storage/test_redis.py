"""The Redis upload store's byte caps: what one client and all clients together may keep in
Redis as unfinished uploads, given back however an upload ends (the contract suite covers the
rest of the store, on both backends)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from chunking.errors import ErrorCode, ProtocolError
from chunking.messages import Chunk
from server.limits import shared_client_share
from server.storage import keys
from server.storage.base import UploadMeta
from server.storage.redis import RedisUploadStore
from tests.server.storage.test_contract import FakeClock, fresh_redis

SIZE = 1000


@pytest.fixture
async def store() -> AsyncIterator[RedisUploadStore]:
    async with fresh_redis() as redis:
        yield RedisUploadStore(redis, idle_s=60, clock=FakeClock(), client_bytes=1500,
                               total_bytes=2500)


async def begin(store: RedisUploadStore, client: str, upload_id: str = "u") -> object:
    return await store.create(UploadMeta(upload_id, SIZE, "colors", client=client), client)


async def send(store: RedisUploadStore, handle: object, client: str, offset: int,
               length: int) -> None:
    await store.write(handle, client, Chunk("u", offset, b"x" * length))


async def test_one_client_parks_no_more_than_its_share(store: RedisUploadStore) -> None:
    first = await begin(store, "mallory")
    second = await begin(store, "mallory")
    await send(store, first, "mallory", 0, SIZE - 1)  # all but the last byte, parked
    await send(store, second, "mallory", 0, 500)
    with pytest.raises(ProtocolError) as refused:
        await send(store, second, "mallory", 500, 2)
    assert refused.value.code is ErrorCode.BUSY
    assert refused.value.retry_after_ms
    assert await store.held_bytes("mallory") == 1499
    # Another client is untouched by mallory's share, up to the total.
    victim = await begin(store, "victim")
    await send(store, victim, "victim", 0, SIZE)
    assert await store.held_bytes() == 2499
    third = await begin(store, "carol")
    with pytest.raises(ProtocolError) as full:
        await send(store, third, "carol", 0, 2)
    assert full.value.code is ErrorCode.BUSY
    assert await store.held_bytes("carol") == 0


async def test_bytes_are_given_back_however_an_upload_ends(store: RedisUploadStore) -> None:
    finished = await begin(store, "a", "done")
    await send(store, finished, "a", 0, SIZE)
    await store.finish(finished)  # its bytes belong to the job now
    assert await store.held_bytes("a") == 0
    discarded = await begin(store, "a")
    await send(store, discarded, "a", 0, 300)
    assert await store.held_bytes("a") == 300
    await store.discard(discarded.token, "a")  # type: ignore[attr-defined]
    idle = await begin(store, "a")
    await send(store, idle, "a", 0, 200)
    assert await store.held_bytes() == 200
    store._clock.advance(61)  # type: ignore[attr-defined]
    assert len(await store.expire_idle(60)) == 1
    assert await store.held_bytes("a") == 0
    assert await store.held_bytes() == 0
    assert not await store._redis.exists(keys.HELD_BYTES)


async def test_a_lying_checksum_gives_its_bytes_back(store: RedisUploadStore) -> None:
    handle = await store.create(UploadMeta("u", SIZE, "colors", sha256="0" * 64, client="a"), "a")
    await send(store, handle, "a", 0, SIZE)
    with pytest.raises(ProtocolError):
        await store.finish(handle)
    assert await store.held_bytes("a") == 0


def test_a_client_never_holds_the_whole_shared_cap() -> None:
    mib = 1 << 20
    assert shared_client_share(1024 * mib, 256 * mib) == 256 * mib  # the defaults
    assert shared_client_share(64 * mib, 256 * mib) == 32 * mib
    assert shared_client_share(64 * mib, 8 * mib) == 16 * mib
