"""Hostile input through a live server: malformed and malicious messages, uploads and frames.

Every case runs on its own socket while a second socket uploads a normal image: the case gets
its documented error (or close code, for what the WebSocket layer itself refuses), the hostile
socket still answers afterwards, the normal upload's result is right, and the server stays up.
At the end, a seeded protocol fuzzer sends random and mutated messages and checks that nothing
crashed (no ``internal`` answer, no fault logged), nothing leaked (no upload, session or
budget byte held once the sockets are gone and idle uploads expired) and that the metrics agree
with what the clients saw.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import random
import resource
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from websockets.exceptions import InvalidStatus

from chunking.codec import encode_client_binary
from chunking.messages import Chunk, Frame
from server.auth import principal_of
from server.pipeline.decode import DEFAULT_DECODE_DEADLINE_S
from server.tasks.builtin.colors import Colors
from tests.conftest import (
    WAIT_S,
    ProtocolClient,
    RunningServer,
    connect,
    fast_settings,
    make_image,
    start_server,
    unique_image,
)
from tests.support import hostile_images as bad
from tests.support.gate import GateTask
from tests.support.raw_ws import OP_TEXT, RawWebSocket, frame_bytes

MAX_CONNECTIONS = 12


@pytest.fixture(scope="module")
def server(gate: Any) -> Iterator[RunningServer]:
    settings = fast_settings(uploads_per_minute=0, max_connections_per_client=MAX_CONNECTIONS,
                             upload_idle_timeout_s=1.0)
    running = start_server(settings, tasks=(Colors(), GateTask(gate.lock_path)))
    yield running
    running.stop()


CHUNK = fast_settings().max_chunk_bytes


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def text(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def upload(**fields: Any) -> str:
    return text({"type": "upload", "id": "u1", "size": 1000, **fields})


def chunk(**fields: Any) -> str:
    return text({"type": "chunk", "id": "u1", "offset": 0, "data": b64(b"x" * 10), **fields})


def binary(header: Any, payload: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else orjson.dumps(header)
    return struct.pack(">H", len(raw)) + raw + payload


async def normal_upload(client: ProtocolClient, upload_id: str = "normal") -> dict[str, Any]:
    data = unique_image(160, 120)
    await client.send_upload(upload_id, data, chunk_size=4096)
    return await client.outcome(upload_id)


def assert_normal_result(result: dict[str, Any]) -> None:
    assert result["type"] == "result", result
    assert result["image"] == {"width": 160, "height": 120, "format": "PNG"}
    assert result["result"]["colors"]


_PINGS = iter(range(1, 1 << 30))


async def assert_alive(client: ProtocolClient) -> None:
    """The socket still answers: a cancel for nothing is ``unknown_upload``."""
    probe = f"alive-{next(_PINGS)}"
    await client.send({"type": "cancel", "id": probe})
    assert (await client.expect("error", id=probe))["code"] == "unknown_upload"


async def alongside(server: RunningServer, open_client: Any,
                    hostile: Callable[[ProtocolClient], Awaitable[None]]) -> None:
    """Run ``hostile`` on one socket while another uploads a normal image."""
    async with open_client(server.ws_url) as bystander:
        normal = asyncio.create_task(normal_upload(bystander))
        try:
            async with open_client(server.ws_url) as client:
                await hostile(client)
        finally:
            result = await normal
    assert_normal_result(result)


# Messages ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    message: str | bytes
    code: str
    setup: bool = False
    """Open upload ``u1`` (1000 bytes) first."""


CASES = [
    # Not JSON, not an object, no type.
    Case("not_json", "hello", "bad_message"),
    Case("truncated_json", '{"type": "upload", "id": "u', "bad_message"),
    Case("json_array", "[1, 2, 3]", "bad_message"),
    Case("json_string", '"upload"', "bad_message"),
    Case("json_null", "null", "bad_message"),
    Case("json_bignum", "123456789012345678901234567890", "bad_message"),
    Case("json_nan", '{"type": "upload", "id": "u1", "size": NaN}', "bad_message"),
    Case("json_deep", "[" * 30_000 + "]" * 30_000, "bad_message"),
    Case("json_many_fields", text({"type": "chunk", "id": "u1", "offset": 0, "data": "QUJD",
                                   "x": [{}] * 40_000}), "too_large", setup=True),
    Case("json_no_data_field", "[" + "{}," * 40_000 + "{}]", "too_large"),
    Case("empty_object", "{}", "bad_message"),
    Case("type_not_string", text({"type": 7}), "bad_message"),
    Case("unknown_type", text({"type": "exec", "cmd": "rm -rf /"}), "bad_message"),
    Case("prototype_pollution", text({"type": "upload", "__proto__": {"admin": True}}),
         "bad_message"),
    # Upload fields of the wrong type, form or range.
    Case("upload_no_id", text({"type": "upload", "size": 10}), "bad_message"),
    Case("id_path_traversal", upload(id="../../etc/passwd"), "bad_message"),
    Case("id_absolute_path", upload(id="/etc/passwd"), "bad_message"),
    Case("id_windows_path", upload(id="..\\..\\boot.ini"), "bad_message"),
    Case("id_url_encoded", upload(id="%2e%2e%2fetc"), "bad_message"),
    Case("id_too_long", upload(id="a" * 65), "bad_message"),
    Case("id_empty", upload(id=""), "bad_message"),
    Case("id_unicode", upload(id="üpload"), "bad_message"),
    Case("id_nul_byte", upload(id="a\u0000b"), "bad_message"),
    Case("id_number", upload(id=5), "bad_message"),
    Case("size_string", upload(size="100"), "bad_message"),
    Case("size_float", upload(size=1.5), "bad_message"),
    Case("size_bool", upload(size=True), "bad_message"),
    Case("size_zero", upload(size=0), "bad_message"),
    Case("size_negative", upload(size=-1), "bad_message"),
    Case("size_int64_max", upload(size=2**63 - 1), "too_large"),
    Case("size_beyond_int64", '{"type":"upload","id":"u1","size":99999999999999999999999}',
         "bad_message"),
    Case("size_float_overflow", '{"type":"upload","id":"u1","size":1e400}', "bad_message"),
    Case("sha_not_hex", upload(sha256="z" * 64), "bad_message"),
    Case("sha_short", upload(sha256="ab"), "bad_message"),
    Case("task_path", upload(task="../colors"), "bad_message"),
    Case("task_unknown", upload(task="mine-bitcoin"), "unknown_task"),
    Case("options_string", upload(options="x"), "bad_message"),
    Case("options_out_of_range", upload(options={"colors": 1000}), "bad_message"),
    Case("options_unknown_key", upload(options={"shell": "/bin/sh"}), "bad_message"),
    Case("name_too_long", upload(name="n" * 2000), "bad_message"),
    Case("name_not_string", upload(name=["a"]), "bad_message"),
    Case("resume_bad_chars", upload(resume="!!"), "bad_message"),
    Case("resume_unknown", upload(resume="A" * 32), "unknown_upload"),
    Case("duplicate_upload", upload(), "duplicate_upload", setup=True),
    # Chunks.
    Case("chunk_negative_offset", chunk(offset=-1), "bad_message", setup=True),
    Case("chunk_offset_string", chunk(offset="0"), "bad_message", setup=True),
    Case("chunk_offset_huge", chunk(offset=2**62), "offset_mismatch", setup=True),
    Case("chunk_gap", chunk(offset=10), "offset_mismatch", setup=True),
    Case("chunk_past_size", chunk(data=b64(b"x" * 1001)), "offset_mismatch", setup=True),
    Case("chunk_invalid_base64", chunk(data="@@@@"), "bad_base64", setup=True),
    Case("chunk_base64_whitespace", chunk(data="YW Jj"), "bad_base64", setup=True),
    Case("chunk_base64_inner_padding", chunk(data="YQ==YQ=="), "bad_base64", setup=True),
    Case("chunk_data_number", chunk(data=12), "bad_message", setup=True),
    Case("chunk_no_data", text({"type": "chunk", "id": "u1", "offset": 0}), "bad_message",
         setup=True),
    Case("chunk_too_large", chunk(data=b64(b"x" * (CHUNK + 1))), "too_large", setup=True),
    Case("chunk_unknown_upload", chunk(id="nobody"), "unknown_upload"),
    Case("cancel_unknown", text({"type": "cancel", "id": "nobody"}), "unknown_upload"),
    # Frames.
    Case("frame_negative_seq", text({"type": "frame", "stream": "c", "seq": -1,
                                     "data": b64(b"x")}), "bad_message"),
    Case("frame_stream_path", text({"type": "frame", "stream": "../c", "seq": 1,
                                    "data": b64(b"x")}), "bad_message"),
    Case("frame_empty_data", text({"type": "frame", "stream": "c", "seq": 1, "data": ""}),
         "invalid_image"),
    # Binary frames with lying or broken headers.
    Case("binary_too_short", b"\x00", "bad_message"),
    Case("binary_header_length_lies", b"\x00\xff" + b'{"type":"chunk"}', "bad_message"),
    Case("binary_header_length_zero", b"\x00\x00abc", "bad_message"),
    Case("binary_header_not_json", binary(b"<xml/>", b"payload"), "bad_message"),
    Case("binary_header_invalid_utf8", binary(b"\xff\xfe\xfd\xfc", b"payload"), "bad_message"),
    Case("binary_header_array", binary([1, 2], b"payload"), "bad_message"),
    Case("binary_upload_type", binary({"type": "upload", "id": "u2", "size": 5}, b"x"),
         "bad_message"),
    Case("binary_header_with_data",
         binary({"type": "chunk", "id": "u1", "offset": 0, "data": "AA=="}, b"x"),
         "bad_message", setup=True),
    Case("binary_chunk_lying_offset", binary({"type": "chunk", "id": "u1", "offset": 500},
                                             b"x" * 10), "offset_mismatch", setup=True),
    Case("binary_chunk_too_large", binary({"type": "chunk", "id": "u1", "offset": 0},
                                          b"x" * (CHUNK + 1)), "too_large", setup=True),
    Case("binary_chunk_negative_offset", binary({"type": "chunk", "id": "u1", "offset": -5},
                                                b"x"), "bad_message", setup=True),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_a_hostile_message_gets_its_documented_error(server, open_client, case: Case
                                                           ) -> None:
    async def hostile(client: ProtocolClient) -> None:
        if case.setup:
            await client.upload("u1", 1000)
            await client.expect("accepted", id="u1")
        await client.send_raw(case.message)
        error = await client.expect("error")
        assert error["code"] == case.code, error
        message = error["message"]
        assert isinstance(message, str)
        assert len(message) < 300
        assert not any(leak in message for leak in ("Traceback", ".py", "/work", "/tmp"))
        await assert_alive(client)

    await alongside(server, open_client, hostile)


async def test_too_many_uploads_on_one_socket(server, open_client) -> None:
    async def hostile(client: ProtocolClient) -> None:
        limit = client.welcome["limits"]["max_uploads"]
        for n in range(limit):
            await client.upload(f"u{n}", 100)
            await client.expect("accepted", id=f"u{n}")
        await client.upload("one-more", 100)
        assert (await client.expect("error", id="one-more"))["code"] == "too_many_uploads"
        await assert_alive(client)

    await alongside(server, open_client, hostile)


# Images -----------------------------------------------------------------------------------------

IMAGES: list[tuple[str, Callable[[], bytes], str]] = [
    ("truncated_png", lambda: bad.truncated(make_image(64, 48, "PNG", seed=1)), "invalid_image"),
    ("truncated_jpeg", lambda: bad.truncated(make_image(64, 48, "JPEG", seed=1)),
     "invalid_image"),
    ("truncated_gif", lambda: bad.truncated(make_image(64, 48, "GIF", seed=1)), "invalid_image"),
    ("truncated_webp", lambda: bad.truncated(make_image(64, 48, "WEBP", seed=1)),
     "invalid_image"),
    ("corrupt_png", bad.corrupt_png, "invalid_image"),
    ("random_bytes", lambda: random.Random(5).randbytes(5000), "invalid_image"),
    ("one_byte", lambda: b"\x89", "invalid_image"),
    ("bomb_png_lying_header", lambda: bad.png_claiming(100_000, 100_000), "too_many_pixels"),
    ("bomb_png_honest_zeros", bad.png_zero_bomb, "too_many_pixels"),
    ("bomb_jpeg", lambda: bad.jpeg_claiming(65_000, 65_000), "too_many_pixels"),
    ("bomb_gif", lambda: bad.gif_claiming(65_535, 65_535), "too_many_pixels"),
    ("bomb_webp_lossless", lambda: bad.webp_claiming(16_384, 16_384), "too_many_pixels"),
    ("bomb_webp_extended", lambda: bad.webp_vp8x_claiming(16_384, 16_384), "too_many_pixels"),
    ("bomb_bmp", lambda: bad.bmp_claiming(100_000, 100_000), "too_many_pixels"),
    ("bomb_tiff", lambda: bad.tiff_claiming(100_000, 100_000), "too_many_pixels"),
    ("polyglot_jpeg_html", bad.jpeg_html_polyglot, "invalid_image"),
    ("polyglot_gif_javascript", bad.gif_script_polyglot, "invalid_image"),
]


@pytest.mark.parametrize(("data", "code"), [(make, code) for _, make, code in IMAGES],
                         ids=[name for name, _, _ in IMAGES])
async def test_a_hostile_upload_gets_its_documented_error(server, open_client,
                                                          data: Callable[[], bytes], code: str
                                                          ) -> None:
    image = data()

    async def hostile(client: ProtocolClient) -> None:
        await client.send_upload("bad", image, chunk_size=8192)
        outcome = await client.outcome("bad")
        assert (outcome["type"], outcome.get("code")) == ("error", code), outcome
        await assert_alive(client)

    await alongside(server, open_client, hostile)


async def test_a_png_with_a_zip_appended_is_only_ever_an_image(server, open_client) -> None:
    image = bad.png_zip_polyglot()

    async def hostile(client: ProtocolClient) -> None:
        await client.send_upload("poly", image)
        outcome = await client.outcome("poly")
        assert outcome["type"] == "result", outcome
        assert outcome["image"] == {"width": 48, "height": 32, "format": "PNG"}

    await alongside(server, open_client, hostile)


async def test_a_lying_checksum_discards_the_upload(server, open_client) -> None:
    async def hostile(client: ProtocolClient) -> None:
        data = unique_image()
        await client.send_upload("lie", data, sha256=hashlib.sha256(b"other").hexdigest())
        assert (await client.outcome("lie"))["code"] == "checksum_mismatch"

    await alongside(server, open_client, hostile)


@pytest.mark.parametrize(("data", "code"), [
    (lambda: bad.png_claiming(50_000, 50_000), "too_many_pixels"),
    (lambda: bad.gif_claiming(65_535, 65_535), "too_many_pixels"),
    (lambda: random.Random(6).randbytes(3000), "invalid_image"),
], ids=["png_bomb", "gif_bomb", "random_bytes"])
async def test_a_hostile_frame_gets_its_documented_error(server, open_client,
                                                         data: Callable[[], bytes], code: str
                                                         ) -> None:
    async def hostile(client: ProtocolClient) -> None:
        await client.frame("cam", 1, data())
        error = await client.expect("error", stream="cam")
        assert (error["code"], error["seq"]) == (code, 1)
        await assert_alive(client)

    await alongside(server, open_client, hostile)


# Decode bombs under max_pixels: bounded before decoding, the worker's memory measured ----------

WORKER_GROWTH_LIMIT = 400 * 1024 * 1024


@pytest.fixture(scope="module")
def pixels_server() -> Iterator[RunningServer]:
    """The default pixel limit (about 179 MP), where these bombs pass the pixel count."""
    settings = fast_settings(uploads_per_minute=0, max_connections_per_client=MAX_CONNECTIONS,
                             max_pixels=178_956_970)
    running = start_server(settings, tasks=(Colors(),))
    yield running
    running.stop()


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {key} for process {pid}")


class WorkerMemory:
    """Peak RSS growth of the server's worker processes from now (Linux ``clear_refs``)."""

    def __init__(self, server: RunningServer) -> None:
        self.pids = list(server.state.service.pool.worker_pids)
        self.before = {}
        for pid in self.pids:
            with open(f"/proc/{pid}/clear_refs", "w") as refs:
                refs.write("5")  # the peak mark starts again from the current RSS
            self.before[pid] = _status_kib(pid, "VmRSS")

    def growth_bytes(self) -> int:
        return max(_status_kib(pid, "VmHWM") - self.before[pid] for pid in self.pids) * 1024


