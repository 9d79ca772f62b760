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


class SpotOptions(SpatialOptions):
    threshold: float = Field(default=0.5, ge=0, le=1, description="Brightness a spot must reach.")
    max_objects: int = Field(default=100, ge=1, le=1000, description="Keep at most this many.")


class BrightSpots(Task):
    """A detector without a model: each connected bright region is an object, answered in the
    ``detect`` shape (``{"objects": [{"label", "score", "box"}]}``, boxes in original pixels),
    so pages and clients can be tested on images whose true boxes the test drew itself."""

    name = "detect"
    Options = SpotOptions
    tiling = Tiling(size=512, overlap=64)

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
        # A spot inside two tiles' overlap is found twice, with the same box.
        unique = {tuple(o["box"]): o for part in parts for o in part["objects"]}
        objects = list(unique.values())
        objects.sort(key=lambda o: (-o["score"], o["box"]))
        return {"objects": objects[: options.max_objects]}
