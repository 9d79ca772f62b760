"""Tiled analysis through the server: tiles per second against the model alone, and memory.

A spatial task with a real (random-weight) convolutional detector, :class:`ConvSpots`, runs
on 1024 px tiles. Two figures, from the same run:

* **tiles/s**: the server (``pixelstream serve``, one worker process, ``--max-batch-size B``)
  analysing a large JPEG in tiles, counted from the first ``inference`` progress message to
  the result (tile cropping, batching, queueing, encoding and merging included), against the
  same task's ``preprocess`` + ``predict`` + ``encode`` on the same tiles, in batches of B, in
  one process with the same thread count. Goal: >= 0.85.
* **memory**: the server tree's peak memory (RSS less shared memory, plus its spool files on
  tmpfs) above idle while it analyses a 12000x9000 JPEG in tiles. Goal: <= 0.5 GB.

    python -m bench.tiles [--batch 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import orjson
import websockets

from bench.common import (
    MB,
    ROOT,
    PeakSampler,
    free_port,
    machine,
    median,
    photo_jpeg,
    pixelstream_argv,
    server_process,
)
from bench.report import Check, Section
from chunking.codec import encode_client_binary
from chunking.messages import Chunk
from server.tasks.contract import ModelInfo, SpatialOptions, Task, Tiling, View

TILE = 1024
CHUNK = 1 << 20
THREADS = 1


class ConvSpots(Task):
    """A detector-shaped spatial task: a small fixed-seed CNN (about 1.4 GFLOP per 1024 px
    tile) whose strongest activations become boxes in original pixels."""

    name = "bench-detect"
    Options = SpatialOptions
    tiling = Tiling(size=TILE, overlap=64)

    @property
    def model(self) -> ModelInfo:
        return ModelInfo(id="bench/conv-spots")

    def setup(self, device: str) -> None:
        import torch

        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(64, 1, 1),
        ).eval()

    def preprocess(self, view: View, options: Any) -> Any:
        import numpy as np
        import torch

        image = view.image
        if image.size != (TILE, TILE):  # edge tiles of small images: pad to the batch shape
            from PIL import Image

            padded = Image.new("RGB", (TILE, TILE))
            padded.paste(image)
            image = padded
        array = np.asarray(image, dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1)

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        import torch

        with torch.inference_mode():
            heat = self.net(torch.stack(list(batch)))[:, 0]
        return [map_.numpy() for map_ in heat]

    def encode(self, output: Any, view: View, options: Any) -> dict[str, Any]:
        import numpy as np

        step = TILE / output.shape[0]
        ys, xs = np.unravel_index(np.argsort(output, axis=None)[-3:], output.shape)
        objects = []
        for y, x in zip(ys.tolist(), xs.tolist(), strict=True):
            box = view.box_to_original([x * step, y * step, (x + 1) * step, (y + 1) * step])
            if box is not None:
                objects.append({"label": "spot", "score": 0.5, "box": box})
        return {"objects": objects}

    def merge(self, parts: Sequence[dict[str, Any]], original: tuple[int, int],
              options: Any) -> dict[str, Any]:
        unique = {tuple(o["box"]): o for part in parts for o in part["objects"]}
        return {"objects": list(unique.values())}


async def tiled_round(port: int, data: bytes, upload_id: str) -> dict[str, Any]:
    """Upload ``data`` for ``bench-detect``; the result with the tiles' wall time added."""
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/ws", compression=None,
                                  max_size=None) as ws:
        welcome = orjson.loads(await ws.recv())
        window = welcome["limits"]["window_bytes"]
        await ws.send(orjson.dumps({"type": "upload", "id": upload_id, "size": len(data),
                                    "task": "bench-detect"}).decode())
        acked = sent = 0
        tiles_started: float | None = None
        total = 0
        while True:
            while sent < len(data) and sent - acked < window:
                await ws.send(encode_client_binary(Chunk(upload_id, sent,
                                                         data[sent:sent + CHUNK])))
                sent = min(len(data), sent + CHUNK)
            message = orjson.loads(await ws.recv())
            if message["type"] == "progress" and message["stage"] == "upload":
                acked = message["received"]
            elif message["type"] == "progress" and message.get("done") == 0:
                tiles_started, total = time.perf_counter(), message["total"]
            elif message["type"] in ("result", "error"):
                if message["type"] == "error" or tiles_started is None:
                    raise RuntimeError(message)
                message["tiles_s"] = time.perf_counter() - tiles_started
                message["tiles"] = total
                return message