DECODE_BOMBS: list[tuple[str, Callable[[], bytes], str]] = [
    # 7 bytes short of nothing: libjpeg would keep 13000x13000 coefficients (484 MiB).
    ("progressive_jpeg_empty_scans", lambda: bad.progressive_jpeg_claiming(13000, 13000),
     "too_many_pixels"),
    # Each scan a pass over 8000x8000 coefficients: a thousand of them took tens of seconds.
    ("jpeg_1000_scans", lambda: bad.progressive_jpeg_claiming(8000, 8000, extra_scans=1000),
     "too_many_pixels"),
    ("jpeg_non_interleaved", lambda: bad.baseline_jpeg_non_interleaved_claiming(12000, 12000),
     "too_many_pixels"),
    ("tiff_16bit_one_strip", lambda: bad.tiff_claiming(10000, 10000, bits=16, samples=4),
     "too_many_pixels"),
    ("png_interlaced", lambda: bad.png_interlaced_claiming(10000, 10000), "too_many_pixels"),
    ("webp_frame", lambda: bad.webp_vp8x_claiming(9000, 9000), "too_many_pixels"),
    ("gif_canvas", lambda: bad.gif_claiming(9000, 9000), "too_many_pixels"),
    # An honest 16-bit image of 169 MP: allowed, and streamed by libvips in little memory.
    ("png_16bit_zeros", lambda: bad.png_16bit_zero_bomb(13000), "result"),
]


