"""Camera streams (chunking.client.frames): drops, sources, pacing, fatal errors, lost frames."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from chunking.client import (
    Client,
    FrameDropped,
    FrameFailed,
    FrameResult,
    FrameStats,
    TooLargeError,
    UnknownTaskError,
    encode_frame,
)
from chunking.errors import ErrorCode
from tests.conftest import WAIT_S
from tests.support.pyclient_media import (
    distinct_colors,
    solid_png,
    write_video,
)
from tests.support.pyclient_proxy import TcpProxy


def close_to(hex_color: str, rgb: tuple[int, int, int], tolerance: int = 12) -> bool:
    values = tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return all(abs(a - b) <= tolerance for a, b in zip(values, rgb, strict=True))


async def test_a_video_file_streamed_faster_than_the_worker_drops_frames(colors_server, gate,
                                                                         tmp_path) -> None:
    """The worker is held inside frame 0: frames 1…10 each replace the waiting one, so the
    server reports 1…9 (and then 10) superseded, and only 0 and 11 get results."""
    colors = distinct_colors(12)
    video = write_video(tmp_path / "clip.avi", colors)
    events: list[Any] = []
    superseded = len(colors) - 2
    holding = gate.closed()
    holding.__enter__()
    try:
        async with Client(colors_server.ws_url) as client:
            async with client.stream_frames(str(video), stream="clip", task="gate") as frames:
                async for event in frames:
                    events.append(event)
                    dropped = sum(isinstance(e, FrameDropped) for e in events)
                    if holding is not None and dropped == superseded:
                        holding.__exit__(None, None, None)
                        holding = None
            stats = frames.stats
    finally:
        if holding is not None:
            holding.__exit__(None, None, None)
    dropped = [e for e in events if isinstance(e, FrameDropped)]
    results = [e for e in events if isinstance(e, FrameResult)]
    assert [e.seq for e in dropped] == list(range(1, len(colors) - 1))
    assert {e.reason for e in dropped} == {"superseded"}
    assert [e.seq for e in results] == [0, len(colors) - 1]
    for event in results:
        assert close_to(event.result.result["colors"][0]["hex"], colors[event.seq])
        assert 0 < event.latency_s < WAIT_S
        assert event.result.stream == "clip"
    assert (stats.sent, stats.results, stats.dropped, stats.lost, stats.errors) == (
        len(colors), 2, superseded, 0, 0)
    assert set(stats.latency_percentiles()) == {"p50", "p90", "p99", "max"}


async def test_frames_from_arrays_pil_images_and_bytes(colors_server) -> None:
    from PIL import Image

    colors = distinct_colors(6)
    frames: list[Any] = []
    for index, (r, g, b) in enumerate(colors):
        if index % 3 == 0:
            frames.append(np.full((48, 64, 3), (b, g, r), np.uint8))  # BGR, as from OpenCV
        elif index % 3 == 1:
            frames.append(Image.new("RGB", (64, 48), (r, g, b)))
        else:
            frames.append(solid_png((r, g, b)))
    async with Client(colors_server.ws_url) as client:
        events = [event async for event in client.stream_frames(frames, stream="mixed")]
    assert sorted(e.seq for e in events) == list(range(len(colors)))
    results = [e for e in events if isinstance(e, FrameResult)]
    assert results
    assert results[-1].seq == len(colors) - 1
    for event in results:
        assert close_to(event.result.result["colors"][0]["hex"], colors[event.seq])
    assert all(isinstance(e, (FrameResult, FrameDropped)) for e in events)


async def test_fps_paces_the_frames(colors_server) -> None:
    frames = [solid_png((index * 10, 0, 0)) for index in range(6)]
    loop = asyncio.get_running_loop()
    async with Client(colors_server.ws_url) as client:
        start = loop.time()
        stream = client.stream_frames(frames, stream="paced", fps=40)
        events = [event async for event in stream]
        elapsed = loop.time() - start
    assert len(events) == 6
    assert elapsed >= 5 / 40  # six frames, five intervals


async def test_an_async_iterable_is_a_frame_source(colors_server) -> None:
    async def frames() -> AsyncIterator[bytes]:
        for index in range(3):
            yield solid_png((0, index * 50, 0))

    async with Client(colors_server.ws_url) as client:
        events = [event async for event in client.stream_frames(frames(), stream="agen")]
    assert len(events) == 3
    assert isinstance(events[-1], FrameResult)


async def test_an_unknown_task_ends_the_stream_with_its_error(colors_server) -> None:
    events: list[Any] = []
    async with Client(colors_server.ws_url) as client:
        with pytest.raises(UnknownTaskError):
            await _collect(client.stream_frames([solid_png((1, 1, 1))] * 3, task="nope"), events)
    assert isinstance(events[0], FrameFailed)
    assert events[0].error.code is ErrorCode.UNKNOWN_TASK


async def test_a_frame_over_max_chunk_bytes_fails_alone(colors_server) -> None:
    big = solid_png((9, 9, 9), pad=colors_server.settings.max_chunk_bytes + 1)
    async with Client(colors_server.ws_url) as client:
        events = [e async for e in client.stream_frames([big, solid_png((8, 8, 8))])]
    assert isinstance(events[0], FrameFailed)
    assert isinstance(events[0].error, TooLargeError)
    assert isinstance(events[1], FrameResult)
    assert events[1].seq == 1


async def test_a_stream_name_can_be_reused_its_seq_keeps_growing(colors_server) -> None:
    async with Client(colors_server.ws_url) as client:
        first = [e async for e in client.stream_frames([solid_png((1, 2, 3))] * 2)]
        second = [e async for e in client.stream_frames([solid_png((3, 2, 1))] * 2)]
    assert [e.seq for e in first] == [0, 1] or {e.seq for e in first} == {0, 1}
    assert sorted(e.seq for e in second) == [2, 3]
    assert isinstance(second[-1], FrameResult)


async def test_frames_in_flight_when_the_connection_drops_are_reported_lost(colors_server, gate
                                                                             ) -> None:
    first_sent = asyncio.Event()
    go_on = asyncio.Event()

    async def frames() -> AsyncIterator[bytes]:
        yield solid_png((200, 0, 0))
        first_sent.set()  # asked for the next frame: the first one is on the socket
        await go_on.wait()
        yield solid_png((0, 200, 0))

    events: list[Any] = []
    async with TcpProxy(colors_server.port) as proxy, Client(proxy.ws_url) as client:
        with gate.closed():
            stream = client.stream_frames(frames(), stream="cut", task="gate")
            first_event = asyncio.Event()
            consumer = asyncio.create_task(_collect(stream, events, first_event))
            async with asyncio.timeout(WAIT_S):
                await first_sent.wait()
            proxy.connections[0].cut()
            async with asyncio.timeout(WAIT_S):
                await first_event.wait()
        go_on.set()
        async with asyncio.timeout(WAIT_S):
            await consumer
    assert events[0] == FrameDropped("cut", 0, "connection_lost")
    assert isinstance(events[1], FrameResult)
    assert events[1].seq == 1
    assert stream.stats.lost == 1
    assert stream.stats.results == 1
    assert len(proxy.connections) == 2


async def _collect(stream: Any, into: list[Any], each: asyncio.Event | None = None) -> None:
    async for event in stream:
        into.append(event)
        if each is not None:
            each.set()


def test_stats_give_nearest_rank_percentiles_and_a_json_summary() -> None:
    stats = FrameStats(sent=12, results=10, dropped=1, lost=1, started=100.0, ended=102.0)
    stats.latencies_s.extend(i / 100 for i in range(1, 11))  # 10 ms ... 100 ms
    assert stats.latency_percentiles() == {"p50": 0.05, "p90": 0.09, "p99": 0.1, "max": 0.1}
    assert stats.to_dict() == {
        "frames_sent": 12, "results": 10, "dropped": 1, "lost": 1, "errors": 0,
        "elapsed_s": 2.0, "fps": 5.0, "send_fps": 6.0,
        "latency_ms": {"p50": 50.0, "p90": 90.0, "p99": 100.0, "max": 100.0},
    }
    assert FrameStats().latency_percentiles() == {}


def test_frames_encode_as_jpeg_from_arrays_and_images() -> None:
    from PIL import Image

    jpeg_from_array = encode_frame(np.zeros((8, 8, 3), np.uint8))
    jpeg_from_image = encode_frame(Image.new("RGB", (8, 8)))
    assert jpeg_from_array[:2] == jpeg_from_image[:2] == b"\xff\xd8"
    assert encode_frame(b"as is") == b"as is"
    with pytest.raises(TypeError, match="cannot encode"):
        encode_frame(object())


def test_without_opencv_frames_ask_for_the_camera_extra(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)  # as if OpenCV were not installed
    with pytest.raises(ImportError, match=r"pip install 'pixelstream-client\[camera\]'"):
        encode_frame(np.zeros((8, 8, 3), np.uint8))
