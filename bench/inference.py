"""Inference throughput and latency: images/s and p50/p95/p99 at 1, 4, 16 and 64 concurrent
clients. The headline row is pixelstream with its DEFAULT settings (workers, threads and batch
size chosen for this machine: :mod:`server.tuning`); beside it pixelstream with one worker (the
earlier default), LitServe in its best configuration here (2 workers x 1 thread, batches of
up to 8) and LitServe with pixelstream's defaults, both serving pixelstream's own pipeline,
LitServe serving the same weights the usual way, and the model alone in a tight loop in as
many processes as pixelstream has workers (the limit), all on this machine, in one run.

Every request is the same 640x480 JPEG (about 50 KB) and asks for ``classify`` top-5; the
result cache is off. A pixelstream client keeps one WebSocket and sends ``upload`` plus one
binary chunk per image; a LitServe client POSTs ``{"image": "<base64>"}`` over a kept-alive
connection. Latency: request sent to result received. The model alone runs pixelstream's own
decode → preprocess → predict → encode with the torch threads a pixelstream worker gets
(:mod:`bench.model_alone`); LitServe gets the same code (the traced, optimized model
included) and threads (:mod:`bench.litserve_server`). Rounds go round-robin over the servers.

LitServe is a benchmark dependency, not the server's: ``scripts/install.sh bench`` (or
``.venv/bin/pip install 'litserve>=0.2.19'``) installs it.

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
    cpu_seconds,
    free_port,
    machine,
    median,
    paused,
    percentile,
    photo_jpeg,
    pixelstream_argv,
    server_process,
    tree_pids,
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


def default_workers() -> int:
    from server.settings import Settings

    return Settings().workers


def model_alone(image_path: str, threads: int, batch: int, seconds: float,
                processes: int = 1) -> dict[str, float]:
    """:mod:`bench.model_alone` in ``processes`` processes at once: their images/s summed,
    the first one's latencies."""
    argv = [PYTHON, "-m", "bench.model_alone", image_path, "--threads", str(threads),
            "--batch", str(batch), "--seconds", str(seconds)]
    running = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True) for _ in range(processes)]
    results: list[dict[str, float]] = []
    for process in running:
        out, _ = process.communicate()
        if process.returncode:
            raise RuntimeError(f"bench.model_alone exited with {process.returncode}")
        results.append(orjson.loads(out.strip().splitlines()[-1]))
    result = dict(results[0])
    result["images_per_s"] = sum(r["images_per_s"] for r in results)
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
    cpu_ms_per_image: list[float] = field(default_factory=list)
    """The server's whole process tree, user + system: steadier than images/s on a machine
    that other work shares."""


async def drive(connect: Callable[[], Awaitable[tuple[Request, Callable[[], Any]]]],
                clients: int, seconds: float, load: Load) -> int:
    """``clients`` closed loops for ``seconds`` (after one warm-up request each); returns the
    requests made, warm-up included."""
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
    return done + clients


# The run ------------------------------------------------------------------------------------


