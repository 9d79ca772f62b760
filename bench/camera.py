"""Camera frames: 640x480 JPEG frames offered at twice what the model can do, on one socket.

* pixelstream's camera protocol (``frame`` messages of one stream): the server keeps the
  latest frame while one is analysed and reports the ones it replaces ``dropped``.
* Processing every frame (the baseline): the same frames at the same rate, each sent as an
  upload, so every frame queues for the model (the server's queue limit is raised so none is
  refused); this run ends when the last frame's result is in.

Figures: processed frames/s, drop ratio, latency (frame sent → result) p50/p95, and the
latency of the last quarter of the frames (a queue that grows shows there). The model's rate
and single-image latency come from :mod:`bench.model_alone` (batch 1). Result cache off.

    python -m bench.camera [--rounds 3] [--seconds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from dataclasses import dataclass, field

import orjson
import websockets

from bench.common import (
    free_port,
    machine,
    median,
    percentile,
    photo_jpeg,
    pixelstream_argv,
    server_process,
)
from bench.inference import OPEN_LIMITS, model_alone, torch_threads
from bench.report import Check, Section
from chunking.codec import encode_client_binary
from chunking.messages import Chunk, Frame


@dataclass
class Run:
    sent: int = 0
    results: int = 0
    dropped: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    tail_ms: list[float] = field(default_factory=list)
    """Latencies of the last quarter of the frames sent."""


def frames_jpeg(count: int = 8) -> list[bytes]:
    """A few different frames (slightly different grain), as a camera would give."""
    frames = []
    for grain in range(count):
        frames.append(photo_jpeg(640, 480, quality=80, grain=8 + grain))
    return frames


async def offer(port: int, frames: list[bytes], fps: float, seconds: float,
                every_frame: bool) -> Run:
    run = Run()
    sent_at: dict[int, float] = {}
    total = int(fps * seconds)
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/ws", compression=None,
                                  max_size=None) as ws:
        await ws.recv()  # welcome
        finished = asyncio.Event()
        settled: set[int] = set()

        async def receive() -> None:
            while len(settled) < total:
                message = orjson.loads(await ws.recv())
                kind = message["type"]
                seq = message.get("seq")
                if seq is None and isinstance(message.get("id"), str) and message["id"][0] == "f":
                    seq = int(message["id"][1:])
                if seq is None or kind not in ("result", "dropped", "error"):
                    continue
                settled.add(seq)
                if kind == "result":
                    run.results += 1
                    latency = (time.perf_counter() - sent_at[seq]) * 1000
                    run.latencies_ms.append(latency)
                    if seq >= total * 3 // 4:
                        run.tail_ms.append(latency)
                elif kind == "dropped":
                    run.dropped += 1
                else:
                    raise RuntimeError(message)
            finished.set()

        receiver = asyncio.create_task(receive())
        started = time.perf_counter()
        for seq in range(total):
            await asyncio.sleep(max(0.0, started + seq / fps - time.perf_counter()))
            data = frames[seq % len(frames)]
            sent_at[seq] = time.perf_counter()
            if every_frame:
                await ws.send(orjson.dumps({"type": "upload", "id": f"f{seq}",
                                            "size": len(data)}).decode())
                await ws.send(encode_client_binary(Chunk(f"f{seq}", 0, data)))
            else:
                await ws.send(encode_client_binary(Frame("cam", seq, data)))
            run.sent += 1
        await asyncio.wait_for(finished.wait(), timeout=600)
        run.seconds = time.perf_counter() - started
        await receiver
    return run


def run(rounds: int = 3, seconds: float = 6.0,
        model: dict[str, float] | None = None) -> Section:
    frames = frames_jpeg()
    if model is None:
        threads = torch_threads()
        with tempfile.NamedTemporaryFile(suffix=".jpg", delete=False) as f:
            f.write(frames[0])
        try:
            alone = model_alone(f.name, threads, 1, 5.0)
        finally:
            os.unlink(f.name)
        model = {"limit_images_per_s": alone["images_per_s"],
                 "single_image_ms": alone["batch_ms_p50"]}
    model_fps = model["limit_images_per_s"]
    single_ms = model["single_image_ms"]
    fps = 2 * model_fps
    port = free_port()
    runs: dict[str, list[Run]] = {"latest": [], "every": []}
    with server_process(pixelstream_argv(port, *OPEN_LIMITS, "--max-queue", "100000"), port,
                        ready_path="/readyz"):
        asyncio.run(offer(port, frames, fps, 1.0, False))  # warm-up
        for _ in range(rounds):
            runs["latest"].append(asyncio.run(offer(port, frames, fps, seconds, False)))
            runs["every"].append(asyncio.run(offer(port, frames, fps, seconds, True)))

    def row(label: str, items: list[Run]) -> list[str]:
        latencies = [x for r in items for x in r.latencies_ms]
        tail = [x for r in items for x in r.tail_ms]
        return [label, f"{median([r.sent / seconds for r in items]):.1f}",
                f"{median([r.results / r.seconds for r in items]):.1f}",
                f"{median([r.dropped / r.sent for r in items]):.2f}",
                f"{percentile(latencies, 50):.0f}", f"{percentile(latencies, 95):.0f}",
                f"{percentile(tail, 50):.0f}", f"{max(latencies):.0f}"]

    latest = [x for r in runs["latest"] for x in r.latencies_ms]
    return Section(
        key="camera",
        title="4. Camera frames under overload",
        intro=(f"640x480 JPEG frames offered at 2x the model's rate ({model_fps:.1f} images/s "
               f"alone, one image in {single_ms:.0f} ms) for {seconds:g} s, one socket; "
               f"{rounds} rounds, medians (latency percentiles over all rounds' frames, ms). "
               "Processing every frame: the same frames sent as uploads, all queued."),
        header=["design", "offered fps", "processed fps", "drop ratio", "latency p50",
                "latency p95", "last quarter p50", "max"],
        rows=[row("pixelstream camera stream (latest frame wins)", runs["latest"]),
              row("every frame processed (uploads, FIFO)", runs["every"])],
        checks=[Check("camera latency p95 / single-image latency",
                      percentile(latest, 95) / single_ms, 3.0, higher_is_better=False)],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    section = run(args.rounds, args.seconds)
    print(f"Machine: {machine()}\n")
    print(section.markdown())


if __name__ == "__main__":
    main()
