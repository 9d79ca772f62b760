"""The backends' contracts: small Protocols with an in-memory default and a Redis implementation.

One contract test suite (``tests/server/storage/test_contract.py``) runs against every
implementation, so they stay interchangeable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from chunking.messages import Chunk
from chunking.reassembler import ChunkEvent

if TYPE_CHECKING:
    from server.pipeline.jobs import Ticket, TileSpec


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
    client: str | None = None
    """Whose budgets it spends (the principal, else the address): the shared store's byte
    caps count its bytes against this client."""


@dataclass(frozen=True)
class ImageRef:
    """Where a worker finds an image's bytes: a spool file on this machine, a key in the
    shared store, or the bytes themselves (small camera frames)."""

    size: int
    path: str | None = None
    data: bytes | None = None
    key: str | None = None


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

    @property
    def complete(self) -> bool:
        """Every byte is in and the upload was handed to analysis (see ``finish``)."""

    @property
    def local_path(self) -> str | None:
        """The file on this machine the bytes are written into, in order, as they arrive
        (a worker may read it meanwhile); None when the store keeps them elsewhere."""


class UploadStore(Protocol):
    """Partial uploads, addressed by resume token, owned by one socket at a time.

    ``owner`` names the socket (any unique string). :meth:`claim` moves an upload to a new
    owner; from then on the old owner's :meth:`write` calls fail with ``unknown_upload``.
    """

    async def create(self, meta: UploadMeta, owner: str) -> UploadHandle:
        """Store a new, empty upload; its buffer is reserved but not yet touched."""

    async def claim(
        self, token: str, owner: str, check: Callable[[UploadHandle], None] | None = None
    ) -> UploadHandle:
        """Take an upload over. Raises ProtocolError(unknown_upload) for an unknown token.

        ``check`` sees the upload before ownership moves and may refuse it by raising (a
        wrong principal, a size that does not match): a refused claim changes nothing.
        """

    async def write(self, handle: UploadHandle, owner: str, chunk: Chunk) -> ChunkEvent:
        """Apply one chunk by PROTOCOL.md's offset rules (see chunking.reassembler)."""

    async def finish(self, handle: UploadHandle) -> FinishedUpload:
        """Verify the checksum of a complete upload and hand its bytes over for analysis.

        Raises ProtocolError(checksum_mismatch) after discarding the upload. Afterwards the
        token still names the upload, now ``complete`` (so a resume can follow its analysis),
        until :meth:`discard`; the returned image must be freed with :meth:`release` once
        analysed.
        """

    async def stage_image(self, source: bytes | BinaryIO, size: int) -> FinishedUpload:
        """Store a whole image that arrived in one piece (HTTP) where workers can read it,
        hashing it on the way. Free it with :meth:`release`."""

    async def release(self, image: ImageRef) -> None:
        """Free an image handed out by :meth:`finish` or :meth:`stage_image`."""

    async def discard(self, token: str, owner: str) -> None:
        """Forget an upload and free its bytes, if ``owner`` still owns it (an upload taken
        over by another socket is that socket's to discard); unknown tokens are ignored."""

    async def expire_idle(self, idle_s: float) -> Sequence[UploadHandle]:
        """Discard partial uploads that saw no write for ``idle_s`` seconds; return those this
        process was tracking."""

    async def ping(self) -> bool:
        """True when the store is reachable (for /readyz)."""

    async def close(self) -> None:
        """Free what this process holds (at shutdown)."""


class ResultCache(Protocol):
    """Analysis results by key (image hash, task, options, model)."""

    async def get(self, key: str) -> dict[str, Any] | None: ...

    async def set(self, key: str, value: dict[str, Any]) -> None: ...

    async def ping(self) -> bool:
        """True when the cache is reachable (for /readyz)."""


class JobQueue(Protocol):
    """Jobs waiting for inference workers, and their events back.

    :meth:`submit` never blocks: the job's events (queue position, stages, outcome) arrive on
    the returned Ticket. A queue that cannot take the job answers on the Ticket too.
    """

    max_queue: int
    startup_error: str | None

    @property
    def depth(self) -> int:
        """Jobs waiting (as last known: shared queues are sampled)."""

    @property
    def ready(self) -> bool:
        """At least one worker has its models loaded."""

    @property
    def workers_ready(self) -> int: ...

    @property
    def unserved_tasks(self) -> list[str]:
        """The offered tasks that no ready worker serves now (as last known)."""

    def check_served(self, task: str) -> None:
        """Raise ProtocolError(busy) when a job of ``task`` would wait for a worker that may
        never come (none serves it now, and none is on its way)."""

    def submit(
        self, task: str, options: dict[str, Any], image: ImageRef, max_pixels: int,
        *, job_id: str | None = None, tile: TileSpec | None = None,
    ) -> Ticket:
        """Queue a job. Raises ProtocolError(busy) when the queue is full (never for a tile
        of an upload admitted already)."""

    def attach(self, job_id: str) -> Ticket:
        """Follow a job that another gateway submitted (its owner socket moved here)."""

    def retry_after_ms(self) -> int:
        """A back-off hint for ``busy`` answers."""

    async def start(self) -> None: ...

    async def stop(self, grace_s: float = 10.0) -> None: ...


class RateLimiter(Protocol):
    """Budgets shared by every gateway that shares the backend.

    ``key`` names a client (a token's principal or an address) and what is counted.
    """

    async def spend(self, key: str, amount: int, limit: int, window_s: float) -> int:
        """Count ``amount`` against ``limit`` per ``window_s``. Returns 0 when within budget
        (the amount is counted), else the milliseconds until it would fit (nothing counted)."""

    async def enter(self, key: str, limit: int) -> bool:
        """Take one of ``limit`` concurrent places (a connection); False when all are taken."""

    async def leave(self, key: str) -> None:
        """Give a place taken by :meth:`enter` back."""
