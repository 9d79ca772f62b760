"""tus 1.0 resumable uploads under ``/v1/tus/``, with results and events over plain HTTP.

For networks that block WebSockets, and for stock tus clients (tus-js-client, Uppy, tuspy).
Extensions: creation, creation-with-upload, termination, expiration, checksum (sha1, sha256,
md5). The upload URL (``/v1/tus/<token>``) is the resume capability: the token is the upload
service's resume token, so any gateway sharing the store continues it. Every rule (tokens,
Origin, rate limits, capacity, the memory budget) is the upload service's, as on the socket.

After the last byte: ``GET <upload url>/result`` (``?wait=``) and ``GET <upload url>/events``
(server-sent events with the WebSocket protocol's progress, result and error messages).

Like tusd's handler: a PATCH holds the upload's lock (another PATCH meanwhile is answered 423,
which tus clients retry), an offset other than the one held is 409, a checksum that does not
match is 460 with nothing written, an unknown upload 404 and one that ended here lately 410.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.utils
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response, StreamingResponse

from chunking.codec import encode_server
from chunking.errors import ErrorCode, ProtocolError
from chunking.messages import Error, Progress, Result, Stage
from chunking.reassembler import Appended, UploadState
from server.auth import origin_allowed
from server.errors import HTTP_STATUS, error_response
from server.limits import KeyedBuckets
from server.state import AppState
from server.storage.locks import Lease
from server.transports.callers import http_caller
from server.uploads import Caller, LiveUpload, UploadRequest

router = APIRouter()
log = logging.getLogger("pixelstream.tus")

TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,creation-with-upload,termination,expiration,checksum"
CHECKSUMS: dict[str, Callable[[], Any]] = {
    "sha1": hashlib.sha1, "sha256": hashlib.sha256, "md5": hashlib.md5,
}
OFFSET_STREAM = "application/offset+octet-stream"
STORE_OWNER = "tus"
"""The store's name for whoever writes a tus upload: every request, on any gateway (the
upload's lock keeps them one at a time)."""
PIECE_BYTES = 1 << 20
"""A PATCH body is written in pieces of this size as it arrives (what an interrupted request
delivered stays written)."""
MAX_WAIT_S = 60.0
KEEPALIVE_S = 15.0
"""A comment line on an idle event stream, so proxies do not time it out."""

CHECKSUM_MISMATCH = 460
LOCKED = 423

TUS_REQUEST_HEADERS = (
    "Authorization, Content-Type, Origin, X-Requested-With, X-Request-ID, "
    "X-HTTP-Method-Override, Tus-Resumable, Upload-Length, Upload-Offset, Upload-Metadata, "
    "Upload-Defer-Length, Upload-Concat, Upload-Checksum"
)
TUS_EXPOSED_HEADERS = (
    "Location, Tus-Resumable, Tus-Version, Tus-Extension, Tus-Max-Size, "
    "Tus-Checksum-Algorithm, Upload-Offset, Upload-Length, Upload-Metadata, Upload-Expires, "
    "Upload-Defer-Length, Upload-Concat, Retry-After, X-Request-ID"
)
TUS_METHODS = "POST, HEAD, PATCH, DELETE, OPTIONS, GET"


