"""The embedded backends: uploads in spool files of this process, results in an LRU dict."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chunking.errors import ErrorCode, ProtocolError
from chunking.messages import Chunk
from chunking.reassembler import ChunkEvent, Reassembler
from server.pipeline.spool import Spool, SpoolFile
from server.storage.base import FinishedUpload, ImageRef, UploadMeta


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
    last_write: float
    _released: bool = field(default=False, repr=False)

    @property
    def received(self) -> int:
        return self.reassembler.received


def unknown_upload(upload_id: str | None, why: str) -> ProtocolError:
    return ProtocolError(ErrorCode.UNKNOWN_UPLOAD, why, upload_id=upload_id)


class MemoryUploadStore:
    """Partial uploads of this process. ``clock`` is injectable for expiry tests."""

    def __init__(self, spool: Spool, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._spool = spool
        self._clock = clock
        self._uploads: dict[str, MemoryUpload] = {}
        self._finished: dict[str, SpoolFile] = {}  # path -> file, until released

    def __len__(self) -> int:
        return len(self._uploads)

    @property
    def bytes_held(self) -> int:
        return sum(u.received for u in self._uploads.values())

    async def create(self, meta: UploadMeta, owner: str) -> MemoryUpload:
        spool_file = self._spool.allocate(meta.size)
        assert spool_file.buffer is not None
        reassembler = Reassembler(
            meta.size, upload_id=meta.upload_id, sha256=meta.sha256, buffer=spool_file.buffer
        )
        upload = MemoryUpload(
            token=new_resume_token(),
            meta=meta,
            owner=owner,
            spool_file=spool_file,
            reassembler=reassembler,
            last_write=self._clock(),
        )
        self._uploads[upload.token] = upload
        return upload

    async def claim(self, token: str, owner: str) -> MemoryUpload:
        upload = self._uploads.get(token)
        if upload is None:
            raise unknown_upload(None, "the resume token names no live upload")
        upload.owner = owner
        upload.last_write = self._clock()
        return upload

    async def write(self, handle: Any, owner: str, chunk: Chunk) -> ChunkEvent:
        upload: MemoryUpload = handle
        if upload.owner != owner or self._uploads.get(upload.token) is not upload:
            raise unknown_upload(chunk.id, "this upload was taken over by another connection")
        event = upload.reassembler.receive(chunk)
        upload.last_write = self._clock()
        return event

    async def finish(self, handle: Any) -> FinishedUpload:
        upload: MemoryUpload = handle
        if self._uploads.get(upload.token) is not upload:  # finished, discarded or expired
            raise unknown_upload(upload.meta.upload_id, "this upload is no longer held")
        try:
            digest = upload.reassembler.finish()  # an incomplete upload stays held
        except ProtocolError:
            del self._uploads[upload.token]
            self._free(upload)
            raise
        del self._uploads[upload.token]
        upload.reassembler.release()
        spool_file = upload.spool_file
        self._finished[str(spool_file.path)] = spool_file
        return FinishedUpload(sha256=digest, image=ImageRef(size=upload.meta.size,
                                                            path=str(spool_file.path)))

    async def release(self, image: ImageRef) -> None:
        if image.path is not None:
            spool_file = self._finished.pop(image.path, None)
            if spool_file is not None:
                spool_file.close()

    async def discard(self, token: str) -> None:
        upload = self._uploads.pop(token, None)
        if upload is not None:
            self._free(upload)

    async def expire_idle(self, idle_s: float) -> list[MemoryUpload]:
        deadline = self._clock() - idle_s
        expired = [u for u in self._uploads.values() if u.last_write <= deadline]
        for upload in expired:
            del self._uploads[upload.token]
            self._free(upload)
        return expired

    async def close(self) -> None:
        for upload in list(self._uploads.values()):
            self._free(upload)
        self._uploads.clear()
        for spool_file in self._finished.values():
            spool_file.close()
        self._finished.clear()

    @staticmethod
    def _free(upload: MemoryUpload) -> None:
        upload.reassembler.release()
        upload.spool_file.close()


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
