"""HTTP routes: whole-image analysis (JSON Base64 or multipart), health, metrics, demo page."""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from typing import Any, BinaryIO

import orjson
import pybase64
from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile
from starlette.responses import HTMLResponse, JSONResponse, Response

from chunking.errors import ErrorCode, ProtocolError
from server.auth import TokenAuth, presented_token
from server.errors import error_response
from server.pipeline.analyzers.base import TaskSpec
from server.state import AppState
from server.storage.base import ImageRef

router = APIRouter()
log = logging.getLogger("pixelstream.http")

_FORM_OVERHEAD = 1 << 20
"""Room for multipart boundaries and the small form fields."""


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.pixelstream
    return state


async def _guard(request: Request, app: AppState) -> None:
    """Token (when configured), per-client rate limit and capacity, before the body is read."""
    auth: TokenAuth = request.app.state.auth
    token = presented_token(request.headers, request.query_params)
    if auth.required and auth.principal(token) is None:
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "a valid API token is required")
    address = request.client.host if request.client else "unknown"
    wait_ms = app.http_buckets.take(address)
    if wait_ms:
        raise ProtocolError(ErrorCode.RATE_LIMITED, "too many requests", retry_after_ms=wait_ms)
    app.service.check_capacity()
    await app.client_limits.upload_started(auth.principal(token) or address)


def _declared_length(request: Request, limit: int) -> None:
    raw = request.headers.get("content-length")
    if raw is None:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a Content-Length header is required")
    try:
        length = int(raw)
    except ValueError:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "Content-Length is not a number") from None
    if length > limit:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"the request exceeds {limit} bytes")


async def _read_body(request: Request, limit: int) -> bytearray:
    _declared_length(request, limit)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:  # the header lied
            raise ProtocolError(ErrorCode.TOO_LARGE, f"the request exceeds {limit} bytes")
    return body


def _options(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "'options' must be an object")
    return value


async def _analyze(app: AppState, image: ImageRef, sha256: str, spec: TaskSpec,
                   options: dict[str, Any]) -> JSONResponse:
    service = app.service
    key = service.cache_key(sha256, spec, options)
    payload = await service.lookup(key)
    timings: dict[str, float] = {}
    cached = payload is not None
    if payload is None:
        payload, timings = await service.run(spec, options, image, key)
        app.metrics.observe_timings(timings)
    return JSONResponse({**payload, "cached": cached, "timings_ms": timings})


async def _stage_and_analyze(app: AppState, source: BinaryIO | bytes, size: int,
                             spec: TaskSpec, options: dict[str, Any]) -> JSONResponse:
    """Put the image where workers read it (hashing it on the way), analyse, free it."""
    store = app.store
    staged = await store.stage_image(source, size)
    try:
        return await _analyze(app, staged.image, staged.sha256, spec, options)
    finally:
        await store.release(staged.image)


async def _answer(request: Request, handler: Any) -> Response:
    app = _state(request)
    try:
        response: Response = await handler(app)
    except ProtocolError as exc:
        app.metrics.errors.labels(exc.code.value).inc()
        response = error_response(exc)
    except Exception:  # a fault: PROTOCOL.md's ``internal`` answer, details only in the log
        log.exception("%s %s failed", request.method, request.url.path)
        app.metrics.errors.labels(ErrorCode.INTERNAL.value).inc()
        response = error_response(
            ProtocolError(ErrorCode.INTERNAL, "the server failed to process the request")
        )
    app.metrics.http_requests.labels(str(response.status_code)).inc()
    return response


@router.post("/api/analyze")
async def analyze_json(request: Request) -> Response:
    """``{"image": "<base64>", "task": ..., "options": {...}}`` → the result object."""

    async def handle(app: AppState) -> Response:
        await _guard(request, app)
        max_chars = -(-app.limits.max_image_bytes // 3) * 4
        body = await _read_body(request, max_chars + 65536)
        try:
            request_obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "the body is not valid JSON") from None
        del body
        if not isinstance(request_obj, dict):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "the body must be a JSON object")
        encoded = request_obj.get("image")
        if not isinstance(encoded, str):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "'image' must be a Base64 string")
        if len(encoded) > max_chars:
            raise ProtocolError(ErrorCode.TOO_LARGE, "the image exceeds max_image_bytes")
        task = request_obj.get("task")
        if task is not None and not isinstance(task, str):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "'task' must be a string")
        spec, options = app.service.resolve(task, _options(request_obj.get("options")))
        try:
            data = pybase64.b64decode(encoded, validate=True)
        except (ValueError, TypeError):
            raise ProtocolError(ErrorCode.BAD_BASE64, "'image' is not valid Base64") from None
        del encoded, request_obj
        if not data:
            raise ProtocolError(ErrorCode.INVALID_IMAGE, "the image is empty")
        if len(data) > app.limits.max_image_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, "the image exceeds max_image_bytes")
        return await _stage_and_analyze(app, data, len(data), spec, options)

    return await _answer(request, handle)


@router.post("/v1/analyze")
async def analyze_multipart(request: Request) -> Response:
    """Multipart form: ``file`` (the image), optional ``task`` and ``options`` (JSON)."""

    async def handle(app: AppState) -> Response:
        await _guard(request, app)
        _declared_length(request, app.limits.max_image_bytes + _FORM_OVERHEAD)
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as exc:  # python-multipart's and Starlette's parse errors
            raise ProtocolError(
                ErrorCode.BAD_MESSAGE, f"not a valid multipart form: {exc}"
            ) from None
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "the form needs a 'file' field")
            task = form.get("task")
            raw_options = form.get("options")
            try:
                options = orjson.loads(raw_options) if isinstance(raw_options, str) else None
            except orjson.JSONDecodeError:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, "'options' must be JSON") from None
            spec, options = app.service.resolve(
                task if isinstance(task, str) else None, _options(options)
            )
            size = upload.size
            if size is None or size < 1:
                raise ProtocolError(ErrorCode.INVALID_IMAGE, "the file is empty")
            if size > app.limits.max_image_bytes:
                raise ProtocolError(ErrorCode.TOO_LARGE, "the image exceeds max_image_bytes")
            await upload.seek(0)
            return await _stage_and_analyze(app, upload.file, size, spec, options)
        finally:
            await form.close()

    return await _answer(request, handle)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready when a worker has its model loaded and the cache answers."""
    app = _state(request)
    pool = app.service.pool
    try:
        cache_ok, store_ok = await asyncio.wait_for(
            asyncio.gather(app.service.cache.ping(), app.store.ping()), timeout=2
        )
    except Exception:
        cache_ok = store_ok = False
    ready = pool.ready and cache_ok and store_ok and pool.startup_error is None
    body = {
        "ready": ready,
        "workers_ready": pool.workers_ready,
        "queue_depth": pool.depth,
        "cache": cache_ok,
        "store": store_ok,
        "models": {task: spec.model_id for task, spec in app.service.specs.items()},
    }
    if pool.startup_error is not None:
        body["error"] = pool.startup_error
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/", response_class=HTMLResponse)
async def demo_page() -> HTMLResponse:
    page = resources.files("server").joinpath("static/index.html").read_text(encoding="utf-8")
    return HTMLResponse(page)
