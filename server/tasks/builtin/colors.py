"""Task ``colors``: an image's dominant colours and brightness, no neural network.

Useful on its own (palettes, thumbnails' backgrounds, exposure checks) and as a task that
answers in milliseconds, which makes it the task protocol tests and benchmarks of the
transport use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field

from server.tasks import results
from server.tasks.contract import DecodeHint, ModelInfo, Task, TaskOptions, View

ANALYSIS_SIDE = 64
MAX_COLORS = 16
MODEL_ID = "pixelstream/median-cut-palette"


class ColorsOptions(TaskOptions):
    colors: int = Field(default=5, ge=1, le=MAX_COLORS, description="How many colours to return.")


class Colors(Task):
    name = "colors"
    kind = "builtin"
    Options = ColorsOptions
    Result = results.Palette
    decode = DecodeHint(min_short_side=ANALYSIS_SIDE)

    @property
    def model(self) -> ModelInfo:
        return ModelInfo(id=MODEL_ID)  # an algorithm, no weights: no revision

    def preprocess(self, view: View, options: Any) -> Any:
        from PIL import Image

        small = view.image.convert("RGB")
        small.thumbnail((ANALYSIS_SIDE * 2, ANALYSIS_SIDE * 2), Image.Resampling.BILINEAR)
        return small

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        return list(batch)

    def encode(self, output: Any, view: View, options: Any) -> dict[str, Any]:
        from PIL import Image, ImageStat

        count = options.colors
        quantized = output.quantize(colors=count, method=Image.Quantize.MEDIANCUT)
        palette = quantized.getpalette() or []
        pixels = output.width * output.height
        found = sorted(quantized.getcolors(MAX_COLORS) or [], reverse=True)
        colors = [
            {
                "hex": "#{:02x}{:02x}{:02x}".format(*palette[3 * index : 3 * index + 3]),
                "fraction": round(n / pixels, 4),
            }
            for n, index in found
        ]
        brightness = ImageStat.Stat(output.convert("L")).mean[0] / 255
        return {"colors": colors, "brightness": round(brightness, 4)}
