"""Scale-out through Redis: two gateways and two workers, only Redis between them.

The gateways are separate app instances (each its own uvicorn, event loop and state, in this
test process's threads); the workers are separate processes, as ``pixelstream worker`` runs
them. They share nothing but a private redis-server this module starts on a free port, so
it can stop and restart it without touching anyone else's Redis.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import redis as redis_sync
import websockets
from PIL import Image

from server.pipeline.stream_worker import StreamWorkerConfig, spawn_worker
from server.settings import Settings
from server.storage import keys
from server.tasks.builtin.colors import Colors
from tests.conftest import WAIT_S, RunningServer, fast_settings, start_server, unique_image
from tests.support.gate import GateTask
from tests.support.sample_tasks import Spots

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


class PrivateRedis:
    """A redis-server of this module's own, that tests may stop and start again."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port: int = sock.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL,
        )
        client = redis_sync.Redis(port=self.port)
        deadline = time.monotonic() + WAIT_S
        while True:  # a subprocess offers no readiness event: bounded polling
            try:
                client.ping()
                return
            except redis_sync.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(WAIT_S)

    def client(self) -> redis_sync.Redis:
        return redis_sync.Redis(port=self.port)


@pytest.fixture(scope="module")
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.stop()


@pytest.fixture
def cluster(private_redis: PrivateRedis, gate: Any) -> Iterator[Callable[..., Cluster]]:
    """Start gateways and workers on a freshly emptied Redis; all are stopped after."""
    private_redis.client().flushall()
    clusters: list[Cluster] = []

    def make(gateways: int = 2, workers: int = 2, **overrides: Any) -> Cluster:
        made = Cluster(private_redis, gate.lock_path, gateways, workers, overrides)
        clusters.append(made)
        return made

    yield make
    for made in clusters:
        made.stop()


class Cluster:
    def __init__(self, redis_server: PrivateRedis, lock_path: str, gateways: int, workers: int,
                 overrides: dict[str, Any]) -> None:
        self.redis_server = redis_server
        self.specs = (Colors(), GateTask(lock_path), Spots())
        self.settings: Settings = fast_settings(
            redis_url=redis_server.url, workers=0, claim_idle_ms=1500, **overrides)
        self.gateways: list[RunningServer] = [
            start_server(self.settings, tasks=self.specs) for _ in range(gateways)
        ]
        self.workers: list[Any] = [self.spawn_worker() for _ in range(workers)]
        for gateway in self.gateways:
            gateway.call(gateway.state.service.pool.wait_ready(workers))

    def spawn_worker(self) -> Any:
        config = StreamWorkerConfig(redis_url=self.redis_server.url, tasks=self.specs,
                                    max_batch_size=4, max_wait_ms=2, claim_idle_ms=1500)
        return spawn_worker(config)

    def worker_holding(self, job_count: int = 1, task: str = "gate") -> int | None:
        """The pid of the worker that holds the pending jobs of ``task`` (consumer names are
        host-pid)."""
        pending = self.redis_server.client().xpending(keys.task_jobs(task), keys.JOBS_GROUP)
        assert pending["pending"] == job_count, pending
        holders = [c["name"].decode() for c in pending["consumers"] or [] if c["pending"]]
        if not holders:
            return None
        assert len(holders) == 1
        return int(holders[0].rsplit("-", 1)[1])

    def stop(self) -> None:
        for gateway in self.gateways:
            gateway.stop()
        for worker in self.workers:
            worker.stop(WAIT_S)


