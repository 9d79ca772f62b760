"""Upload locks, in memory and in Redis: one holder at a time, released and lapsing."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.storage import keys
from server.storage.locks import MemoryLocker, RedisLocker, UploadLocker
from server.storage.redis import connect as connect_redis

REDIS_URL = os.environ.get("PIXELSTREAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


@pytest.fixture
async def redis() -> AsyncIterator[Any]:
    client = connect_redis(REDIS_URL)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def lockers(request: pytest.FixtureRequest, redis: Any
                  ) -> tuple[UploadLocker, UploadLocker]:
    """Two lockers that must exclude each other (two gateways sharing Redis)."""
    if request.param == "memory":
        shared = MemoryLocker()
        return shared, shared
    return RedisLocker(redis), RedisLocker(connect_redis(REDIS_URL))


async def test_one_holder_at_a_time_until_released(lockers) -> None:
    one, two = lockers
    lease = await one.acquire("t1")
    assert lease is not None
    assert await two.acquire("t1") is None
    assert await two.acquire("t2") is not None  # other uploads are free
    await lease.refresh()
    assert await two.acquire("t1") is None
    await lease.release()
    again = await two.acquire("t1")
    assert again is not None
    await lease.release()  # a stale lease's release frees nothing of the new holder's
    assert await one.acquire("t1") is None


async def test_a_redis_lock_lapses_unless_refreshed(redis) -> None:
    """A gateway that died holding a lock does not hold it for ever; a live one renews it."""
    locker = RedisLocker(redis)
    lease = await locker.acquire("t1")
    assert lease is not None
    key = keys.upload_lock("t1")
    assert 0 < await redis.pttl(key) <= keys.UPLOAD_LOCK_TTL_S * 1000
    await redis.pexpire(key, 1000)
    await lease.refresh()
    assert await redis.pttl(key) > 1000
