"""For every setting: a value as text (a flag's or a variable's) and the value it must become.

Shared by the settings and CLI tests, which each check that it covers every field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SETTING_CASES: dict[str, tuple[str, Any]] = {
    "host": ("0.0.0.0", "0.0.0.0"),
    "port": ("9001", 9001),
    "max_image_bytes": ("1048576", 1048576),
    "max_chunk_bytes": ("65536", 65536),
    "max_pixels": ("1000000", 1_000_000),
    "max_uploads": ("3", 3),
    "window_bytes": ("262144", 262144),
    "model": ("/models/vit", "/models/vit"),
    "tasks": ("/etc/pixelstream/tasks.toml", Path("/etc/pixelstream/tasks.toml")),
    "device": ("cuda:1", "cuda:1"),
    "workers": ("4", 4),
    "torch_threads": ("2", 2),
    "max_batch_size": ("16", 16),
    "max_wait_ms": ("2.5", 2.5),
    "max_queue": ("7", 7),
    "upload_idle_timeout_s": ("30", 30.0),
    "spool_dir": ("/var/spool/pixelstream", Path("/var/spool/pixelstream")),
    "cache_entries": ("0", 0),
    "api_tokens": ("alpha, beta,", ("alpha", "beta")),
    "api_tokens_file": ("/etc/pixelstream/tokens", Path("/etc/pixelstream/tokens")),
    "admin_token": ("s3cret", "s3cret"),
    "allowed_origins": ("https://a.example, http://b.example:8080",
                        ("https://a.example", "http://b.example:8080")),
    "allowed_hosts": ("api.example, .internal.example", ("api.example", ".internal.example")),
    "messages_per_second": ("12.5", 12.5),
    "message_burst": ("25", 25),
    "socket_bytes_per_second": ("1048576", 1048576),
    "memory_budget_bytes": ("536870912", 536870912),
    "socket_idle_timeout_s": ("45", 45.0),
    "ws_ping_interval_s": ("5.5", 5.5),
    "http_header_timeout_s": ("3", 3.0),
    "http_body_timeout_s": ("90", 90.0),
    "max_connections_per_client": ("3", 3),
    "uploads_per_minute": ("100", 100),
    "bytes_per_minute": ("1000000", 1_000_000),
    "forwarded_allow_ips": ("10.0.0.1", "10.0.0.1"),
    "redis_url": ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    "redis_upload_bytes": ("67108864", 64 * 1024 * 1024),
    "result_ttl_s": ("60", 60.0),
    "claim_idle_ms": ("5000", 5000),
    "job_timeout_s": ("30", 30.0),
    "shutdown_grace_s": ("4", 4.0),
    "log_level": ("debug", "debug"),
    "readiness": ("any-task", "any-task"),
    "log_format": ("json", "json"),
}
