"""Time to result and server memory for huge photos: pixelstream against the naive design.

Both servers run as subprocesses on this machine, with the same model. pixelstream gets the
image as binary WebSocket chunks; the naive server gets one JSON POST with Base64 and does a
full decode before resizing. Each round is timed from the first byte sent to the result;
memory is the peak RSS of the server's whole process tree during the round, minus its RSS
just before. Medians of ROUNDS rounds; the cache is off so every round does the work.

    python bench/huge_photo.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import time
from typing import Any

import httpx
import orjson
import websockets

from bench.common import (
    VENV_BIN,
    PeakSampler,
    free_port,
    machine,
    median,
    photo_jpeg,
    photo_png,
    rss_bytes,
    server_process,
    tree_pids,
)
from chunking.codec import encode_client_binary
from chunking.messages import Chunk

CHUNK = 1 << 20
MB = 1024 * 1024


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


def measure(pid: int, run: Any, rounds: int) -> tuple[float, float, Any]:
    times, growth, last = [], [], None
    for _ in range(rounds):
        before = rss_bytes(tree_pids(pid))
        with PeakSampler(pid) as sampler:
            last = run()
        times.append(last["elapsed_ms"])
        growth.append(sampler.peak - before)
    return median(times), median(growth), last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    photos = {
        "12000x9000 JPEG": photo_jpeg(12000, 9000, quality=85, grain=12),
        "4000x3000 PNG": photo_png(4000, 3000),
    }
    rows = []
    ps_port, naive_port = free_port(), free_port()
    ps_argv = [str(VENV_BIN / "pixelstream"), "serve", "--port", str(ps_port),
               "--cache-entries", "0", "--log-level", "warning"]
    naive_argv = [str(VENV_BIN / "python"), "bench/naive_server.py", str(naive_port)]
    with server_process(ps_argv, ps_port, ready_path="/readyz") as ps, \
            server_process(naive_argv, naive_port) as naive:
        counter = iter(range(10**6))
        for name, data in photos.items():
            # One warm-up each, so neither side pays first-call costs in the figures.
            asyncio.run(pixelstream_round(ps_port, data, "warmup"))
            naive_round(naive_port, data)
            def upload(d: bytes = data) -> dict[str, Any]:
                return asyncio.run(pixelstream_round(ps_port, d, f"u{next(counter)}"))

            ps_ms, ps_mem, ps_result = measure(ps.pid, upload, args.rounds)
            nv_ms, nv_mem, nv_result = measure(
                naive.pid, lambda d=data: naive_round(naive_port, d), args.rounds)
            assert ps_result["image"] == nv_result["image"]
            top_ps = ps_result["result"]["labels"][0]["label"]
            top_nv = nv_result["result"]["labels"][0]["label"]
            rows.append((name, len(data), ps_ms, nv_ms, ps_mem, nv_mem, top_ps == top_nv,
                         ps_result["timings_ms"]))
    print(f"\nMachine: {machine()}. Medians of {args.rounds} rounds.\n")
    print("| photo | bytes | pixelstream ms | naive ms | speed-up | pixelstream RSS growth "
          "| naive RSS growth | memory ratio | same top-1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, size, ps_ms, nv_ms, ps_mem, nv_mem, same, _ in rows:
        print(f"| {name} | {size / MB:.1f} MB | {ps_ms:.0f} | {nv_ms:.0f} | {nv_ms / ps_ms:.1f}x "
              f"| {ps_mem / MB:.1f} MB ({ps_mem / size:.2f}x image) | {nv_mem / MB:.1f} MB "
              f"| {nv_mem / max(ps_mem, 1):.1f}x | {'yes' if same else 'no'} |")
    for name, *_, timings in rows:
        print(f"\npixelstream stages for {name}: {timings}")


if __name__ == "__main__":
    main()
