"""HTTP routes: whole-image analysis (JSON Base64 or multipart), health, metrics, demo page.

The analysis itself is the upload service's (:meth:`server.uploads.UploadService.analyze`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Coroutine
from importlib import resources
from typing import Any, BinaryIO

import orjson
import pybase64
from fastapi import APIRouter, Request
from starlette.datastructures import MutableHeaders, UploadFile
from starlette.requests import ClientDisconnect
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chunking.errors import ErrorCode, ProtocolError
from server import bounded_json
from server.errors import error_response
from server.limits import Reservation
from server.logs import current_context, log_context
from server.state import AppState
from server.storage.base import ImageRef
from server.tasks.contract import Task
from server.transports.callers import http_caller, http_caller_address

router = APIRouter()
log = logging.getLogger("pixelstream.http")

_FORM_OVERHEAD = 1 << 20
"""Room for multipart boundaries and the small form fields."""


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.pixelstream
    return state


CLIENT_CLOSED = 499
"""Counted (never sent) for a request whose client left before its body was in."""


class BodyTimeout(Exception):
    """The request body did not arrive within ``http_body_timeout_s`` (answered 408)."""


async def _guard(request: Request, app: AppState) -> str | None:
    """Origin, token (when configured), per-client rate limit and capacity, before the body
    is read. Returns the caller's principal (None without tokens)."""
    caller = http_caller(request, app, "use the API")
    wait_ms = app.http_buckets.take(caller.address)
    if wait_ms:
        raise ProtocolError(ErrorCode.RATE_LIMITED, "too many requests", retry_after_ms=wait_ms)
    app.service.check_capacity()
    await app.client_limits.upload_started(caller.client)
    return caller.principal


def _declared_length(request: Request, limit: int) -> int:
    raw = request.headers.get("content-length")
    if raw is None:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a Content-Length header is required")
    try:
        length = int(raw)
    except ValueError:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "Content-Length is not a number") from None
    if length > limit:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"the request exceeds {limit} bytes")
    return max(0, length)


def _reservation(request: Request, app: AppState, principal: str | None) -> Reservation:
    """The request's hold on the memory budget, taken as its bytes arrive, counted against
    its client's share (the principal, else the address)."""
    client = principal or http_caller_address(request)
    return Reservation(app.budget, client, app.service.pool.retry_after_ms)


@contextlib.asynccontextmanager
async def _body_deadline(app: AppState) -> AsyncIterator[None]:
    """The body must arrive within ``http_body_timeout_s`` (a client trickling it is cut)."""
    try:
        async with asyncio.timeout(app.settings.http_body_timeout_s):
            yield
    except TimeoutError:
        raise BodyTimeout from None


async def _read_body(request: Request, limit: int, hold: Reservation) -> bytearray:
    """The whole body, each part reserved as it arrives: twice, for the body and then the
    parsed text or decoded image that outlive it."""
    _declared_length(request, limit)
    body = bytearray()
    async for part in request.stream():
        hold.take(2 * len(part))
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


async def _analyze(app: AppState, image: ImageRef, sha256: str, spec: Task,
                   options: dict[str, Any], principal: str | None) -> JSONResponse:
    payload, cached, timings = await app.uploads.analyze(spec, options, image, sha256, principal)
    app.metrics.observe_timings(timings)
    return JSONResponse({**payload, "cached": cached, "timings_ms": timings})


async def _stage_and_analyze(request: Request, app: AppState, source: BinaryIO | bytes,
                             size: int, spec: Task, options: dict[str, Any],
                             principal: str | None) -> JSONResponse:
    """Put the image where workers read it (hashing it on the way), analyse, free it. The
    body is in by now: a client that goes away meanwhile cancels the analysis (its queued
    job, or the tiles of a large image not yet run), as a socket's ``cancel`` does."""
    store = app.store
    staged = await store.stage_image(source, size)
    try:
        return await _unless_disconnected(
            request, _analyze(app, staged.image, staged.sha256, spec, options, principal))
    finally:
        await store.release(staged.image)


async def _disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (call once the body is read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request,
                               work: Coroutine[Any, Any, JSONResponse]) -> JSONResponse:
    """``work``'s answer; raises ClientDisconnect, ``work`` cancelled, if the client leaves
    first."""
    job = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((job, gone), return_when=asyncio.FIRST_COMPLETED)
        if job.done():
            return job.result()
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
        raise ClientDisconnect
    finally:
        job.cancel()
        gone.cancel()


