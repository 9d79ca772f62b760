"""The client for scripts without asyncio (chunking.client.sync)."""

from __future__ import annotations

from chunking.client import (
    SyncClient,
    analyze_sync,
)
from tests.support.pyclient_media import (
    solid_png,
)
from tests.support.pyclient_record import (
    padded,
    top_hex,
)


def test_analyze_sync_and_the_sync_client(colors_server, tmp_path) -> None:
    result = analyze_sync(padded((44, 55, 66), 0), url=colors_server.ws_url, base64=True)
    assert top_hex(result) == "#2c3742"
    path = tmp_path / "a.png"
    path.write_bytes(padded((66, 55, 44), 300_000))
    stages: list[str] = []
    with SyncClient(colors_server.ws_url) as client:
        result = client.analyze(path, on_stage=lambda stage, detail: stages.append(stage))
        frames = client.stream_frames([solid_png((1, 1, 1))] * 3, stream="sync")
        events = list(frames)
    assert top_hex(result) == "#42372c"
    assert stages[:2] == ["hashing", "upload"]
    assert stages[-1] == "inference"
    assert len(events) == 3
    assert frames.stats.sent == 3
