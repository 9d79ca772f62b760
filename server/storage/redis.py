"""The shared backends: uploads, results and rate limits in Redis, for gateways on many machines.

Uploads: the record is a hash and the bytes a string that chunks are APPENDed to, by a Lua
script that checks the writer still owns the upload and that the offset is still the one it
read (compare-and-append). That is how concurrent writers are excluded: the newest ``claim``
(a resume) takes the upload over and every older socket's writes fail with ``unknown_upload``
— the protocol's answer, where tusd answers 423 Locked. Idle partial uploads are found
through a sorted set of last-write times (wall clock: gateways on different machines share
it) and keys carry a TTL as a backstop.

When Redis cannot be reached, every call raises ProtocolError(busy) with a retry hint; the
client library backs off and resumes once it answers again.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, BinaryIO, ParamSpec, TypeVar

import orjson
from redis import asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chunking.errors import ErrorCode, InvalidTransition, ProtocolError
from chunking.messages import Chunk
from chunking.reassembler import Appended, ChunkEvent, Replayed, is_append
from server.storage import keys
from server.storage.base import FinishedUpload, ImageRef, UploadMeta
from server.storage.memory import new_resume_token, unknown_upload

log = logging.getLogger("pixelstream.redis")

P = ParamSpec("P")
T = TypeVar("T")

RETRY_AFTER_MS = 1000
_HASH_PIECE = 8 * 1024 * 1024
"""Bytes fetched per GETRANGE when an upload must be hashed from the store."""
_OFF_LOOP_BYTES = 1 << 20


def unavailable() -> ProtocolError:
    return ProtocolError(ErrorCode.BUSY, "the shared store is unreachable; retry shortly",
                         retry_after_ms=RETRY_AFTER_MS)


def unavailable_is_busy(
    method: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Turn "Redis is unreachable" into the protocol's ``busy``."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            raise unavailable() from None

    return wrapper


def connect(url: str) -> aioredis.Redis:
    """A client that fails fast when Redis is away, so callers can answer ``busy``."""
    return aioredis.Redis.from_url(
        url, socket_connect_timeout=2, socket_timeout=10, health_check_interval=15,
    )


# Uploads --------------------------------------------------------------------------------------

_WRITE = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return {-1, 0} end
if owner ~= ARGV[1] then return {-2, 0} end
local received = tonumber(redis.call('HGET', KEYS[1], 'received'))
if received ~= tonumber(ARGV[2]) or redis.call('HGET', KEYS[1], 'complete') == '1' then
  return {-3, received}
end
local n = string.len(ARGV[3])
if n > 0 then
  local client = redis.call('HGET', KEYS[1], 'client') or ''
  local mine = tonumber(redis.call('HGET', KEYS[4], client) or '0')
  local all = tonumber(redis.call('HGET', KEYS[4], '*') or '0')
  local client_cap, total_cap = tonumber(ARGV[7]), tonumber(ARGV[8])
  if (client_cap > 0 and mine + n > client_cap) or (total_cap > 0 and all + n > total_cap) then
    return {-4, received}
  end
  redis.call('APPEND', KEYS[2], ARGV[3])
  redis.call('HINCRBY', KEYS[4], client, n)
  redis.call('HINCRBY', KEYS[4], '*', n)
end
if n == 0 then return {1, received} end  -- an empty chunk is no activity
received = received + n
redis.call('HSET', KEYS[1], 'received', received, 'last_write', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[6])
return {1, received}
"""

_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
if redis.call('HGET', KEYS[1], 'complete') ~= '1' then
  redis.call('HSET', KEYS[1], 'last_write', ARGV[2])
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return 1
"""

_UNCOUNT = """
local function uncount(record, held)
  if redis.call('HGET', record, 'complete') == '1' then return end
  local n = tonumber(redis.call('HGET', record, 'received') or '0')
  if n <= 0 then return end
  local client = redis.call('HGET', record, 'client') or ''
  if redis.call('HINCRBY', held, client, -n) <= 0 then redis.call('HDEL', held, client) end
  if redis.call('HINCRBY', held, '*', -n) <= 0 then redis.call('HDEL', held, '*') end
