"""The embedded backends: uploads in spool files of this process, results in an LRU dict."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import mmap
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from chunking.errors import ErrorCode, ProtocolError
from chunking.messages import Chunk
from chunking.reassembler import Appended, ChunkEvent, Reassembler, Replayed, is_append
from server.pipeline.spool import Spool, SpoolFile
from server.storage.base import FinishedUpload, ImageRef, UploadMeta
from server.storage.hashing import BackgroundHasher

_OFF_LOOP_BYTES = 1 << 20
"""Images larger than this are copied and hashed in a thread, off the event loop."""

OFF_LOOP_CHUNK_BYTES = 256 * 1024
"""Chunks at least this large are written (``os.pwrite``) and hashed in a thread: both release
the GIL, so the event loop reads the socket meanwhile. Smaller ones cost less than the hop."""

_IO_THREADS = min(4, os.cpu_count() or 1)


def new_resume_token() -> str:
    """An unguessable capability (192 random bits, URL-safe)."""
    return secrets.token_urlsafe(24)


@dataclass(eq=False)
class MemoryUpload:
    token: str
    meta: UploadMeta
    owner: str
    spool_file: SpoolFile
    reassembler: Reassembler
    hasher: BackgroundHasher
    last_write: float
    complete: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held by a write: one chunk at a time, whichever socket sends it."""
    writing: concurrent.futures.Future[ChunkEvent] | None = None
    """A write running in a thread (it may outlive a cancelled caller)."""
    in_thread: bool = False
    freed: bool = False
    guard: threading.Lock = field(default_factory=threading.Lock)
    """Guards ``in_thread`` and ``freed``: whichever of the thread and :meth:`free` comes
    last closes the file, so a descriptor is never closed (and reused) under a write."""

    @property
    def received(self) -> int:
        return self.reassembler.received

    @property
    def local_path(self) -> str:
        return str(self.spool_file.path)

    async def settled(self) -> None:
        """Wait for a write left running in a thread by a cancelled caller."""
        writing = self.writing
        if writing is not None and not writing.done():
            await asyncio.wait([asyncio.wrap_future(writing)])

    def receive_in_thread(self, chunk: Chunk) -> ChunkEvent:
        """:meth:`Reassembler.receive` on an I/O thread (``in_thread`` set by the caller)."""
        try:
            return self.reassembler.receive(chunk)
        finally:
            with self.guard:
                self.in_thread = False
                if self.freed:
                    self._close()

    def free(self) -> None:
        """Unmap and delete the file now, or when the write in a thread ends."""
        with self.guard:
            self.freed = True
            if not self.in_thread:
                self._close()

    def _close(self) -> None:
        self.reassembler.release()
        self.spool_file.close()


def unknown_upload(upload_id: str | None, why: str) -> ProtocolError:
    return ProtocolError(ErrorCode.UNKNOWN_UPLOAD, why, upload_id=upload_id)


def copy_hashing(source: bytes | BinaryIO, target: mmap.mmap | bytearray, size: int) -> str:
    """Copy an image of ``size`` bytes into ``target``, returning its SHA-256 (hex)."""
    hasher = hashlib.sha256()
    if isinstance(source, bytes):
        if len(source) != size:
            raise ValueError("size does not match the data")
        target[:] = source
        hasher.update(source)
        return hasher.hexdigest()
    view = memoryview(target)
    try:
        offset = 0
        while offset < size:
            read = source.readinto(view[offset : offset + (1 << 20)])  # type: ignore[attr-defined]
            if not read:
                raise ProtocolError(ErrorCode.INVALID_IMAGE, "the file ended early")
            hasher.update(view[offset : offset + read])
            offset += read
    finally:
        view.release()
    return hasher.hexdigest()


