"""``/openapi.json`` that tells the truth: every status a route answers, with its body's schema
(``{"code", "message"}`` for errors, one enum of codes per status) and its real content type,
and the request bodies the analyze routes read themselves.

FastAPI documents only what a route's signature shows: a route that reads ``Request`` has no
body in the document, and every route seems to answer 200 JSON. The routes here are plain
ASGI handlers for speed and memory's sake, so their document is written here, keyed by path
and method, and checked by a schemathesis run in the tests (tests/server/test_openapi.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from chunking.errors import ErrorCode
from server.errors import HTTP_STATUS

E = ErrorCode

EVERY_ROUTE: tuple[ErrorCode, ...] = (E.FORBIDDEN_HOST,)
"""What any request may be answered (server.exposure)."""
ACTING_ROUTE: tuple[ErrorCode, ...] = (E.FORBIDDEN_HOST, E.FORBIDDEN_ORIGIN)
"""What a request that acts (not GET, HEAD or OPTIONS) may be answered besides."""
ANALYZE: tuple[ErrorCode, ...] = (
    *ACTING_ROUTE, E.BAD_MESSAGE, E.BAD_BASE64, E.INVALID_IMAGE, E.UNAUTHORIZED, E.TOO_LARGE,
    E.TOO_MANY_PIXELS, E.UNKNOWN_TASK, E.RATE_LIMITED, E.BUSY, E.INTERNAL,
)

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["code", "message"],
    "properties": {
        "code": {"type": "string", "enum": [code.value for code in ErrorCode],
                 "description": "A stable code of the error catalogue (docs/protocol.md)."},
        "message": {"type": "string", "description": "What went wrong, for people."},
        "retry_after_ms": {"type": "integer", "minimum": 1,
                           "description": "With `rate_limited` and `busy`: when to retry."},
    },
}

_RETRY_AFTER = {"description": "Seconds to wait before retrying (`rate_limited`, `busy`).",
                "schema": {"type": "integer", "minimum": 1}}
_HEADERS_BY_STATUS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "The scheme to authenticate with: Bearer.",
                               "schema": {"type": "string"}}},
    429: {"Retry-After": _RETRY_AFTER},
    503: {"Retry-After": _RETRY_AFTER},
}
TUS_PREFIX = "/v1/tus"
"""tus 1.0's routes: that protocol's own statuses and headers, not described here."""
_BODY_TIMEOUT = 408
"""The analyze routes' answer to a body that does not arrive in time (code ``bad_message``)."""

RESULT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["task", "result", "cached", "timings_ms"],
    "properties": {
        "task": {"type": "string"},
        "result": {"type": "object",
                   "description": "The task's result: its JSON Schema is in GET /v1/tasks."},
        "image": {"type": "object", "description": (
            "Width and height of the image as displayed (EXIF orientation applied; "
            "boxes are in these pixels) and its format.")},
        "model": {"type": "string"},
        "cached": {"type": "boolean"},
        "timings_ms": {"type": "object", "additionalProperties": {"type": "number"}},
    },
}

READINESS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["ready", "workers_ready", "queue_depth", "cache", "store", "models"],
    "properties": {
        "ready": {"type": "boolean"},
        "workers_ready": {"type": "integer", "minimum": 0},
        "queue_depth": {"type": "integer", "minimum": 0},
        "cache": {"type": "boolean"},
        "store": {"type": "boolean"},
        "models": {"type": "object", "additionalProperties": {"type": "string"}},
        "error": {"type": "string", "description": "Why the workers could not start."},
    },
}


