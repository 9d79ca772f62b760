"""The Python client (chunking.client) against real servers on loopback ports, a fault-injecting
TCP proxy between them, and a scripted fake server for what a real one won't do on demand."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

import chunking.client as client_module
from chunking.client import (
    ERRORS,
    BadMessageError,
    BusyError,
    ChecksumMismatchError,
    Client,
    ClientClosedError,
    ConnectFailedError,
    ConnectionLostError,
    ForbiddenOriginError,
    FrameDropped,
    FrameFailed,
    FrameResult,
    InvalidImageError,
    OffsetMismatchError,
    PixelstreamError,
    RateLimitedError,
    StalledError,
    SyncClient,
    TooLargeError,
    TooManyPixelsError,
    UnauthorizedError,
    UnknownTaskError,
    UploadTimeoutError,
    analyze_http,
    analyze_sync,
    error_code,
    is_retryable,
)
from chunking.errors import ErrorCode, ProtocolError
from chunking.messages import Accepted, Chunk, Error, Progress, Stage, Upload
from tests.conftest import WAIT_S, RunningServer
from tests.support.pyclient_fake_server import FakePeer, FakeServer, fake_result
from tests.support.pyclient_media import (
    distinct_colors,
    hex_of,
    png_claiming,
    solid_png,
    write_video,
)
from tests.support.pyclient_proxy import Fault, TcpProxy

_SEEDS = itertools.count(1)


def padded(rgb: tuple[int, int, int], pad: int) -> bytes:
    """A solid image never sent before (servers cache by content)."""
    return solid_png(rgb, pad=pad, seed=next(_SEEDS))


def top_hex(result: Any) -> str:
    colors = result.result["colors"]
    assert colors[0]["fraction"] == 1.0, colors
    return str(colors[0]["hex"])


def appended_bytes(server: RunningServer) -> float:
    """Chunk bytes the server appended (replays are not counted)."""
    value = server.state.metrics.registry.get_sample_value("pixelstream_upload_bytes_total")
    return value or 0.0


def errors_sent(server: RunningServer, code: str) -> float:
    value = server.state.metrics.registry.get_sample_value("pixelstream_errors_total",
                                                           {"code": code})
    return value or 0.0


def uploads_with_outcome(server: RunningServer, outcome: str) -> float:
    value = server.state.metrics.registry.get_sample_value(
        "pixelstream_uploads_total", {"outcome": outcome})
    return value or 0.0


class Recorder:
    """Collects a call's callbacks, with an event per stage for tests to wait on."""

    def __init__(self) -> None:
        self.progress: list[tuple[int, int, int]] = []
        self.stages: list[tuple[str, dict[str, Any]]] = []
        self.timeline: list[tuple[str, Any]] = []
        self._events: dict[str, asyncio.Event] = {}

    def on_progress(self, sent: int, acknowledged: int, total: int) -> None:
        self.progress.append((sent, acknowledged, total))
        self.timeline.append(("progress", acknowledged))

    def on_stage(self, stage: str, detail: dict[str, Any]) -> None:
        self.stages.append((stage, detail))
        self.timeline.append((stage, detail))
        self.event(stage).set()

    def event(self, stage: str) -> asyncio.Event:
        return self._events.setdefault(stage, asyncio.Event())

    async def wait(self, stage: str) -> None:
        async with asyncio.timeout(WAIT_S):
            await self.event(stage).wait()

    @property
    def callbacks(self) -> dict[str, Any]:
        return {"on_progress": self.on_progress, "on_stage": self.on_stage}

    def acknowledged_before(self, stage: str) -> int:
        """The last acknowledged offset seen before the first ``stage``."""
        acknowledged = 0
        for name, value in self.timeline:
            if name == stage:
                break
            if name == "progress":
                acknowledged = value
        return acknowledged


# Uploads ---------------------------------------------------------------------------------------


