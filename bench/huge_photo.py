"""Time to result and server memory for huge photos: pixelstream against the naive design.

Both servers run as subprocesses on this machine, with the same model. pixelstream gets the
image as binary WebSocket chunks; the naive server gets one JSON POST with Base64 and does a
full decode before resizing. Each round is timed from the first byte sent to the result;
memory is the peak, during the round, of the server tree's RSS less shared memory plus its
spool files on tmpfs, minus that figure when idle. Medians of ROUNDS rounds; the cache is off
so every round does the work.

    python -m bench.huge_photo [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import tempfile
import time
from typing import Any

import httpx
import orjson
import websockets

from bench.common import (
    MB,
    VENV_BIN,
    PeakSampler,
    free_port,
    machine,
    median,
    paused,
    photo_jpeg,
    photo_png,
    pixelstream_argv,
    server_process,
)
from bench.report import Check, Section
from chunking.codec import encode_client_binary
from chunking.messages import Chunk

CHUNK = 1 << 20


async def pixelstream_round(port: int, data: bytes, upload_id: str) -> dict[str, Any]:
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/ws", compression=None,
                                  max_size=None) as ws:
        welcome = orjson.loads(await ws.recv())
        window = welcome["limits"]["window_bytes"]
        started = time.perf_counter()
        await ws.send(orjson.dumps({"type": "upload", "id": upload_id, "size": len(data)}).decode())
        acked = sent = 0
        while True:
            while sent < len(data) and sent - acked < window:
                await ws.send(encode_client_binary(Chunk(upload_id, sent, data[sent:sent + CHUNK])))
                sent = min(len(data), sent + CHUNK)
            message = orjson.loads(await ws.recv())
            if message["type"] == "progress" and message["stage"] == "upload":
                acked = message["received"]
            elif message["type"] in ("result", "error"):
                if message["type"] == "error":
                    raise RuntimeError(message)
                message["elapsed_ms"] = (time.perf_counter() - started) * 1000
                return message


def naive_round(port: int, data: bytes) -> dict[str, Any]:
    started = time.perf_counter()
    body = orjson.dumps({"image": base64.b64encode(data).decode()})
    answer = httpx.post(f"http://127.0.0.1:{port}/analyze", content=body,
                        headers={"content-type": "application/json"}, timeout=300)
    answer.raise_for_status()
    result: dict[str, Any] = answer.json()
    result["elapsed_ms"] = (time.perf_counter() - started) * 1000
    return result


def measure(pid: int, directories: list[str], idle: int, run: Any,
            rounds: int) -> tuple[float, float, Any]:
    times, growth, last = [], [], None
    for _ in range(rounds):
        with PeakSampler(pid, directories) as sampler:
            last = run()
        times.append(last["elapsed_ms"])
        growth.append(sampler.peak - idle)
    return median(times), median(growth), last


def run(rounds: int = 3) -> Section:
    photos = {
        # Photo-like files: grain makes them compress as photos do (about 22 MB and 20 MB).
        "12000x9000 JPEG": photo_jpeg(12000, 9000, quality=86, grain=24),
        "4000x3000 PNG": photo_png(4000, 3000, grain=8),
    }
    rows = []
    ps_port, naive_port = free_port(), free_port()
    spool = tempfile.mkdtemp(prefix="bench-huge-", dir="/dev/shm" if os.path.isdir("/dev/shm")
                             else None)
    naive_argv = [str(VENV_BIN / "python"), "bench/naive_server.py", str(naive_port)]
    checks = []
    try:
        with server_process(pixelstream_argv(ps_port, "--spool-dir", spool), ps_port,
                            ready_path="/readyz") as ps, \
                server_process(naive_argv, naive_port) as naive:
            counter = iter(range(10**6))
            servers = [ps.pid, naive.pid]
            for name, data in photos.items():
                # One warm-up each, so neither side pays first-call costs in the figures.
                asyncio.run(pixelstream_round(ps_port, data, "warmup"))
                naive_round(naive_port, data)
                time.sleep(0.5)
                ps_idle = PeakSampler(ps.pid, [spool]).measure()["held"]
                nv_idle = PeakSampler(naive.pid).measure()["held"]

                def upload(port: int, d: bytes = data) -> dict[str, Any]:
                    return asyncio.run(pixelstream_round(port, d, f"u{next(counter)}"))

                with paused([p for p in servers if p != ps.pid]):
                    ps_ms, ps_mem, ps_result = measure(
                        ps.pid, [spool], ps_idle, lambda: upload(ps_port), rounds)
                with paused([p for p in servers if p != naive.pid]):
                    nv_ms, nv_mem, nv_result = measure(
                        naive.pid, [], nv_idle, lambda d=data: naive_round(naive_port, d), rounds)
                assert ps_result["image"] == nv_result["image"]
                top_ps = ps_result["result"]["labels"][0]["label"]
                top_nv = nv_result["result"]["labels"][0]["label"]
                rows.append([
                    name, f"{len(data) / MB:.1f} MB", f"{ps_ms:.0f}",
                    f"{nv_ms:.0f}", f"{nv_ms / ps_ms:.1f}x",
                    f"{ps_mem / MB:.1f} ({ps_mem / len(data):.2f}x file)",
                    f"{nv_mem / MB:.0f} ({nv_mem / len(data):.1f}x file)",
                    f"{nv_mem / max(ps_mem, 1):.1f}x", "yes" if top_ps == top_nv else "no",
                    ", ".join(f"{k} {v:.0f}" for k, v in ps_result["timings_ms"].items()),
                ])
                if "JPEG" in name:
                    checks = [Check("huge JPEG time to result, naive / pixelstream",
                                    nv_ms / ps_ms, 5.0),
                              Check("huge JPEG peak memory, naive / pixelstream",
                                    nv_mem / max(ps_mem, 1), 20.0)]
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    return Section(
        key="huge_photo",
        title="2. Time to result for a huge photo",
        intro=(f"Medians of {rounds} rounds. pixelstream gets binary chunks of 1 MiB over one "
               "WebSocket and decodes large JPEGs at reduced scale once the upload is whole; "
               "the naive server gets one "
               "JSON POST with Base64, a Pydantic model, a full decode, then a resize, then the "
               "same model. Time: first byte sent to result. Memory: peak above idle of the "
               "server tree's RSS (less shared memory) plus its spool files in /dev/shm. "
               "Result cache off."),
        header=["photo", "file", "pixelstream ms", "naive ms", "speed-up",
                "pixelstream memory MB", "naive memory MB", "memory ratio", "same top-1",
                "pixelstream stages ms"],
        rows=rows,
        checks=checks,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    section = run(args.rounds)
    print(f"Machine: {machine()}\n")
    print(section.markdown())


if __name__ == "__main__":
    main()
