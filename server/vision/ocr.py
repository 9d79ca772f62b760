"""Text recognition with RapidOCR (Apache-2.0) on onnxruntime: PaddleOCR's PP-OCRv6 detection
and recognition models (Apache-2.0) and its text-angle classifier, shipped in the rapidocr
wheel.

Small text needs small inputs. RapidOCR shrinks an image whose longer side exceeds
``max_side_len`` (here :data:`MAX_SIDE`), and even unshrunk, its detector's response to small
text fades on large inputs: measured on rendered pages, a line of 13-px text alone in a
square reads wherever it lies up to 832 px, in some places only at 896-1024 px, and nowhere
from 1152 px on; 16-px text is lost in places from 960 px, 20-px text from 1536 px. Callers
hand it tiles of :data:`TILE_SIDE` pixels (the spatial ``ocr`` task does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["DISTRIBUTION", "MAX_SIDE", "MODEL_ID", "ONE_PASS_SIDE", "TILE_SIDE", "FoundLine",
           "TextReader"]

DISTRIBUTION = "rapidocr"
MODEL_ID = "rapidocr/PP-OCRv6-small"
MAX_SIDE = 2048
"""The longest side RapidOCR reads without shrinking (its default is 2000)."""
MIN_CONTRAST = 16
"""Grey levels between an image's darkest and lightest pixel below which it holds no text."""
TILE_SIDE = 768
"""A square in which 13-px text reads wherever it lies (with a margin below 832 px)."""
ONE_PASS_SIDE = 1024
"""The shorter side of one downscaled pass over a whole image."""


@dataclass(frozen=True)
class FoundLine:
    text: str
    score: float
    box: tuple[float, float, float, float]
    """``(x0, y0, x1, y1)`` around the line's quadrilateral, in the read image's pixels."""


class TextReader:
    """Reads lines of text. Build one per worker (it loads three ONNX models)."""

    def __init__(self, *, threads: int | None = None) -> None:
        from rapidocr import RapidOCR

        params: dict[str, Any] = {
            "Global.log_level": "error",  # "no text found" is an answer, not a warning
            "Global.max_side_len": MAX_SIDE,
        }
        if threads is not None:
            params["EngineConfig.onnxruntime.intra_op_num_threads"] = threads
        self._engine: Any = RapidOCR(params=params)

    def read(self, image: Image.Image) -> list[FoundLine]:
        import numpy as np

        # A blank tile (a scan's margins) holds no text: skip the detector, most of the cost.
        extrema: Any = image.convert("L").getextrema()  # (low, high) for one band
        if extrema[1] - extrema[0] < MIN_CONTRAST:
            return []
        pixels = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
        # RapidOCR takes numpy arrays as OpenCV does (BGR); reverse the channels.
        output = self._engine(np.ascontiguousarray(pixels[:, :, ::-1]))
        if output.boxes is None or output.txts is None or output.scores is None:
            return []
        lines = []
        for quad, text, score in zip(output.boxes, output.txts, output.scores, strict=True):
            if not text.strip():
                continue
            xs = [float(point[0]) for point in quad]
            ys = [float(point[1]) for point in quad]
            lines.append(FoundLine(text, min(1.0, max(0.0, float(score))),
                                   (min(xs), min(ys), max(xs), max(ys))))
        return lines
