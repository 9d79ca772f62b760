"""Locks on uploads, so two requests writing one upload cannot interleave (tusd's ``Locker``).

:class:`MemoryLocker` for one process; :class:`RedisLocker` for every gateway sharing Redis.
A lock is taken or refused at once: a tus client that finds its upload locked is answered
423 and retries (another of its requests still runs, or has just been cut off).
"""

from __future__ import annotations

import secrets
from typing import Any, Protocol

from server.storage import keys


class Lease(Protocol):
    async def refresh(self) -> None:
        """Keep holding the lock (a long request calls this as it makes progress)."""

    async def release(self) -> None: ...


class UploadLocker(Protocol):
    async def acquire(self, token: str) -> Lease | None:
        """The lock on upload ``token``, or None while someone else holds it."""


class _MemoryLease:
    def __init__(self, held: dict[str, _MemoryLease], token: str) -> None:
        self._held = held
        self._token = token

    async def refresh(self) -> None:
        pass

    async def release(self) -> None:
        if self._held.get(self._token) is self:  # a stale lease frees nothing of a new holder's
            del self._held[self._token]


class MemoryLocker:
    def __init__(self) -> None:
        self._held: dict[str, _MemoryLease] = {}

    async def acquire(self, token: str) -> Lease | None:
        if token in self._held:
            return None
        lease = self._held[token] = _MemoryLease(self._held, token)
        return lease


_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class _RedisLease:
    def __init__(self, redis: Any, key: str, holder: str) -> None:
        self._redis = redis
        self._key = key
        self._holder = holder

    async def refresh(self) -> None:
        await self._redis.eval(_REFRESH, 1, self._key, self._holder,
                               int(keys.UPLOAD_LOCK_TTL_S * 1000))

    async def release(self) -> None:
        await self._redis.eval(_RELEASE, 1, self._key, self._holder)


class RedisLocker:
    """``SET NX PX``: the holder's random value guards release and refresh."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis

    async def acquire(self, token: str) -> Lease | None:
        key = keys.upload_lock(token)
        holder = secrets.token_hex(8)
        taken = await self._redis.set(key, holder, nx=True,
                                      px=int(keys.UPLOAD_LOCK_TTL_S * 1000))
        return _RedisLease(self._redis, key, holder) if taken else None