class TusError(Exception):
    """An answer with a tus status that the error catalogue does not have (409, 412, 415,
    423, 460) or must not have (410), carrying a catalogue code for the body."""

    def __init__(self, status: int, code: ErrorCode, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


# Plumbing -------------------------------------------------------------------------------------


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.pixelstream
    return state


def _cors(request: Request, app: AppState, headers: dict[str, str]) -> None:
    origin = request.headers.get("origin")
    if origin is not None and origin_allowed(origin, request.headers.get("host"),
                                             app.settings.allowed_origins):
        headers["Access-Control-Allow-Origin"] = origin
        headers["Access-Control-Expose-Headers"] = TUS_EXPOSED_HEADERS
        headers["Vary"] = "Origin"


def _expires(app: AppState) -> str:
    return email.utils.formatdate(time.time() + app.settings.upload_idle_timeout_s, usegmt=True)


def _request_buckets(request: Request, app: AppState) -> KeyedBuckets:
    """Requests about existing uploads, per address, at a socket's message rate (a tus client
    sends one request where a socket sends one message; the one-shot routes' 20 per second
    would cut a client PATCHing small chunks, and tus clients do not retry a 429)."""
    buckets: KeyedBuckets | None = getattr(request.app.state, "tus_buckets", None)
    if buckets is None:
        buckets = KeyedBuckets(app.settings.messages_per_second, app.settings.message_burst)
        request.app.state.tus_buckets = buckets
    return buckets


def _guard(request: Request, app: AppState, *, creating: bool = False) -> Caller:
    """Origin, token and the per-address request rate: creations count as the one-shot
    routes' requests do, the rest as a socket's messages."""
    caller = http_caller(request, app, "upload here")
    wait_ms = _request_buckets(request, app).take(caller.address)
    if creating and not wait_ms:
        wait_ms = app.http_buckets.take(caller.address)
    if wait_ms:
        raise ProtocolError(ErrorCode.RATE_LIMITED, "too many requests", retry_after_ms=wait_ms)
    return Caller(principal=caller.principal, client=caller.client)


async def _answer(request: Request, handle: Callable[[AppState], Awaitable[Response]],
                  *, tus: bool = True) -> Response:
    """Run ``handle``; map errors to answers; add the tus and CORS headers to every answer."""
    app = _state(request)
    try:
        if tus and request.method != "OPTIONS":
            version = request.headers.get("tus-resumable")
            if version != TUS_VERSION:
                raise TusError(412, ErrorCode.BAD_MESSAGE,
                               f"Tus-Resumable must be {TUS_VERSION}",
                               {"Tus-Version": TUS_VERSION})
        response = await handle(app)
    except TusError as exc:
        app.metrics.errors.labels(exc.code.value).inc()
        response = JSONResponse({"code": exc.code.value, "message": exc.message},
                                status_code=exc.status, headers=exc.headers)
    except ProtocolError as exc:
        app.metrics.errors.labels(exc.code.value).inc()
        response = error_response(exc)
    except Exception:
        log.exception("%s %s failed", request.method, request.url.path)
        app.metrics.errors.labels(ErrorCode.INTERNAL.value).inc()
        response = error_response(ProtocolError(
            ErrorCode.INTERNAL, "the server failed to process the request"))
    headers: dict[str, str] = {"Tus-Resumable": TUS_VERSION} if tus else {}
    _cors(request, app, headers)
    for name, value in headers.items():
        response.headers.setdefault(name, value)
    if request.method == "HEAD" or _method(request) == "HEAD":
        response.body = b""
        response.headers["Content-Length"] = "0"
    app.metrics.http_requests.labels(str(response.status_code)).inc()
    return response


def _method(request: Request) -> str:
    """The method, or the one ``X-HTTP-Method-Override`` names on a POST (for proxies that
    pass only GET and POST)."""
    override = request.headers.get("x-http-method-override")
    if request.method == "POST" and override:
        return override.strip().upper()
    return request.method


def _int_header(request: Request, name: str) -> int:
    raw = request.headers.get(name)
    if raw is None or not raw.strip().isdigit():
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{name} must be a non-negative integer")
    return int(raw)


def parse_metadata(raw: str | None) -> dict[str, str]:
    """``Upload-Metadata``: comma-separated ``key base64(value)`` pairs (value optional)."""
    pairs: dict[str, str] = {}
    if not raw:
        return pairs
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        key, _, encoded = item.partition(" ")
        try:
            value = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                f"Upload-Metadata {key!r} is not Base64 of UTF-8") from None
        pairs[key] = value
    return pairs


def _metadata_header(live: LiveUpload) -> str:
    meta = live.meta
    values = {"filename": meta.name, "task": meta.task, "sha256": meta.sha256,
              "options": orjson.dumps(meta.options).decode() if meta.options else None}
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}"
                    for key, value in values.items() if value)


def _request_from_metadata(metadata: dict[str, str], size: int) -> UploadRequest:
    options: Any = {}
    if metadata.get("options"):
        try:
            options = orjson.loads(metadata["options"])
        except orjson.JSONDecodeError:
            raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                "metadata 'options' must be a JSON object") from None
        if not isinstance(options, dict):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "metadata 'options' must be a JSON object")
    sha256 = metadata.get("sha256") or None
    if sha256 is not None:
        sha256 = sha256.lower()
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "metadata 'sha256' must be 64 hex digits")
    return UploadRequest(upload_id="tus", size=size, task=metadata.get("task") or None,
                         options=options, sha256=sha256,
                         name=metadata.get("filename") or metadata.get("name") or None)


