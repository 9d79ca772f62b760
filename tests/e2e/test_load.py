"""Load: 200 sockets upload small images at once, for a bounded time, to a real
``pixelstream serve`` process (its own interpreter, so the clients here do not share its GIL).

Every upload must end in a result (zero errors), the server's memory (the RSS of its process
tree: the gateway and its worker) must level off rather than grow, and the latency of
progress events (a chunk sent → its ``progress`` acknowledgement received) is reported with
the other figures, printed and written to ``test-output/load.json``.

``PIXELSTREAM_SOAK_SECONDS`` sets the duration (20 s in the suite; the README's soak run used
60), ``PIXELSTREAM_LOAD_SOCKETS`` the number of sockets (200).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import websockets
from PIL import Image

from chunking.codec import encode_client_binary
from chunking.messages import Chunk

PIXELSTREAM = Path(sys.executable).with_name("pixelstream")
SECONDS = float(os.environ.get("PIXELSTREAM_SOAK_SECONDS", "20"))
SOCKETS = int(os.environ.get("PIXELSTREAM_LOAD_SOCKETS", "200"))
CHUNK = 4096
OUTPUT = Path(__file__).resolve().parents[2] / "test-output" / "load.json"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and its descendants, from /proc."""
    total, pending, seen = 0, [pid], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        with contextlib.suppress(OSError):
            with open(f"/proc/{current}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            for path in glob.glob(f"/proc/{current}/task/*/children"):
                with open(path) as children:
                    pending.extend(int(p) for p in children.read().split())
    return total


class Images:
    """Distinct valid images at no cost: one BMP, a counter written into its pixels."""

    def __init__(self) -> None:
        pixels = np.random.default_rng(1).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(out, "BMP")
        self.base = bytearray(out.getvalue())
        self.count = 0

    def next(self) -> bytes:
        self.count += 1
        image = bytearray(self.base)
        image[54:62] = self.count.to_bytes(8, "little")  # the first pixels' bytes
        return bytes(image)


@dataclass
class Stats:
    uploads: int = 0
    results: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    progress_latency_s: list[float] = field(default_factory=list)
    result_latency_s: list[float] = field(default_factory=list)


@dataclass
class Run:
    sockets: int
    connected: int = 0
    deadline: float = float("inf")
    all_connected: asyncio.Event = field(default_factory=asyncio.Event)
    go: asyncio.Event = field(default_factory=asyncio.Event)


async def one_socket(url: str, images: Images, run: Run, stats: Stats) -> None:
    async with websockets.connect(url, compression=None, max_size=None, open_timeout=60,
                                  ping_interval=None) as ws:
        welcome = orjson.loads(await ws.recv())
        assert welcome["type"] == "welcome"
        run.connected += 1
        if run.connected == run.sockets:
            run.all_connected.set()
        await run.go.wait()  # every socket is open before the clock starts
        n = 0
        while time.monotonic() < run.deadline:
            n += 1
            upload_id = f"u{n}"
            data = images.next()
            begun = time.monotonic()
            await ws.send(orjson.dumps({"type": "upload", "id": upload_id, "size": len(data),
                                        "task": "colors"}).decode())
            stats.uploads += 1
            sent_at: dict[int, float] = {}
            outcome: dict[str, Any] | None = None
            async with asyncio.timeout(60):
                while outcome is None:
                    message = orjson.loads(await ws.recv())
                    kind = message["type"]
                    if kind == "accepted":
                        for offset in range(message["offset"], len(data), CHUNK):
                            piece = data[offset : offset + CHUNK]
                            sent_at[offset + len(piece)] = time.monotonic()
                            await ws.send(encode_client_binary(Chunk(upload_id, offset, piece)))
                    elif kind == "progress" and message["stage"] == "upload":
                        sent = sent_at.pop(message["received"], None)
                        if sent is not None:
                            stats.progress_latency_s.append(time.monotonic() - sent)
                    elif kind in ("result", "error"):
                        outcome = message
            if outcome["type"] == "result":
                stats.results += 1
                stats.result_latency_s.append(time.monotonic() - begun)
            else:
                stats.errors[outcome["code"]] += 1


@contextlib.asynccontextmanager
async def serve(*args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PIXELSTREAM_MODEL_DIR", None)
    process = await asyncio.create_subprocess_exec(
        str(PIXELSTREAM), "serve", "--host", "127.0.0.1", "--port", str(port), *args,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            for _ in range(1200):  # a subprocess: bounded polling of its readiness route
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                        break
                assert process.returncode is None, "the server exited"
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the server never became ready")
        yield process, port
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


@pytest.mark.timeout(int(SECONDS) + 240)
async def test_two_hundred_sockets_upload_at_once_without_errors_in_bounded_memory() -> None:
    async with serve("--workers", "1", "--max-connections-per-client", "0",
                     "--uploads-per-minute", "0", "--max-queue", "4096",
                     "--log-level", "warning") as (process, port):
        url = f"ws://127.0.0.1:{port}/v1/ws"
        images, stats, run = Images(), Stats(), Run(SOCKETS)
        rss: list[tuple[float, int]] = []
        clients = [asyncio.create_task(one_socket(url, images, run, stats))
                   for _ in range(SOCKETS)]
        async with asyncio.timeout(120):
            waiter = asyncio.create_task(run.all_connected.wait())
            await asyncio.wait({waiter, *clients}, return_when=asyncio.FIRST_COMPLETED)
            assert run.all_connected.is_set(), [c.exception() for c in clients if c.done()][:3]

        async def sampler() -> None:
            while True:
                rss.append((time.monotonic(), tree_rss_bytes(process.pid)))
                await asyncio.sleep(0.5)  # a sampling period, not a wait for anything

        begin = time.monotonic()
        run.deadline = begin + SECONDS
        sampling = asyncio.create_task(sampler())
        run.go.set()
        results = await asyncio.gather(*clients, return_exceptions=True)
        elapsed = time.monotonic() - begin
        sampling.cancel()
        rss.append((time.monotonic(), tree_rss_bytes(process.pid)))
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    warm = [value for at, value in rss if at - begin >= elapsed * 0.25]
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "sockets": SOCKETS,
        "seconds": round(elapsed, 1),
        "uploads": stats.uploads,
        "results": stats.results,
        "errors": dict(stats.errors),
        "uploads_per_s": round(stats.results / elapsed, 1),
        "progress_latency_ms": {
            "p50": round(percentile(stats.progress_latency_s, 50) * 1000, 1),
            "p99": round(percentile(stats.progress_latency_s, 99) * 1000, 1),
            "max": round(max(stats.progress_latency_s, default=0) * 1000, 1),
            "samples": len(stats.progress_latency_s),
        },
        "result_latency_ms": {
            "p50": round(percentile(stats.result_latency_s, 50) * 1000, 1),
            "p99": round(percentile(stats.result_latency_s, 99) * 1000, 1),
        },
        "server_rss_mb": {
            "start": round(rss[0][1] / 2**20, 1),
            "after_warmup": round(warm[0] / 2**20, 1),
            "max": round(max(v for _, v in rss) / 2**20, 1),
            "end": round(rss[-1][1] / 2**20, 1),
        },
    }
    print("\nload:", json.dumps(report, indent=2))
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(json.dumps(report, indent=2) + "\n")
    assert stats.errors == Counter(), report
    assert stats.results == stats.uploads
    assert stats.results >= SOCKETS  # every socket got through at least one
    # Bounded memory: after warm-up the tree grows by less than a fixed allowance, however
    # long the run (a leak of even a few KB per upload would show over thousands of them).
    assert max(warm) - warm[0] < 96 * 2**20, report
