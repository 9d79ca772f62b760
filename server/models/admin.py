"""Rolling a model's revision out on a running server, and keeping every gateway in step.

:func:`roll_out` is the whole switch: the new revision answers a warm-up image through the
ordinary job queue (so a worker loads it beside the old one), then the gateway's task is
switched in one assignment, the folder's ``ACTIVE`` file is replaced, and, with Redis, the
switch is announced on :data:`server.storage.keys.MODEL_SWITCHES` so every other gateway
switches too (:func:`follow_switches`). If the warm-up fails nothing changes.

The admin routes (enabled by ``admin_token``; ``Authorization: Bearer <token>``)::

    GET  /v1/admin/models                      every versioned model: revisions, the active one
    POST /v1/admin/models/{name}/activate      {"revision": "<hex, or a unique prefix>"}
    POST /v1/admin/models/{name}/rollback      back to the revision active before
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import logging
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from chunking.errors import ErrorCode, ProtocolError
from server.errors import error_response
from server.models.store import VersionError
from server.models.versioned import VersionedClassification
from server.storage import keys
from server.storage.base import ImageRef
from server.tasks.contract import validate_options

log = logging.getLogger("pixelstream.models")

router = APIRouter(include_in_schema=False)
"""Operators' routes, documented in the README rather than in ``/openapi.json``."""
WARMUP_TIMEOUT_S = 120.0
"""A new revision must answer its warm-up image within this (loading included)."""
_locks: dict[tuple[int, str], asyncio.Lock] = {}
"""One switch at a time per model (and event loop)."""


def warmup_image() -> bytes:
    """A small PNG for the new revision to answer before it takes traffic."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").resize((96, 96)).save(buffer, "PNG")
    return buffer.getvalue()


def versioned_tasks(service: Any, name: str | None = None) -> list[VersionedClassification]:
    """The service's tasks served from a folder of versions (named ``name``, if given)."""
    return [task for task in service.specs.values()
            if isinstance(task, VersionedClassification)
            and (name is None or task.versions.name == name)]


async def roll_out(service: Any, task: VersionedClassification, revision: str, *,
                   publish: Any = None) -> dict[str, Any]:
    """Switch ``task`` to ``revision`` once it has answered a warm-up image. Returns
    ``{"name", "revision", "previous"}``. Raises VersionError (no such revision) or
    ProtocolError (the warm-up failed; nothing changed)."""
    loop_id = id(asyncio.get_running_loop())
    lock = _locks.setdefault((loop_id, task.versions.name), asyncio.Lock())
    async with lock:
        full = await asyncio.to_thread(task.versions.resolve, revision)
        previous = task.active
        if full != previous:
            options = {**validate_options(task, {}), "revision": full}
            image = warmup_image()
            await asyncio.wait_for(
                service.run(task, options, ImageRef(size=len(image), data=image), None),
                WARMUP_TIMEOUT_S)
            # It answered: from this assignment on, new jobs are stamped with it.
            task.switch(full)
            service.registry.changed()
            log.info("model %s: revision %s is active (was %s)", task.versions.name, full,
                     previous)
        await asyncio.to_thread(task.versions.activate, full)
        if publish is not None:
            await publish(task.versions.name, full)
        return {"name": task.versions.name, "revision": full, "previous": previous}


def follow(service: Any, name: str, revision: str) -> None:
    """Another gateway switched ``name`` to ``revision``: switch here too (its warm-up
    already proved the revision answers; workers load it on first use)."""
    for task in versioned_tasks(service, name):
        if task.active != revision:
            try:
                task.switch(revision)
            except VersionError as exc:
                log.error("model %s: cannot follow the switch to %s: %s", name, revision, exc)
                continue
            service.registry.changed()
            log.info("model %s: revision %s is active (followed)", name, revision)


async def follow_switches(redis: Any, service: Any) -> None:
    """Subscribe to the switch channel and follow every announcement (runs until
    cancelled)."""
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.MODEL_SWITCHES)
    try:
        async for message in pubsub.listen():
            if message.get("type") != "message":
                continue
            try:
                data = orjson.loads(message["data"])
                follow(service, str(data["name"]), str(data["revision"]))
            except Exception:
                log.exception("a model switch announcement could not be followed")
    finally:
        with contextlib.suppress(Exception):
            await pubsub.unsubscribe(keys.MODEL_SWITCHES)
            await pubsub.aclose()


def publisher(redis: Any) -> Any:
    async def publish(name: str, revision: str) -> None:
        await redis.publish(keys.MODEL_SWITCHES,
                            orjson.dumps({"name": name, "revision": revision}))

    return publish


# Routes -----------------------------------------------------------------------------------------


def _authorized(request: Request) -> Response | None:
    """None when the request may use the admin routes; else the answer to give."""
    token = request.app.state.settings.admin_token
    if not token:
        return JSONResponse({"detail": "Not Found"}, status_code=404)
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                             token.encode()):
        return error_response(ProtocolError(ErrorCode.UNAUTHORIZED,
                                            "the admin routes need the admin token"))
    return None


def _service(request: Request) -> Any:
    return request.app.state.pixelstream.service


def _model(request: Request, name: str) -> VersionedClassification | Response:
    tasks = versioned_tasks(_service(request), name)
    if not tasks:
        return error_response(ProtocolError(
            ErrorCode.BAD_MESSAGE, f"this server serves no versioned model {name!r}"))
    return tasks[0]


@router.get("/v1/admin/models")
async def list_models(request: Request) -> Response:
    refused = _authorized(request)
    if refused is not None:
        return refused
    described = {}
    for task in versioned_tasks(_service(request)):
        info = await asyncio.to_thread(task.versions.describe)
        described[task.versions.name] = {**info, "serving": task.active,
                                         "tasks": [t.name for t in versioned_tasks(
                                             _service(request), task.versions.name)]}
    return JSONResponse({"models": list(described.values())})


async def _switch(request: Request, name: str, revision: str | None) -> Response:
    refused = _authorized(request)
    if refused is not None:
        return refused
    found = _model(request, name)
    if isinstance(found, Response):
        return found
    service = _service(request)
    try:
        if revision is None:
            revision = await asyncio.to_thread(found.versions.previous)
        publish = getattr(request.app.state, "publish_switch", None)
        outcome = await roll_out(service, found, revision, publish=publish)
        for other in versioned_tasks(service, name)[1:]:  # more tasks over the same folder
            await roll_out(service, other, outcome["revision"])
    except VersionError as exc:
        return error_response(ProtocolError(ErrorCode.BAD_MESSAGE, str(exc)))
    except ProtocolError as exc:
        return error_response(ProtocolError(
            exc.code, f"revision {revision} did not answer its warm-up image: {exc.message}"))
    except TimeoutError:
        return error_response(ProtocolError(
            ErrorCode.BUSY, f"revision {revision} did not answer its warm-up image within "
                            f"{WARMUP_TIMEOUT_S:g} s", retry_after_ms=1000))
    return JSONResponse(outcome)


@router.post("/v1/admin/models/{name}/activate")
async def activate(request: Request, name: str) -> Response:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        body = None
    revision = body.get("revision") if isinstance(body, dict) else None
    if not isinstance(revision, str) or not revision:
        refused = _authorized(request)
        return refused or error_response(ProtocolError(
            ErrorCode.BAD_MESSAGE, 'the body must be {"revision": "<revision>"}'))
    return await _switch(request, name, revision)


@router.post("/v1/admin/models/{name}/rollback")
async def rollback(request: Request, name: str) -> Response:
    return await _switch(request, name, None)
