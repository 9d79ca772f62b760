"""Uploads over tus 1.0 and results over plain HTTP, for networks that block WebSockets.

The server's ``/v1/tus/`` routes (PROTOCOL.md, "HTTP fallback"): create the upload, PATCH its
bytes span by span, then follow ``<upload url>/events`` (server-sent events carrying the
WebSocket protocol's progress, result and error messages). The same callbacks, retries and
typed errors as over the socket: a failed PATCH is retried after ``retry_delays``, from the
offset the server reports (``HEAD``), and the retry counter resets on progress.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import orjson

from chunking.client.errors import ConnectFailedError, ConnectionLostError, error_for_code
from chunking.client.http import http_base_url
from chunking.client.retry import Retrier
from chunking.client.sources import ImageSource
from chunking.client.upload import ProgressCallback, StageCallback
from chunking.messages import Result

if TYPE_CHECKING:
    import httpx

    from chunking.client.client import Client

__all__ = ["TUS_PATH", "TusUpload", "tus_available", "tus_endpoint"]

TUS_PATH: Final = "/v1/tus/"
TUS_VERSION: Final = "1.0.0"
OFFSET_STREAM: Final = "application/offset+octet-stream"
TUS_CHUNK_SIZE: Final = 8 << 20
"""Bytes per PATCH: HTTP requests cost more than socket messages, so they carry more."""
RESULT_WAIT_S: Final = 60


def tus_endpoint(url: str) -> str:
    """``http://host:port/v1/tus/`` from the server's WebSocket or HTTP URL."""
    return http_base_url(url) + TUS_PATH


async def tus_available(url: str, connect_timeout: float) -> bool:
    """Whether the server behind ``url`` answers tus discovery (``OPTIONS /v1/tus/``): where
    its socket could not be opened, tells a blocked WebSocket from a wrong address."""
    import httpx

    try:
        async with httpx.AsyncClient(timeout=connect_timeout) as http:
            response = await http.options(tus_endpoint(url))
    except httpx.HTTPError:
        return False
    versions = str(response.headers.get("tus-version", ""))
    return TUS_VERSION in (v.strip() for v in versions.split(","))


def _metadata(values: Mapping[str, str | None]) -> str:
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}"
                    for key, value in values.items() if value)


def _error(response: httpx.Response) -> Exception:
    """The typed error of a refused request (its JSON body's code, else its status)."""
    body: Any = None
    with contextlib.suppress(ValueError):
        body = response.json()
    code = body.get("code") if isinstance(body, dict) else None
    message = (body.get("message") if isinstance(body, dict) else None) or (
        f"HTTP {response.status_code}")
    retry_after = body.get("retry_after_ms") if isinstance(body, dict) else None
    if retry_after is None and "retry-after" in response.headers:
        with contextlib.suppress(ValueError):
            retry_after = int(float(response.headers["retry-after"]) * 1000)
    if code is None:
        code = {401: "unauthorized", 403: "forbidden_origin", 404: "unknown_upload",
                409: "offset_mismatch", 410: "upload_expired", 413: "too_large",
                423: "busy", 429: "rate_limited", 460: "checksum_mismatch"}.get(
                    response.status_code, "internal" if response.status_code >= 500 else None)
    return error_for_code(code, str(message), retry_after)


