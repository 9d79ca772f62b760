"""The limit: pixelstream's own decode → preprocess → predict → encode in a tight loop, in one
process, with the torch threads a pixelstream worker gets. Run by :mod:`bench.inference` as a
subprocess (so the benchmark process never imports torch)::

    python -m bench.model_alone IMAGE --threads 1 --batch 8 --seconds 5 [--malloc default]
        [--model eager]

Prints one JSON object: images per second, per-batch latency percentiles (ms), and per image
the minor page faults and the CPU time (user and system, ms) of the process. ``--malloc
default`` skips the worker's malloc tuning (:func:`server.tuning.tune_worker_malloc`);
``--model eager`` skips the traced, optimized forward pass.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import orjson


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("image")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--malloc", choices=["tuned", "default"], default="tuned")
    parser.add_argument("--model", choices=["optimized", "eager"], default="optimized")
    args = parser.parse_args()
    if args.malloc == "tuned":  # as worker_main does
        from server.tuning import tune_worker_malloc

        tune_worker_malloc()
    # As worker_main does: read by torch when first imported.
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(args.threads)
    from server.pipeline.decode import decode
    from server.tasks.contract import View, parse_options
    from server.tasks.hf import ImageClassification

    data = Path(args.image).read_bytes()
    analyzer = ImageClassification()
    if args.model == "eager":
        analyzer.trace = False
    analyzer.setup("cpu")
    analyzer.wait_optimized()  # measure the model as it runs once warm
    options = parse_options(analyzer, {"top_k": 5})

    def one_batch() -> None:
        views = []
        for _ in range(args.batch):
            decoded = decode(data, max_pixels=178_956_970, hint=analyzer.decode)
            views.append(View.whole(decoded.image, (decoded.info.width, decoded.info.height)))
        items = [analyzer.preprocess(view, options) for view in views]
        for output, view in zip(analyzer.predict(items), views, strict=True):
            analyzer.encode(output, view, options)

    for _ in range(5):  # warm-up
        one_batch()
    latencies = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    while time.perf_counter() - started < args.seconds:
        begun = time.perf_counter()
        one_batch()
        latencies.append((time.perf_counter() - begun) * 1000)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    images = len(latencies) * args.batch
    latencies.sort()
    sys.stdout.write(orjson.dumps({
        "images_per_s": images / elapsed,
        "batch_ms_p50": latencies[len(latencies) // 2],
        "batch_ms_min": latencies[0],
        "page_faults_per_image": (after.ru_minflt - before.ru_minflt) / images,
        "user_ms_per_image": (after.ru_utime - before.ru_utime) * 1000 / images,
        "system_ms_per_image": (after.ru_stime - before.ru_stime) * 1000 / images,
    }).decode() + "\n")


if __name__ == "__main__":
    main()
