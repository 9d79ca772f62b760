"""Faults, in the style of tusd's end-to-end tests: the real server behind a fault-injecting
TCP proxy (tests/support/pyclient_proxy.py), workers killed or hung, servers stopped and
restarted under their clients. Nothing accepted is lost: every upload completes (resuming
where the server's bytes end) or fails with a clear error, and nothing is left held.

(Redis going away and coming back is tests/e2e/test_scale_out.py's.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis as redis_sync
from websockets.exceptions import ConnectionClosed

from chunking.client import Client
from server.pipeline.stream_worker import StreamWorkerConfig, spawn_worker
from server.tasks.builtin.colors import Colors
from tests.conftest import (
    WAIT_S,
    ProtocolClient,
    RunningServer,
    connect,
    fast_settings,
    start_server,
    unique_image,
)
from tests.support.gate import GateTask
from tests.support.pyclient_proxy import Fault, TcpProxy

CHUNK = 32 * 1024


def sample(server: RunningServer, name: str, **labels: str) -> float:
    return float(server.state.metrics.registry.get_sample_value(name, labels or None) or 0.0)


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Bounded polling of state on another thread's loop (or of another process)."""
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def open_protocol(url: str) -> tuple[Any, ProtocolClient]:
    context = connect(url)
    client = ProtocolClient(await context.__aenter__())
    client.welcome = await client.next()
    return context, client


async def send_until_cut(client: ProtocolClient, upload_id: str, data: bytes) -> int:
    """Send chunks until the connection fails; the highest offset the server acknowledged."""
    acknowledged = 0

    async def acks() -> None:
        nonlocal acknowledged
        while True:
            message = await client.next()
            if message.get("stage") == "upload":
                acknowledged = max(acknowledged, message["received"])

    reader = asyncio.create_task(acks())
    try:
        with contextlib.suppress(ConnectionClosed):
            for offset in range(0, len(data), CHUNK):
                await client.chunk(upload_id, offset, data[offset : offset + CHUNK])
            await reader  # the cut ends the reader too
    finally:
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader
    return acknowledged


async def resume_and_finish(url: str, token: str, data: bytes, held_at_least: int
                            ) -> dict[str, Any]:
    """A new socket: resume by token, check the server's offset, send the rest."""
    context, client = await open_protocol(url)
    try:
        await client.upload("again", len(data), resume=token)
        offset = (await client.expect("accepted", id="again"))["offset"]
        assert held_at_least <= offset <= len(data)
        assert offset % CHUNK == 0 or offset == len(data)  # whole messages only, never half
        for start in range(offset, len(data), CHUNK):
            await client.chunk("again", start, data[start : start + CHUNK])
        return await client.outcome("again")
    finally:
        await context.__aexit__(None, None, None)


# The network ------------------------------------------------------------------------------------


async def test_a_tcp_reset_mid_chunk_loses_nothing_acknowledged(server_factory) -> None:
    server = server_factory()
    data = unique_image(400, 300, "BMP")  # 360 KB: eleven 32 KB chunks
    async with TcpProxy(server.port, faults={0: Fault(cut_after=150_000)}) as proxy:
        context, client = await open_protocol(proxy.ws_url)
        await client.upload("u1", len(data))
        token = (await client.expect("accepted", id="u1"))["resume"]
        acknowledged = await send_until_cut(client, "u1", data)
        with contextlib.suppress(Exception):
            await context.__aexit__(None, None, None)
        assert proxy.connections[0].faulted.is_set()
        assert acknowledged < len(data)
        result = await resume_and_finish(proxy.ws_url, token, data, acknowledged)
    assert result["type"] == "result", result
    assert result["image"]["width"] == 400
    await until(lambda: len(server.state.store) == 0 and not server.state.live,
                "the finished upload to be let go")


async def test_a_half_open_socket_is_taken_over_and_then_dropped(server_factory) -> None:
    """The first connection freezes (the server still sees it open, as after a lost FIN);
    the client resumes on a new one, which takes the upload over. The old one is dropped by
    ping timeout; nothing of it is left."""
    server = server_factory(ws_ping_interval_s=0.3)
    data = unique_image(400, 300, "BMP")
    async with TcpProxy(server.port, faults={0: Fault(freeze_after=120_000)}) as proxy:
        context, client = await open_protocol(proxy.ws_url)
        await client.upload("u1", len(data))
        token = (await client.expect("accepted", id="u1"))["resume"]
        sender = asyncio.create_task(send_until_cut(client, "u1", data))
        await proxy.connections[0].faulted.wait()
        assert len(server.state.sessions) == 1  # half-open: still there
        result = await resume_and_finish(server.ws_url, token, data, 0)
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
        assert result["type"] == "result", result
        await until(lambda: not server.state.sessions, "the frozen socket to be dropped")
        proxy.connections[0].cut()
        with contextlib.suppress(Exception):
            await context.__aexit__(None, None, None)
    assert len(server.state.store) == 0
    assert sample(server, "pixelstream_uploads_total", outcome="completed") == 1


