"""The real service end to end: the bundled model behind the WebSocket, on real photos."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import skimage.data
from PIL import Image

from bench.common import photo_jpeg
from server.settings import Settings
from tests.conftest import RunningServer, start_server

CATS = {"Egyptian cat", "tabby, tabby cat", "tiger cat"}


def jpeg(pixels: np.ndarray, **save: Any) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", **save)
    return out.getvalue()


@pytest.fixture(scope="module")
def classify_server() -> Iterator[RunningServer]:
    """The default task set (classify first) with the bundled model, as `serve` runs it."""
    running = start_server(Settings(max_chunk_bytes=1 << 20, max_wait_ms=2.0))
    yield running
    running.stop()


async def classify(server: RunningServer, open_client: Any, data: bytes, **fields: Any
                   ) -> dict[str, Any]:
    async with open_client(server.ws_url) as client:
        assert client.welcome["default_task"] == "classify"
        await client.send_upload("photo", data, chunk_size=1 << 20, **fields)
        outcome: dict[str, Any] = await client.outcome("photo")
    return outcome


async def test_chelsea_is_a_cat(classify_server, open_client) -> None:
    result = await classify(classify_server, open_client, jpeg(skimage.data.chelsea()),
                            options={"top_k": 3})
    assert result["type"] == "result", result
    labels = [item["label"] for item in result["result"]["labels"]]
    assert len(labels) == 3
    assert CATS & set(labels)
    assert result["model"] == "pixelstream/mobilenet_v2-imagenet"


async def test_coffee_is_espresso_over_http_too(classify_server, open_client) -> None:
    import base64

    import httpx

    data = jpeg(skimage.data.coffee())
    result = await classify(classify_server, open_client, data)
    assert result["result"]["labels"][0]["label"] == "espresso"
    async with httpx.AsyncClient(timeout=30) as http:
        answer = await http.post(classify_server.http_url + "/api/analyze",
                                 json={"image": base64.b64encode(data).decode()})
    assert answer.status_code == 200
    assert answer.json()["result"]["labels"][0]["label"] == "espresso"
    assert answer.json()["cached"] is True  # same bytes, task, options and model


async def test_a_108_megapixel_photo_streams_in_and_is_classified(classify_server, open_client
                                                                  ) -> None:
    import base64

    import httpx

    data = photo_jpeg(12000, 9000)  # 108 megapixels, about 20 MB: a photo's gradients and grain
    assert len(data) > 10 * 1024 * 1024
    result = await classify(classify_server, open_client, data,
                            sha256=hashlib.sha256(data).hexdigest())
    assert result["type"] == "result", result
    assert result["image"] == {"width": 12000, "height": 9000, "format": "JPEG"}
    assert len(result["result"]["labels"]) == 5
    scores = [item["score"] for item in result["result"]["labels"]]
    assert scores == sorted(scores, reverse=True)
    assert set(result["timings_ms"]) >= {"upload", "queue", "decode", "inference"}
    # The HTTP route gives the same labels (other options, so not the cached result).
    async with httpx.AsyncClient(timeout=60) as http:
        answer = await http.post(classify_server.http_url + "/api/analyze",
                                 json={"image": base64.b64encode(data).decode(),
                                       "options": {"top_k": 4}})
    assert answer.status_code == 200, answer.text
    assert answer.json()["cached"] is False
    assert answer.json()["result"]["labels"] == result["result"]["labels"][:4]