@pytest.mark.parametrize(("data", "answer"), [(make, answer) for _, make, answer in DECODE_BOMBS],
                         ids=[name for name, _, _ in DECODE_BOMBS])
async def test_a_decode_bomb_costs_the_worker_little(pixels_server, open_client,
                                                     data: Callable[[], bytes], answer: str
                                                     ) -> None:
    image = data()
    memory = WorkerMemory(pixels_server)

    async def hostile(client: ProtocolClient) -> None:
        await client.send_upload("bomb", image, chunk_size=CHUNK)
        outcome = await client.outcome("bomb")
        got = outcome["type"] if answer == "result" else outcome.get("code")
        assert got == answer, outcome

    started = time.monotonic()
    await alongside(pixels_server, open_client, hostile)
    took = time.monotonic() - started
    growth = memory.growth_bytes()
    print(f"worker growth {growth / 2**20:.1f} MiB; bomb and victim done in {took:.2f} s")
    assert growth < WORKER_GROWTH_LIMIT
    # Never stuck behind the bomb until a timeout: every decode stops at its deadline.
    assert took < DEFAULT_DECODE_DEADLINE_S


@pytest.mark.parametrize("data", [
    lambda: bad.progressive_jpeg_claiming(13000, 13000),
    lambda: bad.progressive_jpeg_claiming(8000, 8000, extra_scans=1000),
], ids=["progressive_jpeg_empty_scans", "jpeg_1000_scans"])
async def test_a_decode_bomb_as_a_camera_frame_meets_the_same_limits(
        pixels_server, open_client, data: Callable[[], bytes]) -> None:
    memory = WorkerMemory(pixels_server)

    async def hostile(client: ProtocolClient) -> None:
        await client.frame("cam", 1, data())
        error = await client.expect("error", stream="cam")
        assert (error["code"], error["seq"]) == ("too_many_pixels", 1)
        await assert_alive(client)

    await alongside(pixels_server, open_client, hostile)
    assert memory.growth_bytes() < WORKER_GROWTH_LIMIT


