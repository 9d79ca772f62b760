"""Inference throughput and latency: images/s and p50/p95/p99 at 1, 4, 16 and 64 concurrent
clients, pixelstream with dynamic batching on and off, against the model alone in a tight loop
(the limit) and LitServe serving the same model, all on this machine.

Every request is the same 640x480 JPEG (about 50 KB) and asks for ``classify`` top-5; the
result cache is off. A pixelstream client keeps one WebSocket and sends ``upload`` plus one
binary chunk per image; a LitServe client POSTs ``{"image": "<base64>"}`` over a kept-alive
connection. Latency: request sent to result received. The model alone runs pixelstream's own
decode → preprocess → predict → encode in one process with the torch threads a pixelstream
worker gets (:mod:`bench.model_alone`); LitServe gets the same code and threads
(:mod:`bench.litserve_server`). Rounds go round-robin over the servers.

    python -m bench.inference [--rounds 3] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import websockets

from bench.common import (
    VENV_BIN,
    free_port,
    machine,
    median,
    paused,
    percentile,
    photo_jpeg,
    pixelstream_argv,
    server_process,
)
from bench.report import Check, Section
from chunking.codec import encode_client_binary
from chunking.messages import Chunk

CONCURRENCY = (1, 4, 16, 64)
PYTHON = str(VENV_BIN / "python")
OPEN_LIMITS = ("--uploads-per-minute", "0", "--max-connections-per-client", "0")


def torch_threads() -> int:
    """What a pixelstream worker gets by default here (``server.app.torch_threads``)."""
    from server.app import torch_threads as threads
    from server.settings import Settings

    return threads(Settings())


def model_alone(image_path: str, threads: int, batch: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [PYTHON, "-m", "bench.model_alone", image_path, "--threads", str(threads),
         "--batch", str(batch), "--seconds", str(seconds)],
        check=True, capture_output=True, text=True,
    ).stdout
    result: dict[str, float] = orjson.loads(out.strip().splitlines()[-1])
    return result


# Clients ------------------------------------------------------------------------------------

Request = Callable[[], Awaitable[None]]


async def pixelstream_client(port: int, data: bytes) -> tuple[Request, Callable[[], Any]]:
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/v1/ws", compression=None,
                                  max_size=None)
    await ws.recv()  # welcome
    counter = iter(range(10**9))
    upload = {"type": "upload", "size": len(data), "task": "classify"}

    async def request() -> None:
        upload_id = f"r{next(counter)}"
        await ws.send(orjson.dumps({**upload, "id": upload_id}).decode())
        await ws.send(encode_client_binary(Chunk(upload_id, 0, data)))
        while True:
            message = orjson.loads(await ws.recv())
            if message.get("id") == upload_id and message["type"] in ("result", "error"):
                if message["type"] == "error":
                    raise RuntimeError(message)
                return

    return request, ws.close


async def litserve_client(port: int, data: bytes) -> tuple[Request, Callable[[], Any]]:
    client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120)
    body = orjson.dumps({"image": base64.b64encode(data).decode()})

    async def request() -> None:
        answer = await client.post("/predict", content=body,
                                   headers={"content-type": "application/json"})
        answer.raise_for_status()

    return request, client.aclose


@dataclass
class Load:
    images_per_s: list[float] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)


async def drive(connect: Callable[[], Awaitable[tuple[Request, Callable[[], Any]]]],
                clients: int, seconds: float, load: Load) -> None:
    """``clients`` closed loops for ``seconds`` (after one warm-up request each)."""
    pairs = [await connect() for _ in range(clients)]
    await asyncio.gather(*(request() for request, _ in pairs))
    deadline = time.perf_counter() + seconds
    done = 0
    latencies: list[float] = []

    async def loop(request: Request) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await request()
            latencies.append((time.perf_counter() - started) * 1000)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(request) for request, _ in pairs))
    load.images_per_s.append(done / (time.perf_counter() - started))
    load.latencies_ms.extend(latencies)
    for _, close in pairs:
        await close()


# The run ------------------------------------------------------------------------------------


def run(rounds: int = 3, seconds: float = 3.0) -> tuple[Section, dict[str, float]]:
    """The section, and the model's figures (the camera benchmark uses them)."""
    threads = torch_threads()
    data = photo_jpeg(640, 480)
    with tempfile.NamedTemporaryFile(suffix=".jpg", delete=False) as f:
        f.write(data)
    try:
        alone = {batch: model_alone(f.name, threads, batch, seconds * 1.5) for batch in (1, 4, 8)}
    finally:
        os.unlink(f.name)
    best_batch = max(alone, key=lambda b: alone[b]["images_per_s"])
    limit = alone[best_batch]["images_per_s"]
    single_ms = alone[1]["batch_ms_p50"]

    ports = {name: free_port() for name in NAMES}
    litserve = [PYTHON, "-m", "bench.litserve_server"]
    batching = ["--max-batch-size", str(BATCH), "--batch-timeout-ms", f"{WAIT_MS:g}"]
    servers = {
        "ps_on": (pixelstream_argv(ports["ps_on"], *OPEN_LIMITS), "/readyz"),
        "ps_8": (pixelstream_argv(ports["ps_8"], *OPEN_LIMITS, "--max-batch-size", "8"),
                 "/readyz"),
        "ps_off": (pixelstream_argv(ports["ps_off"], *OPEN_LIMITS, "--max-batch-size", "1"),
                   "/readyz"),
        "ls_on": ([*litserve, str(ports["ls_on"]), "--threads", str(threads), *batching],
                  "/health"),
        "ls_off": ([*litserve, str(ports["ls_off"]), "--threads", str(threads),
                    "--max-batch-size", "1", "--batch-timeout-ms", "0"], "/health"),
    }

    def client(name: str) -> Callable[[], Awaitable[tuple[Request, Callable[[], Any]]]]:
        make = pixelstream_client if name.startswith("ps") else litserve_client
        return lambda: make(ports[name], data)

    connect = {name: client(name) for name in servers}
    loads = {(name, c): Load() for name in servers for c in CONCURRENCY}
    with ExitStack() as stack:
        pids = {name: stack.enter_context(server_process(argv, ports[name], ready_path=ready)).pid
                for name, (argv, ready) in servers.items()}
        for _ in range(rounds):
            for clients in CONCURRENCY:
                for name in servers:
                    with paused([pid for other, pid in pids.items() if other != name]):
                        asyncio.run(drive(connect[name], clients, seconds,
                                          loads[(name, clients)]))
    return _section(loads, alone, best_batch, threads, rounds, seconds), {
        "limit_images_per_s": limit, "single_image_ms": single_ms, "threads": threads}