async def test_a_network_stall_is_survived_by_the_client_resuming(server_factory) -> None:
    """Everything stops mid-upload, both ways, the connection still open: the client's stall
    timeout notices, it reconnects and resumes from the server's offset."""
    server = server_factory()
    data = unique_image(500, 400, "BMP")  # 600 KB
    async with TcpProxy(server.port, faults={0: Fault(freeze_after=250_000)}) as proxy:
        async with Client(proxy.ws_url, chunk_size=CHUNK, stall_timeout=0.5,
                          retry_delays=[0, 0, 0]) as client:
            result = await client.analyze(data, task="colors")
        assert len(proxy.connections) >= 2
        resent = sum(c.up_bytes for c in proxy.connections[1:])
    assert result.image["width"] == 500
    assert resent < len(data)  # resumed, not started over
    assert sample(server, "pixelstream_uploads_total", outcome="completed") == 1


# Workers ------------------------------------------------------------------------------------------


async def test_a_worker_killed_mid_job_is_replaced_and_the_client_gets_one_result(
    server_factory, open_client, gate
) -> None:
    server = server_factory()
    pool = server.state.service.pool
    async with open_client(server.ws_url) as client:
        with gate.closed():
            await client.send_upload("victim", unique_image(), task="gate")
            await client.expect("progress", id="victim", stage="decoding")
            (pid,) = pool.worker_pids
            os.kill(pid, signal.SIGKILL)
            await until(lambda: pool.worker_pids not in ([], [pid]), "a replacement")
        messages = await client.messages_until(lambda m: m.get("type") in ("result", "error"))
        await client.send_upload("after", unique_image())
        after = await client.outcome("after")
    assert messages[-1]["type"] == "result", messages[-1]
    assert [m["stage"] for m in messages if m.get("type") == "progress"].count("inference") == 1
    assert after["type"] == "result"
    assert sample(server, "pixelstream_worker_restarts_total", reason="died") == 1


async def test_a_hung_worker_is_killed_replaced_and_its_job_retried_once(
    server_factory, open_client, gate
) -> None:
    """The gate holds the worker past ``job_timeout_s``: it is killed and the job retried on
    a replacement; held again, the job fails ``internal``. The pool carries on."""
    server = server_factory(job_timeout_s=1.0)
    pool = server.state.service.pool
    async with open_client(server.ws_url) as client:
        with gate.closed():
            (first_pid,) = pool.worker_pids
            await client.send_upload("stuck", unique_image(), task="gate")
            error = await client.outcome("stuck")
        assert error["type"] == "error", error
        assert error["code"] == "internal"
        assert "hung" in error["message"]
        await client.send_upload("after", unique_image())
        assert (await client.outcome("after"))["type"] == "result"
    assert first_pid not in pool.worker_pids
    assert sample(server, "pixelstream_worker_restarts_total", reason="hung") == 2


# Stopping ---------------------------------------------------------------------------------------


def stop_in_thread(server: RunningServer) -> tuple[threading.Thread, list[float]]:
    took: list[float] = []

    def stop() -> None:
        started = time.monotonic()
        server.stop()
        took.append(time.monotonic() - started)

    thread = threading.Thread(target=stop, name="stopper")
    thread.start()
    return thread, took


async def test_shutdown_closes_sockets_1012_and_finishes_running_jobs(server_factory, gate
                                                                      ) -> None:
    server = server_factory(shutdown_grace_s=5)
    pool = server.state.service.pool
    worker = pool._workers[0].process
    image = unique_image(80, 60)
    async with httpx.AsyncClient(timeout=WAIT_S) as http, connect(server.ws_url) as ws:
        await ws.recv()  # welcome
        with gate.closed():
            request = asyncio.create_task(http.post(
                server.http_url + "/v1/analyze", data={"task": "gate"},
                files={"file": ("a.png", image, "image/png")}))
            await until(lambda: any(w.in_flight for w in pool._workers), "the job to run")
            thread, took = stop_in_thread(server)
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(WAIT_S):
                    await ws.recv()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1012  # "service restart": reconnect elsewhere
            assert not request.done()  # the running job holds its request open
        response = await request  # the gate opened: the job finished within the grace
    await asyncio.to_thread(thread.join, WAIT_S)
    assert response.status_code == 200, response.text
    assert response.json()["image"]["width"] == 80
    assert worker.exitcode == 0  # left after its batch, not killed
    assert took[0] < 10