end
"""
"""Gives an unfinished upload's bytes back to the byte caps (before its record goes, or when
it completes: its bytes then belong to the job queue, which ``max_queue`` bounds)."""

_FINISHED = _UNCOUNT + """
uncount(KEYS[1], KEYS[2])
return 1
"""

_DISCARD = _UNCOUNT + """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
uncount(KEYS[1], KEYS[4])
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[2])
return 1
"""

_EXPIRE = _UNCOUNT + """
local gone = {}
for _, token in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])) do
  redis.call('ZREM', KEYS[1], token)
  local record = ARGV[2] .. token
  local last = redis.call('HGET', record, 'last_write')
  if (not last) or tonumber(last) <= tonumber(ARGV[1]) then
    uncount(record, KEYS[2])
    redis.call('DEL', record, record .. ':data')
    table.insert(gone, token)
  end
end
return gone
"""


@dataclass(eq=False)
class RedisUpload:
    token: str
    meta: UploadMeta
    received: int
    complete: bool = False
    hasher: Any = field(default=None, repr=False)
    """SHA-256 state of bytes this process appended, valid while ``hashed == received``."""
    hashed: int = 0
    local_path: str | None = None
    """The bytes live in Redis, not in a file here."""


def _encode_meta(meta: UploadMeta) -> bytes:
    return orjson.dumps({
        "upload_id": meta.upload_id, "size": meta.size, "task": meta.task,
        "options": meta.options, "sha256": meta.sha256, "name": meta.name,
        "principal": meta.principal,
    })


def _decode_meta(raw: bytes) -> UploadMeta:
    return UploadMeta(**orjson.loads(raw))


class RedisUploadStore:
    """Uploads any gateway can continue. ``clock`` is wall time (shared between machines)."""

    def __init__(self, redis: aioredis.Redis, *, idle_s: float,
                 clock: Callable[[], float] = time.time, client_bytes: int = 0,
                 total_bytes: int = 0) -> None:
        self._redis = redis
        self._idle_ms = max(1, int(idle_s * 1000))
        self._keep_ms = 2 * self._idle_ms + 60_000
        """The keys' lifetime, a backstop for when no gateway sweeps: longer than the idle
        time, so the sweep (which gives the bytes back to the caps) always comes first."""
        self.client_bytes = client_bytes
        """Bytes of unfinished uploads one client may keep in Redis (0: no cap)."""
        self.total_bytes = total_bytes
        """Bytes of unfinished uploads all clients together may keep (0: no cap)."""
        self._clock = clock
        self._tracked: dict[str, RedisUpload] = {}
        """Partial uploads this process writes, to notice when another gateway expires one."""
        self._write = redis.register_script(_WRITE)
        self._claim = redis.register_script(_CLAIM)
        self._discard = redis.register_script(_DISCARD)
        self._expire = redis.register_script(_EXPIRE)
        self._finished = redis.register_script(_FINISHED)

    def _keys(self, token: str) -> list[str]:
        return [keys.upload(token), keys.upload_data(token), keys.IDLE_UPLOADS, keys.HELD_BYTES]

    @unavailable_is_busy
    async def create(self, meta: UploadMeta, owner: str) -> RedisUpload:
        token = new_resume_token()
        now = self._clock()
        record = keys.upload(token)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(record, mapping={"meta": _encode_meta(meta), "owner": owner,
                                       "received": 0, "complete": 0, "last_write": now,
                                       "client": meta.client or meta.principal or ""})
            pipe.pexpire(record, self._keep_ms)
            pipe.zadd(keys.IDLE_UPLOADS, {token: now})
            await pipe.execute()
        upload = RedisUpload(token, meta, 0, hasher=hashlib.sha256())
        self._tracked[token] = upload
        return upload

    @unavailable_is_busy
    async def claim(self, token: str, owner: str,
                    check: Callable[[Any], None] | None = None) -> RedisUpload:
        fields: Any = await self._redis.hgetall(keys.upload(token))
        if not fields:
            raise unknown_upload(None, "the resume token names no live upload")
        upload = RedisUpload(token, _decode_meta(fields[b"meta"]), int(fields[b"received"]),
                             complete=fields.get(b"complete") == b"1")
        if check is not None:
            check(upload)
        if not await self._claim(keys=self._keys(token),
                                 args=[owner, self._clock(), self._keep_ms, token]):
            raise unknown_upload(None, "the resume token names no live upload")
        if not upload.complete:
            self._tracked[token] = upload
        return upload

    @unavailable_is_busy
    async def write(self, handle: Any, owner: str, chunk: Chunk) -> ChunkEvent:
        upload: RedisUpload = handle
        size = upload.meta.size
        while True:
            if not is_append(chunk, upload.received, size):  # raises offset_mismatch
                # A replay writes nothing, but is still only the owner's to send.
                if await self._redis.hget(keys.upload(upload.token), "owner") != owner.encode():
                    raise unknown_upload(chunk.id, "this upload is no longer this socket's")
                return Replayed(received=upload.received, total=size)
            status, received = await self._write(
                keys=self._keys(upload.token),
                args=[owner, upload.received, bytes(chunk.data), self._clock(), self._keep_ms,
                      upload.token, self.client_bytes, self.total_bytes],
            )
            if status == 1:
                if upload.hasher is not None and upload.hashed == upload.received:
                    upload.hasher.update(chunk.data)
                    upload.hashed = received
                upload.received = received
                return Appended(received=received, total=size, complete=received == size)
            if status in (-1, -2):
                self._tracked.pop(upload.token, None)
                why = ("the upload expired or was discarded" if status == -1
                       else "this upload was taken over by another connection")
                raise unknown_upload(chunk.id, why)
            if status == -4:
                raise ProtocolError(
                    ErrorCode.BUSY,
                    "the shared store holds all the unfinished upload bytes this client (or "
                    "every client) may keep; retry when an upload ends",
                    retry_after_ms=RETRY_AFTER_MS, upload_id=chunk.id,
                )
            upload.received = int(received)  # another writer moved it: judge the chunk again

    @unavailable_is_busy
    async def finish(self, handle: Any) -> FinishedUpload:
        upload: RedisUpload = handle
        token = upload.token
        if upload.complete:
            raise unknown_upload(upload.meta.upload_id, "this upload is no longer held")
        if upload.received != upload.meta.size:
            raise InvalidTransition(f"finish() with {upload.received} of {upload.meta.size} "
                                    "bytes held")
        record, data = keys.upload(token), keys.upload_data(token)
        if not await self._redis.exists(record):
            self._tracked.pop(token, None)
            raise unknown_upload(upload.meta.upload_id, "the upload expired or was discarded")
        if upload.hasher is not None and upload.hashed == upload.meta.size:
            digest = upload.hasher.hexdigest()
        else:
            digest = await self._hash_stored(data, upload.meta.size)
        self._tracked.pop(token, None)
        await self._finished(keys=[record, keys.HELD_BYTES])  # the caps count partial bytes
        if upload.meta.sha256 is not None and digest != upload.meta.sha256.lower():
            await self._redis.delete(record, data)
            await self._redis.zrem(keys.IDLE_UPLOADS, token)
            raise ProtocolError(
                ErrorCode.CHECKSUM_MISMATCH,
                "the bytes received do not hash to the declared sha256; the upload is discarded",
                upload_id=upload.meta.upload_id,
            )
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(record, "complete", 1)
            pipe.expire(record, keys.COMPLETE_UPLOAD_TTL_S)
            pipe.expire(data, keys.COMPLETE_UPLOAD_TTL_S)
            pipe.zrem(keys.IDLE_UPLOADS, token)
            await pipe.execute()
        upload.complete = True
        return FinishedUpload(sha256=digest, image=ImageRef(size=upload.meta.size, key=data))

    async def _hash_stored(self, key: str, size: int) -> str:
        """The SHA-256 of an upload some of whose bytes another gateway received."""
        hasher = hashlib.sha256()
        for start in range(0, size, _HASH_PIECE):
            piece: Any = await self._redis.getrange(key, start, min(size, start + _HASH_PIECE) - 1)
            hasher.update(piece)
        return hasher.hexdigest()

    @unavailable_is_busy
    async def stage_image(self, source: bytes | BinaryIO, size: int) -> FinishedUpload:
        if isinstance(source, bytes):
            data = source
        else:
            data = await asyncio.to_thread(source.read, size)
            if len(data) != size:
                raise ProtocolError(ErrorCode.INVALID_IMAGE, "the file ended early")
        if size > _OFF_LOOP_BYTES:
            digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        else:
            digest = hashlib.sha256(data).hexdigest()
        key = keys.staged_image(secrets.token_hex(16))
        await self._redis.set(key, data, ex=keys.STAGED_IMAGE_TTL_S)
        return FinishedUpload(sha256=digest, image=ImageRef(size=size, key=key))

    @unavailable_is_busy
    async def release(self, image: ImageRef) -> None:
        if image.key is not None:
            await self._redis.delete(image.key)

    @unavailable_is_busy
    async def discard(self, token: str, owner: str) -> None:
        self._tracked.pop(token, None)
        await self._discard(keys=self._keys(token), args=[owner, token])

    @unavailable_is_busy
    async def expire_idle(self, idle_s: float) -> list[RedisUpload]:
        deadline = self._clock() - idle_s
        gone = {raw.decode() for raw in await self._expire(
            keys=[keys.IDLE_UPLOADS, keys.HELD_BYTES], args=[deadline, keys.upload("")])}
        # Another gateway's sweep may have expired an upload this one writes: notice it too.
        tracked = list(self._tracked)
        if tracked:
            async with self._redis.pipeline(transaction=False) as pipe:
                for token in tracked:
                    pipe.exists(keys.upload(token))
                present = await pipe.execute()
            gone.update(token for token, exists in zip(tracked, present, strict=True)
                        if not exists)
        return [upload for token in gone if (upload := self._tracked.pop(token, None))]

    async def held_bytes(self, client: str | None = None) -> int:
        """Bytes of unfinished uploads in Redis: one client's, or (None) every client's."""
        value: Any = await self._redis.hget(keys.HELD_BYTES, "*" if client is None else client)
        return int(value or 0)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        self._tracked.clear()


# Results --------------------------------------------------------------------------------------


class RedisResultCache:
    """Results shared by every gateway, kept ``ttl_s`` seconds."""

    def __init__(self, redis: aioredis.Redis, *, ttl_s: float) -> None:
        self._redis = redis
        self._ttl_ms = max(1, int(ttl_s * 1000))

    @unavailable_is_busy
    async def get(self, key: str) -> dict[str, Any] | None:
        raw = await self._redis.get(keys.result(key))
        value: dict[str, Any] | None = None if raw is None else orjson.loads(raw)
        return value

    @unavailable_is_busy
    async def set(self, key: str, value: dict[str, Any]) -> None:
        await self._redis.set(keys.result(key), orjson.dumps(value), px=self._ttl_ms)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False


class TieredResultCache:
    """An in-process LRU in front of a shared cache: a hit on either level is a hit.

    The shared level being away degrades to the local one (a miss costs a recomputation,
    nothing is lost), so cache trouble never fails a request.
    """

    def __init__(self, front: Any, back: Any) -> None:
        self.front = front
        self.back = back

    async def get(self, key: str) -> dict[str, Any] | None:
        value: dict[str, Any] | None = await self.front.get(key)
        if value is not None:
            return value
        try:
            value = await self.back.get(key)
        except ProtocolError:
            log.warning("shared cache unreachable; answering from the local one")
            return None
        if value is not None:
            await self.front.set(key, value)
        return value

    async def set(self, key: str, value: dict[str, Any]) -> None:
        await self.front.set(key, value)
        try:
            await self.back.set(key, value)
        except ProtocolError:
            log.warning("shared cache unreachable; result kept locally only")

    async def ping(self) -> bool:
        return bool(await self.back.ping())


# Rate limits ------------------------------------------------------------------------------------

_SPEND = """
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
local amount = tonumber(ARGV[1])
if count > 0 and count + amount > tonumber(ARGV[2]) then
  local left = redis.call('PTTL', KEYS[1])
  if left < 1 then left = 1 end
  return left
