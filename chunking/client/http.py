"""One-shot HTTP: the whole image in one ``POST /v1/analyze`` (no resume, no retries)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import orjson

from chunking.client.errors import ConnectFailedError, error_for_code
from chunking.client.sources import Source
from chunking.messages import Result

__all__ = ["DEFAULT_HTTP_URL", "analyze_http", "http_base_url"]

DEFAULT_HTTP_URL: Final = "http://127.0.0.1:8000"


def http_base_url(url: str) -> str:
    """``http://host:port`` from an HTTP(S) or WebSocket URL (``ws://host:port/v1/ws``)."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme or "http")
    path = parts.path
    for suffix in ("/v1/ws", "/v1/analyze", "/api/analyze"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    return urlunsplit((scheme, parts.netloc, path.rstrip("/"), "", ""))


def analyze_http(source: Source, *, url: str = DEFAULT_HTTP_URL, token: str | None = None,
                 task: str | None = None, options: Mapping[str, Any] | None = None,
                 name: str | None = None, timeout: float = 120.0) -> Result:
    """The whole image in one request to ``POST /v1/analyze`` (multipart, streamed from the
    file); blocking. No resume and no retries: use :class:`Client` for large images. Raises
    the same typed errors as the WebSocket client."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    form: dict[str, str] = {}
    if task is not None:
        form["task"] = task
    if options:
        form["options"] = orjson.dumps(dict(options)).decode()
    endpoint = http_base_url(url) + "/v1/analyze"
    with contextlib.ExitStack() as stack:
        if isinstance(source, (bytes, bytearray, memoryview)):
            fileobj: Any = io.BytesIO(bytes(source))
            filename = name or "image"
        else:
            path = Path(source)
            fileobj = stack.enter_context(path.open("rb"))
            filename = name or path.name
        try:
            response = httpx.post(endpoint, files={"file": (filename, fileobj)}, data=form,
                                  headers=headers, timeout=timeout)
        except httpx.TransportError as exc:
            raise ConnectFailedError(f"cannot reach {endpoint}: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200 or not isinstance(body, dict) or "result" not in body:
        code = body.get("code") if isinstance(body, dict) else None
        message = (body.get("message") if isinstance(body, dict) else None) or (
            f"HTTP {response.status_code}")
        retry_after = body.get("retry_after_ms") if isinstance(body, dict) else None
        if retry_after is None and "retry-after" in response.headers:
            with contextlib.suppress(ValueError):
                retry_after = int(float(response.headers["retry-after"]) * 1000)
        raise error_for_code(code, str(message), retry_after)
    return Result(
        task=body.get("task", task or ""),
        result=body["result"],
        image=body.get("image", {}),
        cached=bool(body.get("cached", False)),
        model=body.get("model", ""),
        timings_ms=body.get("timings_ms", {}),
    )
