"""The backends' contracts: small Protocols with an in-memory default and a Redis implementation.

One contract test suite (``tests/server/storage/test_contract.py``) runs against every
implementation, so they stay interchangeable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from chunking.messages import Chunk
from chunking.reassembler import ChunkEvent


@dataclass(frozen=True)
class UploadMeta:
    """What an ``upload`` message declared, fixed for the upload's life."""

    upload_id: str
    size: int
    task: str
    options: dict[str, Any] = field(default_factory=dict)
    sha256: str | None = None
    name: str | None = None
    principal: str | None = None
    """Who created it (a token's identity); only the same principal may resume it."""


@dataclass(frozen=True)
class ImageRef:
    """Where a worker finds an image's bytes: a spool file, or the bytes themselves."""

    size: int
    path: str | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class FinishedUpload:
    sha256: str
    image: ImageRef


class UploadHandle(Protocol):
    """One stored upload, as its current owner sees it."""

    @property
    def token(self) -> str: ...

    @property
    def meta(self) -> UploadMeta: ...

    @property
    def received(self) -> int: ...


class UploadStore(Protocol):
    """Partial uploads, addressed by resume token, owned by one socket at a time.

    ``owner`` names the socket (any unique string). :meth:`claim` moves an upload to a new
    owner; from then on the old owner's :meth:`write` calls fail with ``unknown_upload``.
    """

    async def create(self, meta: UploadMeta, owner: str) -> UploadHandle:
        """Store a new, empty upload; its buffer is reserved but not yet touched."""

    async def claim(self, token: str, owner: str) -> UploadHandle:
        """Take an upload over. Raises ProtocolError(unknown_upload) for an unknown token."""

    async def write(self, handle: UploadHandle, owner: str, chunk: Chunk) -> ChunkEvent:
        """Apply one chunk by PROTOCOL.md's offset rules (see chunking.reassembler)."""

    async def finish(self, handle: UploadHandle) -> FinishedUpload:
        """Verify the checksum of a complete upload and hand its bytes over for analysis.

        Raises ProtocolError(checksum_mismatch) after discarding the upload. After this call
        the store no longer holds the upload (its token names nothing); the returned image
        must be released with :meth:`release` once analysed.
        """

    async def release(self, image: ImageRef) -> None:
        """Free an image handed out by :meth:`finish`."""

    async def discard(self, token: str) -> None:
        """Forget an upload and free its bytes; unknown tokens are ignored."""

    async def expire_idle(self, idle_s: float) -> Sequence[UploadHandle]:
        """Discard partial uploads that saw no write for ``idle_s`` seconds; return them."""

    async def close(self) -> None:
        """Free everything (at shutdown)."""


class ResultCache(Protocol):
    """Analysis results by key (image hash, task, options, model)."""

    async def get(self, key: str) -> dict[str, Any] | None: ...

    async def set(self, key: str, value: dict[str, Any]) -> None: ...

    async def ping(self) -> bool:
        """True when the cache is reachable (for /readyz)."""
