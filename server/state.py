"""What the app's transports share: settings, backends, the upload service."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chunking.limits import Limits
from server.analysis import AnalysisService
from server.limits import ClientLimits, KeyedBuckets, MemoryBudget
from server.metrics import Metrics
from server.settings import Settings
from server.storage.base import UploadStore
from server.storage.locks import MemoryLocker, UploadLocker
from server.uploads import LiveUpload, UploadService

if TYPE_CHECKING:
    from server.protocol import ServerConnection


@dataclass(eq=False)
class AppState:
    settings: Settings
    limits: Limits
    metrics: Metrics
    store: UploadStore
    service: AnalysisService
    http_buckets: KeyedBuckets
    client_limits: ClientLimits
    budget: MemoryBudget
    uploads_in_memory: bool = True
    """The upload store keeps bytes in this process (spool files), so uploads reserve their
    size in ``budget``; with Redis they live there and only messages and frames count."""
    background: set[asyncio.Task[None]] = field(default_factory=set)
    sessions: set[ServerConnection] = field(default_factory=set)
    """The open sockets' connections."""
    stopping: bool = False
    """Set at shutdown: with a shared queue, analyses are then handed back, not ended."""
    upload_locker: UploadLocker = field(default_factory=MemoryLocker)
    """One writer per upload at a time (Redis-backed when gateways share Redis)."""
    uploads: UploadService = field(init=False)
    """The one upload service every transport goes through."""

    def __post_init__(self) -> None:
        self.uploads = UploadService(self)

    @property
    def live(self) -> dict[str, LiveUpload]:
        """Uploads of this process from creation until their outcome is delivered, by token."""
        return self.uploads.live

    def spawn(self, coroutine: object, name: str) -> asyncio.Task[None]:
        """Run a task that outlives the socket that started it, keeping a reference."""
        task: asyncio.Task[None] = asyncio.create_task(coroutine, name=name)  # type: ignore[arg-type]
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task