class TusUpload:
    """One upload over tus, for :meth:`Client.analyze` (``transport="tus"``, or its fallback)."""

    def __init__(self, client: Client, image: ImageSource, *, task: str | None,
                 options: Mapping[str, Any], sha256: str | None,
                 on_progress: ProgressCallback | None, on_stage: StageCallback | None) -> None:
        self.client = client
        self.image = image
        self.task = task
        self.options = options
        self.sha256 = sha256
        self.on_progress = on_progress
        self.on_stage = on_stage
        self.url: str | None = None
        """The upload's URL once created: the capability that resumes it."""
        self.retrier = Retrier(client.retry_delays, client.on_should_retry)
        headers = {"Tus-Resumable": TUS_VERSION}
        if client.token:
            headers["Authorization"] = f"Bearer {client.token}"
        self.headers = headers

    async def run(self) -> Result:
        import httpx

        timeout = httpx.Timeout(self.client.stall_timeout or None,
                                connect=self.client.connect_timeout)
        async with httpx.AsyncClient(timeout=timeout, headers=self.headers) as http:
            offset = await self._retrying(http, self._create)
            if self.on_stage is not None:
                self.on_stage("upload", {"offset": offset, "resumed": False})
            size = self.image.size
            while offset < size:
                offset = await self._retrying(http, lambda h, at=offset: self._patch(h, at))
            result: Result = await self._retrying(http, self._outcome)
            return result

    async def _retrying(self, http: httpx.AsyncClient, step: Any) -> Any:
        import httpx

        while True:
            try:
                return await step(http)
            except (httpx.TransportError, ConnectionLostError) as exc:
                error: Exception = ConnectionLostError(f"the request failed: {exc}")
            except Exception as exc:
                error = exc
            delay = self.retrier.next_delay(error)
            if delay is None:
                if isinstance(error, ConnectionLostError) and self.url is None:
                    raise ConnectFailedError(str(error)) from None
                raise error
            if self.on_stage is not None:
                self.on_stage("retrying", {"attempt": self.retrier.attempt, "delay": delay,
                                           "error": str(error),
                                           "code": getattr(error, "code", None)})
            await asyncio.sleep(delay)

    async def _create(self, http: httpx.AsyncClient) -> int:
        if self.url is not None:  # a retry after the upload exists: ask where it stands
            response = await http.head(self.url)
            if response.status_code != 200:
                raise _error(response)
            return int(response.headers["Upload-Offset"])
        options = orjson.dumps(dict(self.options)).decode() if self.options else None
        response = await http.post(tus_endpoint(self.client.url), headers={
            "Upload-Length": str(self.image.size),
            "Upload-Metadata": _metadata({"filename": self.image.name, "task": self.task,
                                          "options": options, "sha256": self.sha256}),
        })
        if response.status_code != 201:
            raise _error(response)
        self.url = str(response.url.join(response.headers["Location"]))
        return 0

    async def _patch(self, http: httpx.AsyncClient, offset: int) -> int:
        assert self.url is not None
        size = self.image.size
        length = min(self.client.tus_chunk_size, size - offset)
        data = await self.image.read(offset, length)
        response = await http.patch(self.url, content=bytes(data), headers={
            "Upload-Offset": str(offset), "Content-Type": OFFSET_STREAM})
        if response.status_code in (409, 423):
            # Someone else's bytes, or a request of ours still running: go on from the
            # server's offset.
            head = await http.head(self.url)
            if head.status_code != 200:
                raise _error(head)
            return int(head.headers["Upload-Offset"])
        if response.status_code != 204:
            raise _error(response)
        held = int(response.headers["Upload-Offset"])
        if held > offset:
            self.retrier.progressed(held - offset)
        if self.on_progress is not None:
            self.on_progress(held, held, size)
        return held

    async def _outcome(self, http: httpx.AsyncClient) -> Result:
        """Follow the upload's events to its result; ``/result?wait=`` if the stream ends."""
        assert self.url is not None
        async with http.stream("GET", self.url + "/events",
                               timeout=None if self.client.stall_timeout is None else
                               max(self.client.stall_timeout, 30.0)) as response:
            if response.status_code != 200:
                await response.aread()
                raise _error(response)
            event = None
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:].strip()
                elif line.startswith("data: ") and event is not None:
                    data = orjson.loads(line[6:])
                    if event == "result":
                        return _result(data)
                    if event == "error":
                        raise error_for_code(data.get("code"), data.get("message", ""),
                                             data.get("retry_after_ms"))
                    if event == "progress" and self.on_stage is not None:
                        stage = data.get("stage")
                        if stage != "upload":
                            detail = {k: data[k] for k in ("position", "done", "total")
                                      if data.get(k) is not None}
                            self.on_stage(stage, detail)
        answer = await http.get(self.url + "/result", params={"wait": RESULT_WAIT_S},
                                timeout=RESULT_WAIT_S + 10)
        if answer.status_code == 200:
            return _result(answer.json())
        if answer.status_code == 202:
            raise ConnectionLostError("the result is not ready yet")
        raise _error(answer)


def _result(body: dict[str, Any]) -> Result:
    return Result(task=body.get("task", ""), result=body["result"], image=body.get("image", {}),
                  cached=bool(body.get("cached", False)), model=body.get("model", ""),
                  timings_ms=body.get("timings_ms", {}))
