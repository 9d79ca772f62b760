"""Prometheus metrics, one registry per app (so several apps can live in one test process)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

if TYPE_CHECKING:
    from server.limits import MemoryBudget

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.active_sockets = Gauge(
            "pixelstream_active_sockets", "Open WebSocket connections", registry=r
        )
        self.uploads = Counter(
            "pixelstream_uploads", "Uploads by outcome", ["outcome"], registry=r
        )
        self.upload_bytes = Counter(
            "pixelstream_upload_bytes", "Image bytes received in chunks", registry=r
        )
        self.frames = Counter(
            "pixelstream_frames", "Camera frames by outcome", ["outcome"], registry=r
        )
        self.errors = Counter(
            "pixelstream_errors", "Error messages sent, by code", ["code"], registry=r
        )
        self.http_requests = Counter(
            "pixelstream_http_analyze_requests", "HTTP analyze requests by status", ["status"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "pixelstream_queue_depth", "Jobs waiting for an inference worker", registry=r
        )
        self.workers_ready = Gauge(
            "pixelstream_workers_ready", "Inference workers with their models loaded", registry=r
        )
        self.task_queue_depth = Gauge(
            "pixelstream_task_queue_depth", "Jobs waiting for an inference worker, by task",
            ["task"], registry=r,
        )
        self.task_workers_ready = Gauge(
            "pixelstream_task_workers_ready", "Inference workers that serve a task, by task",
            ["task"], registry=r,
        )
        self.stage_seconds = Histogram(
            "pixelstream_stage_seconds", "Time spent per stage", ["stage"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "pixelstream_batch_size", "Jobs per inference batch",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64), registry=r,
        )
        self.tiles = Counter(
            "pixelstream_tiles", "Full-resolution tiles queued for spatial tasks", registry=r,
        )
        self.handshake_refusals = Counter(
            "pixelstream_handshake_refusals", "WebSocket handshakes refused, by reason",
            ["reason"], registry=r,
        )
        self.sockets_closed = Counter(
            "pixelstream_sockets_closed", "WebSocket connections ended, by why", ["reason"],
            registry=r,
        )
        self.memory_held = Gauge(
            "pixelstream_memory_held_bytes",
            "Bytes held for clients against memory_budget_bytes", registry=r,
        )
        self.reads_paused = Gauge(
            "pixelstream_reads_paused",
            "Sockets not being read because the memory budget is spent", registry=r,
        )
        self.worker_restarts = Counter(
            "pixelstream_worker_restarts", "Inference workers replaced, by why", ["reason"],
            registry=r,
        )
        self._stage_seconds: dict[str, Any] = {}
        self.cache = Counter(
            "pixelstream_cache_lookups", "Result cache lookups by outcome", ["outcome"],
            registry=r,
        )

    def watch_memory(self, budget: MemoryBudget) -> None:
        """Report ``budget``'s bytes held and readers paused, read when scraped (they change
        several times per message: a gauge update each time costs more than the scrape)."""
        self.memory_held.set_function(lambda: budget.held)
        self.reads_paused.set_function(lambda: budget.waiting)

    def observe_timings(self, timings_ms: dict[str, float]) -> None:
        stages = self._stage_seconds
        for stage, ms in timings_ms.items():
            histogram = stages.get(stage)
            if histogram is None:  # labels() checks and locks on every call: once per stage
                histogram = stages[stage] = self.stage_seconds.labels(stage)
            histogram.observe(ms / 1000)

    def render(self) -> bytes:
        return generate_latest(self.registry)