# What the WebSocket layer refuses: the socket closes, nothing else does -----------------------


async def test_invalid_utf8_in_a_text_frame_closes_only_that_socket_1007(
    server, open_client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    async def hostile(_: ProtocolClient) -> None:
        for _ in range(3):  # each one used to log an ERROR with a traceback
            async with RawWebSocket.connect(server.port) as raw:
                await raw.welcome()
                await raw.send_raw(frame_bytes(OP_TEXT, b'{"type": "\xff\xfe"}'))
                async with asyncio.timeout(WAIT_S):
                    assert await raw.closed() == 1007

    await alongside(server, open_client, hostile)
    noted = [r for r in caplog.records if "not UTF-8" in r.getMessage()]
    assert len(noted) == 3
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in noted)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_a_client_dropping_its_analyze_body_is_no_fault(
    server, open_client, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that sends half its body and disconnects: the server notes it, counts no
    ``internal`` error, logs no traceback, and holds nothing for it afterwards."""
    caplog.set_level(logging.INFO)
    registry = server.state.metrics.registry

    def internal() -> float:
        return registry.get_sample_value("pixelstream_errors_total", {"code": "internal"}) or 0

    before = internal()

    async def hostile(_: ProtocolClient) -> None:
        form_head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
        for path, content_type, head in (
            ("/api/analyze", "application/json", b'{"image": "'),
            ("/v1/analyze", "multipart/form-data; boundary=b", form_head),
        ):
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         f"Content-Type: {content_type}\r\nContent-Length: 100000\r\n\r\n"
                         .encode() + head + b"A" * 5000)
            await writer.drain()
            writer.close()  # gone, mid-body
            await writer.wait_closed()

    await alongside(server, open_client, hostile)
    await until(lambda: len([r for r in caplog.records if "went away" in r.getMessage()]) == 2,
                "both dropped requests to be noted")
    assert internal() == before
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def test_a_message_beyond_the_transport_limit_closes_only_that_socket_1009(
    server, open_client
) -> None:
    limit = server.settings.limits.max_message_bytes

    async def hostile(_: ProtocolClient) -> None:
        async with RawWebSocket.connect(server.port) as raw:
            await raw.welcome()
            # Only the frame header: the server refuses on the declared length, unbuffered.
            await raw.send_raw(frame_bytes(OP_TEXT, b"", length=limit + 1))
            async with asyncio.timeout(WAIT_S):
                assert await raw.closed() == 1009

    await alongside(server, open_client, hostile)


# Exposure ---------------------------------------------------------------------------------------


async def test_a_dns_rebinding_page_reaches_nothing(server, open_client) -> None:
    """A page of evil.example whose name now resolves to this server's address: its requests
    carry ``Host: evil.example`` and its own Origin, so to the browser they are same-origin.
    The socket, the analyze routes and the metrics all refuse that name."""
    rebound = {"Host": f"evil.example:{server.port}",
               "Origin": f"http://evil.example:{server.port}"}

    async def hostile(_: ProtocolClient) -> None:
        async with RawWebSocket.connect(server.port, headers=rebound) as raw:
            response = await raw.handshake_response()
            assert response.status_code == 400
            assert orjson.loads(response.body)["code"] == "forbidden_host"
        async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT_S) as http:
            image = b64(make_image(16, 16, seed=3))
            for method, path, body in (("POST", "/api/analyze", {"image": image}),
                                       ("GET", "/metrics", None), ("GET", "/", None)):
                answer = await http.request(method, path, json=body, headers=rebound)
                assert answer.status_code == 400, (path, answer.text)
                assert answer.json()["code"] == "forbidden_host"
                assert "pixelstream_" not in answer.text
            # A TLS page of the server's own name may not drive a plain-HTTP server either:
            # the Origin's scheme must be the request's.
            tls_page = {"Origin": f"https://127.0.0.1:{server.port}"}
            answer = await http.post("/api/analyze", json={"image": image}, headers=tls_page)
            assert (answer.status_code, answer.json()["code"]) == (403, "forbidden_origin")

    await alongside(server, open_client, hostile)


# Memory budget: declared but never sent -------------------------------------------------------


async def test_body_less_posts_hold_nothing_and_freeze_no_socket(server_factory, open_client
                                                                 ) -> None:
    """Three POSTs declaring the largest body and sending none used to reserve it (twice, for
    JSON) and so fill the budget: every socket's reader then paused. Now a body is reserved as
    it arrives: they hold nothing, and an upload in progress and a new socket are served."""
    length = -(-fast_settings().max_image_bytes // 3) * 4 + 65536
    # Two such JSON requests reserved at their declared length filled this budget to within
    # one small chunk of the limit.
    server = server_factory(memory_budget_bytes=4 * length + 100_000)
    state = server.state
    async with open_client(server.ws_url) as in_progress:
        image = unique_image(160, 120)
        await in_progress.upload("normal", len(image))
        await in_progress.expect("accepted", id="normal")
        await in_progress.chunk("normal", 0, image[:1000])
        await in_progress.expect("progress", id="normal")
        writers = []
        for path in ("/api/analyze", "/api/analyze", "/v1/analyze"):
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
                         .encode())
            await writer.drain()
            writers.append(writer)
        try:
            await until(lambda: "127.0.0.1" in state.http_buckets._buckets,
                        "the requests to be admitted")
            started = time.monotonic()
            await in_progress.chunk("normal", 1000, image[1000:])
            assert_normal_result(await in_progress.outcome("normal"))
            async with open_client(server.ws_url) as newcomer:
                assert_normal_result(await normal_upload(newcomer, "newcomer"))
            assert time.monotonic() - started < 10
            assert state.budget.held == 0  # the three hanging requests hold nothing
        finally:
            for writer in writers:
                writer.close()


async def test_declared_uploads_that_never_send_lock_nothing(server_factory, open_client
                                                             ) -> None:
    """Four addresses each declaring as many of the largest uploads as they may and sending
    nothing (one resuming with an empty chunk, which is no activity): nothing is held, and a
    fifth address's upload and HTTP request are served."""
    server = server_factory(memory_budget_bytes=32 * 1024 * 1024)  # share: 8 MiB
    state = server.state
    size = server.settings.max_image_bytes
    per_socket = server.settings.max_uploads
    async with contextlib.AsyncExitStack() as stack:
        for n in range(4):
            attacker = await stack.enter_async_context(
                open_client(server.ws_url, local_addr=(f"127.0.0.{n + 2}", 0)))
            for k in range(per_socket):
                await attacker.upload(f"big{k}", size)
                accepted = await attacker.expect("accepted", id=f"big{k}")
            stored = state.store._uploads[accepted["resume"]]
            idle_since = stored.last_write
            await attacker.chunk(f"big{per_socket - 1}", 0, b"")  # no byte: no activity
            await attacker.expect("progress", id=f"big{per_socket - 1}")
            assert stored.last_write == idle_since
        assert len(state.uploads.live) == 4 * per_socket
        assert state.budget.held == 0
        started = time.monotonic()
        async with open_client(server.ws_url) as victim:
            assert_normal_result(await normal_upload(victim, "victim"))
        async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT_S) as http:
            answer = await http.post("/api/analyze",
                                     json={"image": b64(unique_image(64, 48))})
            assert answer.status_code == 200, answer.text
        assert time.monotonic() - started < 10