def is_outcome(upload_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m.get("id") == upload_id and m["type"] in ("result", "error")


async def test_an_upload_begun_on_one_gateway_resumes_on_the_other(cluster, open_client
                                                                    ) -> None:
    one, two = cluster().gateways
    data = unique_image(400, 300)
    async with open_client(one.ws_url) as first:
        await first.upload("u1", len(data), options={"colors": 2})
        token = (await first.expect("accepted", id="u1"))["resume"]
        await first.chunk("u1", 0, data[:20_000])
        await first.expect("progress", id="u1", received=20_000)
    async with open_client(two.ws_url) as second:
        await second.upload("again", len(data), resume=token)
        accepted = await second.expect("accepted", id="again")
        assert accepted["offset"] == 20_000
        await second.chunk("again", 20_000, data[20_000:])
        messages = await second.messages_until(is_outcome("again"))
    result = messages[-1]
    assert result["type"] == "result", result
    assert len(result["result"]["colors"]) <= 2  # the original upload's options
    assert [m["stage"] for m in messages if m["type"] == "progress"][-2:] == [
        "decoding", "inference"
    ]


async def test_an_upload_whose_socket_dropped_while_queued_gets_its_result_on_the_other(
    cluster, open_client, gate
) -> None:
    one, two = cluster(workers=1).gateways
    data = unique_image(300, 200)
    async with open_client(one.ws_url) as holder, open_client(two.ws_url) as resumer:
        with gate.closed():
            await holder.send_upload("block", unique_image(), task="gate")
            await holder.expect("progress", id="block", stage="decoding")
            async with open_client(one.ws_url) as client:
                token = (await client.send_upload("u1", data))["resume"]
                queued = await client.expect("progress", id="u1", stage="queued")
                assert queued["position"] == 1
            # That socket is gone; its upload waits in the queue. Resume on the other gateway.
            await resumer.upload("r", len(data), resume=token)
            assert (await resumer.expect("accepted", id="r"))["offset"] == len(data)
        outcome = await resumer.outcome("r")
        await holder.outcome("block")
    assert outcome["type"] == "result", outcome
    assert outcome["image"]["width"] == 300


async def test_queue_positions_are_real_across_gateways(cluster, open_client, gate) -> None:
    one, two = cluster(workers=1).gateways
    async with open_client(one.ws_url) as a, open_client(two.ws_url) as b:
        with gate.closed():
            await a.send_upload("block", unique_image(), task="gate")
            await a.expect("progress", id="block", stage="decoding")
            await a.send_upload("first", unique_image(), task="gate")
            assert (await a.expect("progress", id="first", stage="queued"))["position"] == 1
            await b.send_upload("second", unique_image(), task="gate")
            assert (await b.expect("progress", id="second", stage="queued"))["position"] == 2
        outcomes = [await a.outcome("block"), await a.outcome("first"), await b.outcome("second")]
    assert [o["type"] for o in outcomes] == ["result"] * 3


async def test_a_worker_killed_mid_job_loses_nothing_and_the_client_gets_one_result(
    cluster, open_client, gate
) -> None:
    made = cluster(gateways=1, workers=2)
    (gateway,) = made.gateways
    async with open_client(gateway.ws_url) as client:
        with gate.closed():
            await client.send_upload("victim", unique_image(), task="gate")
            await client.expect("progress", id="victim", stage="decoding")
            victim_worker = made.worker_holding()
            assert victim_worker is not None
            os.kill(victim_worker, signal.SIGKILL)
        # The dead worker can answer nothing: a result means the other worker claimed the job
        # (once it had been idle claim_idle_ms) and ran it.
        messages = await client.messages_until(is_outcome("victim"))
        # A later upload's result is the next outcome: no second result for the victim.
        await client.send_upload("after", unique_image())
        messages += await client.messages_until(is_outcome("after"))
    results = [m for m in messages if m["type"] == "result"]
    assert [m["id"] for m in results] == ["victim", "after"]


async def test_a_spatial_tasks_tiles_run_on_the_shared_workers_with_tile_progress(
    cluster, open_client
) -> None:
    (gateway,) = cluster(gateways=1, workers=2).gateways
    spots = [[5, 5, 15, 15], [105, 60, 115, 70], [288, 188, 298, 198]]
    pixels = np.zeros((200, 300, 3), np.uint8)
    for x0, y0, x1, y1 in spots:
        pixels[y0:y1, x0:x1] = 255
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "PNG")
    async with open_client(gateway.ws_url) as client:
        await client.send_upload("big", out.getvalue(), task="spots")
        messages = await client.messages_until(is_outcome("big"))
    result = messages[-1]
    assert result["type"] == "result", result
    assert result["result"]["spots"] == [[float(v) for v in spot] for spot in spots]
    assert result["result"]["tiles"] == 24
    counts = [(m["done"], m["total"]) for m in messages
              if m["type"] == "progress" and m["stage"] == "inference"]
    assert counts == [(done, 24) for done in range(25)]


async def test_a_second_upload_through_the_other_gateway_is_cached(cluster, open_client) -> None:
    one, two = cluster().gateways
    data = unique_image(160, 120)
    async with open_client(one.ws_url) as client:
        await client.send_upload("first", data)
        first = await client.outcome("first")
    async with open_client(two.ws_url) as client:
        await client.send_upload("second", data)
        second = await client.outcome("second")
    assert first["cached"] is False
    assert second["cached"] is True
    assert second["result"] == first["result"]


