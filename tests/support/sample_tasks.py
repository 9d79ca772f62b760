"""Tasks a user might write, for the tasks-file and entry-point tests (``kind = "python"``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field

from server.tasks.contract import DecodeHint, ModelInfo, Task, TaskOptions, View


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