async def test_analyze_reports_progress_then_every_stage_then_the_result(colors_server) -> None:
    color = (200, 10, 30)
    data = padded(color, 600_000)
    record = Recorder()
    results: list[Any] = []
    async with Client(colors_server.ws_url) as client:
        assert client.welcome is not None
        assert client.welcome.default_task == "colors"
        result = await client.analyze(data, on_result=results.append, **record.callbacks)
    assert top_hex(result) == hex_of(color)
    assert results == [result]
    assert result.image == {"width": 64, "height": 48, "format": "PNG"}
    # Progress: what was sent, then what the server acknowledged, up to every byte.
    assert record.progress[-1] == (len(data), len(data), len(data))
    acked = [a for _, a, _ in record.progress]
    assert acked == sorted(acked)
    assert all(a <= s for s, a, _ in record.progress)
    assert len({a for a in acked}) >= 3  # several acknowledgements: 256 KiB chunks
    names = [name for name, _ in record.stages]
    assert record.stages[:2] == [("hashing", {}), ("upload", {"offset": 0, "resumed": False})]
    assert list(dict.fromkeys(names)) == ["hashing", "upload", "queued", "decoding", "inference"]
    assert all(d["position"] >= 1 for n, d in record.stages if n == "queued")


async def test_a_file_is_streamed_from_disk_one_span_at_a_time(colors_server, tmp_path,
                                                               monkeypatch) -> None:
    color = (10, 200, 90)
    path = tmp_path / "scan.png"
    path.write_bytes(padded(color, 1_500_000))
    reads: list[int] = []
    real_pread = client_module._pread

    def spy(fd: int, length: int, offset: int) -> bytes:
        reads.append(length)
        return real_pread(fd, length, offset)

    monkeypatch.setattr(client_module, "_pread", spy)
    async with Client(colors_server.ws_url) as client:
        result = await client.analyze(path)
    assert top_hex(result) == hex_of(color)
    size = path.stat().st_size
    assert sum(reads) == size  # each byte read once, to be sent
    assert max(reads) <= colors_server.settings.max_chunk_bytes < size


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


async def test_without_checksum_no_sha256_is_sent(tmp_path) -> None:
    seen: list[Upload] = []

    async def script(peer: FakePeer) -> None:
        upload = await peer.expect(Upload)
        seen.append(upload)
        await peer.serve_upload(upload)

    async with FakeServer(script) as server, Client(server.url, checksum=False) as client:
        await client.analyze(b"abc")
        await client.analyze(b"abc", sha256="ab" * 32)  # a known checksum: sent as given
    assert [u.sha256 for u in seen] == [None, "ab" * 32]


async def test_a_cached_image_sends_no_chunk(colors_server) -> None:
    color = (120, 40, 220)
    data = padded(color, 300_000)
    async with TcpProxy(colors_server.port) as proxy, Client(proxy.ws_url) as client:
        first = await client.analyze(data)
        before = proxy.up_bytes
        record = Recorder()
        second = await client.analyze(data, **record.callbacks)
        sent_again = proxy.up_bytes - before
    assert (first.cached, second.cached) == (False, True)
    assert top_hex(second) == hex_of(color)
    assert record.stages[1] == ("upload", {"offset": len(data), "resumed": False})
    assert sent_again < 1024  # the upload message alone


async def test_an_empty_image_is_refused_before_anything_is_sent(colors_server) -> None:
    async with Client(colors_server.ws_url) as client:
        with pytest.raises(InvalidImageError):
            await client.analyze(b"")


# Resilience ----------------------------------------------------------------------------------