@dataclass(frozen=True)
class Operation:
    """What one route answers: its successes (status → media type → schema), its errors (by
    code), and the body it reads."""

    ok: dict[int, dict[str, dict[str, Any]]]
    errors: Sequence[ErrorCode] = EVERY_ROUTE
    body: dict[str, Any] | None = None
    extra: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Further non-catalogue answers (status → OpenAPI response object)."""


def _json(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"application/json": {"schema": schema}}


def operations(task_names: Iterable[str]) -> dict[tuple[str, str], Operation]:
    """The document of every route this module knows, by (method, path)."""
    tasks = sorted(task_names)
    task_schema: dict[str, Any] = {"type": ["string", "null"],
                                   "description": "The task to run; null or \"\": the default."}
    form_task: dict[str, Any] = {"type": "string",
                                 "description": "The task to run; \"\": the default."}
    if tasks:
        task_schema["enum"] = [*tasks, "", None]
        form_task["enum"] = [*tasks, ""]
    options_schema = {"type": ["object", "null"],
                      "description": "The task's options (their JSON Schema is in GET /v1/tasks)."}
    timed_out = {_BODY_TIMEOUT: {
        "description": "`bad_message`: the body did not arrive within http_body_timeout_s.",
        "content": _json({"$ref": "#/components/schemas/Error"}),
    }}
    return {
        ("post", "/api/analyze"): Operation(
            ok={200: _json(RESULT_SCHEMA)}, errors=ANALYZE, extra=timed_out,
            body={"required": True, "content": _json({
                "type": "object",
                "required": ["image"],
                "properties": {
                    "image": {"type": "string", "contentEncoding": "base64",
                              "description": "The whole image, Base64 (standard alphabet)."},
                    "task": task_schema,
                    "options": options_schema,
                },
            })},
        ),
        ("post", "/v1/analyze"): Operation(
            ok={200: _json(RESULT_SCHEMA)}, errors=ANALYZE, extra=timed_out,
            body={"required": True, "content": {"multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary",
                                 "description": "The image."},
                        "task": form_task,
                        "options": {"type": ["object", "null"],
                                    "description": "The task's options, as JSON text."},
                    },
                },
                "encoding": {"options": {"contentType": "application/json"}},
            }}},
        ),
        ("get", "/healthz"): Operation(ok={200: _json({
            "type": "object", "required": ["status"],
            "properties": {"status": {"type": "string", "const": "ok"}}})}),
        ("get", "/readyz"): Operation(ok={200: _json(READINESS_SCHEMA)}, extra={503: {
            "description": "Not ready: no worker has its model loaded, or the cache or the "
                           "store does not answer.",
            "content": _json(READINESS_SCHEMA),
        }}),
        ("get", "/metrics"): Operation(ok={200: {"text/plain": {"schema": {
            "type": "string", "description": "Prometheus text format, version 0.0.4."}}}}),
        ("get", "/"): Operation(ok={200: {"text/html": {"schema": {"type": "string"}}}}),
        ("get", "/v1/tasks"): Operation(ok={200: _json({
            "type": "object", "required": ["tasks"],
            "properties": {"tasks": {"type": "array", "items": {"type": "object"}},
                           "default_task": {"type": ["string", "null"]}}})}),
    }


def _error_responses(codes: Sequence[ErrorCode]) -> dict[str, Any]:
    by_status: dict[int, list[ErrorCode]] = {}
    for code in codes:
        by_status.setdefault(HTTP_STATUS[code], []).append(code)
    responses: dict[str, Any] = {}
    for status, group in sorted(by_status.items()):
        schema = {"allOf": [{"$ref": "#/components/schemas/Error"}, {
            "type": "object",
            "properties": {"code": {"enum": [code.value for code in group]}},
        }]}
        response: dict[str, Any] = {
            "description": ", ".join(f"`{code.value}`" for code in group),
            "content": _json(schema),
        }
        if status in _HEADERS_BY_STATUS:
            response["headers"] = _HEADERS_BY_STATUS[status]
        responses[str(status)] = response
    return responses


def describe(schema: dict[str, Any], task_names: Iterable[str], *, tokens: bool) -> dict[str, Any]:
    """Rewrite FastAPI's generated document with what each known route really answers."""
    known = operations(task_names)
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    if tokens:
        components["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "query_token": {"type": "apiKey", "in": "query", "name": "token"},
        }
    paths = schema.setdefault("paths", {})
    for path in [path for path in paths if path.startswith(TUS_PREFIX)]:
        del paths[path]  # a protocol of its own: docs/protocol.md and the tus 1.0 specification
    info = schema.setdefault("info", {})
    info["description"] = (
        "The plain HTTP routes. Uploads of any size with progress go over the WebSocket "
        "protocol (`GET /v1/ws`) or tus 1.0 (`/v1/tus/`), both described in docs/protocol.md."
    )
    for path, methods in paths.items():
        for method, operation in methods.items():
            spec = known.get((method, path))
            if spec is None:
                continue
            responses: dict[str, Any] = {}
            for status, content in spec.ok.items():
                responses[str(status)] = {"description": "Success.", "content": content}
            responses.update(_error_responses(spec.errors))
            for status, response in spec.extra.items():
                responses[str(status)] = response
            operation["responses"] = dict(sorted(responses.items()))
            if spec.body is not None:
                operation["requestBody"] = spec.body
            if tokens and E.UNAUTHORIZED in spec.errors:
                operation["security"] = [{"bearer": []}, {"query_token": []}]
    return schema


def install(app: FastAPI, task_names: Iterable[str], *, tokens: bool) -> None:
    """Serve :func:`describe`'s document as the app's ``/openapi.json``."""
    names = list(task_names)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            with warnings.catch_warnings():
                # tus routes answer several methods under one name; dropped by describe().
                warnings.filterwarnings("ignore", "Duplicate Operation ID", UserWarning)
                generated = get_openapi(title=app.title, version=app.version,
                                        summary=app.summary, description=app.description,
                                        routes=app.routes)
            app.openapi_schema = describe(generated, names, tokens=tokens)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