# JSON bombs -----------------------------------------------------------------------------------


async def test_json_bombs_are_refused_before_they_are_parsed(server, open_client) -> None:
    """``{"image": "AAAA", "x": [{}, {}, ...]}``: millions of objects if parsed (hundreds of
    MB and seconds of the event loop). Refused ``too_large`` on sight, over HTTP and as a
    WebSocket text message, while a normal upload runs alongside; the gateway barely grows."""
    limit = server.settings.limits.max_message_bytes
    http_bomb = b'{"image": "AAAA", "x": [' + b"{}," * 2_500_000 + b'{}]}'  # 7.5 MB
    ws_bomb = ('{"type": "chunk", "id": "u1", "offset": 0, "data": "QUJD", "x": ['
               + "{}," * ((limit - 200) // 3) + "{}]}")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    async def hostile(client: ProtocolClient) -> None:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=WAIT_S) as http:
            started = time.monotonic()
            answer = await http.post("/api/analyze", content=http_bomb,
                                     headers={"Content-Type": "application/json"})
            assert (answer.status_code, answer.json()["code"]) == (413, "too_large")
            assert time.monotonic() - started < 5
        await client.send_raw(ws_bomb)
        assert (await client.expect("error"))["code"] == "too_large"
        await assert_alive(client)

    await alongside(server, open_client, hostile)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown_kib < 100 * 1024  # parsed, the HTTP bomb alone took 210 MiB (and 0.3 s)


# Redis mode: bytes parked in the shared store ----------------------------------------------------

REDIS_URL = os.environ.get("PIXELSTREAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


async def test_one_client_parks_no_more_than_its_share_in_redis(server_factory, open_client
                                                                ) -> None:
    """Uploads sent all but their last byte, parked in Redis: one client stops at its share
    (``busy`` on the chunk past it) and another client's upload is served meanwhile."""
    from server.storage.redis import connect as connect_redis

    redis = connect_redis(REDIS_URL)
    await redis.flushdb()
    await redis.aclose()
    cap = 4 * 1024 * 1024
    server = server_factory(redis_url=REDIS_URL, redis_upload_bytes=cap,
                            api_tokens=("attacker-token", "victim-token"))
    share = cap // 2  # a largest upload (8 MiB here) needs more than a quarter: half
    size, piece = 1024 * 1024, 256 * 1024
    async with open_client(server.ws_url + "?token=attacker-token") as attacker:
        refused = 0
        for n in range(4):
            await attacker.upload(f"park{n}", size)
            await attacker.expect("accepted", id=f"park{n}")
            for offset in range(0, size - piece, piece):
                await attacker.chunk(f"park{n}", offset, b"p" * piece)
            await attacker.chunk(f"park{n}", size - piece, b"p" * (piece - 1))
            for _ in range(size // piece):
                answer = await attacker.expect(lambda m, n=n: m.get("id") == f"park{n}")
                if answer["type"] == "error" and answer["code"] == "busy":
                    assert answer["retry_after_ms"] > 0
                    refused += 1
                elif answer["type"] == "error":  # the chunks after a refused one
                    assert answer["code"] == "offset_mismatch", answer
                    assert refused
        assert refused > 0
        store = server.state.store
        principal = principal_of("attacker-token")
        held = server.call(store.held_bytes(principal))
        assert share - piece < held <= share
        async with open_client(server.ws_url + "?token=victim-token") as victim:
            started = time.monotonic()
            assert_normal_result(await normal_upload(victim))
            assert time.monotonic() - started < 10
    assert server.call(store.held_bytes()) <= cap


# Floods -------------------------------------------------------------------------------------------


async def test_a_message_flood_is_rate_limited_and_every_message_answered(server, open_client
                                                                          ) -> None:
    count = 4000  # twice the default burst of 2000

    async def hostile(client: ProtocolClient) -> None:
        for n in range(count):
            await client.send({"type": "cancel", "id": f"f{n}"})
        codes: Counter[str] = Counter()
        retry_after = []
        for _ in range(count):
            message = await client.next()
            codes[message["code"]] += 1
            if message["code"] == "rate_limited":
                retry_after.append(message["retry_after_ms"])
        assert set(codes) == {"unknown_upload", "rate_limited"}
        assert codes["rate_limited"] > 0
        assert all(ms > 0 for ms in retry_after)

    await alongside(server, open_client, hostile)


async def test_a_frame_flood_keeps_the_latest_frame_and_answers_every_one(server, open_client
                                                                          ) -> None:
    count = 40

    async def hostile(client: ProtocolClient) -> None:
        image = make_image(64, 48, seed=77)
        for seq in range(1, count + 1):
            await client.frame("flood", seq, image)
        outcomes: dict[int, str] = {}
        while len(outcomes) < count:
            message = await client.next()
            assert message.get("stream") == "flood", message
            assert message["seq"] not in outcomes
            outcomes[message["seq"]] = message["type"]
        assert set(outcomes.values()) <= {"result", "dropped"}
        assert outcomes[count] == "result"  # the latest frame always runs
        assert list(outcomes.values()).count("dropped") > 0

    await alongside(server, open_client, hostile)


async def test_a_connection_flood_is_refused_past_the_per_client_limit(server, open_client
                                                                       ) -> None:
    async def hostile(_: ProtocolClient) -> None:
        # Two sockets are open already (this one and the bystander's).
        sockets = [connect(server.ws_url) for _ in range(MAX_CONNECTIONS - 2)]
        opened = [await s.__aenter__() for s in sockets]
        try:
            with pytest.raises(InvalidStatus) as refused:
                async with connect(server.ws_url):
                    pass
            assert refused.value.response.status_code == 429
            assert orjson.loads(refused.value.response.body)["code"] == "rate_limited"
        finally:
            for ws, context in zip(opened, sockets, strict=True):
                await context.__aexit__(None, None, None)
                del ws

    await alongside(server, open_client, hostile)


async def test_after_all_that_the_server_is_healthy_and_holds_nothing(server, open_client
                                                                      ) -> None:
    async with open_client(server.ws_url) as client:
        assert_normal_result(await normal_upload(client, "final"))
    state = server.state
    await until(lambda: len(state.store) == 0 and not state.live and state.budget.held == 0
                and not state.sessions, "idle uploads to expire and sockets to close")
    registry = state.metrics.registry
    assert registry.get_sample_value("pixelstream_errors_total", {"code": "internal"}) is None
    assert registry.get_sample_value("pixelstream_active_sockets") == 0


async def until(predicate: Callable[[], bool], what: str,
                detail: Callable[[], Any] = lambda: None) -> None:
    """Bounded polling of the server's state (it runs on another thread's loop)."""
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {detail()}"
        await asyncio.sleep(0.02)


# A seeded protocol fuzzer ------------------------------------------------------------------

FUZZ_MESSAGES = int(os.environ.get("PIXELSTREAM_FUZZ_MESSAGES", "4000"))
FUZZ_SEED = int(os.environ.get("PIXELSTREAM_FUZZ_SEED", "20251125"))
FUZZ_SOCKETS = 4


class Fuzzer:
    """Messages from a seeded generator: valid ones, valid ones mutated, random values."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.images = [make_image(24, 16, fmt, seed=seed % 1000 + n)
                       for n, fmt in enumerate(("PNG", "JPEG", "GIF", "WEBP", "BMP"))]
        self.ids = ["u1", "u2", "u3", "cam", "x", "../u1", "", "a" * 70]
        self.offsets: dict[str, int] = {}
        self.current = self.images[0]

    def value(self, depth: int = 0) -> Any:
        rng = self.rng
        kind = rng.randrange(9 if depth < 3 else 6)
        if kind == 0:
            return None
        if kind == 1:
            return rng.choice([True, False])
        if kind == 2:
            return rng.choice([0, -1, 1, 2**31, 2**63 - 1, -(2**63), rng.randrange(-10**6, 10**6)])
        if kind == 3:
            return rng.choice([0.5, -0.0, 1e308, 3.14])
        if kind == 4:
            return rng.choice(["", "u1", "upload", "chunk", "../../x", "\u0000", "é" * 10,
                               b64(rng.randbytes(rng.randrange(0, 40)))])
        if kind == 5:
            return rng.choice(self.ids)
        if kind == 6:
            return [self.value(depth + 1) for _ in range(rng.randrange(4))]
        return {rng.choice(["type", "id", "size", "offset", "data", "seq", "stream", "task",
                            "options", "sha256", "resume", "name", "colors", "x"]):
                self.value(depth + 1) for _ in range(rng.randrange(5))}

    def valid(self) -> dict[str, Any]:
        rng = self.rng
        upload_id = rng.choice(self.ids[:4])
        kind = rng.randrange(5)
        if kind == 0:
            image = rng.choice(self.images)
            self.offsets[upload_id] = 0
            self.current = image
            return {"type": "upload", "id": upload_id, "size": len(image),
                    "task": rng.choice(["colors", "colors", "gate", "nope"]),
                    "options": rng.choice([{}, {"colors": rng.randrange(0, 20)}])}
        if kind in (1, 2):
            image = self.current
            offset = self.offsets.get(upload_id, 0)
            if rng.random() < 0.2:
                offset = rng.randrange(0, len(image) + 10)
            piece = image[offset : offset + rng.randrange(1, 2000)]
            self.offsets[upload_id] = offset + len(piece)
            return {"type": "chunk", "id": upload_id, "offset": offset, "data": piece}
        if kind == 3:
            return {"type": "frame", "stream": rng.choice(["cam", "c2"]),
                    "seq": rng.randrange(0, 50), "data": rng.choice(self.images)}
        return {"type": "cancel", "id": upload_id}

    def message(self) -> str | bytes:
        rng = self.rng
        roll = rng.random()
        if roll < 0.45:  # a valid-looking message, as text or binary
            obj = self.valid()
            data = obj.pop("data", None)
            if data is not None and rng.random() < 0.6:
                cls = Chunk if obj["type"] == "chunk" else Frame
                fields = {k: v for k, v in obj.items() if k != "type"}
                try:
                    return encode_client_binary(cls(**fields, data=data))  # type: ignore[arg-type]
                except (TypeError, ValueError):
                    pass
            if data is not None:
                obj["data"] = b64(data)
            return text(obj)
        if roll < 0.7:  # a valid one, mutated: a field's value replaced, a field dropped
            obj = self.valid()
            obj.pop("data", None)
            obj["data"] = b64(rng.randbytes(rng.randrange(0, 64)))
            key = rng.choice(list(obj))
            if rng.random() < 0.5:
                obj[key] = self.value()
            else:
                del obj[key]
            return text(obj)
        if roll < 0.8:  # its JSON text with bytes flipped
            raw = bytearray(text(self.valid() | {"data": "QUJD"}).encode())
            for _ in range(rng.randrange(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(32, 127)
            return raw.decode(errors="replace")
        if roll < 0.9:  # any JSON value
            return text(self.value())
        # A binary frame: a random header length, random or JSON header, random payload.
        header = rng.choice([rng.randbytes(rng.randrange(0, 20)), text(self.value()).encode()])
        length = rng.choice([len(header), rng.randrange(0, 65536)])
        return struct.pack(">H", length) + header + rng.randbytes(rng.randrange(0, 300))


async def fuzz_socket(url: str, fuzzer: Fuzzer, count: int, observed: Counter[str]) -> int:
    """Send ``count`` fuzzed messages, then a marker; count every error code received."""
    async with connect(url) as ws:
        assert orjson.loads(await ws.recv())["type"] == "welcome"
        done = asyncio.Event()
        marker = f"end-{id(fuzzer)}-{count}"

        async def read() -> None:  # until the socket closes: a client that stops reading
            async for raw in ws:  # is one the server stops reading (and closing) too
                message = orjson.loads(raw)
                if message["type"] == "error":
                    observed[message["code"]] += 1
                    if message.get("id") == marker:
                        done.set()

        reader = asyncio.create_task(read())
        for _ in range(count):
            await ws.send(fuzzer.message())
        await ws.send(text({"type": "cancel", "id": marker}))
        async with asyncio.timeout(WAIT_S):
            await done.wait()
            await ws.close()
            await reader
    return count


async def test_a_seeded_protocol_fuzzer_crashes_nothing_and_leaks_nothing(
    server_factory, open_client, gate, caplog: pytest.LogCaptureFixture
) -> None:
    server = server_factory(upload_idle_timeout_s=0.3, uploads_per_minute=0)
    caplog.set_level(logging.WARNING)
    observed: Counter[str] = Counter()
    per_socket = FUZZ_MESSAGES // FUZZ_SOCKETS
    with gate.closed():  # "gate" uploads wait in the queue: cancels and drops meet real jobs
        sent = await asyncio.gather(*(
            fuzz_socket(server.ws_url, Fuzzer(FUZZ_SEED + n), per_socket, observed)
            for n in range(FUZZ_SOCKETS)
        ))
    assert sum(sent) == per_socket * FUZZ_SOCKETS
    # Zero crashes: the server still answers, and no handler failed unexpectedly.
    async with open_client(server.ws_url) as client:
        assert_normal_result(await normal_upload(client, "after-fuzz"))
    assert observed["internal"] == 0, observed
    faults = [r for r in caplog.records
              if r.name.startswith("pixelstream") and r.levelno >= logging.ERROR]
    assert not faults, [r.getMessage() for r in faults]
    # Zero leaks: once the sockets are gone and idle uploads expired, nothing is held.
    state = server.state
    await until(lambda: len(state.store) == 0 and not state.live and not state.sessions
                and state.budget.held == 0, "every upload and session to be let go",
                lambda: (len(state.store), state.live, state.sessions, state.budget.held))
    # The metrics agree with what the clients saw.
    registry = state.metrics.registry
    assert registry.get_sample_value("pixelstream_active_sockets") == 0
    assert registry.get_sample_value("pixelstream_memory_held_bytes") == 0
    for code, count in observed.items():
        counted = registry.get_sample_value("pixelstream_errors_total", {"code": code}) or 0
        assert counted >= count, (code, counted, count)
    assert sum(observed.values()) >= FUZZ_MESSAGES // 3  # most fuzzed messages are refused
    print(f"fuzzer: {FUZZ_MESSAGES} messages (seed {FUZZ_SEED}), errors by code: "
          f"{dict(sorted(observed.items()))}")