def _upload_url(request: Request, token: str) -> str:
    return str(request.url_for("tus_upload", token=token))


# Finding and locking uploads ------------------------------------------------------------------


async def _locate(app: AppState, token: str, caller: Caller, *, gone: int = 410) -> LiveUpload:
    """The live upload ``token`` names, for this caller. With a shared store the store's
    record is claimed afresh (another gateway may have written since)."""
    uploads = app.uploads
    live = uploads.live.get(token)
    if live is None or not app.uploads_in_memory:
        try:
            live, _ = await uploads.resume(token, caller, STORE_OWNER)
        except ProtocolError as exc:
            if exc.code is not ErrorCode.UNKNOWN_UPLOAD:
                raise
            live = None
    if live is None or live.ended or live.meta.principal != caller.principal:
        if token in uploads.ended and gone == 410:
            raise TusError(410, ErrorCode.UPLOAD_EXPIRED, "this upload ended")
        raise ProtocolError(ErrorCode.UNKNOWN_UPLOAD, "no such upload")
    return live


@contextlib.asynccontextmanager
async def _locked(app: AppState, token: str) -> AsyncIterator[Lease]:
    lease = await app.upload_locker.acquire(token)
    if lease is None:
        raise TusError(LOCKED, ErrorCode.BUSY, "another request is writing this upload",
                       {"Retry-After": "1"})
    try:
        yield lease
    finally:
        await lease.release()


# Writing --------------------------------------------------------------------------------------


def _checksum(request: Request) -> tuple[Any, bytes] | None:
    raw = request.headers.get("upload-checksum")
    if raw is None:
        return None
    algorithm, _, encoded = raw.strip().partition(" ")
    factory = CHECKSUMS.get(algorithm.lower())
    if factory is None:
        raise ProtocolError(ErrorCode.BAD_MESSAGE,
                            f"unsupported checksum algorithm {algorithm!r}")
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "Upload-Checksum is not Base64") from None
    return factory(), digest


async def _write_body(request: Request, app: AppState, live: LiveUpload, caller: Caller,
                      lease: Lease) -> None:
    """Write the request body at the upload's offset; returns once the body ended (or the
    client went away: what arrived stays written, unless a checksum was declared)."""
    uploads = app.uploads
    room = live.meta.size - live.received
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > room:
        raise ProtocolError(ErrorCode.TOO_LARGE,
                            f"the body runs past Upload-Length ({live.meta.size} bytes)")
    checksum = _checksum(request)

    async def write(data: bytes) -> None:
        app.budget.charge(len(data))
        try:
            event = await uploads.write(live, caller, STORE_OWNER, live.received, data)
        finally:
            app.budget.release(len(data))
        uploads.deliver(live, Progress(id=live.upload_id, stage=Stage.UPLOAD,
                                       received=event.received, total=event.total))
        await lease.refresh()
        if isinstance(event, Appended) and event.complete:
            await uploads.finish(live)

    if checksum is not None:
        # Nothing is written until the whole body is known to match: it waits in memory,
        # reserved from the budget first.
        hasher, expected = checksum
        if not app.budget.reserve(room):
            raise ProtocolError(ErrorCode.BUSY, "the server holds all the bytes it may",
                                retry_after_ms=app.service.pool.retry_after_ms())
        try:
            body = bytearray()
            with contextlib.suppress(ClientDisconnect):
                async for part in request.stream():
                    body += part
                    if len(body) > room:
                        raise ProtocolError(ErrorCode.TOO_LARGE,
                                            "the body runs past Upload-Length")
            hasher.update(body)
            if hasher.digest() != expected:
                raise TusError(CHECKSUM_MISMATCH, ErrorCode.CHECKSUM_MISMATCH,
                               "the body does not match Upload-Checksum; nothing was written")
            if body:
                await write(bytes(body))
        finally:
            app.budget.unreserve(room)
        return
    pending: list[bytes] = []
    held = 0
    try:
        async for part in request.stream():
            if not part:
                continue
            if live.received + held + len(part) > live.meta.size:
                raise ProtocolError(ErrorCode.TOO_LARGE, "the body runs past Upload-Length")
            pending.append(part)
            held += len(part)
            if held >= PIECE_BYTES:
                data, pending, held = b"".join(pending), [], 0
                await write(data)
    except ClientDisconnect:
        pass
    if held:
        await write(b"".join(pending))


