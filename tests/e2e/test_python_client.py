"""The Python client and CLI against the real service: the bundled model behind the socket."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import skimage.data
from PIL import Image

from chunking.client import Client, FrameDropped, FrameResult
from server.cli import main
from server.settings import Settings
from tests.conftest import RunningServer, start_server
from tests.support.pyclient_proxy import Fault, TcpProxy
from tests.support.sample_tasks import BrightSpots

CATS = {"Egyptian cat", "tabby, tabby cat", "tiger cat"}


@pytest.fixture(scope="module")
def classify_server() -> Iterator[RunningServer]:
    """The default task set (classify first) with the bundled model, as ``serve`` runs it."""
    running = start_server(Settings(max_chunk_bytes=1 << 20, max_wait_ms=2.0))
    yield running
    running.stop()


def big_chelsea(path: Path, scale: int = 8) -> Path:
    """Chelsea the cat, upscaled to 3608 x 2400 with film grain: a JPEG of several megabytes."""
    cat = Image.fromarray(skimage.data.chelsea())
    big = np.asarray(cat.resize((cat.width * scale, cat.height * scale),
                                Image.Resampling.BICUBIC)).astype(np.int16)
    grain = np.random.default_rng(0).integers(-12, 13, size=big.shape, dtype=np.int16)
    Image.fromarray(np.clip(big + grain, 0, 255).astype(np.uint8)).save(path, "JPEG",
                                                                        quality=95)
    return path


async def test_a_large_photo_from_disk_survives_a_cut_and_is_a_cat(classify_server, tmp_path
                                                                    ) -> None:
    path = big_chelsea(tmp_path / "chelsea.jpg")
    size = path.stat().st_size
    assert size > 2 * 1024 * 1024
    stages: list[tuple[str, dict[str, Any]]] = []
    async with TcpProxy(classify_server.port, faults={0: Fault(cut_after=size // 2)}) as proxy, \
            Client(proxy.ws_url) as client:
        result = await client.analyze(path, options={"top_k": 3},
                                      on_stage=lambda s, d: stages.append((s, d)))
    labels = [item["label"] for item in result.result["labels"]]
    assert len(labels) == 3
    assert CATS & set(labels)
    assert result.image == {"width": 3608, "height": 2400, "format": "JPEG"}
    resumed = [d for s, d in stages if s == "upload"][1]
    assert resumed["resumed"] is True
    assert proxy.connections[1].up_bytes < size - resumed["offset"] + 4096


def write_clip(path: Path, frames: int, size: tuple[int, int] = (320, 240)) -> Path:
    import cv2

    coffee = Image.fromarray(skimage.data.coffee()).resize(size)
    base = np.asarray(coffee)[:, :, ::-1]  # BGR for OpenCV
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, size)
    assert writer.isOpened()
    for index in range(frames):
        writer.write(np.roll(base, index * 3, axis=1).copy())
    writer.release()
    return path


async def test_a_video_faster_than_the_model_drops_frames_and_latency_stays_bounded(
        classify_server, tmp_path) -> None:
    frames = 240
    clip = write_clip(tmp_path / "coffee.avi", frames)
    events = []
    async with Client(classify_server.ws_url) as client:
        async with client.stream_frames(str(clip), stream="coffee", fps=None) as stream:
            async for event in stream:
                events.append(event)
        stats = stream.stats
    results = [e for e in events if isinstance(e, FrameResult)]
    dropped = [e for e in events if isinstance(e, FrameDropped)]
    assert stats.sent == frames == len(events)  # every frame ends as exactly one event
    assert dropped
    assert {e.reason for e in dropped} == {"superseded"}
    assert len(results) >= 2
    assert results[-1].seq == frames - 1  # the newest frame is the one analysed last
    assert "espresso" in {r.result.result["labels"][0]["label"] for r in results}
    # Latest frame wins: a frame waits for at most the one running, so its latency stays
    # within a few model runs, where a queue of every frame would grow with the clip.
    run_s = max((r.result.timings_ms.get("decode", 0) + r.result.timings_ms.get("inference", 0))
                / 1000 for r in results)
    worst = max(r.latency_s for r in results)
    assert worst <= 3 * run_s + 1.0, (worst, run_s)
    assert worst < frames * run_s / 4
    print(f"\n{frames} frames: {stats.to_dict()} (model run {run_s * 1000:.1f} ms)")


def test_the_cli_classifies_with_top_k(classify_server, tmp_path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "coffee.jpg"
    out = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).save(out, "JPEG")
    path.write_bytes(out.getvalue())
    assert main(["upload", str(path), "--top-k", "2", "--json",
                 "--url", classify_server.ws_url]) == 0
    (line,) = [orjson.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert line["result"]["labels"][0]["label"] == "espresso"
    assert len(line["result"]["labels"]) == 2
    assert main(["analyze", str(path), "--http", "--url", classify_server.http_url]) == 0
    (line,) = [orjson.loads(text) for text in capsys.readouterr().out.splitlines()]
    assert line["result"]["labels"][0]["label"] == "espresso"


def test_the_cli_runs_any_task_with_options_and_summarizes_its_result(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = start_server(Settings(max_wait_ms=2.0), tasks=(BrightSpots(),))
    try:
        pixels = np.full((700, 1100, 3), 15, dtype=np.uint8)
        pixels[40:140, 60:200] = 250  # the brightest spot
        pixels[500:600, 800:900] = 220
        path = tmp_path / "spots.png"
        Image.fromarray(pixels).save(path)
        assert main(["upload", str(path), "--task", "detect", "--options",
                     '{"max_objects": 1, "threshold": 0.8}', "--url", server.ws_url]) == 0
        (line,) = capsys.readouterr().out.splitlines()
        # The option reached the task, and the line says what it found in words.
        assert line.startswith(f"ok    {path}  1 object: spot 0.98"), line
        assert main(["upload", str(path), "--task", "detect", "--json", "--options",
                     '{"tiles": false}', "--url", server.ws_url]) == 0
        (answer,) = [orjson.loads(text) for text in capsys.readouterr().out.splitlines()]
        assert [o["box"] for o in answer["result"]["objects"]] == [[60, 40, 200, 140],
                                                                  [800, 500, 900, 600]]
    finally:
        server.stop()
