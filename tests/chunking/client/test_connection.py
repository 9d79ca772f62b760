"""One socket (chunking.client.connection): handshake refusals, upload slots and the shared
window, binary or Base64 frames, stalls."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import numpy as np
import pytest

from chunking.client import (
    Client,
    ConnectFailedError,
    ForbiddenHostError,
    ForbiddenOriginError,
    StalledError,
    UnauthorizedError,
)
from chunking.messages import Upload
from tests.support.pyclient_fake_server import FakePeer, FakeServer
from tests.support.pyclient_media import (
    distinct_colors,
    hex_of,
)
from tests.support.pyclient_proxy import Fault, TcpProxy
from tests.support.pyclient_record import (
    Recorder,
    errors_sent,
    padded,
    top_hex,
)


async def test_a_directory_uploads_concurrently_on_one_socket(colors_server, tmp_path) -> None:
    colors = distinct_colors(10)
    paths = []
    for index, color in enumerate(colors):
        path = tmp_path / f"img{index:02d}.png"
        path.write_bytes(padded(color, 400_000))
        paths.append(path)
    receiving: set[int] = set()
    most = 0

    def tracker(index: int) -> Any:
        def on_progress(sent: int, acknowledged: int, total: int) -> None:
            nonlocal most
            if acknowledged < total:
                receiving.add(index)
            else:
                receiving.discard(index)
            most = max(most, len(receiving))
        return on_progress

    refused_before = errors_sent(colors_server, "too_many_uploads")
    async with TcpProxy(colors_server.port) as proxy, Client(proxy.ws_url) as client:
        results = await asyncio.gather(*(
            client.analyze(path, on_progress=tracker(i)) for i, path in enumerate(paths)
        ))
    assert [top_hex(r) for r in results] == [hex_of(c) for c in colors]
    assert len(proxy.connections) == 1
    assert errors_sent(colors_server, "too_many_uploads") == refused_before  # slots respected
    assert 2 <= most <= colors_server.settings.max_uploads  # concurrent, within max_uploads


async def test_all_uploads_of_a_socket_share_one_window(colors_server) -> None:
    """Once both uploads are accepted the proxy delivers nothing more to the client: no
    acknowledgement comes, so together they may send one window of chunks, and then must wait
    (until the stall timer gives the socket up, and they resume on a new one)."""
    window = colors_server.settings.window_bytes
    uploads = [padded((10, 20, 30), 2_000_000), padded((30, 20, 10), 2_000_000)]
    acked: dict[int, int] = {0: 0, 1: 0}
    accepted: set[int] = set()
    stalled = asyncio.Event()
    acked_at_mute = 0

    def callbacks(index: int) -> dict[str, Any]:
        def on_progress(sent: int, acknowledged: int, total: int) -> None:
            acked[index] = acknowledged

        def on_stage(stage: str, detail: dict[str, Any]) -> None:
            nonlocal acked_at_mute
            if stage == "upload" and len(accepted) < 2:
                accepted.add(index)
                if len(accepted) == 2:
                    proxy.connections[0].mute()
                    acked_at_mute = sum(acked.values())
            if stage == "retrying" and detail["code"] == "stalled":
                stalled.set()
        return {"on_progress": on_progress, "on_stage": on_stage}

    async with TcpProxy(colors_server.port) as proxy, \
            Client(proxy.ws_url, stall_timeout=1.0) as client:
        results = await asyncio.gather(*(client.analyze(data, **callbacks(i))
                                         for i, data in enumerate(uploads)))
    assert stalled.is_set()
    assert [top_hex(r) for r in results] == ["#0a141e", "#1e140a"]
    sent_unacknowledged = proxy.connections[0].up_bytes - acked_at_mute
    chunk = colors_server.settings.max_chunk_bytes
    assert sent_unacknowledged <= window + 8192  # the window, plus headers and handshake
    assert sent_unacknowledged >= window - chunk  # and the window was used


@pytest.mark.parametrize("base64", [False, True], ids=["binary", "base64"])
async def test_chunks_travel_as_binary_frames_or_base64_text(tmp_path, base64: bool) -> None:
    data = np.random.default_rng(5).bytes(200_000)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    received: dict[str, Any] = {}

    async def script(peer: FakePeer) -> None:
        upload = await peer.expect(Upload)
        received["upload"] = upload
        received["data"] = await peer.serve_upload(upload)
        received["frames"] = (peer.text_frames, peer.binary_frames)

    async with FakeServer(script) as server, Client(server.url, base64=base64) as client:
        await client.analyze(path, task="colors", options={"colors": 3})
    upload = received["upload"]
    assert received["data"] == data
    assert (upload.name, upload.size, upload.task, upload.options) == (
        "photo.jpg", len(data), "colors", {"colors": 3})
    assert upload.sha256 == hashlib.sha256(data).hexdigest()
    text, binary = received["frames"]
    chunks = -(-len(data) // (64 * 1024))
    assert (text, binary) == ((1 + chunks, 0) if base64 else (1, chunks))


async def test_a_stalled_connection_is_dropped_and_resumed(colors_server) -> None:
    data = padded((90, 0, 90), 2_000_000)
    record = Recorder()
    fault = Fault(freeze_after=len(data) // 2)
    async with TcpProxy(colors_server.port, faults={0: fault}) as proxy, \
            Client(proxy.ws_url, stall_timeout=1.0) as client:
        result = await client.analyze(data, **record.callbacks)
    assert top_hex(result) == "#5a005a"
    retrying = [d for n, d in record.stages if n == "retrying"]
    assert [d["code"] for d in retrying] == ["stalled"]
    assert isinstance(retrying[0]["error"], StalledError)
    assert len(proxy.connections) == 2
    resumed = [d for n, d in record.stages if n == "upload"][1]
    assert resumed["resumed"] is True
    assert resumed["offset"] > 0


@pytest.mark.parametrize(("status", "body", "expected"), [
    (401, {"code": "unauthorized", "message": "a valid API token is required"},
     UnauthorizedError),
    (403, {"code": "forbidden_origin", "message": "no"}, ForbiddenOriginError),
    (400, {"code": "forbidden_host", "message": "not this Host"}, ForbiddenHostError),
    (500, {}, ConnectFailedError),
])
async def test_a_refused_handshake_raises_its_error(status: int, body: dict[str, Any],
                                                    expected: type[Exception]) -> None:
    async def script(peer: FakePeer) -> None:
        raise AssertionError("never reached")

    async with FakeServer(script, refuse=(status, body)) as server:
        with pytest.raises(expected) as raised:
            async with Client(server.url):
                pass
    if body.get("message"):
        assert body["message"] in str(raised.value)


async def test_a_1008_close_before_the_welcome_is_unauthorized() -> None:
    async def script(peer: FakePeer) -> None:
        raise AssertionError("never reached")

    async with FakeServer(script, close_before_welcome=1008) as server:
        with pytest.raises(UnauthorizedError):
            await Client(server.url).connect()


async def test_a_token_server_refuses_a_client_without_one(server_factory) -> None:
    server = server_factory(api_tokens=("s3cret",))
    with pytest.raises(UnauthorizedError):
        async with Client(server.ws_url):
            pass
    async with Client(server.ws_url, token="s3cret") as client:
        assert top_hex(await client.analyze(padded((6, 6, 6), 0))) == "#060606"