def _offset_headers(app: AppState, live: LiveUpload) -> dict[str, str]:
    headers = {"Upload-Offset": str(live.received)}
    if live.lifecycle.state is UploadState.RECEIVING:
        headers["Upload-Expires"] = _expires(app)
    return headers


# Routes ---------------------------------------------------------------------------------------


def _discovery(app: AppState, request: Request) -> Response:
    headers = {
        "Tus-Version": TUS_VERSION,
        "Tus-Extension": EXTENSIONS,
        "Tus-Max-Size": str(app.limits.max_image_bytes),
        "Tus-Checksum-Algorithm": ",".join(CHECKSUMS),
    }
    if request.headers.get("access-control-request-method"):
        headers["Access-Control-Allow-Methods"] = TUS_METHODS
        headers["Access-Control-Allow-Headers"] = TUS_REQUEST_HEADERS
        headers["Access-Control-Max-Age"] = "600"
    return Response(status_code=204, headers=headers)


@router.api_route("/v1/tus", methods=["POST", "OPTIONS"], include_in_schema=False)
@router.api_route("/v1/tus/", methods=["POST", "OPTIONS"])
async def tus_collection(request: Request) -> Response:
    """Discovery (OPTIONS) and creation (POST, with or without the first bytes)."""

    async def handle(app: AppState) -> Response:
        if _method(request) == "OPTIONS":
            return _discovery(app, request)
        if _method(request) != "POST":
            return Response(status_code=405, headers={"Allow": "POST, OPTIONS"})
        return await _create(request, app)

    return await _answer(request, handle)


async def _create(request: Request, app: AppState) -> Response:
    caller = _guard(request, app, creating=True)
    if request.headers.get("upload-defer-length") is not None:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "Upload-Defer-Length is not supported")
    size = _int_header(request, "upload-length")
    if size > app.limits.max_image_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE,
                            f"Upload-Length exceeds Tus-Max-Size ({app.limits.max_image_bytes})")
    if size < 1:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "Upload-Length must be at least 1")
    upload_request = _request_from_metadata(
        parse_metadata(request.headers.get("upload-metadata")), size)
    with_body = request.headers.get("content-type", "").split(";")[0].strip() == OFFSET_STREAM
    created = await app.uploads.create(upload_request, caller, None, STORE_OWNER,
                                       answer_from_cache=False)
    assert isinstance(created, LiveUpload)  # never a cached answer: tus sends every byte
    live = created
    live.upload_id = live.token
    live.detached_at = app.uploads.clock()
    headers = {"Location": _upload_url(request, live.token), "Upload-Expires": _expires(app)}
    if with_body:
        async with _locked(app, live.token) as lease:
            await _write_body(request, app, live, caller, lease)
        headers.update(_offset_headers(app, live))
    return Response(status_code=201, headers=headers)


@router.api_route("/v1/tus/{token}", methods=["HEAD", "PATCH", "DELETE", "POST", "OPTIONS",
                                              "GET"], name="tus_upload")
async def tus_upload(request: Request, token: str) -> Response:
    """One upload: HEAD (its offset), PATCH (more bytes), DELETE (termination)."""

    async def handle(app: AppState) -> Response:
        method = _method(request)
        if method == "OPTIONS":
            return _discovery(app, request)
        caller = _guard(request, app)
        if method == "HEAD":
            live = await _locate(app, token, caller)
            headers = {"Upload-Length": str(live.meta.size), "Cache-Control": "no-store",
                       **_offset_headers(app, live)}
            if metadata := _metadata_header(live):
                headers["Upload-Metadata"] = metadata
            return Response(status_code=200, headers=headers)
        if method == "PATCH":
            return await _patch(request, app, token, caller)
        if method == "DELETE":
            live = await _locate(app, token, caller)
            async with _locked(app, token):
                if not app.uploads.cancel(live):
                    app.uploads.forget(live)  # its outcome is in: termination frees it
            return Response(status_code=204)
        return Response(status_code=405, headers={"Allow": "HEAD, PATCH, DELETE, OPTIONS"})

    return await _answer(request, handle)