async def test_a_cut_connection_resumes_without_resending_acknowledged_bytes(colors_server
                                                                              ) -> None:
    color = (30, 160, 250)
    data = padded(color, 3_000_000)
    size = len(data)
    record = Recorder()
    appended_before = appended_bytes(colors_server)
    fault = Fault(cut_after=size // 2)
    async with TcpProxy(colors_server.port, faults={0: fault}) as proxy, \
            Client(proxy.ws_url) as client:
        result = await client.analyze(data, **record.callbacks)
    assert top_hex(result) == hex_of(color)
    assert len(proxy.connections) == 2
    retrying = [d for n, d in record.stages if n == "retrying"]
    assert [d["code"] for d in retrying] == ["connection_lost"]
    assert isinstance(retrying[0]["error"], ConnectionLostError)
    acked_at_cut = record.acknowledged_before("retrying")
    assert acked_at_cut > 0
    resumed = [d for n, d in record.stages if n == "upload"][1]
    assert resumed["resumed"] is True
    assert resumed["offset"] >= acked_at_cut
    # The second connection carried the handshake, the resume and the bytes not held, only.
    overhead = 4096
    assert proxy.connections[1].up_bytes <= size - resumed["offset"] + overhead
    assert proxy.connections[1].up_bytes <= size - acked_at_cut + overhead
    # Every byte was appended exactly once.
    assert appended_bytes(colors_server) - appended_before == size


async def test_a_connection_lost_after_the_last_byte_resumes_to_the_result(colors_server, gate
                                                                           ) -> None:
    data = padded((250, 250, 0), 200_000)
    record = Recorder()
    async with TcpProxy(colors_server.port) as proxy, Client(proxy.ws_url) as client:
        with gate.closed():
            call = asyncio.create_task(client.analyze(data, task="gate", **record.callbacks))
            await record.wait("decoding")  # every byte in, the worker holds the job
            sent_before_cut = proxy.connections[0].up_bytes
            proxy.connections[0].cut()
            await record.wait("retrying")
            await proxy.wait_for_connections(2)
            while len([n for n, _ in record.stages if n == "upload"]) < 2:
                await record.event("upload").wait()
                record.event("upload").clear()
        async with asyncio.timeout(WAIT_S):
            result = await call
    assert result.result["colors"][0]["hex"] == "#fafa00"
    resumed = [d for n, d in record.stages if n == "upload"][1]
    assert resumed == {"offset": len(data), "resumed": True}
    assert sent_before_cut > len(data)
    assert proxy.connections[1].up_bytes < 2048  # no chunk sent again


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


async def test_once_retries_are_spent_the_connection_error_surfaces(colors_server) -> None:
    attempts: list[tuple[type[BaseException], int]] = []

    def on_should_retry(error: BaseException, attempt: int) -> bool:
        attempts.append((type(error), attempt))
        return is_retryable(error)

    def fault_for(index: int) -> Fault:
        return Fault(cut_after=100_000) if index == 0 else Fault(refuse=True)

    async with TcpProxy(colors_server.port, fault_for=fault_for) as proxy, \
            Client(proxy.ws_url, retry_delays=[0, 0.05], on_should_retry=on_should_retry
                   ) as client:
        with pytest.raises(ConnectionLostError) as raised:
            await client.analyze(padded((1, 2, 3), 400_000))
    assert isinstance(raised.value, ConnectFailedError)
    assert error_code(raised.value) == "connection_failed"
    assert attempts == [(ConnectionLostError, 0), (ConnectFailedError, 1)]
    assert len(proxy.connections) == 3


async def test_progress_resets_the_retry_counter(colors_server) -> None:
    """Two retries allowed, yet an upload cut on every connection finishes after more than
    three connections: connections that moved it forward reset the count (tus-js-client's
    rule). (Two, not one: a cut can, on a loaded machine, reset the socket before the server
    read what it was sent, and then that connection made no progress.)"""
    data = padded((7, 77, 177), 2_400_000)

    async with TcpProxy(colors_server.port, fault_for=lambda index: Fault(cut_after=500_000)
                        ) as proxy, Client(proxy.ws_url, retry_delays=[0, 0]) as client:
        result = await client.analyze(data)
    assert top_hex(result) == hex_of((7, 77, 177))
    assert len(proxy.connections) > 3  # more than the retries allow without a reset


async def test_on_should_retry_can_refuse(colors_server) -> None:
    seen: list[BaseException] = []

    def never(error: BaseException, attempt: int) -> bool:
        seen.append(error)
        return False

    async with TcpProxy(colors_server.port, faults={0: Fault(cut_after=100_000)}) as proxy, \
            Client(proxy.ws_url, on_should_retry=never) as client:
        with pytest.raises(ConnectionLostError):
            await client.analyze(padded((9, 9, 9), 400_000))
    assert len(seen) == 1
    assert len(proxy.connections) == 1


@pytest.mark.parametrize("how", ["timeout", "task.cancel()"])
async def test_giving_up_cancels_the_upload_on_the_server(colors_server, gate, how: str) -> None:
    cached = padded((1, 100, 1), 0)
    cancelled_before = uploads_with_outcome(colors_server, "cancelled")
    async with Client(colors_server.ws_url) as client:
        await client.analyze(cached)
        with gate.closed():
            data = padded((100, 1, 1), 100_000)
            if how == "timeout":
                with pytest.raises(UploadTimeoutError) as raised:
                    await client.analyze(data, task="gate", timeout=0.5)
                assert error_code(raised.value) == "timeout"
            else:
                record = Recorder()
                call = asyncio.create_task(client.analyze(data, task="gate", **record.callbacks))
                await record.wait("decoding")
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
            # A round trip on the same socket: the server read the cancel before it.
            assert (await client.analyze(cached)).cached is True
    assert uploads_with_outcome(colors_server, "cancelled") - cancelled_before == 1


async def test_closing_the_client_ends_its_calls(colors_server, gate) -> None:
    record = Recorder()
    client = Client(colors_server.ws_url)
    await client.connect()
    with gate.closed():
        call = asyncio.create_task(client.analyze(padded((3, 3, 3), 1000), task="gate",
                                                  **record.callbacks))
        await record.wait("decoding")
        await client.close()
        with pytest.raises(ClientClosedError):
            async with asyncio.timeout(WAIT_S):
                await call
    assert not [n for n, _ in record.stages if n == "retrying"]


# Errors ---------------------------------------------------------------------------------------


def test_every_error_code_has_its_exception_class() -> None:
    assert set(ERRORS) == set(ErrorCode)
    for code, cls in ERRORS.items():
        error = cls("why")
        assert isinstance(error, PixelstreamError)
        assert isinstance(error, ProtocolError)
        assert error.code is code
        assert error_code(error) == code.value
        assert str(error) == f"{code.value}: why"
    assert len(set(ERRORS.values())) == len(ERRORS)


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.value)
async def test_every_error_code_surfaces_as_its_typed_exception(code: ErrorCode) -> None:
    retry_after = 7 if code in (ErrorCode.BUSY, ErrorCode.RATE_LIMITED) else None

    async def script(peer: FakePeer) -> None:
        upload = await peer.expect(Upload)
        await peer.send(Error(code, "scripted", id=upload.id, retry_after_ms=retry_after))

    async with FakeServer(script) as server, Client(server.url, retry_delays=None) as client:
        with pytest.raises(ERRORS[code]) as raised:
            await client.analyze(b"image")
    assert raised.value.code is code
    assert raised.value.message == "scripted"
    assert raised.value.retry_after_ms == retry_after
    assert server.failures == []


