"""Task ``ocr``: lines of text read with RapidOCR (:mod:`server.vision.ocr`).

Spatial: a large image is read in overlapping full-resolution tiles of 768 px, where text of
13 px reads wherever it lies (one pass over a 4000x3000 scan loses text far larger than that).
Merging the tiles' lines:

- a line seen whole by one tile and cut by another tile's edge is kept whole (the larger copy
  of two overlapping lines wins);
- a line longer than the overlap is read in pieces by neighbouring tiles; pieces on the same
  row that overlap are joined, their texts stitched where they repeat each other.

``text`` is the lines in reading order (rows top to bottom, left to right in a row).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.tasks import results
from server.tasks.builtin.engine_task import EngineTask
from server.tasks.contract import DecodeHint, SpatialOptions, Tiling, View
from server.vision import ocr as engine
from server.vision import thread_count

MIN_STITCH = 3
"""Fewest repeated characters that count as the overlap of two pieces of one line."""


def _height(box: Sequence[float]) -> float:
    return float(box[3] - box[1])


def _vertical_overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """How much of the lower of two boxes' heights they share vertically (0..1)."""
    shared = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, shared) / max(1e-6, min(_height(a), _height(b)))


def _same_row(a: Sequence[float], b: Sequence[float]) -> bool:
    return _vertical_overlap(a, b) >= 0.5


def stitch(left: str, right: str, overlap_fraction: float) -> str:
    """Two readings of one line's overlapping pieces → the line: joined at the longest text
    both read (each piece's glyphs beyond it, cut by its tile's edge, are the other's to
    give). ``overlap_fraction``: how much of ``right``'s box lies inside ``left``'s, to fall
    back on where the texts share too little."""
    from difflib import SequenceMatcher

    shared = SequenceMatcher(None, left, right, autojunk=False).find_longest_match()
    if shared.size >= MIN_STITCH:
        return left[:shared.a + shared.size] + right[shared.b + shared.size:]
    skip = round(len(right) * min(1.0, max(0.0, overlap_fraction)))
    rest = right[skip:]
    joiner = " " if left and rest and not left.endswith(" ") and right[skip - 1:skip] == " " \
        else ""
    return left + joiner + rest


def _join(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    left, right = (a, b) if a["box"][0] <= b["box"][0] else (b, a)
    lbox, rbox = left["box"], right["box"]
    shared = max(0.0, lbox[2] - rbox[0])
    fraction = shared / max(1e-6, rbox[2] - rbox[0])
    return {
        "text": stitch(left["text"], right["text"], fraction),
        "score": min(left["score"], right["score"]),
        "box": [min(lbox[0], rbox[0]), min(lbox[1], rbox[1]),
                max(lbox[2], rbox[2]), max(lbox[3], rbox[3])],
    }


def _area(line: dict[str, Any]) -> float:
    x0, y0, x1, y1 = line["box"]
    return float((x1 - x0) * (y1 - y0))


def _horizontal_overlap(a: Sequence[float], b: Sequence[float]) -> float:
    """How much of the narrower of two boxes' widths they share (0..1)."""
    shared = min(a[2], b[2]) - max(a[0], b[0])
    return max(0.0, shared) / max(1e-6, min(a[2] - a[0], b[2] - b[0]))


def _inside(inner: Sequence[float], outer: Sequence[float]) -> bool:
    """Whether ``inner`` lies horizontally within ``outer``, give or take a quarter of a
    line's height (two readings of one line differ by a few pixels of padding, less than a
    glyph's width; a piece that reaches further holds text the other lacks)."""
    slack = 0.25 * min(_height(inner), _height(outer))
    return outer[0] - slack <= inner[0] and inner[2] <= outer[2] + slack


def merge_lines(lines: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Lines from overlapping tiles → each line once (see the module's docstring)."""
    kept: list[dict[str, Any]] = []
    for line in sorted(lines, key=_area, reverse=True):
        for index, other in enumerate(kept):
            if not _same_row(other["box"], line["box"]):
                continue
            if _inside(line["box"], other["box"]):
                break  # the same line, or a copy cut by a tile's edge: the larger stays
            shared = _horizontal_overlap(other["box"], line["box"])
            similar = 0.67 <= _height(line["box"]) / max(1e-6, _height(other["box"])) <= 1.5
            if shared > 0 and similar:
                kept[index] = _join(other, line)
                break
        else:
            kept.append(line)
    return kept


def reading_order(lines: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows top to bottom (a line joins a row whose first line it shares half its height
    with), left to right within a row."""
    rows: list[list[dict[str, Any]]] = []
    for line in sorted(lines, key=lambda line: (line["box"][1], line["box"][0])):
        for row in rows:
            if _same_row(row[0]["box"], line["box"]):
                row.append(line)
                break
        else:
            rows.append([line])
    return [line for row in rows for line in sorted(row, key=lambda line: line["box"][0])]


def _result(lines: Sequence[dict[str, Any]]) -> dict[str, Any]:
    ordered = reading_order(lines)
    return {"text": "\n".join(line["text"] for line in ordered), "lines": ordered}


class Ocr(EngineTask[engine.TextReader]):
    name = "ocr"
    Options = SpatialOptions
    Result = results.Text
    # One pass over a whole image ("tiles": false).
    decode = DecodeHint(min_short_side=engine.ONE_PASS_SIDE)
    # The overlap holds a line of 28-px text whole and a dozen of its characters, which is
    # what stitching a line's pieces from neighbouring tiles needs.
    tiling = Tiling(size=engine.TILE_SIDE, overlap=192)

    model_id = engine.MODEL_ID
    distribution = engine.DISTRIBUTION

    def make_engine(self) -> engine.TextReader:
        return engine.TextReader(threads=thread_count())

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        reader = self.engine()
        return [reader.read(image) for image in batch]

    def encode(self, output: Any, view: View, options: Any) -> dict[str, Any]:
        lines = []
        for line in output:
            box = view.box_to_original(line.box)
            if box is not None:
                lines.append({"text": line.text, "score": round(line.score, 4), "box": box})
        return _result(lines)

    def merge(self, parts: Sequence[dict[str, Any]], original: tuple[int, int],
              options: Any) -> dict[str, Any]:
        return _result(merge_lines([line for part in parts for line in part["lines"]]))
