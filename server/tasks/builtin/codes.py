"""Task ``codes``: QR codes and barcodes, read with zxing-cpp (:mod:`server.vision.codes`).

Spatial: a large image is read in overlapping full-resolution tiles, so a small code on a
poster keeps every module it has; a code found by two tiles is reported once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.tasks import results
from server.tasks.builtin.engine_task import EngineTask
from server.tasks.contract import DecodeHint, SpatialOptions, Tiling, View
from server.tasks.spatial import suppress_duplicates
from server.vision import codes as engine


def _area(code: dict[str, Any]) -> float:
    x0, y0, x1, y1 = code["box"]
    return float((x1 - x0) * (y1 - y0))


def _same_code(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return bool(a["format"] == b["format"] and a["text"] == b["text"])


def _reading_order(code: dict[str, Any]) -> tuple[float, float]:
    return code["box"][1], code["box"][0]


class Codes(EngineTask[engine.CodeReader]):
    name = "codes"
    Options = SpatialOptions
    Result = results.Codes
    # One pass over a whole image keeps at least 2048 px on its shorter side: a code's
    # modules need two pixels or more each.
    decode = DecodeHint(min_short_side=2048)
    # Tiles read small codes at full resolution; the overview reads codes too large to lie
    # whole in any tile (a Code 128 wider than the overlap, across a tile's edge).
    tiling = Tiling(size=2048, overlap=512, overview=True)

    model_id = engine.DISTRIBUTION
    distribution = engine.DISTRIBUTION

    def make_engine(self) -> engine.CodeReader:
        return engine.CodeReader()

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        reader = self.engine()
        return [reader.read(image) for image in batch]

    def encode(self, output: Any, view: View, options: Any) -> dict[str, Any]:
        found = []
        for code in output:
            box = view.box_to_original(code.box)
            if box is not None:
                found.append({"format": code.format, "text": code.text, "box": box})
        return {"codes": sorted(found, key=_reading_order)}

    def merge(self, parts: Sequence[dict[str, Any]], original: tuple[int, int],
              options: Any) -> dict[str, Any]:
        found = [code for part in parts for code in part["codes"]]
        kept = suppress_duplicates(found, lambda code: code["box"], _area, same=_same_code)
        return {"codes": sorted(kept, key=_reading_order)}
