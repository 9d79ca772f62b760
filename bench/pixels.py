"""Decoding one huge image for tiles and for a downscaled model pass: peak memory and time.

Each case runs in a fresh interpreter; memory is the peak RSS growth over the interpreter's
RSS just before the case (Linux ``/proc/self/clear_refs`` + ``VmHWM``), time is the case's
wall time. Cases, on a 12000x9000 photo-like JPEG and PNG generated here:

* ``tiles``: every 1024 px tile of the image at full resolution. ``pillow`` decodes the whole
  image into memory and crops it (the simple design); ``pixel_source`` is
  :class:`server.pipeline.pixel_source.PixelSource`: one streaming libvips decode into a raw
  file on disk, then each tile read from it.
* ``whole``: the image for one model pass (short side 224). ``pillow`` is a plain Pillow
  decode then ``reduce``; ``decode`` is :func:`server.pipeline.decode.decode` as the worker
  calls it (JPEG DCT scaling; PNG/TIFF/WebP shrunk while libvips streams them).

    python -m bench.pixels [--width 12000 --height 9000] [--rounds 1]

Ratios are pillow / ours, from the same run; the README quotes them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from bench.common import MB, ROOT, machine, photo_jpeg, photo_png

TILE = 1024

CHILD = textwrap.dedent(
    """
    import re, sys, time
    from PIL import Image
    Image.MAX_IMAGE_PIXELS = None
    from server.pipeline.decode import decode
    from server.pipeline.pixel_source import open_pixels
    from server.tasks.contract import DecodeHint

    def status(key):
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{key}:\\s+(\\d+) kB", f.read(), re.M).group(1)) * 1024

    case, how, path, scratch, tile = sys.argv[1:6]
    tile = int(tile)
    import pyvips  # load the libraries before measuring
    pyvips.Image.black(8, 8).write_to_memory()
    Image.new("RGB", (8, 8)).save("/dev/null", "PNG")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    started = time.perf_counter()
    if case == "tiles" and how == "pillow":
        with Image.open(path) as image:
            image.load()
            width, height = image.size
            for y in range(0, height, tile):
                for x in range(0, width, tile):
                    image.crop((x, y, x + tile, y + tile)).tobytes()
    elif case == "tiles":
        with open_pixels(path, max_pixels=10**9, scratch_dir=scratch) as source:
            width, height = source.original
            for y in range(0, height, tile):
                for x in range(0, width, tile):
                    source.region((x, y, x + tile, y + tile)).tobytes()
    elif how == "pillow":
        with Image.open(path) as image:
            image.load()
            image.reduce(max(1, min(image.size) // 224)).convert("RGB")
    else:
        decode(path, max_pixels=10**9, hint=DecodeHint(224))
    elapsed = time.perf_counter() - started
    print(status("VmHWM") - before, elapsed)
    """
)


def measure(case: str, how: str, path: Path, scratch: str) -> tuple[int, float]:
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, case, how, str(path), scratch, str(TILE)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, check=True, timeout=600,
    )
    peak, seconds = completed.stdout.split()[-2:]
    return int(peak), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=12000)
    parser.add_argument("--height", type=int, default=9000)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    print(f"Machine: {machine()}; image {args.width}x{args.height}, tiles of {TILE} px; "
          f"medians of {args.rounds} round(s)\n")
    print("| case | format | Pillow peak | ours peak | memory ratio | Pillow time | ours time "
          "| time ratio |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        files = {
            "JPEG": Path(scratch) / "photo.jpg",
            "PNG": Path(scratch) / "photo.png",
        }
        files["JPEG"].write_bytes(photo_jpeg(args.width, args.height))
        files["PNG"].write_bytes(photo_png(args.width, args.height, grain=8))
        for case, ours in (("tiles", "pixel_source"), ("whole", "decode")):
            for fmt, path in files.items():
                runs = {how: [measure(case, how, path, scratch) for _ in range(args.rounds)]
                        for how in ("pillow", ours)}
                peak = {how: statistics.median(r[0] for r in rs) for how, rs in runs.items()}
                took = {how: statistics.median(r[1] for r in rs) for how, rs in runs.items()}
                print(f"| {case} | {fmt} | {peak['pillow'] / MB:.1f} MiB | "
                      f"{peak[ours] / MB:.1f} MiB | {peak['pillow'] / max(1, peak[ours]):.1f}x "
                      f"| {took['pillow']:.2f} s | {took[ours]:.2f} s | "
                      f"{took['pillow'] / took[ours]:.2f}x |")


if __name__ == "__main__":
    main()
