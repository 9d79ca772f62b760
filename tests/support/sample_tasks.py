"""Tasks a user might write, for the tasks-file and entry-point tests (``kind = "python"``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field

from server.tasks.contract import (
    DecodeHint,
    ModelInfo,
    SpatialOptions,
    Task,
    TaskOptions,
    Tiling,
    View,
)


class MeanOptions(TaskOptions):
    digits: int = Field(default=2, ge=0, le=6, description="Decimals to round to.")


class MeanBrightness(Task):
    """The image's mean grey level, 0..1 (times ``gain``, a constructor argument)."""

    name = "mean"
    Options = MeanOptions
    decode = DecodeHint(min_short_side=32)

    def __init__(self, gain: float = 1.0) -> None:
        self.gain = gain
        self.device: str | None = None

    @property
    def model(self) -> ModelInfo:
        return ModelInfo(id="tests/mean-brightness", revision=f"gain-{self.gain}")

    def setup(self, device: str) -> None:
        self.device = device

    def preprocess(self, view: View, options: Any) -> Any:
        return view.image.convert("L")

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        import numpy as np

        return [float(np.asarray(image).mean()) / 255 * self.gain for image in batch]

    def encode(self, output: Any, view: View, options: Any) -> dict[str, Any]:
        return {"mean": round(output, options.digits), "device": self.device}


class NoPredict:
    """Looks like a task, but cannot predict."""

    name = "nopredict"
    Options = MeanOptions

    def setup(self, device: str) -> None: ...
    def preprocess(self, view: Any, options: Any) -> Any: ...
    def encode(self, output: Any, view: Any, options: Any) -> dict[str, Any]:
        return {}


class FailsSetup(MeanBrightness):
    def setup(self, device: str) -> None:
        raise OSError("weights.bin is truncated")


def find_spots(grey: Any) -> list[list[int]]:
    """Boxes ``[x0, y0, x1, y1]`` (x1/y1 exclusive) of the 4-connected bright regions."""
    import numpy as np

    bright = np.asarray(grey) > 127
    seen = np.zeros_like(bright)
    height, width = bright.shape
    boxes: list[list[int]] = []
    for y, x in zip(*np.nonzero(bright), strict=True):
        if seen[y, x]:
            continue
        seen[y, x] = True
        stack, box = [(int(y), int(x))], [int(x), int(y), int(x) + 1, int(y) + 1]
        while stack:
            cy, cx = stack.pop()
            box = [min(box[0], cx), min(box[1], cy), max(box[2], cx + 1), max(box[3], cy + 1)]
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < height and 0 <= nx < width and bright[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        boxes.append(box)
    return boxes


def _inside(inner: list[float], outer: list[float]) -> float:
    """The share of ``inner``'s area that lies in ``outer``."""
    width = min(inner[2], outer[2]) - max(inner[0], outer[0])
    height = min(inner[3], outer[3]) - max(inner[1], outer[1])
    area = (inner[2] - inner[0]) * (inner[3] - inner[1])
    return max(0.0, width) * max(0.0, height) / area if area > 0 else 0.0


class Spots(Task):
    """A spatial task: bright spots on a dark image, as boxes in original pixels. Each result
    also says which regions ran in the same ``predict`` call, and at what size the task saw
    its pixels, so tests can check batching and resolution."""

    name = "spots"
    Options = SpatialOptions
    decode = DecodeHint(min_short_side=32)
    tiling = Tiling(size=64, overlap=16)

    @property
    def model(self) -> ModelInfo:
        return ModelInfo(id="tests/spots")

    def preprocess(self, view: View, options: Any) -> Any:
        return view.image.convert("L"), view.region

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        regions = [list(region) for _, region in batch]
        return [{"boxes": find_spots(grey), "batch": regions} for grey, _ in batch]

    def encode(self, output: Any, view: View, options: Any) -> dict[str, Any]:
        boxes = [view.box_to_original(box) for box in output["boxes"]]
        return {"spots": [box for box in boxes if box is not None],
                "batch": output["batch"], "seen": list(view.image.size)}

    def merge(self, parts: Sequence[dict[str, Any]], original: tuple[int, int],
              options: Any) -> dict[str, Any]:
        # Largest first; a box mostly inside one kept already is the same spot, cut by a tile
        # edge or seen whole by two overlapping tiles.
        boxes = sorted((box for part in parts for box in part["spots"]),
                       key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)
        kept: list[list[float]] = []
        for box in boxes:
            if all(_inside(box, other) < 0.5 for other in kept):
                kept.append(box)
        return {"spots": sorted(kept), "tiles": len(parts),
                "batches": [part["batch"] for part in parts]}


class SpotOptions(SpatialOptions):
    threshold: float = Field(default=0.5, ge=0, le=1, description="Brightness a spot must reach.")
    max_objects: int = Field(default=100, ge=1, le=1000, description="Keep at most this many.")


class BrightSpots(Task):
    """A detector without a model: each connected bright region is an object, answered in the
    ``detect`` shape (``{"objects": [{"label", "score", "box"}]}``, boxes in original pixels),
    so pages and clients can be tested on images whose true boxes the test drew itself."""

    name = "detect"
    Options = SpotOptions
    tiling = Tiling(size=512, overlap=224)  # spots up to 224 px lie whole in a tile

    @property
    def model(self) -> ModelInfo:
        return ModelInfo(id="tests/bright-spots")

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        import numpy as np

        return [np.asarray(image.convert("L"), dtype=np.float32) / 255 for image in batch]

    def encode(self, output: Any, view: View, options: Any) -> dict[str, Any]:
        from skimage.measure import label, regionprops

        objects = []
        for region in regionprops(label(output >= options.threshold), intensity_image=output):
            y0, x0, y1, x1 = region.bbox
            box = view.box_to_original([x0, y0, x1, y1])
            if box is not None:
                score = round(float(region.intensity_mean), 3)
                objects.append({"label": "spot", "score": score, "box": box})
        objects.sort(key=lambda o: (-o["score"], o["box"]))
        return {"objects": objects[: options.max_objects]}

    def merge(self, parts: Sequence[dict[str, Any]], original: tuple[int, int],
              options: Any) -> dict[str, Any]:
        from server.tasks.spatial import area, suppress_duplicates

        # Largest first: a spot a tile's edge cut off lies inside the whole one a neighbour saw.
        found = [o for part in parts for o in part["objects"]]
        kept = suppress_duplicates(found, box=lambda o: o["box"], rank=lambda o: area(o["box"]))
        kept.sort(key=lambda o: (-o["score"], o["box"]))
        return {"objects": kept[: options.max_objects]}