async def test_a_rate_limit_holds_across_both_gateways(cluster, open_client) -> None:
    one, two = cluster(workers=1, uploads_per_minute=3).gateways
    async with open_client(one.ws_url) as a, open_client(two.ws_url) as b:
        for client, upload_id in ((a, "a1"), (b, "b1"), (a, "a2")):
            await client.upload(upload_id, 100)
            await client.expect("accepted", id=upload_id)
        await b.upload("b2", 100)
        error = await b.expect("error", id="b2")
    assert error["code"] == "rate_limited"
    assert error["retry_after_ms"] > 0


async def test_redis_going_away_gives_clear_errors_and_service_returns_by_itself(
    cluster, open_client, private_redis
) -> None:
    made = cluster(gateways=1, workers=1)
    (gateway,) = made.gateways
    async with open_client(gateway.ws_url) as connected:
        private_redis.stop()
        try:
            # A socket that is open: its messages are answered busy, with a retry hint.
            await connected.upload("down", 100)
            error = await connected.expect("error", id="down")
            assert error["code"] == "busy"
            assert error["retry_after_ms"] > 0
            # A new socket is refused at the handshake with the same code.
            with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
                async with open_client(gateway.ws_url):
                    pass
            assert refused.value.response.status_code == 503
            assert orjson.loads(refused.value.response.body)["code"] == "busy"
            async with httpx.AsyncClient() as http:
                ready = await http.get(gateway.http_url + "/readyz")
                image = base64.b64encode(unique_image()).decode()
                analyze = await http.post(gateway.http_url + "/api/analyze", json={"image": image})
            assert ready.status_code == 503
            assert ready.json()["store"] is False
            assert (analyze.status_code, analyze.json()["code"]) == (503, "busy")
        finally:
            private_redis.start()
    gateway.call(gateway.state.service.pool.wait_ready())  # the worker came back by itself
    async with open_client(gateway.ws_url) as client:
        await client.send_upload("up", unique_image())
        outcome = await client.outcome("up")
    assert outcome["type"] == "result", outcome
    assert made.workers[0].processes[0].is_alive()


def test_the_documented_recipe_runs_with_the_real_commands(private_redis, tmp_path: Path
                                                           ) -> None:
    """`pixelstream worker` and two `pixelstream serve --workers 0`, as the README shows."""
    private_redis.client().flushall()
    pixelstream = str(Path(sys.executable).with_name("pixelstream"))
    env = {**os.environ, "PIXELSTREAM_REDIS_URL": private_redis.url, "HF_HUB_OFFLINE": "1"}
    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    processes = [subprocess.Popen([pixelstream, "worker", "--workers", "1"], env=env,
                                  stderr=subprocess.DEVNULL)]
    processes += [subprocess.Popen([pixelstream, "serve", "--workers", "0", "--port", str(port),
                                    "--log-level", "warning"], env=env,
                                   stderr=subprocess.DEVNULL) for port in ports]
    try:
        image = base64.b64encode(unique_image(64, 64, "JPEG")).decode()
        answers = []
        for port in ports:
            deadline = time.monotonic() + 120
            while True:  # subprocesses: bounded polling of their readiness route
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "a gateway did not become ready"
                assert all(p.poll() is None for p in processes), "a process exited"
                time.sleep(0.2)
            answers.append(httpx.post(f"http://127.0.0.1:{port}/api/analyze",
                                      json={"image": image, "task": "colors"}, timeout=60))
        assert [a.status_code for a in answers] == [200, 200]
        assert [a.json()["cached"] for a in answers] == [False, True]
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(60)


