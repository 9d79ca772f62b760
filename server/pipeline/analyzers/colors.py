"""Task ``colors``: an image's dominant colours and brightness, no neural network.

Useful on its own (palettes, thumbnails' backgrounds, exposure checks) and as a task that
answers in milliseconds, which makes it the task protocol tests and benchmarks of the
transport use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server.pipeline.analyzers.base import DecodeHint, OptionsError

_ANALYSIS_SIDE = 64
MAX_COLORS = 16
MODEL_ID = "pixelstream/median-cut-palette"


def _validate(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(options) - {"colors"}
    if unknown:
        raise OptionsError(f"unknown option(s) for task 'colors': {', '.join(sorted(unknown))}")
    count = options.get("colors", 5)
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_COLORS:
        raise OptionsError(f"option 'colors' must be an integer from 1 to {MAX_COLORS}")
    return {"colors": count}


@dataclass(frozen=True)
class ColorsSpec:
    task: str = "colors"

    @property
    def model_id(self) -> str:
        return MODEL_ID

    @property
    def model_revision(self) -> str:
        return ""  # an algorithm, no weights

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return _validate(options)

    def create_analyzer(self) -> ColorsAnalyzer:
        return ColorsAnalyzer()


class ColorsAnalyzer:
    task = "colors"
    model_id = MODEL_ID
    decode_hint = DecodeHint(min_short_side=_ANALYSIS_SIDE)

    def load(self) -> None:
        """Nothing to load."""

    def preprocess(self, image: Any, options: Mapping[str, Any]) -> Any:
        from PIL import Image

        small = image.convert("RGB")
        small.thumbnail((_ANALYSIS_SIDE * 2, _ANALYSIS_SIDE * 2), Image.Resampling.BILINEAR)
        return small

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        return list(batch)

    def encode(self, output: Any, options: Mapping[str, Any]) -> dict[str, Any]:
        from PIL import Image, ImageStat

        count = options.get("colors", 5)
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
