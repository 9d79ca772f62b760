"""The client over tus 1.0: asked for (``transport="tus"``), or by itself when the socket
cannot be opened (``auto``), against a real server and a proxy that refuses WebSockets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from chunking.cli import main
from chunking.client import Client, ConnectFailedError, InvalidImageError
from chunking.client.tus import tus_endpoint
from tests.conftest import RunningServer, make_image, unique_image
from tests.support.browser_proxy import CuttingProxy


def test_the_endpoint_comes_from_the_socket_url() -> None:
    assert tus_endpoint("ws://h:8000/v1/ws") == "http://h:8000/v1/tus/"
    assert tus_endpoint("wss://h/base/v1/ws") == "https://h/base/v1/tus/"


async def test_tus_uploads_in_pieces_with_progress_to_a_result(colors_server: RunningServer
                                                               ) -> None:
    image = unique_image(400, 300)
    progress: list[tuple[int, int, int]] = []
    stages: list[tuple[str, dict[str, Any]]] = []
    async with Client(colors_server.ws_url, transport="tus",
                      tus_chunk_size=len(image) // 3 + 1) as client:
        result = await client.analyze(image, on_progress=lambda *a: progress.append(a),
                                      on_stage=lambda s, d: stages.append((s, d)))
    assert result.task == "colors"
    assert result.image["width"] == 400
    assert [p[0] for p in progress] == sorted({p[0] for p in progress})
    assert len(progress) == 3
    assert progress[-1] == (len(image), len(image), len(image))
    assert stages[:2] == [("hashing", {}), ("upload", {"offset": 0, "resumed": False})]


async def test_auto_falls_back_to_tus_when_the_upgrade_is_refused(colors_server: RunningServer
                                                                  ) -> None:
    with CuttingProxy(colors_server.port) as proxy:
        proxy.refuse_websockets = True
        url = proxy.url.replace("http://", "ws://") + "/v1/ws"
        async with Client(url) as client:
            assert client.over_tus
            result = await client.analyze(make_image(seed=3))
        assert result.task == "colors"
        assert {c.kind for c in proxy.connections} == {"websocket", "http"}
        with pytest.raises(ConnectFailedError):
            async with Client(url, transport="websocket"):
                pass


async def test_errors_over_tus_are_the_typed_errors(colors_server: RunningServer) -> None:
    async with Client(colors_server.ws_url, transport="tus") as client:
        with pytest.raises(InvalidImageError):
            await client.analyze(b"not an image" * 50)


def test_the_cli_uploads_over_tus(colors_server: RunningServer, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(make_image(seed=5))
    code = main(["upload", str(path), "--url", colors_server.ws_url, "--transport", "tus",
                 "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured
    assert '"ok": true' in captured.out.replace('"ok":true', '"ok": true')