def test_pixelstream_worker_sigtermed_as_a_group_stops_cleanly_without_respawning(
        private_redis, tmp_path: Path) -> None:
    """systemd's default: SIGTERM to every process of the group. The supervisor stops its
    workers after their batch; the workers ignore the signal; nothing is started again."""
    private_redis.client().flushall()
    pixelstream = str(Path(sys.executable).with_name("pixelstream"))
    env = {**os.environ, "PIXELSTREAM_REDIS_URL": private_redis.url, "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "worker.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen([pixelstream, "worker", "--workers", "2"], env=env,
                                   stderr=stderr, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while private_redis.client().hlen(keys.WORKERS) < 2:  # bounded polling: subprocesses
            assert time.monotonic() < deadline, "the workers did not come up"
            assert process.poll() is None, log.read_text()
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    text = log.read_text()
    assert "starting another" not in text
    assert private_redis.client().hlen(keys.WORKERS) == 0  # each worker signed off itself


async def test_a_worker_started_for_one_task_serves_it_alone_and_the_others_are_refused_busy(
    cluster, open_client, private_redis, tmp_path: Path
) -> None:
    """`pixelstream worker --task colors`: it loads and serves colors only; the gateway is not
    ready while its other tasks lack workers, and answers their uploads busy at once."""
    (gateway,) = cluster(gateways=1, workers=0).gateways
    pixelstream = str(Path(sys.executable).with_name("pixelstream"))
    env = {**os.environ, "PIXELSTREAM_REDIS_URL": private_redis.url, "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "worker.log"
    with log.open("wb") as stderr:
        process = await asyncio.to_thread(
            subprocess.Popen, [pixelstream, "worker", "--workers", "1", "--task", "colors"],
            env=env, stderr=stderr)
    try:
        queue = gateway.state.service.pool
        await asyncio.to_thread(gateway.call, queue.wait_served("colors"), 120)
        (beat,) = private_redis.client().hvals(keys.WORKERS)
        assert orjson.loads(beat)["tasks"] == ["colors"]  # all it loaded
        async with httpx.AsyncClient() as http:
            ready = await http.get(gateway.http_url + "/readyz")
        assert ready.status_code == 503
        assert ready.json()["tasks_without_workers"] == ["gate", "spots"]
        async with open_client(gateway.ws_url) as client:
            await client.upload("refused", 100, task="spots")
            error = await client.expect("error", id="refused")
            await client.send_upload("served", unique_image(), task="colors")
            outcome = await client.outcome("served")
        assert error["code"] == "busy"
        assert "'spots'" in error["message"]
        assert error["retry_after_ms"] > 0
        assert outcome["type"] == "result", outcome
        assert private_redis.client().xlen(keys.task_jobs("spots")) == 0
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 60)
    assert "serving tasks: colors" in log.read_text()


async def test_a_tus_upload_goes_on_through_the_other_gateway_one_writer_at_a_time(
    cluster,
) -> None:
    """The upload URL is the capability: any gateway continues it, the lock holds across
    them, and the result can be read on either."""
    one, two = cluster().gateways
    data = unique_image(400, 300)
    tus = {"Tus-Resumable": "1.0.0"}
    stream = {**tus, "Content-Type": "application/offset+octet-stream"}
    async with httpx.AsyncClient(timeout=WAIT_S) as http:
        created = await http.post(one.http_url + "/v1/tus/",
                                  headers={**tus, "Upload-Length": str(len(data))})
        path = httpx.URL(created.headers["Location"]).path
        first_half = await http.patch(one.http_url + path, content=data[:20_000],
                                      headers={**stream, "Upload-Offset": "0"})
        assert first_half.status_code == 204
        head = await http.head(two.http_url + path, headers=tus)
        assert head.headers["Upload-Offset"] == "20000"

        started, release = asyncio.Event(), asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:
            yield data[20_000:30_000]
            started.set()
            await release.wait()
            yield data[30_000:40_000]

        holding = asyncio.create_task(http.patch(one.http_url + path, content=slow_body(),
                                                 headers={**stream, "Upload-Offset": "20000"}))
        await started.wait()
        async with asyncio.timeout(WAIT_S):
            while True:  # gateway one holds the lock once it has read the headers
                other = await http.patch(two.http_url + path, content=b"x",
                                         headers={**stream, "Upload-Offset": "20000"})
                if other.status_code == 423:
                    break
                assert other.status_code == 409, other.text
        release.set()
        assert (await holding).headers["Upload-Offset"] == "40000"
        rest = await http.patch(two.http_url + path, content=data[40_000:],
                                headers={**stream, "Upload-Offset": "40000"})
        assert rest.status_code == 204
        on_two = await http.get(two.http_url + path + "/result", params={"wait": 30})
        on_one = await http.get(one.http_url + path + "/result", params={"wait": 30})
    assert on_two.status_code == on_one.status_code == 200, (on_two.text, on_one.text)
    assert on_two.json()["result"] == on_one.json()["result"]
    assert on_one.json()["image"]["width"] == 400
