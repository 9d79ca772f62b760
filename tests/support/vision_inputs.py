"""Real inputs for the vision engines and the built-in tasks, made in the tests: rendered
text, generated QR codes and barcodes, photographs shipped with scikit-image; and a driver
that runs a task the way the runtime does (whole image, or tiles then merge)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from server.tasks.contract import Task, View, parse_options, validate_options
from server.tasks.spatial import tile_boxes

ASTRONAUT_FACE = (174.0, 70.0, 279.0, 175.0)
"""Where Eileen Collins' face is in scikit-image's ``astronaut`` (512x512), by eye."""


def photo(name: str) -> Image.Image:
    """A photograph scikit-image ships (``astronaut``, ``coffee``, ``chelsea``...), in RGB."""
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def lfw_crops() -> tuple[list[Image.Image], list[Image.Image]]:
    """scikit-image's Labeled Faces in the Wild subset: 100 face crops and 100 crops of other
    things, 25x25 grey."""
    from pathlib import Path

    import numpy as np
    import skimage.data

    crops = np.load(Path(skimage.data.__file__).parent / "lfw_subset.npy")
    images = [Image.fromarray((crop * 255).astype(np.uint8)) for crop in crops]
    return images[:100], images[100:]


def framed(crop: Image.Image, side: int) -> Image.Image:
    """``crop`` enlarged to ``side`` px, centred on a grey square twice as large."""
    canvas = Image.new("RGB", (side * 2, side * 2), (128, 128, 128))
    canvas.paste(crop.resize((side, side), Image.Resampling.BICUBIC).convert("RGB"),
                 (side // 2, side // 2))
    return canvas


def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's own scalable font (no system font needed)."""
    return ImageFont.load_default(size=size)


@dataclass(frozen=True)
class Written:
    text: str
    box: tuple[int, int, int, int]
    """Where the ink is, in the image's pixels."""


def write(image: Image.Image, text: str, at: tuple[int, int], size: int) -> Written:
    draw = ImageDraw.Draw(image)
    typeface = font(size)
    draw.text(at, text, fill=(20, 20, 20), font=typeface)
    left, top, right, bottom = draw.textbbox(at, text, font=typeface)
    return Written(text, (int(left), int(top), int(right), int(bottom)))


def page(lines: Sequence[str], size: tuple[int, int] = (1000, 700), text_px: int = 28,
         at: tuple[int, int] = (60, 80), spacing: int = 90) -> tuple[Image.Image, list[Written]]:
    """A white page with ``lines`` of dark text, one under the other."""
    image = Image.new("RGB", size, "white")
    written = [write(image, line, (at[0], at[1] + index * spacing), text_px)
               for index, line in enumerate(lines)]
    return image, written


def barcode(format_name: str, text: str, scale: int = 4) -> Image.Image:
    """A code zxing-cpp draws: ``format_name`` as zxingcpp.BarcodeFormat spells it
    (``QRCode``, ``EAN13``, ``Code128``), with its quiet zone, in grey."""
    import numpy as np
    import zxingcpp

    symbol = zxingcpp.create_barcode(text, getattr(zxingcpp.BarcodeFormat, format_name))
    return Image.fromarray(np.asarray(symbol.to_image(scale=scale))).convert("RGB")


def overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes."""
    from server.tasks.spatial import iou

    return iou(a, b)


def encloses(found: Sequence[float], drawn: Sequence[float], margin: float) -> bool:
    """``found`` covers ``drawn`` (within 3 px) and reaches at most ``margin`` px beyond it:
    a reader's box around text it read, padded as readers pad."""
    return (drawn[0] - margin <= found[0] <= drawn[0] + 3
            and drawn[1] - margin <= found[1] <= drawn[1] + 3
            and drawn[2] - 3 <= found[2] <= drawn[2] + margin
            and drawn[3] - 3 <= found[3] <= drawn[3] + margin)


def run_task(task: Task, image: Image.Image, options: dict[str, Any] | None = None,
             *, decode_scale: float = 1.0) -> dict[str, Any]:
    """``task``'s result for ``image`` as the runtime computes it: a spatial task on an image
    larger than its tile runs tile by tile at full resolution and merges; anything else runs
    once over the whole image, decoded at ``decode_scale`` (a downscaled decode)."""
    checked = validate_options(task, options or {})
    parsed = parse_options(task, checked)
    original = image.size
    tiling = task.tiling
    if tiling is not None and parsed.tiles and max(original) > tiling.size:
        views = [View(image.crop(box), original, box)
                 for box in tile_boxes(*original, tiling.size, tiling.overlap)]
        if tiling.overview:  # the whole image, shrunk as PixelSource.whole shrinks it
            wanted = task.decode.min_short_side
            factor = min(original) // wanted if wanted else 1
            whole = image if factor < 2 else image.resize(
                (original[0] // factor, original[1] // factor), Image.Resampling.BOX)
            views.insert(0, View.whole(whole, original))
    else:
        decoded = image
        if decode_scale != 1.0:
            decoded = image.resize((round(original[0] * decode_scale),
                                    round(original[1] * decode_scale)),
                                   Image.Resampling.LANCZOS)
        views = [View.whole(decoded, original)]
    outputs = task.predict([task.preprocess(view, parsed) for view in views])
    parts = [task.encode(output, view, parsed) for output, view in zip(outputs, views,
                                                                        strict=True)]
    if len(parts) == 1 and views[0].region == (0, 0, *original):
        return parts[0]
    return task.merge(parts, original, parsed)


SCAN_LINES = [
    "Part PX-7731 rev B, qty 40",
    "Torque 12 Nm on bolts M8",
    "Inspected by QA team 4",
    "Drawing 2026-118 sheet 3 of 7",
    "Weld seam W14 length 320 mm",
    "Paint RAL 7035 light grey",
    "Tolerance plus minus 0.2 mm",
    "Supplier Nordic Steel AB",
    "Batch 55231 cast on Tuesday",
    "Do not stack more than 6 high",
    "Ship to Dock 9, Gate B12",
    "Net weight 18.5 kg each",
]


def scan(lines: Sequence[str] = SCAN_LINES, size: tuple[int, int] = (4000, 3000),
         text_px: int = 28) -> tuple[Image.Image, list[Written]]:
    """A scanned drawing's page: ``lines`` spread over a large white sheet, many of them across
    the edges of the ``ocr`` task's 768-px tiles (starts at x 0, 539, 1077, 1616, 2155, 2693,
    3232 and y 0, 558, 1116, 1674, 2232 on 4000x3000), each once."""
    width, height = size
    image = Image.new("RGB", size, (250, 250, 247))
    columns = (0.05, 0.42, 0.70)
    rows = (0.07, 0.23, 0.47, 0.71)
    written = []
    for index, line in enumerate(lines):
        x = round(width * columns[index % len(columns)]) + 37 * (index % 4)
        y = round(height * rows[(index // len(columns)) % len(rows)]) + 23 * (index % 5)
        written.append(write(image, line, (x, y), text_px))
    return image, written