def _defaults() -> tuple[int, float]:
    from server.settings import Settings

    settings = Settings()
    return settings.max_batch_size, settings.max_wait_ms


BATCH, WAIT_MS = _defaults()
"""pixelstream's default batching; LitServe gets the same."""
NAMES = {
    "ps_on": f"pixelstream, batching on (defaults: max {BATCH}, {WAIT_MS:g} ms)",
    "ps_8": f"pixelstream, batching on (max 8, {WAIT_MS:g} ms: the previous default)",
    "ps_off": "pixelstream, batching off",
    "ls_on": f"LitServe, batching on (max {BATCH}, {WAIT_MS:g} ms)",
    "ls_off": "LitServe, batching off",
}


def _section(loads: dict[tuple[str, int], Load], alone: dict[int, dict[str, float]],
             best_batch: int, threads: int, rounds: int, seconds: float) -> Section:
    limit = alone[best_batch]["images_per_s"]
    rows = [[f"model alone, tight loop, batch {batch}", "-",
             f"{figures['images_per_s']:.1f}", f"{figures['images_per_s'] / limit:.2f}",
             f"{figures['batch_ms_p50']:.1f} (a batch)", "-", "-"]
            for batch, figures in alone.items()]
    for name, label in NAMES.items():
        for clients in CONCURRENCY:
            load = loads[(name, clients)]
            rate = median(load.images_per_s)
            rows.append([label, str(clients), f"{rate:.1f}", f"{rate / limit:.2f}",
                         *(f"{percentile(load.latencies_ms, q):.0f}" for q in (50, 95, 99))])

    def rate(name: str, clients: int) -> float:
        return median(loads[(name, clients)].images_per_s)

    best_ls = max(("ls_on", "ls_off"), key=lambda n: rate(n, 16))
    return Section(
        key="inference",
        title="3. Inference throughput and latency",
        intro=(f"640x480 JPEG, classify top-5, result cache off. images/s: median of {rounds} "
               f"rounds of {seconds:g} s per row (round-robin); latency percentiles over all "
               f"rounds' requests, ms. {threads} torch thread(s) for every contender (a "
               "pixelstream worker's default here: the cores but one). The limit is the best "
               "of the model alone (pixelstream's decode, preprocess, predict and encode in a "
               "tight loop, one process)."),
        header=["server", "clients", "images/s", "of the limit", "p50 ms", "p95 ms", "p99 ms"],
        rows=rows,
        checks=[
            Check("16 clients: pixelstream (defaults) / model alone",
                  rate("ps_on", 16) / limit, 0.85),
            Check(f"16 clients: pixelstream (defaults) / the better LitServe ({NAMES[best_ls]})",
                  rate("ps_on", 16) / rate(best_ls, 16), 1.0),
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    section, _ = run(args.rounds, args.seconds)
    print(f"Machine: {machine()}\n")
    print(section.markdown())


if __name__ == "__main__":
    main()
