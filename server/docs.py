"""``/docs`` (Swagger UI) and ``/redoc`` over ``/openapi.json``, with every asset served by
this server from an installed package (fastapi-offline's copies): FastAPI's own pages load
them from a CDN, which a server without internet access cannot reach and which would run
a third party's script on the server's origin."""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

router = APIRouter(include_in_schema=False)

ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
_PREFIX = "/docs/assets/"


@functools.cache
def _asset_bytes(name: str) -> bytes:
    return resources.files("fastapi_offline").joinpath("static", name).read_bytes()


def _openapi_url(request: Request) -> str:
    return str(request.app.openapi_url or "/openapi.json")


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=_openapi_url(request), title="pixelstream API",
        swagger_js_url=_PREFIX + "swagger-ui-bundle.js",
        swagger_css_url=_PREFIX + "swagger-ui.css",
        swagger_favicon_url=_PREFIX + "favicon.png",
        swagger_ui_parameters={"validatorUrl": None},  # its badge asks an online validator
    )


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(
        openapi_url=_openapi_url(request), title="pixelstream API",
        redoc_js_url=_PREFIX + "redoc.standalone.js",
        redoc_favicon_url=_PREFIX + "favicon.png",
        with_google_fonts=False,
    )


@router.get(_PREFIX + "{name}")
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        return Response(status_code=404)
    return Response(_asset_bytes(name), media_type=media_type,
                    headers={"Cache-Control": "public, max-age=86400"})