class MemoryUploadStore:
    """Uploads of this process, in spool files. ``clock`` is injectable for expiry tests."""

    def __init__(self, spool: Spool, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._spool = spool
        self._clock = clock
        self._io = concurrent.futures.ThreadPoolExecutor(_IO_THREADS, "upload-io")
        self._uploads: dict[str, MemoryUpload] = {}
        self._images: dict[str, SpoolFile] = {}  # path -> file handed out, until released

    def __len__(self) -> int:
        return len(self._uploads)

    @property
    def bytes_held(self) -> int:
        return sum(u.received for u in self._uploads.values() if not u.complete)

    async def create(self, meta: UploadMeta, owner: str) -> MemoryUpload:
        spool_file = self._spool.allocate(meta.size)
        assert spool_file.buffer is not None
        hasher = BackgroundHasher(self._io)
        reassembler = Reassembler(
            meta.size, upload_id=meta.upload_id, sha256=meta.sha256, buffer=spool_file.buffer,
            writer=spool_file.write_at, hasher=hasher,
        )
        upload = MemoryUpload(
            token=new_resume_token(),
            meta=meta,
            owner=owner,
            spool_file=spool_file,
            reassembler=reassembler,
            hasher=hasher,
            last_write=self._clock(),
        )
        self._uploads[upload.token] = upload
        return upload

    async def claim(
        self, token: str, owner: str, check: Callable[[Any], None] | None = None
    ) -> MemoryUpload:
        upload = self._uploads.get(token)
        if upload is None:
            raise unknown_upload(None, "the resume token names no live upload")
        if check is not None:
            check(upload)
        upload.owner = owner
        upload.last_write = self._clock()
        return upload

    async def write(self, handle: Any, owner: str, chunk: Chunk) -> ChunkEvent:
        upload: MemoryUpload = handle
        async with upload.lock:
            await upload.settled()
            if upload.owner != owner or self._uploads.get(upload.token) is not upload:
                raise unknown_upload(chunk.id, "this upload was taken over by another connection")
            if upload.complete:
                # Every byte is in and the buffer belongs to the analysis: only replays remain.
                size = upload.meta.size
                if not is_append(chunk, size, size):
                    return Replayed(received=size, total=size)
            if len(chunk.data) < OFF_LOOP_CHUNK_BYTES:
                event = upload.reassembler.receive(chunk)
            else:
                upload.in_thread = True
                try:
                    upload.writing = self._io.submit(upload.receive_in_thread, chunk)
                except BaseException:
                    upload.in_thread = False
                    raise
                event = await asyncio.wrap_future(upload.writing)
            if isinstance(event, Appended) and event.complete:
                # The last byte is acknowledged only once every byte is hashed too.
                await upload.hasher.wait()
            if chunk.data:  # an empty chunk is no activity: it cannot keep an upload alive
                upload.last_write = self._clock()
            return event

    async def finish(self, handle: Any) -> FinishedUpload:
        upload: MemoryUpload = handle
        await upload.settled()
        await upload.hasher.wait()
        if self._uploads.get(upload.token) is not upload or upload.complete:
            raise unknown_upload(upload.meta.upload_id, "this upload is no longer held")
        try:
            digest = upload.reassembler.finish()  # an incomplete upload stays held
        except ProtocolError:
            del self._uploads[upload.token]
            self._free(upload)
            raise
        upload.complete = True
        upload.reassembler.release()
        spool_file = upload.spool_file
        self._images[str(spool_file.path)] = spool_file
        return FinishedUpload(sha256=digest, image=ImageRef(size=upload.meta.size,
                                                            path=str(spool_file.path)))

    async def stage_image(self, source: bytes | BinaryIO, size: int) -> FinishedUpload:
        spool_file = self._spool.allocate(size)
        assert spool_file.buffer is not None
        try:
            if size > _OFF_LOOP_BYTES:
                digest = await asyncio.to_thread(copy_hashing, source, spool_file.buffer, size)
            else:
                digest = copy_hashing(source, spool_file.buffer, size)
        except BaseException:
            spool_file.close()
            raise
        self._images[str(spool_file.path)] = spool_file
        return FinishedUpload(sha256=digest, image=ImageRef(size=size, path=str(spool_file.path)))

    async def release(self, image: ImageRef) -> None:
        if image.path is not None:
            spool_file = self._images.pop(image.path, None)
            if spool_file is None:
                return
            if spool_file.size < _OFF_LOOP_BYTES:
                spool_file.close()
                return
            # Unmapping and unlinking a large tmpfs file frees its pages: milliseconds
            # (3-4 ms for 64 MiB here) that the loop spends reading sockets instead.
            try:
                closing = self._io.submit(spool_file.close)
            except RuntimeError:  # the store is closing: its executor takes no more work
                spool_file.close()
                return
            await asyncio.wrap_future(closing)

    async def discard(self, token: str, owner: str) -> None:
        upload = self._uploads.get(token)
        if upload is None or upload.owner != owner:
            return
        del self._uploads[token]
        if not upload.complete:
            self._free(upload)  # a complete upload's file is freed by release()

    async def expire_idle(self, idle_s: float) -> list[MemoryUpload]:
        deadline = self._clock() - idle_s
        expired = [u for u in self._uploads.values()
                   if not u.complete and u.last_write <= deadline]
        for upload in expired:
            del self._uploads[upload.token]
            self._free(upload)
        return expired

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        for upload in list(self._uploads.values()):
            if not upload.complete:
                self._free(upload)
        self._uploads.clear()
        for spool_file in self._images.values():
            spool_file.close()
        self._images.clear()
        self._io.shutdown(wait=True)

    @staticmethod
    def _free(upload: MemoryUpload) -> None:
        upload.free()


class LruResultCache:
    """At most ``max_entries`` results; the least recently used goes first."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> dict[str, Any] | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    async def set(self, key: str, value: dict[str, Any]) -> None:
        if self.max_entries <= 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def ping(self) -> bool:
        return True


class MemoryRateLimiter:
    """Fixed-window budgets and concurrency counts of this process."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[str, tuple[int, float]] = {}  # key -> (count, window end)
        self._places: dict[str, int] = {}

    async def spend(self, key: str, amount: int, limit: int, window_s: float) -> int:
        now = self._clock()
        count, ends = self._windows.get(key, (0, 0.0))
        if now >= ends:
            count, ends = 0, now + window_s
            if len(self._windows) > 100_000:  # forget windows that have ended
                self._windows = {k: v for k, v in self._windows.items() if v[1] > now}
        if count + amount > limit and count > 0:
            return max(1, int((ends - now) * 1000))
        self._windows[key] = (count + amount, ends)
        return 0

    async def enter(self, key: str, limit: int) -> bool:
        taken = self._places.get(key, 0)
        if taken >= limit:
            return False
        self._places[key] = taken + 1
        return True

    async def leave(self, key: str) -> None:
        taken = self._places.get(key, 0) - 1
        if taken > 0:
            self._places[key] = taken
        else:
            self._places.pop(key, None)
