"""``GET /v1/tasks``: what this server offers, for clients that build their forms from it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

router = APIRouter()


@router.get("/v1/tasks", summary="The tasks this server offers")
async def list_tasks(request: Request) -> dict[str, Any]:
    """``{"tasks": [{"name", "kind", "model", "revision", "options", "result", "spatial"}],
    "default_task": ...}``: ``options`` and ``result`` are JSON Schemas. Needs no token: it
    names models, never paths."""
    service = request.app.state.pixelstream.service
    return {"tasks": service.describe(), "default_task": service.default_task}
