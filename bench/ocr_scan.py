"""OCR on a 4000x3000 scan: the ``ocr`` task's tiles against one downscaled pass, same run.

The scan (tests/support/vision_inputs.py ``scan``) holds 12 lines of text spread over the
sheet, many across tile edges, once at 28 px and once at 13 px. Cases, each in this process
with one task set up once (its engines' load and a first read reported apart):

* ``tiles``: what the server does with ``"tiles": true`` (the default): 768-px tiles at full
  resolution through the task's preprocess/predict/encode, then ``merge``; here one tile after
  another on one worker (a server spreads them over its workers).
* ``one pass``: ``"tiles": false``: the whole scan decoded to 1024 px on its shorter side.
* ``small image``: the same 12 lines on a 1000x700 page (no tiling needed).

Reported: median seconds per image, lines read exactly (of 12), and tiles/one-pass ratios.

    python -m bench.ocr_scan [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine


def _read(task: Any, image: Any, options: dict[str, Any], scale: float) -> tuple[float, Any]:
    from tests.support.vision_inputs import run_task

    started = time.perf_counter()
    result = run_task(task, image, options, decode_scale=scale)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from server.tasks.builtin.ocr import Ocr
    from tests.support.vision_inputs import SCAN_LINES, page, scan

    task = Ocr()
    expected = set(SCAN_LINES)
    small, _ = page(SCAN_LINES, size=(1000, 700), at=(40, 30), spacing=54)
    started = time.perf_counter()
    task.setup("cpu")
    _read(task, small, {}, 1.0)  # the engines are built on first use: not in the cases
    load_s = time.perf_counter() - started
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}; "
          f"engines loaded and a first page read in {load_s:.2f} s", flush=True)
    print("\n| text | case | s per image (median) | lines read exactly |")
    print("|---|---|---:|---:|")
    for text_px in (28, 13):
        sheet, _ = scan(text_px=text_px)
        one_pass_scale = 1024 / min(sheet.size)
        cases = [("tiles", sheet, {}, 1.0),
                 ("one pass", sheet, {"tiles": False}, one_pass_scale)]
        if text_px == 28:
            cases.append(("small image", small, {}, 1.0))
        medians = {}
        for name, image, options, scale in cases:
            times, read = [], 0
            for _ in range(args.rounds):
                elapsed, result = _read(task, image, options, scale)
                times.append(elapsed)
                read = len(expected & {line["text"] for line in result["lines"]})
            medians[name] = statistics.median(times)
            size = "x".join(map(str, image.size))
            print(f"| {text_px} px | {name} ({size}) | {medians[name]:.2f} | {read}/12 |",
                  flush=True)
        print(f"| {text_px} px | tiles / one pass | "
              f"{medians['tiles'] / medians['one pass']:.1f}x | |", flush=True)


if __name__ == "__main__":
    main()