def model_alone(data: bytes, batch: int) -> tuple[float, int]:
    """The task's own hooks on every tile of ``data``, in batches: (tiles/s, tiles)."""
    import torch

    from server.pipeline.pixel_source import open_pixels
    from server.tasks.spatial import tile_boxes

    torch.set_num_threads(THREADS)
    task = ConvSpots()
    task.setup("cpu")
    options = SpatialOptions()
    with open_pixels(data, max_pixels=200_000_000) as source:
        source.share()  # the one decode, outside the timing (as the server's plan step)
        boxes = tile_boxes(*source.original, TILE, 64)
        warm = View(source.region(boxes[0]), source.original, boxes[0])
        task.predict([task.preprocess(warm, options)] * batch)
        started = time.perf_counter()
        for first in range(0, len(boxes), batch):
            views = [View(source.region(box), source.original, box)
                     for box in boxes[first:first + batch]]
            outputs = task.predict([task.preprocess(view, options) for view in views])
            parts = [task.encode(out, view, options)
                     for out, view in zip(outputs, views, strict=True)]
        task.merge(parts, source.original, options)
        elapsed = time.perf_counter() - started
    return len(boxes) / elapsed, len(boxes)


def run(batch: int = 4, rounds: int = 2) -> Section:
    throughput_image = photo_jpeg(6000, 4000, quality=86, grain=24)
    huge = photo_jpeg(12000, 9000, quality=86, grain=24)
    scratch = tempfile.mkdtemp(prefix="bench-tiles-")
    tasks_file = os.path.join(scratch, "tasks.toml")
    with open(tasks_file, "w") as file:
        file.write('[tasks.bench-detect]\nkind = "python"\nentry = "bench.tiles:ConvSpots"\n')
    spool = tempfile.mkdtemp(prefix="bench-tiles-spool-",
                             dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    port = free_port()
    argv = pixelstream_argv(port, "--tasks", tasks_file, "--workers", "1",
                            "--max-batch-size", str(batch), "--max-wait-ms", "5",
                            "--spool-dir", spool, "--max-pixels", "200000000",
                            "--max-image-bytes", str(200 * MB))
    env = {"PYTHONPATH": str(ROOT), "PIXELSTREAM_TORCH_THREADS": str(THREADS),
           "OMP_NUM_THREADS": str(THREADS)}
    counter = iter(range(10**6))
    try:
        alone_rates = [model_alone(throughput_image, batch)[0] for _ in range(rounds)]
        with server_process(argv, port, env=env, ready_path="/readyz") as server:
            asyncio.run(tiled_round(port, throughput_image, "warmup"))
            served = [asyncio.run(tiled_round(port, throughput_image, f"t{next(counter)}"))
                      for _ in range(rounds)]
            served_rates = [m["tiles"] / m["tiles_s"] for m in served]
            time.sleep(1.0)  # let the previous round's buffers go back before idling
            idle = PeakSampler(server.pid, [spool]).measure()["held"]
            growth, huge_results = [], []
            for _ in range(rounds):
                with PeakSampler(server.pid, [spool]) as sampler:
                    huge_results.append(
                        asyncio.run(tiled_round(port, huge, f"h{next(counter)}")))
                growth.append(sampler.peak - idle)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(spool, ignore_errors=True)
    alone, served_rate = median(alone_rates), median(served_rates)
    memory = median(growth)
    huge_result = huge_results[-1]
    rows = [
        ["6000x4000 JPEG", str(served[-1]["tiles"]), f"{alone:.2f}", f"{served_rate:.2f}",
         f"{served_rate / alone:.2f}", "", ""],
        ["12000x9000 JPEG", str(huge_result["tiles"]), "", "",
         "", f"{memory / MB:.0f}",
         ", ".join(f"{k} {v:.0f}" for k, v in huge_result["timings_ms"].items())],
    ]
    return Section(
        key="tiles",
        title="Tiled analysis: tiles/s through the server and memory",
        intro=(f"A spatial task with a small CNN on {TILE} px tiles (64 px overlap), batch size "
               f"{batch}, one worker process, {THREADS} torch thread(s). Model alone: the "
               "task's preprocess/predict/encode on the same tiles in one process (decode "
               "outside the timing). Server: first `inference` progress to result. Memory: "
               "peak above idle of the server tree's RSS less shared memory plus tmpfs spool "
               f"files. Medians of {rounds} rounds."),
        header=["image", "tiles", "model alone tiles/s", "server tiles/s", "server / alone",
                "memory growth MB", "server stages ms"],
        rows=rows,
        checks=[Check("tiles/s through the server / model alone", served_rate / alone, 0.85),
                Check("memory growth in GB, 12000x9000 JPEG tiled", memory / (1024 * MB), 0.5,
                      higher_is_better=False)],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    section = run(args.batch, args.rounds)
    print(f"Machine: {machine()}\n")
    print(section.markdown())


if __name__ == "__main__":
    main()