@pytest.mark.parametrize(("status", "body", "expected"), [
    (401, {"code": "unauthorized", "message": "a valid API token is required"},
     UnauthorizedError),
    (403, {"code": "forbidden_origin", "message": "no"}, ForbiddenOriginError),
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


def unknown_option(task: str) -> dict[str, Any]:
    return {"nonsense": 1}


@pytest.mark.parametrize(("data", "kwargs", "expected"), [
    (b"x" * 100, {"task": "no-such-task"}, UnknownTaskError),
    (b"x" * 100, {"options": {"colors": 99}}, BadMessageError),
    (b"x" * (8 * 1024 * 1024 + 1), {}, TooLargeError),
    (b"this is not an image at all" * 100, {}, InvalidImageError),
    (png_claiming(10_000, 10_000), {}, TooManyPixelsError),
    (b"x" * 100, {"sha256": "0" * 64}, ChecksumMismatchError),
], ids=["unknown_task", "bad_message", "too_large", "invalid_image", "too_many_pixels",
        "checksum_mismatch"])
async def test_a_real_servers_refusals_surface_typed(colors_server, data: bytes,
                                                     kwargs: dict[str, Any],
                                                     expected: type[PixelstreamError]) -> None:
    async with Client(colors_server.ws_url) as client:
        with pytest.raises(expected) as raised:
            await client.analyze(data, **kwargs)
        assert raised.value.code is expected.error_code
        # The socket is unharmed: the next upload on it succeeds.
        assert top_hex(await client.analyze(padded((5, 5, 5), 0))) == "#050505"


async def test_a_token_server_refuses_a_client_without_one(server_factory) -> None:
    server = server_factory(api_tokens=("s3cret",))
    with pytest.raises(UnauthorizedError):
        async with Client(server.ws_url):
            pass
    async with Client(server.ws_url, token="s3cret") as client:
        assert top_hex(await client.analyze(padded((6, 6, 6), 0))) == "#060606"


async def analyze_once(url: str, data: bytes, **client_options: Any) -> Any:
    """One upload on a socket of its own."""
    async with Client(url, **client_options) as client:
        return await client.analyze(data)


async def test_busy_surfaces_with_retry_after_then_a_retry_succeeds(server_factory, gate
                                                                   ) -> None:
    server = server_factory(max_queue=1, max_batch_size=1)
    busy_seen = asyncio.Event()

    def on_should_retry(error: BaseException, attempt: int) -> bool:
        if isinstance(error, BusyError):
            busy_seen.set()
        return is_retryable(error)

    async with Client(server.ws_url) as client:
        with gate.closed():
            running, waiting = Recorder(), Recorder()
            first = asyncio.create_task(client.analyze(padded((1, 1, 1), 0), task="gate",
                                                       **running.callbacks))
            await running.wait("decoding")
            second = asyncio.create_task(client.analyze(padded((2, 2, 2), 0),
                                                        **waiting.callbacks))
            await waiting.wait("queued")
            with pytest.raises(BusyError) as raised:
                await analyze_once(server.ws_url, padded((4, 4, 4), 0), retry_delays=None)
            assert raised.value.retry_after_ms is not None
            assert raised.value.retry_after_ms > 0
            retried = asyncio.create_task(analyze_once(
                server.ws_url, padded((8, 8, 8), 0), on_should_retry=on_should_retry))
            async with asyncio.timeout(WAIT_S):
                await busy_seen.wait()
        # The gate opens: the queue drains, and the retry (after retry_after_ms) gets in.
        async with asyncio.timeout(WAIT_S):
            results = await asyncio.gather(first, second, retried)
    assert [top_hex(r) for r in results[1:]] == ["#020202", "#080808"]


async def test_rate_limited_surfaces_with_retry_after(server_factory) -> None:
    server = server_factory(messages_per_second=1.0, message_burst=1)
    async with Client(server.ws_url, retry_delays=None) as client:
        with pytest.raises(RateLimitedError) as raised:
            await client.analyze(padded((11, 11, 11), 100_000))
    assert raised.value.retry_after_ms is not None
    assert raised.value.retry_after_ms > 0
    assert raised.value.expected == 0


async def test_rate_limited_chunks_are_resent_from_the_servers_offset(server_factory) -> None:
    server = server_factory(messages_per_second=40.0, message_burst=3)
    data = padded((12, 34, 56), 1_200_000)
    record = Recorder()
    async with Client(server.ws_url) as client:
        result = await client.analyze(data, **record.callbacks)
    assert top_hex(result) == hex_of((12, 34, 56))
    assert "rate_limited" in [d["code"] for n, d in record.stages if n == "retrying"]
    assert appended_bytes(server) == len(data)


async def test_an_offset_mismatch_rewinds_once_and_ignores_stale_answers() -> None:
    """The server "loses" the first chunk: the client resends from ``expected``. The answers
    to chunks it had sent after that one are delayed until it has resent (in order, as a slow
    network delivers them): they are stale, and must not rewind it again."""
    data = np.random.default_rng(3).bytes(300_000)
    offsets: list[int] = []
    received = bytearray()

    async def script(peer: FakePeer) -> None:
        upload = await peer.expect(Upload)
        await peer.send(Accepted(upload.id, 0, "tok"))

        def gap(held: int) -> Error:
            return Error(ErrorCode.OFFSET_MISMATCH, "gap", id=upload.id, expected=held)

        first = await peer.expect(Chunk)
        second = await peer.expect(Chunk)  # sent before the client could know of the loss
        offsets.extend([first.offset, second.offset])
        await peer.send(Error(ErrorCode.OFFSET_MISMATCH, "lost", id=upload.id, expected=0))
        held_back = [gap(0)]  # the answer to the second chunk, delayed
        while len(received) < upload.size:
            chunk = await peer.expect(Chunk)
            offsets.append(chunk.offset)
            held = len(received)
            if held_back and chunk.offset != 0:
                held_back.append(gap(0))  # sent before the rewind: answered late too
                continue
            for late in held_back:
                await peer.send(late)
            held_back.clear()
            if chunk.offset == held:
                received.extend(chunk.data)
                await peer.send(Progress(upload.id, Stage.UPLOAD, received=len(received),
                                         total=upload.size))
            elif chunk.offset + len(chunk.data) <= held:
                await peer.send(Progress(upload.id, Stage.UPLOAD, received=held,
                                         total=upload.size))
            else:
                await peer.send(gap(held))
        await peer.send(fake_result(upload.id))

    record = Recorder()
    async with FakeServer(script) as server, Client(server.url) as client:
        await client.analyze(data, **record.callbacks)
    assert server.failures == []
    assert bytes(received) == data
    assert offsets.count(0) == 2  # sent, "lost", sent once more
    retries = [d for n, d in record.stages if n == "retrying"]
    assert len(retries) == 1  # once
    assert isinstance(retries[0].pop("error"), OffsetMismatchError)
    assert retries[0] == {"attempt": 1, "delay": 0.0, "code": "offset_mismatch"}


async def test_an_offset_mismatch_without_retries_surfaces() -> None:
    async def script(peer: FakePeer) -> None:
        upload = await peer.expect(Upload)
        await peer.send(Accepted(upload.id, 0, "tok"))
        await peer.expect(Chunk)
        await peer.send(Error(ErrorCode.OFFSET_MISMATCH, "no", id=upload.id, expected=0))
        await peer.recv()  # the cancel (or a chunk sent meanwhile): the socket stays usable

    async with FakeServer(script) as server, Client(server.url, retry_delays=None) as client:
        with pytest.raises(OffsetMismatchError) as raised:
            await client.analyze(b"z" * 1000)
    assert raised.value.expected == 0


# Camera frames ---------------------------------------------------------------------------------


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


# Scripts without asyncio, and HTTP -------------------------------------------------------------


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


def test_analyze_http(colors_server) -> None:
    result = analyze_http(padded((70, 80, 90), 0), url=colors_server.http_url)
    assert top_hex(result) == "#46505a"
    # A WebSocket URL works too: the HTTP base is derived from it.
    result = analyze_http(padded((90, 80, 70), 0), url=colors_server.ws_url, task="colors",
                          options={"colors": 2})
    assert top_hex(result) == "#5a5046"
    with pytest.raises(InvalidImageError):
        analyze_http(b"not an image", url=colors_server.http_url)
    with pytest.raises(UnknownTaskError):
        analyze_http(padded((1, 1, 1), 0), url=colors_server.http_url, task="nope")


# The retry rule, alone -----------------------------------------------------------------------


def test_the_retry_rule() -> None:
    retrier = client_module._Retrier([0, 1, 3], None)
    lost = ConnectionLostError("x")
    assert [retrier.next_delay(lost) for _ in range(4)] == [0, 1, 3, None]
    retrier.progressed()
    assert retrier.next_delay(lost) == 0  # progress: the counter starts again
    assert retrier.next_delay(BusyError("b", retry_after_ms=2500)) == 2.5  # retry_after wins
    assert retrier.next_delay(InvalidImageError("i")) is None  # not retryable
    assert client_module._Retrier([5], lambda e, n: True).next_delay(ClientClosedError()) is None
    assert is_retryable(StalledError())
    assert not is_retryable(ClientClosedError())
    assert not is_retryable(ValueError())
