"""Uploads (chunking.client.upload) against real servers, a fault-injecting TCP proxy and a
scripted fake server: progress and stages, resume, retries, typed refusals."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from chunking.client import (
    ERRORS,
    BadMessageError,
    BusyError,
    ChecksumMismatchError,
    Client,
    ConnectFailedError,
    ConnectionLostError,
    InvalidImageError,
    OffsetMismatchError,
    PixelstreamError,
    RateLimitedError,
    TooLargeError,
    TooManyPixelsError,
    UnknownTaskError,
    UploadTimeoutError,
    error_code,
    is_retryable,
)
from chunking.errors import ErrorCode
from chunking.messages import Accepted, Chunk, Error, Progress, Stage, Upload
from tests.conftest import WAIT_S
from tests.support.pyclient_fake_server import FakePeer, FakeServer, fake_result
from tests.support.pyclient_media import (
    hex_of,
    png_claiming,
)
from tests.support.pyclient_proxy import Fault, TcpProxy
from tests.support.pyclient_record import (
    Recorder,
    appended_bytes,
    padded,
    top_hex,
    uploads_with_outcome,
)


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
    """Three retries allowed, yet an upload cut on every connection finishes after more than
    four connections: connections that moved it forward reset the count (tus-js-client's
    rule). (Three, not one: a cut can, on a loaded machine, reset the socket before the server
    read what it was sent, and then that connection made no progress; two such connections in
    a row were seen on a busy machine.)"""
    data = padded((7, 77, 177), 2_400_000)

    async with TcpProxy(colors_server.port, fault_for=lambda index: Fault(cut_after=500_000)
                        ) as proxy, Client(proxy.ws_url, retry_delays=[0, 0, 0]) as client:
        result = await client.analyze(data)
    assert top_hex(result) == hex_of((7, 77, 177))
    assert len(proxy.connections) > 4  # more than the retries allow without a reset


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
