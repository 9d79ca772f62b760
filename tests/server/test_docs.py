"""/docs and /redoc: served with their assets from this server, never from a CDN."""

from __future__ import annotations

import re

import httpx

from server.app import create_app
from server.docs import ASSETS
from server.tasks.builtin.colors import Colors
from tests.conftest import fast_settings


def client() -> httpx.AsyncClient:
    app = create_app(fast_settings(), tasks=[Colors()])  # no lifespan needed for the docs
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                             base_url="http://127.0.0.1:8000")


async def test_every_docs_asset_comes_from_this_server() -> None:
    async with client() as http:
        for page in ("/docs", "/redoc"):
            answer = await http.get(page)
            assert answer.status_code == 200
            assert "text/html" in answer.headers["content-type"]
            sources = re.findall(r'(?:src|href)=["\']([^"\']+)', answer.text)
            assert any(source.endswith(".js") for source in sources), answer.text
            assert all(source.startswith("/docs/assets/") for source in sources), sources
            assert "//" not in answer.text.replace("://127.0.0.1", "")
            assert "/openapi.json" in answer.text


async def test_assets_have_their_types_and_nothing_else_is_served() -> None:
    async with client() as http:
        for name, media_type in ASSETS.items():
            answer = await http.get(f"/docs/assets/{name}")
            assert answer.status_code == 200
            assert answer.headers["content-type"] == media_type
            assert len(answer.content) > 1000
        for name in ("../../server/app.py", "__init__.py", "consts.py", "nothing.js"):
            assert (await http.get(f"/docs/assets/{name}")).status_code == 404