end
if redis.call('INCRBY', KEYS[1], amount) == amount then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 0
"""

_ENTER = """
local taken = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
if taken > tonumber(ARGV[1]) then
  redis.call('DECR', KEYS[1])
  return 0
end
return 1
"""

_LEAVE = """
if tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then redis.call('DECR', KEYS[1]) end
return 1
"""


class RedisRateLimiter:
    """Fixed windows and concurrency counts shared by all gateways.

    A gateway that dies holding connections leaves its counts behind until their key
    expires (``keys.CONNECTIONS_TTL_S`` after the client's last connect).
    """

    def __init__(self, redis: aioredis.Redis) -> None:
        self._spend = redis.register_script(_SPEND)
        self._enter = redis.register_script(_ENTER)
        self._leave = redis.register_script(_LEAVE)

    @unavailable_is_busy
    async def spend(self, key: str, amount: int, limit: int, window_s: float) -> int:
        wait = await self._spend(keys=[keys.rate(key)],
                                 args=[amount, limit, max(1, int(window_s * 1000))])
        return int(wait)

    @unavailable_is_busy
    async def enter(self, key: str, limit: int) -> bool:
        return bool(await self._enter(keys=[keys.rate(key)],
                                      args=[limit, keys.CONNECTIONS_TTL_S]))

    @unavailable_is_busy
    async def leave(self, key: str) -> None:
        await self._leave(keys=[keys.rate(key)])