async def _patch(request: Request, app: AppState, token: str, caller: Caller) -> Response:
    content_type = request.headers.get("content-type", "").split(";")[0].strip()
    if content_type != OFFSET_STREAM:
        raise TusError(415, ErrorCode.BAD_MESSAGE, f"Content-Type must be {OFFSET_STREAM}")
    offset = _int_header(request, "upload-offset")
    live = await _locate(app, token, caller)
    async with _locked(app, token) as lease:
        if offset != live.received:
            raise TusError(409, ErrorCode.OFFSET_MISMATCH,
                           f"Upload-Offset must be {live.received}",
                           {"Upload-Offset": str(live.received)})
        if live.handle is not None:
            try:
                await _write_body(request, app, live, caller, lease)
            except ProtocolError as exc:
                if exc.code is ErrorCode.CHECKSUM_MISMATCH:  # the declared sha256: discarded
                    raise TusError(CHECKSUM_MISMATCH, exc.code, exc.message) from None
                raise
        elif request.headers.get("content-length", "0") not in ("0", ""):
            raise ProtocolError(ErrorCode.TOO_LARGE, "every byte of this upload is in")
    return Response(status_code=204, headers=_offset_headers(app, live))


# Results and events ---------------------------------------------------------------------------


def _current_stage(live: LiveUpload) -> str:
    if live.lifecycle.state is UploadState.RECEIVING:
        return Stage.UPLOAD.value
    if live.last_stage is not None and live.last_stage.stage is not Stage.UPLOAD:
        return live.last_stage.stage.value
    return Stage.QUEUED.value


def _outcome_response(outcome: Result | Error) -> Response:
    if isinstance(outcome, Result):
        return JSONResponse({"task": outcome.task, "result": outcome.result,
                             "image": outcome.image, "cached": outcome.cached,
                             "model": outcome.model, "timings_ms": outcome.timings_ms})
    body: dict[str, Any] = {"code": outcome.code.value, "message": outcome.message}
    headers = {}
    if outcome.retry_after_ms is not None:
        body["retry_after_ms"] = outcome.retry_after_ms
        headers["Retry-After"] = str(max(1, -(-outcome.retry_after_ms // 1000)))
    return JSONResponse(body, status_code=HTTP_STATUS[outcome.code], headers=headers)


@router.get("/v1/tus/{token}/result")
async def tus_result(request: Request, token: str) -> Response:
    """200 with the result, 202 ``{"stage"}`` while there is none yet (``?wait=`` seconds,
    at most 60, holds the request until there is), or the analysis error's status."""

    async def handle(app: AppState) -> Response:
        caller = _guard(request, app)
        raw_wait = request.query_params.get("wait", "0")
        try:
            wait_s = min(MAX_WAIT_S, max(0.0, float(raw_wait)))
        except ValueError:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "wait must be a number of seconds") from None
        live = await _locate(app, token, caller, gone=404)
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            changed = live.changed()
            if live.undelivered is not None:
                return _outcome_response(live.undelivered)
            if live.ended:
                raise ProtocolError(ErrorCode.UNKNOWN_UPLOAD, "no such upload")
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return JSONResponse({"stage": _current_stage(live)}, status_code=202)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()

    return await _answer(request, handle, tus=False)


def _sse(message: Progress | Result | Error) -> bytes:
    return b"event: " + message.type.encode() + b"\ndata: " + encode_server(message) + b"\n\n"


@router.get("/v1/tus/{token}/events")
async def tus_events(request: Request, token: str) -> Response:
    """Server-sent events: the progress, result and error messages of the WebSocket
    protocol, the current one first; the stream ends after the result or error."""

    async def handle(app: AppState) -> Response:
        caller = _guard(request, app)
        live = await _locate(app, token, caller, gone=404)
        return StreamingResponse(
            _events(live), media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return await _answer(request, handle, tus=False)


async def _events(live: LiveUpload) -> AsyncIterator[bytes]:
    if live.history:
        seen, first = live.history[-1]
    else:
        seen, first = 0, Progress(id=live.upload_id, stage=Stage.UPLOAD,
                                  received=live.received, total=live.meta.size)
    yield _sse(first)
    if isinstance(first, (Result, Error)):
        return
    while True:
        changed = live.changed()
        for number, message in [entry for entry in live.history if entry[0] > seen]:
            seen = number
            yield _sse(message)
            if isinstance(message, (Result, Error)):
                return
        if live.ended:
            return
        try:
            async with asyncio.timeout(KEEPALIVE_S):
                await changed.wait()
        except TimeoutError:
            yield b": keep-alive\n\n"