class RequestIds:
    """ASGI middleware: every HTTP request gets an id, in its log records (uvicorn's access
    line included) and in the ``X-Request-ID`` response header; ``internal`` answers cite it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = secrets.token_hex(8)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("X-Request-ID", request_id)
            await send(message)

        with log_context(request=request_id):
            await self.app(scope, receive, send_with_id)


async def _answer(request: Request, handler: Any) -> Response:
    app = _state(request)
    request_id = current_context().get("request", "-")
    try:
        response: Response = await handler(app)
    except ProtocolError as exc:
        app.metrics.errors.labels(exc.code.value).inc()
        response = error_response(exc)
    except BodyTimeout:
        app.metrics.errors.labels(ErrorCode.BAD_MESSAGE.value).inc()
        limit = app.settings.http_body_timeout_s
        response = JSONResponse(
            {"code": ErrorCode.BAD_MESSAGE.value,
             "message": f"the request body did not arrive within {limit:g} s"},
            status_code=408, headers={"Connection": "close"},
        )
    except ClientDisconnect:  # the client left: nobody to answer, nothing failed
        log.info("%s %s: the client went away before its answer", request.method,
                 request.url.path)
        response = Response(status_code=CLIENT_CLOSED)
    except Exception:  # a fault: PROTOCOL.md's ``internal`` answer, details only in the log
        log.exception("%s %s failed (ref %s)", request.method, request.url.path, request_id)
        app.metrics.errors.labels(ErrorCode.INTERNAL.value).inc()
        response = error_response(ProtocolError(
            ErrorCode.INTERNAL, f"the server failed to process the request (ref {request_id})"
        ))
    app.metrics.http_requests.labels(str(response.status_code)).inc()
    return response


@router.post("/api/analyze")
async def analyze_json(request: Request) -> Response:
    """``{"image": "<base64>", "task": ..., "options": {...}}`` → the result object."""

    async def handle(app: AppState) -> Response:
        principal = await _guard(request, app)
        max_chars = -(-app.limits.max_image_bytes // 3) * 4
        _declared_length(request, max_chars + 65536)
        with _reservation(request, app, principal) as hold:
            return await _analyze_body(request, app, max_chars, principal, hold)

    return await _answer(request, handle)


async def _analyze_body(request: Request, app: AppState, max_chars: int,
                        principal: str | None, hold: Reservation) -> Response:
    """The JSON route's work: read the body (against its deadline), parse it, analyse. Each
    large intermediate is dropped as soon as the next exists."""
    async with _body_deadline(app):
        body = await _read_body(request, max_chars + 65536, hold)
    try:
        request_obj = await bounded_json.loads(bounded_json.check_fields(body, "image"))
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
        if len(encoded) >= bounded_json.OFF_LOOP_BYTES:
            data = await asyncio.to_thread(pybase64.b64decode, encoded, validate=True)
        else:
            data = pybase64.b64decode(encoded, validate=True)
    except (ValueError, TypeError):
        raise ProtocolError(ErrorCode.BAD_BASE64, "'image' is not valid Base64") from None
    del encoded, request_obj
    if not data:
        raise ProtocolError(ErrorCode.INVALID_IMAGE, "the image is empty")
    if len(data) > app.limits.max_image_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE, "the image exceeds max_image_bytes")
    return await _stage_and_analyze(request, app, data, len(data), spec, options, principal)


@router.post("/v1/analyze")
async def analyze_multipart(request: Request) -> Response:
    """Multipart form: ``file`` (the image), optional ``task`` and ``options`` (JSON)."""

    async def handle(app: AppState) -> Response:
        principal = await _guard(request, app)
        _declared_length(request, app.limits.max_image_bytes + _FORM_OVERHEAD)
        # Starlette spools the file (to disk past 1 MiB); staging it for the workers is
        # what takes memory, reserved then.
        with _reservation(request, app, principal) as hold:
            try:
                async with _body_deadline(app):
                    form = await request.form(max_files=1, max_fields=8)
            except BodyTimeout:
                raise
            except ClientDisconnect:
                raise
            except Exception as exc:  # python-multipart's and Starlette's parse errors
                raise ProtocolError(
                    ErrorCode.BAD_MESSAGE, f"not a valid multipart form: {exc}"
                ) from None
            return await _analyze_form(request, app, form, principal, hold)

    return await _answer(request, handle)


async def _analyze_form(request: Request, app: AppState, form: Any, principal: str | None,
                        hold: Reservation) -> Response:
    """The multipart route's work once its form is parsed (and closed afterwards)."""
    try:
        for name in ("file", "task", "options"):
            if len(form.getlist(name)) > 1:  # one would be picked silently: refuse instead
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"the form has more than one {name!r}")
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
        hold.take(size)  # the staged copy the workers read
        await upload.seek(0)
        return await _stage_and_analyze(request, app, upload.file, size, spec, options,
                                        principal)
    finally:
        await form.close()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready when every task (``--readiness any-task``: any task) has a worker with its model
    loaded and the cache answers; ``tasks_without_workers`` names the tasks that have none."""
    app = _state(request)
    pool = app.service.pool
    try:
        cache_ok, store_ok = await asyncio.wait_for(
            asyncio.gather(app.service.cache.ping(), app.store.ping()), timeout=2
        )
    except Exception:
        cache_ok = store_ok = False
    unserved = pool.unserved_tasks
    tasks_served = not unserved if app.settings.readiness == "all-tasks" else (
        len(unserved) < len(app.service.specs))
    ready = (pool.ready and tasks_served and cache_ok and store_ok
             and pool.startup_error is None)
    body = {
        "ready": ready,
        "workers_ready": pool.workers_ready,
        "tasks_without_workers": unserved,
        "queue_depth": pool.depth,
        "cache": cache_ok,
        "store": store_ok,
        "models": {name: task.model.id for name, task in app.service.specs.items()},
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
