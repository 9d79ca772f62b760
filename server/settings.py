"""Settings: embedded defaults, overridden by ``PIXELSTREAM_*`` variables, then by CLI flags.

Every field can be set from the environment as ``PIXELSTREAM_<FIELD NAME IN CAPITALS>``
(``PIXELSTREAM_MAX_CHUNK_BYTES=1048576``, ``PIXELSTREAM_API_TOKENS=a,b``); lists are
comma-separated. :func:`Settings.from_env` reads them and refuses values it cannot parse,
naming the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

from chunking.limits import Limits
from server.tuning import machine_plan

ENV_PREFIX = "PIXELSTREAM_"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000

    # Protocol limits (announced in welcome).
    max_image_bytes: int = 256 * 1024 * 1024
    max_chunk_bytes: int = 4 * 1024 * 1024
    max_pixels: int = 178_956_970
    max_uploads: int = 8
    window_bytes: int = 16 * 1024 * 1024

    # Inference.
    model: str | None = None
    """The ``classify`` task's model: an image-classification folder or hub id; None: the
    bundled default."""
    tasks: Path | None = None
    """A tasks file (TOML) adding or replacing tasks: see README, "Serve your own model"."""
    device: str = "auto"
    """Where models run: auto (CUDA where there is one, else CPU), cpu, cuda or cuda:N."""
    workers: int = field(default_factory=lambda: machine_plan().workers)
    """Inference worker processes; default: one per usable core, up to 8
    (:func:`server.tuning.plan_for`)."""
    torch_threads: int = 0
    """Threads per worker for torch; 0: the cores but one, divided among the workers (at
    least one)."""
    max_batch_size: int = field(default_factory=lambda: machine_plan().max_batch_size)
    """Jobs per batch; default: 4 per torch thread (up to 16). MobileNetV2 on one CPU thread
    does most images/s at batch 4 (batch 8 spills the cache; bench.inference)."""
    max_wait_ms: float = 5.0
    """How long a batch may wait for more jobs once a worker is free for it."""
    max_queue: int = 128
    """Jobs waiting for a worker beyond which new work is answered ``busy``."""

    # Uploads and results.
    upload_idle_timeout_s: float = 600.0
    """A partial upload that sees no chunk for this long is discarded."""
    spool_dir: Path | None = None
    """Where upload buffers live (memory-mapped files); None: /dev/shm when it has room."""
    cache_entries: int = 1024
    """Results kept in the in-memory LRU cache; 0 disables it."""

    # Security and fairness.
    api_tokens: tuple[str, ...] = ()
    """When set, every WebSocket and analyze request needs one of these tokens."""
    api_tokens_file: Path | None = None
    """A file of SHA-256 hashes (hex) of accepted tokens, one a line, ``#`` comments; read at
    start, in addition to ``api_tokens``."""
    admin_token: str | None = None
    """Enables the admin routes (``/v1/admin/...``: model rollouts) for requests bearing it;
    unset, they answer 404."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins allowed to open the WebSocket; empty: the server's own origin only."""
    allowed_hosts: tuple[str, ...] = ()
    """Names the server answers to (a request's ``Host``) besides localhost names, loopback
    addresses and the address it listens on (any address when it listens on all): a name,
    ``.example.com`` for it and every name under it, or ``*`` for any. Other names are refused
    (``forbidden_host``): that is what keeps DNS-rebinding pages out."""
    messages_per_second: float = 1000.0
    message_burst: int = 2000
    """Per-socket token bucket over every inbound message, bad ones included."""
    socket_bytes_per_second: int = 256 * 1024 * 1024
    """Per-socket token bucket over inbound message bytes (bursts of a second's worth, at least
    one largest message)."""
    memory_budget_bytes: int = 1024 * 1024 * 1024
    """Bytes this process may hold for clients: the bytes uploads received into its spool and
    HTTP bodies (reserved as they arrive; a quarter per client), frames waiting, messages being
    handled. What does not fit is answered ``busy``; while messages and frames take it over,
    sockets are not read."""
    socket_idle_timeout_s: float = 300.0
    """A socket that sends no complete message for this long, while the server owes it no
    reply, is closed with code 1001."""
    ws_ping_interval_s: float = 20.0
    """WebSocket pings this often; a peer that does not answer one within the same time is
    dropped (this also bounds how long one message may take to arrive)."""
    http_header_timeout_s: float = 10.0
    """An HTTP request's head (request line and headers) must arrive within this."""
    http_body_timeout_s: float = 300.0
    """An HTTP analyze request's body must arrive within this (else 408)."""

    max_connections_per_client: int = 64
    uploads_per_minute: int = 1200
    bytes_per_minute: int = 0
    """Per-client budgets (a token, else an address), shared across replicas; 0: no limit."""
    forwarded_allow_ips: str = "127.0.0.1"
    """Proxies whose X-Forwarded-For names the client (uvicorn's setting; "*" trusts all)."""

    # Scale-out (see README: Redis).
    redis_url: str | None = None
    """Redis for shared uploads, results, jobs and rate limits; None: everything in-process."""
    redis_upload_bytes: int = 0
    """Bytes of unfinished uploads all gateways together may keep in Redis; 0: as many as
    memory_budget_bytes. One client may keep a quarter of it (half, when a largest upload
    needs more); a chunk past either cap is answered ``busy``."""
    result_ttl_s: float = 86400.0
    """How long results stay in the shared (Redis) cache."""
    claim_idle_ms: int = 15000
    """A job held this long by a silent worker is taken over by another (Redis queue)."""

    # Reliability.
    job_timeout_s: float = 120.0
    """An in-process worker that holds a batch longer than this per job is killed and
    replaced; its jobs are retried once (then ``internal``). 0 disables the deadline."""
    shutdown_grace_s: float = 10.0
    """On shutdown, requests and running jobs get this long to finish (twice, at most: HTTP
    requests, then the workers' current batches)."""

    readiness: str = "all-tasks"
    """When ``/readyz`` is 200: ``all-tasks``, once every task has a worker (strict, as an
    inference server's readiness usually is); ``any-task``, once any has, so that a gateway
    whose other tasks still work stays in its load balancer while one task lacks workers
    (that task's jobs are answered ``busy``). ``tasks_without_workers`` lists them in both."""

    log_level: str = "info"
    log_format: str = "text"
    """``text`` or ``json`` (one object per line: time, level, logger, message, ids)."""

    def __post_init__(self) -> None:
        self.limits  # noqa: B018 -- validates the limit fields early
        for name in ("max_batch_size", "max_queue", "message_burst", "socket_bytes_per_second",
                     "memory_budget_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("workers", "max_connections_per_client", "uploads_per_minute",
                     "bytes_per_minute", "claim_idle_ms", "redis_upload_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.workers < 1 and self.redis_url is None:
            raise ValueError("workers must be at least 1 without redis_url: nothing would run jobs")
        if not self.result_ttl_s > 0:
            raise ValueError("result_ttl_s must be positive")
        if not (self.max_wait_ms >= 0 and self.messages_per_second > 0):  # NaN fails too
            raise ValueError("max_wait_ms must be >= 0 and messages_per_second > 0")
        for name in ("socket_idle_timeout_s", "ws_ping_interval_s", "http_header_timeout_s",
                     "http_body_timeout_s", "shutdown_grace_s"):
            if not getattr(self, name) > 0:  # NaN fails too
                raise ValueError(f"{name} must be positive")
        if not self.job_timeout_s >= 0:
            raise ValueError("job_timeout_s must not be negative")
        if not _DEVICE.match(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.readiness not in ("all-tasks", "any-task"):
            raise ValueError(f"readiness must be 'all-tasks' or 'any-task', not "
                             f"{self.readiness!r}")
        if self.log_format not in ("text", "json"):
            raise ValueError("log_format must be 'text' or 'json'")

    @property
    def limits(self) -> Limits:
        return Limits(
            max_image_bytes=self.max_image_bytes,
            max_chunk_bytes=self.max_chunk_bytes,
            max_pixels=self.max_pixels,
            max_uploads=self.max_uploads,
            window_bytes=self.window_bytes,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``PIXELSTREAM_*`` variables, then ``overrides`` (None values skipped)."""
        environ = os.environ if environ is None else environ
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f.name, hints[f.name], raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def _parse(name: str, kind: Any, raw: str) -> Any:
    variable = ENV_PREFIX + name.upper()
    text = raw.strip()
    try:
        if kind in (int, float):
            value = kind(text)
            if value != value:  # NaN passes every range check, and disables rate limits
                raise ValueError("not a number")
            return value
        if kind == str | None:
            return text or None
        if kind == Path | None:
            return Path(text) if text else None
        if kind == tuple[str, ...]:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        if kind is str:
            return text
    except ValueError:
        raise ValueError(f"{variable}={raw!r} is not a valid {kind.__name__}") from None
    raise TypeError(f"no parser for setting {name}")  # a field type this function lacks

