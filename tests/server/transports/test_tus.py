"""tus 1.0 under /v1/tus/ against a real server: the core protocol and its extensions, the
upload's result and events over plain HTTP, and the limits the socket has."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import RunningServer, unique_image

TUS = {"Tus-Resumable": "1.0.0"}
STREAM = {**TUS, "Content-Type": "application/offset+octet-stream"}
WAIT_S = 30.0


def metadata(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


@pytest.fixture
async def http(colors_server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=colors_server.http_url, timeout=WAIT_S) as client:
        yield client


async def create(http: httpx.AsyncClient, size: int, **meta: str) -> str:
    response = await http.post("/v1/tus/", headers={**TUS, "Upload-Length": str(size),
                                                   "Upload-Metadata": metadata(**meta)})
    assert response.status_code == 201, response.text
    assert response.headers["Tus-Resumable"] == "1.0.0"
    assert response.headers["Upload-Expires"].endswith("GMT")
    return response.headers["Location"]


async def patch(http: httpx.AsyncClient, url: str, offset: int, data: bytes,
                **headers: str) -> httpx.Response:
    return await http.patch(url, content=data,
                            headers={**STREAM, "Upload-Offset": str(offset), **headers})


async def events(http: httpx.AsyncClient, url: str, after_first: Any = None
                 ) -> list[tuple[str, dict[str, Any]]]:
    """Every event of the upload's stream, until it ends; ``after_first`` (a coroutine
    function) runs once the first event is in: the subscription is live by then."""
    received = []
    async with http.stream("GET", url + "/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                assert name is not None
                received.append((name, orjson.loads(line[6:])))
                if len(received) == 1 and after_first is not None:
                    await after_first()
    return received


async def test_options_describes_the_server(http, colors_server) -> None:
    response = await http.options("/v1/tus/")
    assert response.status_code == 204
    headers = response.headers
    assert headers["Tus-Version"] == "1.0.0"
    assert set(headers["Tus-Extension"].split(",")) >= {
        "creation", "creation-with-upload", "termination", "expiration", "checksum"}
    assert int(headers["Tus-Max-Size"]) == colors_server.settings.max_image_bytes
    assert set(headers["Tus-Checksum-Algorithm"].split(",")) >= {"sha1", "sha256", "md5"}


async def test_a_chunked_upload_reaches_its_result(http) -> None:
    image = unique_image()
    url = await create(http, len(image), filename="a.png", task="colors")
    assert url.startswith("http://127.0.0.1:")
    assert "/v1/tus/" in url
    half = len(image) // 2
    response = await patch(http, url, 0, image[:half])
    assert (response.status_code, response.headers["Upload-Offset"]) == (204, str(half))
    head = await http.head(url, headers=TUS)
    assert (head.status_code, head.headers["Upload-Offset"]) == (200, str(half))
    assert head.headers["Upload-Length"] == str(len(image))
    assert head.headers["Cache-Control"] == "no-store"
    response = await patch(http, url, half, image[half:])
    assert response.headers["Upload-Offset"] == str(len(image))
    result = await http.get(url + "/result", params={"wait": 20})
    assert result.status_code == 200, result.text
    body = result.json()
    assert body["task"] == "colors"
    assert body["image"]["format"] == "PNG"
    assert "upload" in body["timings_ms"]
    again = await http.get(url + "/result")  # asked again: the same answer
    assert again.json()["result"] == body["result"]


async def test_result_without_wait_is_202_with_the_stage(http) -> None:
    image = unique_image()
    url = await create(http, len(image))
    response = await http.get(url + "/result")
    assert (response.status_code, response.json()) == (202, {"stage": "upload"})


async def test_creation_with_upload_takes_the_first_bytes(http) -> None:
    image = unique_image()
    response = await http.post("/v1/tus/", content=image, headers={
        **STREAM, "Upload-Length": str(len(image))})
    assert response.status_code == 201
    assert response.headers["Upload-Offset"] == str(len(image))
    result = await http.get(response.headers["Location"] + "/result", params={"wait": 20})
    assert result.status_code == 200


async def test_a_wrong_offset_is_409_and_changes_nothing(http) -> None:
    url = await create(http, 100)
    await patch(http, url, 0, b"a" * 10)
    for offset in (0, 5, 50):
        response = await patch(http, url, offset, b"b" * 10)
        assert response.status_code == 409
        assert response.headers["Upload-Offset"] == "10"
    assert (await http.head(url, headers=TUS)).headers["Upload-Offset"] == "10"


@pytest.mark.parametrize("algorithm", ["sha1", "sha256", "md5"])
async def test_checksums_are_verified_and_a_mismatch_writes_nothing(http, algorithm) -> None:
    url = await create(http, 100)
    data = b"c" * 40
    good = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    bad = base64.b64encode(hashlib.new(algorithm, b"other").digest()).decode()
    response = await patch(http, url, 0, data, **{"Upload-Checksum": f"{algorithm} {bad}"})
    assert response.status_code == 460
    assert response.json()["code"] == "checksum_mismatch"
    assert (await http.head(url, headers=TUS)).headers["Upload-Offset"] == "0"
    response = await patch(http, url, 0, data, **{"Upload-Checksum": f"{algorithm} {good}"})
    assert (response.status_code, response.headers["Upload-Offset"]) == (204, "40")


async def test_an_unknown_checksum_algorithm_is_400(http) -> None:
    url = await create(http, 10)
    response = await patch(http, url, 0, b"x", **{"Upload-Checksum": "crc32 AAAA"})
    assert response.status_code == 400


async def test_the_declared_sha256_is_checked_at_the_end(http) -> None:
    image = unique_image()
    url = await create(http, len(image), sha256=hashlib.sha256(b"other").hexdigest())
    response = await patch(http, url, 0, image)
    assert (response.status_code, response.json()["code"]) == (460, "checksum_mismatch")
    assert (await http.head(url, headers=TUS)).status_code == 410


async def test_size_and_version_and_content_type_rules(http, colors_server) -> None:
    limit = colors_server.settings.max_image_bytes
    response = await http.post("/v1/tus/", headers={**TUS, "Upload-Length": str(limit + 1)})
    assert (response.status_code, response.json()["code"]) == (413, "too_large")
    response = await http.post("/v1/tus/", headers={"Upload-Length": "10"})
    assert response.status_code == 412
    assert response.headers["Tus-Version"] == "1.0.0"
    url = await create(http, 10)
    response = await http.patch(url, content=b"x", headers={
        **TUS, "Upload-Offset": "0", "Content-Type": "text/plain"})
    assert response.status_code == 415
    response = await patch(http, url, 0, b"x" * 11)
    assert response.status_code == 413
    assert (await http.head(url, headers=TUS)).headers["Upload-Offset"] == "0"


async def test_termination_then_the_url_is_gone(http) -> None:
    url = await create(http, 50)
    await patch(http, url, 0, b"a" * 10)
    assert (await http.delete(url, headers=TUS)).status_code == 204
    assert (await http.head(url, headers=TUS)).status_code == 410
    assert (await patch(http, url, 10, b"a")).status_code == 410
    assert (await http.get(url + "/result")).status_code == 404
    assert (await http.get(url + "/events")).status_code == 404


async def test_an_unknown_upload_is_404(http) -> None:
    assert (await http.head("/v1/tus/nothing-here", headers=TUS)).status_code == 404
    assert (await http.get("/v1/tus/nothing-here/result")).status_code == 404


async def test_method_override_for_proxies_that_pass_only_post(http) -> None:
    url = await create(http, 20)
    response = await http.post(url, content=b"z" * 20, headers={
        **STREAM, "Upload-Offset": "0", "X-HTTP-Method-Override": "PATCH"})
    assert (response.status_code, response.headers["Upload-Offset"]) == (204, "20")
    response = await http.post(url, headers={**TUS, "X-HTTP-Method-Override": "HEAD"})
    assert (response.status_code, response.headers["Upload-Length"]) == (200, "20")
    response = await http.post(url, headers={**TUS, "X-HTTP-Method-Override": "DELETE"})
    assert response.status_code == 204


async def test_two_patches_cannot_interleave(http) -> None:
    url = await create(http, 100)
    started, release = asyncio.Event(), asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"a" * 10
        started.set()
        await release.wait()
        yield b"b" * 10

    first = asyncio.create_task(http.patch(url, content=slow_body(), headers={
        **STREAM, "Upload-Offset": "0"}))
    await started.wait()
    async with asyncio.timeout(WAIT_S):
        while True:  # the first PATCH holds the lock once the server has read its headers
            response = await patch(http, url, 0, b"c" * 10)
            if response.status_code == 423:
                break
            assert response.status_code == 409, response.text  # not locked yet: offset rule
    release.set()
    response = await first
    assert (response.status_code, response.headers["Upload-Offset"]) == (204, "20")


async def test_events_follow_the_upload_and_end_with_the_result(http) -> None:
    image = unique_image()
    url = await create(http, len(image))
    half = len(image) // 2

    async def send_all() -> None:
        await patch(http, url, 0, image[:half])
        await patch(http, url, half, image[half:])

    received = await events(http, url, send_all)
    assert received[0] == ("progress", {"type": "progress", "id": url.rsplit("/", 1)[1],
                                        "stage": "upload", "received": 0,
                                        "total": len(image)})
    names = [name for name, _ in received]
    assert names[-1] == "result"
    stages = [data["stage"] for name, data in received if name == "progress"]
    order = ["upload", "queued", "decoding", "inference"]
    assert stages == sorted(stages, key=order.index)  # never reordered
    assert stages[0] == "upload"
    assert received[-1][1]["type"] == "result"
    late = await events(http, url)  # a late subscriber gets the result at once
    assert [name for name, _ in late] == ["result"]


async def test_an_invalid_image_is_reported_by_result_and_events(http) -> None:
    data = b"not an image at all" * 10
    url = await create(http, len(data))
    await patch(http, url, 0, data)
    response = await http.get(url + "/result", params={"wait": 20})
    assert (response.status_code, response.json()["code"]) == (400, "invalid_image")
    late = await events(http, url)
    assert late[-1][0] == "error"
    assert late[-1][1]["code"] == "invalid_image"


async def test_metadata_names_the_task_and_options(http) -> None:
    response = await http.post("/v1/tus/", headers={
        **TUS, "Upload-Length": "10", "Upload-Metadata": metadata(task="no-such-task")})
    assert (response.status_code, response.json()["code"]) == (422, "unknown_task")
    response = await http.post("/v1/tus/", headers={
        **TUS, "Upload-Length": "10", "Upload-Metadata": metadata(options="[1]")})
    assert response.status_code == 400


async def test_tokens_and_origins_apply_as_on_the_socket(server_factory) -> None:
    server = server_factory(api_tokens=("secret-token-1234",))
    async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT_S) as client:
        response = await client.post("/v1/tus/", headers={**TUS, "Upload-Length": "10"})
        assert response.status_code == 401
        auth = {"Authorization": "Bearer secret-token-1234"}
        response = await client.post("/v1/tus/", headers={**TUS, **auth, "Upload-Length": "10"})
        assert response.status_code == 201
        url = response.headers["Location"]
        assert (await client.head(url, headers=TUS)).status_code == 401
        assert (await client.head(url, headers={**TUS, **auth})).status_code == 200
        response = await client.post("/v1/tus/", headers={
            **TUS, **auth, "Upload-Length": "10", "Origin": "http://evil.example"})
        assert response.status_code == 403


async def test_a_preflight_from_an_allowed_origin_exposes_the_tus_headers(server_factory) -> None:
    origin = "http://app.example"
    server = server_factory(allowed_origins=(origin,))
    async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT_S) as client:
        response = await client.options("/v1/tus/", headers={
            "Origin": origin, "Access-Control-Request-Method": "PATCH",
            "Access-Control-Request-Headers": "tus-resumable,upload-offset,content-type"})
        assert response.status_code == 200
        assert "PATCH" in response.headers["Access-Control-Allow-Methods"]
        assert "upload-offset" in response.headers["Access-Control-Allow-Headers"].lower()
        response = await client.post("/v1/tus/", headers={
            **TUS, "Upload-Length": "10", "Origin": origin})
        assert response.status_code == 201
        assert response.headers["Access-Control-Allow-Origin"] == origin
        exposed = response.headers["Access-Control-Expose-Headers"].lower()
        assert {"location", "upload-offset", "upload-expires"} <= {
            h.strip() for h in exposed.split(",")}


async def test_an_upload_over_the_memory_budget_is_busy(server_factory) -> None:
    """Uploads hold the bytes they received, not their declared length: a creation is busy
    once its first chunk would not fit beside them."""
    server = server_factory(memory_budget_bytes=1 << 20, max_image_bytes=1 << 20)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT_S) as client:
        first = await create(client, 1 << 20)
        assert server.state.budget.held == 0  # declared, nothing received: nothing held
        piece, sent = 100_000, 900_000
        for offset in range(0, sent, piece):
            assert (await patch(client, first, offset, b"x" * piece)).status_code == 204
        assert server.state.budget.held == sent
        second = await client.post("/v1/tus/", headers={**TUS, "Upload-Length": "200000"})
        assert (second.status_code, second.json()["code"]) == (503, "busy")


async def test_the_clients_upload_rate_applies_to_tus_creations(server_factory) -> None:
    server = server_factory(uploads_per_minute=1)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT_S) as client:
        first = await client.post("/v1/tus/", headers={**TUS, "Upload-Length": "10"})
        assert first.status_code == 201
        second = await client.post("/v1/tus/", headers={**TUS, "Upload-Length": "10"})
        assert (second.status_code, second.json()["code"]) == (429, "rate_limited")
        assert "Retry-After" in second.headers


async def test_many_small_patches_are_not_cut_by_the_one_shot_request_rate(http) -> None:
    """A tus client PATCHing small chunks makes many requests, one per chunk, as a socket
    sends one message per chunk: they count at the socket's rate, not the one-shot routes'."""
    image = unique_image(200, 150)
    url = await create(http, len(image))
    piece = len(image) // 60 + 1
    for offset in range(0, len(image), piece):
        response = await patch(http, url, offset, image[offset:offset + piece])
        assert response.status_code == 204, response.text
    result = await http.get(url + "/result", params={"wait": 20})
    assert result.status_code == 200