def run(rounds: int = 3, seconds: float = 3.0) -> tuple[Section, dict[str, float]]:
    """The section, and the model's figures (the camera benchmark uses them)."""
    threads = torch_threads()
    data = photo_jpeg(640, 480)
    with tempfile.NamedTemporaryFile(suffix=".jpg", delete=False) as f:
        f.write(data)
    try:
        alone = {batch: model_alone(f.name, threads, batch, seconds * 1.5, WORKERS)
                 for batch in (1, 4, 8)}
        single = model_alone(f.name, threads, 1, seconds * 1.5)
    finally:
        os.unlink(f.name)
    best_batch = max(alone, key=lambda b: alone[b]["images_per_s"])
    limit = alone[best_batch]["images_per_s"]
    single_ms = single["batch_ms_p50"]

    ports = {name: free_port() for name in NAMES}
    litserve = [PYTHON, "-m", "bench.litserve_server"]
    servers = {
        "ps_default": (pixelstream_argv(ports["ps_default"], *OPEN_LIMITS), "/readyz"),
        "ps_1": (pixelstream_argv(ports["ps_1"], *OPEN_LIMITS, "--workers", "1"), "/readyz"),
        "ls_best": ([*litserve, str(ports["ls_best"]), "--threads", "1", "--workers", "2",
                     "--max-batch-size", "8", "--batch-timeout-ms", f"{WAIT_MS:g}"], "/health"),
        "ls_same": ([*litserve, str(ports["ls_same"]), "--threads", str(threads),
                     "--workers", str(WORKERS), "--max-batch-size", str(BATCH),
                     "--batch-timeout-ms", f"{WAIT_MS:g}"], "/health"),
        "ls_plain": ([*litserve, str(ports["ls_plain"]), "--plain", "--threads", "1",
                      "--workers", "2", "--max-batch-size", "8",
                      "--batch-timeout-ms", f"{WAIT_MS:g}"], "/health"),
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
                    load = loads[(name, clients)]
                    with paused([pid for other, pid in pids.items() if other != name]):
                        before = cpu_seconds(tree_pids(pids[name]))
                        requests = asyncio.run(drive(connect[name], clients, seconds, load))
                        used = cpu_seconds(tree_pids(pids[name])) - before
                    load.cpu_ms_per_image.append(used * 1000 / requests)
    return _section(loads, alone, best_batch, threads, rounds, seconds), {
        "limit_images_per_s": limit / WORKERS,  # one process's
        "single_image_ms": single_ms, "threads": threads}


def _defaults() -> tuple[int, int, float]:
    from server.settings import Settings

    settings = Settings()
    return settings.workers, settings.max_batch_size, settings.max_wait_ms


WORKERS, BATCH, WAIT_MS = _defaults()
"""pixelstream's defaults on this machine."""
NAMES = {
    "ps_default": f"**pixelstream, defaults** ({WORKERS} worker(s), batches of up to {BATCH}, "
                  f"{WAIT_MS:g} ms)",
    "ps_1": "pixelstream, --workers 1 (the earlier default)",
    "ls_best": f"LitServe, 2 workers x 1 thread, batches of up to 8, {WAIT_MS:g} ms (its best "
               "here)",
    "ls_same": f"LitServe, {WORKERS} worker(s), batches of up to {BATCH}, {WAIT_MS:g} ms "
               "(pixelstream's defaults)",
    "ls_plain": f"LitServe, 2 workers x 1 thread, batches of up to 8, {WAIT_MS:g} ms, the same "
                "weights served the usual way (Pillow decode, AutoImageProcessor, eager model)",
}


def _section(loads: dict[tuple[str, int], Load], alone: dict[int, dict[str, float]],
             best_batch: int, threads: int, rounds: int, seconds: float) -> Section:
    limit = alone[best_batch]["images_per_s"]
    rows = [[f"model alone, tight loop, batch {batch}, {WORKERS} process(es)", "-",
             f"{figures['images_per_s']:.1f}", f"{figures['images_per_s'] / limit:.2f}",
             f"{figures['batch_ms_p50']:.1f} (a batch)", "-", "-",
             f"{figures['user_ms_per_image'] + figures['system_ms_per_image']:.1f}"]
            for batch, figures in alone.items()]
    for name, label in NAMES.items():
        for clients in CONCURRENCY:
            load = loads[(name, clients)]
            rate = median(load.images_per_s)
            rows.append([label, str(clients), f"{rate:.1f}", f"{rate / limit:.2f}",
                         *(f"{percentile(load.latencies_ms, q):.0f}" for q in (50, 95, 99)),
                         f"{median(load.cpu_ms_per_image):.1f}"])

    def rate(name: str, clients: int) -> float:
        return median(loads[(name, clients)].images_per_s)

    def cpu(name: str, clients: int) -> float:
        return median(loads[(name, clients)].cpu_ms_per_image)

    best_ls = max(("ls_best", "ls_same"), key=lambda n: rate(n, 16))
    return Section(
        key="inference",
        title="3. Inference throughput and latency",
        intro=(f"640x480 JPEG, classify top-5, result cache off. images/s: median of {rounds} "
               f"rounds of {seconds:g} s per row (round-robin); latency percentiles over all "
               f"rounds' requests, ms. {threads} torch thread(s) per worker for every "
               "contender (a pixelstream worker's default here). The first two LitServe rows "
               "serve pixelstream's own decode, preprocessing and optimized model (only the "
               "server differs); the last serves the same weights as a LitServe user writes it "
               "from the model card (as the issue's independent probe measured LitServe). "
               "The limit is the best of the "
               "model alone (pixelstream's decode, preprocess, predict and encode in a tight "
               f"loop, in {WORKERS} process(es) at once). Server CPU per image: the server's "
               "whole process tree (user + system) over the round's requests, median of the "
               "rounds; on a machine other work shares, a steadier measure of capacity than "
               "images/s (the model alone: its own process)."),
        header=["server", "clients", "images/s", "of the limit", "p50 ms", "p95 ms", "p99 ms",
                "server CPU ms per image"],
        rows=rows,
        checks=[
            Check("16 clients: pixelstream (defaults) / model alone",
                  rate("ps_default", 16) / limit, 0.85),
            Check(f"16 clients: pixelstream (defaults) / the better LitServe ({NAMES[best_ls]})",
                  rate("ps_default", 16) / rate(best_ls, 16), 1.2),
            Check("16 clients: server CPU per image, the better LitServe / pixelstream "
                  "(defaults)", cpu(best_ls, 16) / cpu("ps_default", 16), 1.2),
            Check("16 clients: pixelstream (defaults) / LitServe serving the same weights the "
                  "usual way (2 workers x 1 thread, batches of up to 8)",
                  rate("ps_default", 16) / rate("ls_plain", 16), 1.2),
            Check("1 client: pixelstream (defaults) latency p50",
                  percentile(loads[("ps_default", 1)].latencies_ms, 50), 35,
                  higher_is_better=False, unit=" ms"),
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