async def test_shutdown_is_bounded_when_a_job_never_finishes(server_factory, gate) -> None:
    server = server_factory(shutdown_grace_s=0.5)
    pool = server.state.service.pool
    worker = pool._workers[0].process
    async with httpx.AsyncClient(timeout=WAIT_S) as http:
        with gate.closed():
            request = asyncio.create_task(http.post(
                server.http_url + "/v1/analyze", data={"task": "gate"},
                files={"file": ("a.png", unique_image(), "image/png")}))
            await until(lambda: any(w.in_flight for w in pool._workers), "the job to run")
            thread, took = stop_in_thread(server)
            await asyncio.to_thread(thread.join, WAIT_S)
            with contextlib.suppress(httpx.HTTPError):
                await request
    assert took
    assert took[0] < 2 * 0.5 + 4  # the requests' grace, the jobs' grace, slack
    assert worker.exitcode == -signal.SIGKILL


# Restarting a gateway (Redis) ---------------------------------------------------------------


class RedisProcess:
    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port: int = sock.getsockname()[1]
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL)
        client = redis_sync.Redis(port=self.port)
        deadline = time.monotonic() + WAIT_S
        while True:  # a subprocess: bounded polling until it answers
            try:
                client.ping()
                break
            except redis_sync.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(WAIT_S)


@pytest.fixture
def redis_process() -> Iterator[RedisProcess]:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    server = RedisProcess()
    yield server
    server.stop()


async def test_a_restarted_gateway_takes_its_clients_back(redis_process, gate) -> None:
    """Redis mode: a gateway stops under two clients, one mid-upload and one whose job is
    queued behind a busy worker; it starts again on the same port; both resume there and
    get their results. The queued job waited in the stream the whole time."""
    specs = (Colors(), GateTask(gate.lock_path))
    settings = fast_settings(redis_url=redis_process.url, workers=0, claim_idle_ms=1500,
                             shutdown_grace_s=1)
    worker = spawn_worker(StreamWorkerConfig(redis_url=redis_process.url, tasks=specs,
                                             max_batch_size=1, max_wait_ms=1,
                                             claim_idle_ms=1500))
    gateway = start_server(settings, tasks=specs)
    restarted: RunningServer | None = None
    try:
        await gateway_ready(gateway)
        partial, queued = unique_image(400, 300, "BMP"), unique_image(200, 150)
        with gate.closed():
            blocker_context, blocker = await open_protocol(gateway.ws_url)
            await blocker.send_upload("block", unique_image(), task="gate")
            await blocker.expect("progress", id="block", stage="decoding")
            q_context, q_client = await open_protocol(gateway.ws_url)
            q_token = (await q_client.send_upload("queued", queued))["resume"]
            await q_client.expect("progress", id="queued", stage="queued")
            p_context, p_client = await open_protocol(gateway.ws_url)
            await p_client.upload("partial", len(partial))
            p_token = (await p_client.expect("accepted", id="partial"))["resume"]
            for offset in range(0, 5 * CHUNK, CHUNK):
                await p_client.chunk("partial", offset, partial[offset : offset + CHUNK])
            await p_client.expect("progress", id="partial", received=5 * CHUNK)
            thread, _ = stop_in_thread(gateway)
            for client in (blocker, q_client, p_client):
                assert await close_code(client) == 1012
            await asyncio.to_thread(thread.join, WAIT_S)
            for context in (blocker_context, q_context, p_context):
                with contextlib.suppress(Exception):
                    await context.__aexit__(None, None, None)
            restarted = start_server(settings, tasks=specs, port=gateway.port)
            await gateway_ready(restarted)
            # The queued job's client: all its bytes were in, so it only follows the job.
            context, client = await open_protocol(restarted.ws_url)
            await client.upload("q2", len(queued), resume=q_token)
            assert (await client.expect("accepted", id="q2"))["offset"] == len(queued)
        queued_result = await client.outcome("q2")
        await context.__aexit__(None, None, None)
        partial_result = await resume_and_finish(restarted.ws_url, p_token, partial, 5 * CHUNK)
    finally:
        if restarted is not None:
            restarted.stop()
        with contextlib.suppress(Exception):
            gateway.stop()
        worker.stop(WAIT_S)
    assert queued_result["type"] == "result", queued_result
    assert queued_result["image"]["width"] == 200
    assert partial_result["type"] == "result", partial_result
    assert partial_result["image"]["width"] == 400


async def close_code(client: ProtocolClient) -> int | None:
    """Read until the server closes the socket; its close code."""
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                await client.next()
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None


async def gateway_ready(gateway: RunningServer) -> None:
    async with asyncio.timeout(WAIT_S):
        await asyncio.to_thread(gateway.call, gateway.state.service.pool.wait_ready(1))
