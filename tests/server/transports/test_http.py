"""HTTP routes through a real server: both analyze routes, their error statuses, auth, rate
limits, load shedding, health, metrics and the demo page (PROTOCOL.md's HTTP section)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import struct
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chunking.errors import ErrorCode
from server.errors import HTTP_STATUS
from server.limits import KeyedBuckets
from tests.conftest import RunningServer, make_image, unique_image

RESULT_FIELDS = {"task", "result", "image", "cached", "model", "timings_ms"}
COLORS_MODEL = "pixelstream/median-cut-palette"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR claims other dimensions, CRC fixed (a decompression bomb)."""
    data = bytearray(make_image(1, 1, "PNG"))
    ihdr = 8 + 8  # the signature, then the chunk's length and "IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


async def post_json(http: httpx.AsyncClient, server: RunningServer, body: Any,
                    **kwargs: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return await http.post(server.http_url + "/api/analyze", content=content,
                           headers={"Content-Type": "application/json",
                                    **kwargs.pop("headers", {})}, **kwargs)


async def post_form(http: httpx.AsyncClient, server: RunningServer, image: bytes | None,
                    **fields: Any) -> httpx.Response:
    files = {"file": ("image.bin", image, "application/octet-stream")} if image is not None else {}
    params = fields.pop("params", None)
    headers = fields.pop("headers", None)
    data = {k: v if isinstance(v, str) else orjson.dumps(v).decode() for k, v in fields.items()}
    if not files:  # httpx sends urlencoded without files: force a multipart body
        files = {"other": ("x.txt", b"x", "text/plain")}
    return await http.post(server.http_url + "/v1/analyze", files=files, data=data,
                           params=params, headers=headers)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert (response.status_code, response.json().get("code")) == (status, code), response.text
    body: dict[str, Any] = response.json()
    assert isinstance(body["message"], str)
    assert "type" not in body
    return body


def counter(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


# Results ------------------------------------------------------------------------------------


async def test_json_analyze_answers_the_result_object(colors_server, http) -> None:
    response = await post_json(http, colors_server, {"image": b64(unique_image(96, 64))})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == RESULT_FIELDS
    assert body["task"] == "colors"  # the default task
    assert body["model"] == COLORS_MODEL
    assert body["cached"] is False
    assert body["image"] == {"width": 96, "height": 64, "format": "PNG"}
    assert 1 <= len(body["result"]["colors"]) <= 5
    assert set(body["timings_ms"]) >= {"queue", "decode", "inference"}
    assert all(isinstance(v, int | float) and v >= 0 for v in body["timings_ms"].values())


async def test_multipart_analyze_answers_the_result_object(colors_server, http) -> None:
    image = unique_image(80, 60, "JPEG")
    response = await post_form(http, colors_server, image, task="colors", options={"colors": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == RESULT_FIELDS
    assert body["image"] == {"width": 80, "height": 60, "format": "JPEG"}
    assert (body["task"], body["cached"]) == ("colors", False)
    assert 1 <= len(body["result"]["colors"]) <= 2


async def test_a_second_identical_request_is_cached(colors_server, http) -> None:
    request = {"image": b64(unique_image()), "task": "colors", "options": {"colors": 3}}
    first = (await post_json(http, colors_server, request)).json()
    second = (await post_json(http, colors_server, request)).json()
    assert (first["cached"], second["cached"]) == (False, True)
    assert second["result"] == first["result"]
    assert second["image"] == first["image"]
    assert second["model"] == first["model"]


async def test_the_cache_is_shared_by_both_routes_and_keyed_by_options(colors_server,
                                                                      http) -> None:
    image = unique_image()
    by_form = await post_form(http, colors_server, image, options={"colors": 4})
    by_json = await post_json(http, colors_server, {"image": b64(image), "options": {"colors": 4}})
    other_options = await post_json(http, colors_server,
                                    {"image": b64(image), "options": {"colors": 2}})
    other_task = await post_json(http, colors_server, {"image": b64(image), "task": "gate"})
    assert by_form.json()["cached"] is False
    assert by_json.json()["cached"] is True
    assert other_options.json()["cached"] is False
    assert other_task.json()["cached"] is False
    assert other_task.json()["task"] == "gate"


# Errors: /api/analyze -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"",
        b'{"image": ',
        b"[1, 2]",
        b'"a string"',
        b"null",
        {},
        {"task": "colors"},
        {"image": 5},
        {"image": None},
        {"image": ["aGk="]},
        {"image": "aGk=", "task": 5},
        {"image": "aGk=", "options": []},
        {"image": "aGk=", "options": "colors=3"},
        {"image": "aGk=", "options": {"colors": "many"}},
        {"image": "aGk=", "options": {"unknown": 1}},
    ],
    ids=lambda body: repr(body)[:40],
)
async def test_json_bad_messages_are_400(colors_server, http, body: Any) -> None:
    assert_error(await post_json(http, colors_server, body), 400, "bad_message")


@pytest.mark.parametrize("encoded", ["not base64!", "aGk", "aGk=aGk=", "aG\nk=", "////\x00"])
async def test_json_invalid_base64_is_400_bad_base64(colors_server, http, encoded: str) -> None:
    assert_error(await post_json(http, colors_server, {"image": encoded}), 400, "bad_base64")


@pytest.mark.parametrize(
    "payload",
    [b"hello, this is not an image", b"\x89PNG\r\n\x1a\n", b""],
    ids=["text", "signature only", "empty"],
)
async def test_json_not_an_image_is_400_invalid_image(colors_server, http,
                                                      payload: bytes) -> None:
    response = await post_json(http, colors_server, {"image": b64(payload)})
    assert_error(response, 400, "invalid_image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
async def test_json_truncated_image_is_400_invalid_image(colors_server, http, fmt: str) -> None:
    image = unique_image(200, 150, fmt)
    response = await post_json(http, colors_server, {"image": b64(image[: len(image) * 2 // 3])})
    assert_error(response, 400, "invalid_image")


async def test_json_decompression_bomb_is_422_too_many_pixels(colors_server, http) -> None:
    response = await post_json(http, colors_server, {"image": b64(png_claiming(60_000, 60_000))})
    assert_error(response, 422, "too_many_pixels")


async def test_json_unknown_task_is_422_unknown_task(colors_server, http) -> None:
    response = await post_json(http, colors_server, {"image": b64(unique_image()),
                                                     "task": "no-such-task"})
    body = assert_error(response, 422, "unknown_task")
    assert "colors" in body["message"]  # says what the server offers


async def test_json_without_content_length_is_refused(colors_server, http) -> None:
    """A chunked body has no declared length to check before reading: refused up front."""

    async def chunks() -> AsyncIterator[bytes]:
        yield orjson.dumps({"image": b64(unique_image())})

    response = await http.post(colors_server.http_url + "/api/analyze", content=chunks())
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert_error(response, 400, "bad_message")


# Errors: /v1/analyze ------------------------------------------------------------------------


async def test_form_without_a_file_is_400(colors_server, http) -> None:
    assert_error(await post_form(http, colors_server, None, task="colors"), 400, "bad_message")


async def test_form_file_sent_as_a_plain_field_is_400(colors_server, http) -> None:
    response = await http.post(colors_server.http_url + "/v1/analyze",
                               files={"other": ("x", b"x")}, data={"file": "not a file"})
    assert_error(response, 400, "bad_message")


async def test_a_body_that_is_not_multipart_is_400(colors_server, http) -> None:
    response = await http.post(colors_server.http_url + "/v1/analyze",
                               content=b"--nope\r\n\r\nbroken",
                               headers={"Content-Type": "multipart/form-data; boundary=nope"})
    assert_error(response, 400, "bad_message")
    response = await post_json(http, colors_server, {"image": b64(unique_image())})
    assert response.status_code == 200  # (and the JSON route is unaffected)


@pytest.mark.parametrize(
    ("options", "code"),
    [("{not json", "bad_message"), ("[1]", "bad_message"), ('"x"', "bad_message"),
     ('{"colors": 0}', "bad_message")],
)
async def test_form_bad_options_are_400(colors_server, http, options: str, code: str) -> None:
    response = await post_form(http, colors_server, unique_image(), options=options)
    assert_error(response, 400, code)


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [(b"definitely not an image", 400, "invalid_image"), (b"", 400, "invalid_image"),
     (png_claiming(60_000, 60_000), 422, "too_many_pixels")],
    ids=["not an image", "empty", "bomb"],
)
async def test_form_image_errors(colors_server, http, payload: bytes, status: int,
                                 code: str) -> None:
    assert_error(await post_form(http, colors_server, payload), status, code)


async def test_form_truncated_image_is_400_invalid_image(colors_server, http) -> None:
    image = unique_image(200, 150, "JPEG")
    response = await post_form(http, colors_server, image[: len(image) // 2])
    assert_error(response, 400, "invalid_image")


async def test_form_unknown_task_is_422(colors_server, http) -> None:
    response = await post_form(http, colors_server, unique_image(), task="nope")
    assert_error(response, 422, "unknown_task")


async def test_an_unexpected_fault_is_500_internal_without_details(server_factory,
                                                                  http) -> None:
    server = server_factory()
    store = server.state.store

    async def failing_stage(source: Any, size: int) -> Any:
        raise OSError("/secret/spool/path: No space left on device")

    store.stage_image = failing_stage  # type: ignore[method-assign]
    for response in (await post_json(http, server, {"image": b64(unique_image())}),
                     await post_form(http, server, unique_image())):
        assert_error(response, 500, "internal")
        assert "secret" not in response.text
    metrics = (await http.get(server.http_url + "/metrics")).text
    assert counter(metrics, "pixelstream_http_analyze_requests_total", status="500") == 2
    assert counter(metrics, "pixelstream_errors_total", code="internal") == 2


# Size limits --------------------------------------------------------------------------------


@pytest.fixture
def small_server(server_factory) -> RunningServer:
    return server_factory(max_image_bytes=1000)  # 1000 % 3 == 1: see the JSON case below


async def test_json_body_over_the_limit_is_413_by_content_length(small_server, http) -> None:
    # max 1000 bytes → 1336 Base64 characters, plus 64 KiB for the JSON around them.
    body = b'{"image": "' + b"A" * 70_000 + b'"}'
    assert_error(await post_json(http, small_server, body), 413, "too_large")


async def test_json_base64_longer_than_the_limit_allows_is_413(small_server, http) -> None:
    response = await post_json(http, small_server, {"image": b64(b"\x00" * 1500)})
    assert_error(response, 413, "too_large")


async def test_json_image_over_the_limit_after_decoding_is_413(small_server, http) -> None:
    """1001 bytes encode to 1336 characters, as many as 1000 bytes do: only the decoded size
    can tell."""
    encoded = b64(b"\x00" * 1001)
    assert len(encoded) == len(b64(b"\x00" * 1000))
    assert_error(await post_json(http, small_server, {"image": encoded}), 413, "too_large")


async def test_json_image_at_the_limit_is_processed(small_server, http) -> None:
    image = make_image(4, 4, "PNG", seed=5)
    assert len(image) <= 1000
    assert (await post_json(http, small_server, {"image": b64(image)})).status_code == 200


async def test_form_body_over_the_limit_is_413_by_content_length(small_server, http) -> None:
    response = await post_form(http, small_server, b"\x00" * (1000 + (1 << 20) + 1))
    assert_error(response, 413, "too_large")


async def test_form_file_over_the_limit_is_413(small_server, http) -> None:
    assert_error(await post_form(http, small_server, b"\x00" * 1001), 413, "too_large")


async def test_form_large_file_goes_through_the_threaded_copy(server_factory, http) -> None:
    """Over 1 MiB the copy into the spool runs off the loop: the bytes must still arrive."""
    server = server_factory()
    image = make_image(1200, 900, "PNG", seed=11)
    assert len(image) > 1 << 20
    response = await post_form(http, server, image)
    assert response.status_code == 200, response.text
    assert response.json()["image"] == {"width": 1200, "height": 900, "format": "PNG"}
    response = await post_json(http, server, {"image": b64(image)})
    assert response.json()["cached"] is True  # the same bytes, hashed the same way


# Rate limits and load shedding --------------------------------------------------------------


async def test_rate_limit_is_429_with_retry_after_per_client_address(server_factory,
                                                                     http) -> None:
    server = server_factory()
    server.state.http_buckets = KeyedBuckets(rate=0.01, burst=2)  # no refill within the test
    for _ in range(2):  # bad requests count too
        assert_error(await post_json(http, server, {"image": 5}), 400, "bad_message")
    limited = await post_json(http, server, {"image": b64(unique_image())})
    body = assert_error(limited, 429, "rate_limited")
    assert 90_000 <= body["retry_after_ms"] <= 100_000
    assert limited.headers["Retry-After"] == str(math.ceil(body["retry_after_ms"] / 1000))
    form = await post_form(http, server, unique_image())
    assert_error(form, 429, "rate_limited")

    # Another client address has its own bucket.
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(transport=transport, timeout=30) as other:
        response = await post_json(other, server, {"image": b64(unique_image())})
    assert response.status_code == 200, response.text

    # Health, readiness and metrics are not rate limited.
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await http.get(server.http_url + path)).status_code == 200


async def test_busy_is_503_when_the_queue_is_full(server_factory, open_client, http,
                                                  gate) -> None:
    server = server_factory(max_queue=1, max_batch_size=1)
    async with open_client(server.ws_url) as client:
        with gate.closed():
            await client.send_upload("run", unique_image(320, 240), task="gate")
            await client.expect("progress", id="run", stage="decoding")
            await client.send_upload("wait", unique_image(320, 240))
            await client.expect("progress", id="wait", stage="queued")
            for response in (
                await post_json(http, server, {"image": b64(unique_image())}),
                await post_form(http, server, unique_image()),
            ):
                body = assert_error(response, 503, "busy")
                assert body["retry_after_ms"] > 0
                assert int(response.headers["Retry-After"]) >= 1
        assert (await client.outcome("wait"))["type"] == "result"
    # Capacity is back.
    response = await post_json(http, server, {"image": b64(unique_image())})
    assert response.status_code == 200


async def test_a_client_that_goes_away_withdraws_its_queued_analysis(server_factory,
                                                                     open_client, gate) -> None:
    """An HTTP client that closes its connection while its job waits in the queue: the job is
    withdrawn (as a socket's ``cancel`` withdraws one), so the upload queued behind it moves
    up at once instead of waiting for work nobody will read."""
    server = server_factory(max_batch_size=1)
    async with open_client(server.ws_url) as client:
        with gate.closed():
            await client.send_upload("run", unique_image(320, 240), task="gate")
            await client.expect("progress", id="run", stage="decoding")
            leaving = httpx.AsyncClient(timeout=30)
            request = asyncio.ensure_future(post_json(leaving, server,
                                                      {"image": b64(unique_image())}))
            deadline = time.monotonic() + 30  # the request reaches the queue in another task
            while (await leaving.get(server.http_url + "/readyz")).json()["queue_depth"] < 1:
                assert time.monotonic() < deadline, "the HTTP job was never queued"
                await asyncio.sleep(0.02)
            await client.send_upload("wait", unique_image(320, 240))
            await client.expect("progress", id="wait", stage="queued", position=2)
            request.cancel()  # the connection is closed under the request
            with contextlib.suppress(asyncio.CancelledError):
                await request
            await leaving.aclose()
            await client.expect("progress", id="wait", stage="queued", position=1)
        assert (await client.outcome("wait"))["type"] == "result"


# Tokens -------------------------------------------------------------------------------------

TOKENS = ("http-token-one", "http-token-two")


@pytest.fixture
def token_server(server_factory) -> RunningServer:
    return server_factory(api_tokens=TOKENS)


@pytest.mark.parametrize(
    ("params", "headers"),
    [(None, None), ({"token": "wrong"}, None), ({"token": ""}, None),
     (None, {"Authorization": "Bearer wrong"}), (None, {"Authorization": f"Basic {TOKENS[0]}"})],
    ids=["none", "wrong query", "empty query", "wrong bearer", "not bearer"],
)
async def test_without_a_valid_token_analyze_is_401(token_server, http, params: Any,
                                                    headers: Any) -> None:
    image = unique_image()
    for response in (
        await post_json(http, token_server, {"image": b64(image)}, params=params,
                        headers=headers or {}),
        await post_form(http, token_server, image, params=params, headers=headers),
    ):
        assert_error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert TOKENS[0] not in response.text


async def test_a_bad_request_without_a_token_is_401_not_400(token_server, http) -> None:
    assert_error(await post_json(http, token_server, b"not json"), 401, "unauthorized")


@pytest.mark.parametrize("token", TOKENS)
async def test_a_valid_token_in_the_header_or_query_is_200(token_server, http,
                                                           token: str) -> None:
    bearer = {"Authorization": f"Bearer {token}"}
    responses = [
        await post_json(http, token_server, {"image": b64(unique_image())}, headers=bearer),
        await post_json(http, token_server, {"image": b64(unique_image())},
                        params={"token": token}),
        await post_form(http, token_server, unique_image(), headers=bearer),
        await post_form(http, token_server, unique_image(), params={"token": token}),
    ]
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/"])
async def test_health_metrics_and_page_never_need_a_token(token_server, http, path: str) -> None:
    assert (await http.get(token_server.http_url + path)).status_code == 200


# Health, readiness, metrics, page -----------------------------------------------------------


async def test_healthz(colors_server, http) -> None:
    response = await http.get(colors_server.http_url + "/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_with_workers_ready(colors_server, http) -> None:
    response = await http.get(colors_server.http_url + "/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["ready"] is True
    assert body["workers_ready"] == colors_server.settings.workers
    assert body["tasks_without_workers"] == []
    assert body["cache"] is True
    assert body["queue_depth"] == 0
    assert body["models"] == {"colors": COLORS_MODEL, "gate": "test/gate"}
    assert "error" not in body


class PartlyServed:
    """A pool as a gateway sees it when no live worker serves ``gate``."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self.unserved_tasks = ["gate"]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


@pytest.mark.parametrize(("readiness", "status"), [("all-tasks", 503), ("any-task", 200)])
async def test_readyz_with_a_task_that_has_no_worker(server_factory, http, readiness: str,
                                                     status: int) -> None:
    server = server_factory(readiness=readiness)
    service = server.state.service
    working, service.pool = service.pool, PartlyServed(service.pool)
    try:
        response = await http.get(server.http_url + "/readyz")
    finally:
        service.pool = working
    assert response.status_code == status
    assert response.json()["tasks_without_workers"] == ["gate"]
    assert (await http.get(server.http_url + "/readyz")).status_code == 200


async def test_readyz_is_503_when_the_cache_does_not_answer(server_factory, http) -> None:
    server = server_factory()
    service = server.state.service

    class DeadCache:
        async def ping(self) -> bool:
            raise ConnectionError("cache unreachable")

    working, service.cache = service.cache, DeadCache()
    try:
        response = await http.get(server.http_url + "/readyz")
    finally:
        service.cache = working
    assert response.status_code == 503
    assert (response.json()["ready"], response.json()["cache"]) == (False, False)
    assert (await http.get(server.http_url + "/readyz")).status_code == 200


async def test_metrics_count_http_requests_by_status(colors_server, http) -> None:
    async def scrape() -> str:
        response = await http.get(colors_server.http_url + "/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        return response.text

    name = "pixelstream_http_analyze_requests_total"
    before = await scrape()
    await post_json(http, colors_server, {"image": b64(unique_image())})
    await post_form(http, colors_server, unique_image())
    await post_json(http, colors_server, {"image": "!!"})
    await post_json(http, colors_server, {"image": b64(png_claiming(60_000, 60_000))})
    after = await scrape()
    assert counter(after, name, status="200") - counter(before, name, status="200") == 2
    assert counter(after, name, status="400") - counter(before, name, status="400") == 1
    assert counter(after, name, status="422") - counter(before, name, status="422") == 1
    errors = "pixelstream_errors_total"
    assert (counter(after, errors, code="bad_base64")
            - counter(before, errors, code="bad_base64")) == 1
    assert "pixelstream_stage_seconds_bucket" in after


async def test_demo_page_is_html(colors_server, http) -> None:
    response = await http.get(colors_server.http_url + "/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<html" in response.text.lower()
    assert "pixelstream" in response.text


# The error catalogue ------------------------------------------------------------------------


def test_every_error_code_has_an_http_status() -> None:
    assert set(HTTP_STATUS) == set(ErrorCode)
    assert all(400 <= status < 600 for status in HTTP_STATUS.values())


@pytest.mark.parametrize(
    ("code", "status"),
    [("bad_message", 400), ("bad_base64", 400), ("invalid_image", 400), ("unauthorized", 401),
     ("too_large", 413), ("too_many_pixels", 422), ("unknown_task", 422),
     ("rate_limited", 429), ("internal", 500), ("busy", 503)],
)
def test_protocol_md_statuses(code: str, status: int) -> None:
    assert HTTP_STATUS[ErrorCode(code)] == status


def test_error_response_carries_retry_after_in_whole_seconds() -> None:
    from chunking.errors import ProtocolError
    from server.errors import error_response

    for ms, header in ((1, "1"), (999, "1"), (1000, "1"), (1001, "2"), (2500, "3")):
        response = error_response(ProtocolError(ErrorCode.BUSY, "x", retry_after_ms=ms))
        assert response.headers["Retry-After"] == header
        assert orjson.loads(response.body) == {"code": "busy", "message": "x",
                                               "retry_after_ms": ms}
    plain = error_response(ProtocolError(ErrorCode.BAD_MESSAGE, "y"))
    assert "Retry-After" not in plain.headers
    assert orjson.loads(plain.body) == {"code": "bad_message", "message": "y"}


# CORS, origins, request ids ---------------------------------------------------------------------

ALLOWED_ORIGIN = "https://app.example"


async def test_cors_preflight_answers_allowed_origins_only(server_factory, http) -> None:
    server = server_factory(allowed_origins=(ALLOWED_ORIGIN,))
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    allowed = await http.options(server.http_url + "/api/analyze",
                                 headers={"Origin": ALLOWED_ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in allowed.headers  # bearer tokens only
    refused = await http.options(server.http_url + "/api/analyze",
                                 headers={"Origin": "https://evil.example", **preflight})
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers


async def test_cross_origin_requests_carry_cors_headers_and_foreign_ones_are_refused(
    server_factory, http
) -> None:
    server = server_factory(allowed_origins=(ALLOWED_ORIGIN,))
    image = {"image": b64(unique_image(40, 30))}
    ok = await post_json(http, server, image, headers={"Origin": ALLOWED_ORIGIN})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "Retry-After" in ok.headers["access-control-expose-headers"]
    # A simple (unpreflighted) cross-site POST still reaches the server: refuse its work.
    foreign = await post_form(http, server, unique_image(40, 30),
                              headers={"Origin": "https://evil.example"})
    assert_error(foreign, 403, "forbidden_origin")
    assert "access-control-allow-origin" not in foreign.headers
    health = await http.get(server.http_url + "/healthz", headers={"Origin": ALLOWED_ORIGIN})
    assert health.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


async def test_without_an_allow_list_only_the_own_origin_may_post(colors_server, http) -> None:
    own = f"http://127.0.0.1:{colors_server.port}"
    ok = await post_json(http, colors_server, {"image": b64(unique_image(40, 30))},
                         headers={"Origin": own})
    assert ok.status_code == 200
    assert "access-control-allow-origin" not in ok.headers  # same origin: no CORS needed
    refused = await post_json(http, colors_server, {"image": b64(unique_image(40, 30))},
                              headers={"Origin": "http://evil.example"})
    assert_error(refused, 403, "forbidden_origin")


async def test_every_response_names_its_request(colors_server, http) -> None:
    first = await post_json(http, colors_server, b"{not json")
    second = await http.get(colors_server.http_url + "/healthz")
    ids = {first.headers["x-request-id"], second.headers["x-request-id"]}
    assert len(ids) == 2
    assert all(len(i) == 16 for i in ids)


# Slow and greedy requests ------------------------------------------------------------------------


async def raw_http(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes (a reset counts as a close: the server
    closes with our trickled bytes unread, and the kernel answers those with a reset)."""
    received = b""
    async with asyncio.timeout(15):
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(65536):
                received += chunk
    return received


async def trickled_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          piece: bytes) -> bytes:
    """Send ``piece`` every 50 ms (a slowloris's pace) until the server answers and closes."""

    async def trickle() -> None:
        for _ in range(1000):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)  # the attack's pace, not a wait for an event

    trickler = asyncio.create_task(trickle())
    try:
        return await read_until_closed(reader)
    finally:
        trickler.cancel()
        writer.close()


async def test_a_body_that_trickles_in_is_cut_with_408(server_factory) -> None:
    server = server_factory(http_body_timeout_s=0.5, http_header_timeout_s=5)
    reader, writer = await raw_http(server.port)
    writer.write(b"POST /api/analyze HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\n"
                 b"Content-Length: 100000\r\n\r\n{\"image\": \"")
    started = time.monotonic()
    answer = await trickled_answer(reader, writer, b"A")
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"code":"bad_message"' in answer
    assert time.monotonic() - started < 5
    assert server.state.budget.held == 0  # its reservation was given back


async def test_a_request_head_that_trickles_in_is_dropped(server_factory) -> None:
    server = server_factory(http_header_timeout_s=0.5)
    reader, writer = await raw_http(server.port)
    writer.write(b"POST /api/analyze HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    started = time.monotonic()
    answer = await trickled_answer(reader, writer, b"X-Slow: 1\r\n")
    assert answer == b""  # no request was ever made: the connection is just closed
    assert 0.4 < time.monotonic() - started < 5


async def test_the_head_deadline_applies_to_each_keep_alive_request(server_factory) -> None:
    server = server_factory(http_header_timeout_s=0.5)
    reader, writer = await raw_http(server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    writer.write(b"GET /healthz HTTP/1.1\r\n")  # the next request's head never ends
    await writer.drain()
    started = time.monotonic()
    assert await read_until_closed(reader) == b""
    writer.close()
    assert time.monotonic() - started < 5


async def test_a_huge_request_head_is_refused(colors_server, http) -> None:
    """h11 buffers at most 64 KiB of head: beyond, 400 and close (the close may overtake the
    answer as a reset, since the rest of the head is never read)."""
    reader, writer = await raw_http(colors_server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Big: " + b"a" * 200_000)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    answer = await read_until_closed(reader)
    writer.close()
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400 ")
    assert (await http.get(colors_server.http_url + "/healthz")).status_code == 200


async def test_a_request_that_does_not_fit_the_memory_budget_is_busy(server_factory, http
                                                                     ) -> None:
    server = server_factory(memory_budget_bytes=100_000)
    big = unique_image(200, 200, "BMP")  # 120 KB: over the whole budget
    response = await post_form(http, server, big)
    body = assert_error(response, 503, "busy")
    assert body["retry_after_ms"] > 0
    assert int(response.headers["retry-after"]) >= 1
    small = await post_form(http, server, unique_image(40, 30))
    assert small.status_code == 200
    assert server.state.budget.held == 0


async def test_a_form_field_given_twice_is_refused_not_picked(colors_server, http) -> None:
    image = unique_image(40, 30)
    for fields in ({"task": ["colors", "gate"]}, {"options": ["{}", '{"colors": 3}']}):
        answer = await http.post(colors_server.http_url + "/v1/analyze", data=fields,
                                 files={"file": ("image.png", image, "image/png")})
        assert_error(answer, 400, "bad_message")
    answer = await http.post(colors_server.http_url + "/v1/analyze",
                             files=[("file", ("a.png", image, "image/png")),
                                    ("file", ("b.png", image, "image/png"))])
    assert_error(answer, 400, "bad_message")
