"""Helpers shared by spatial tasks: the tile grid and merging the tiles' results.

The runtime cuts a large image with :func:`tile_boxes`; each tile's result comes back in
ORIGINAL pixels, and a task's ``merge`` removes what two overlapping tiles both found with
:func:`suppress_duplicates`. Pure functions over plain boxes ``[x0, y0, x1, y1]``: no numpy,
cheap to import in the gateway.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

__all__ = [
    "area",
    "containment",
    "fit_tiling",
    "intersection",
    "iou",
    "suppress_duplicates",
    "tile_boxes",
    "tile_starts",
]

Item = TypeVar("Item")


def tile_starts(length: int, size: int, overlap: int) -> list[int]:
    """Where tiles of ``size`` start along one side of ``length`` pixels so that neighbours
    overlap by at least ``overlap`` and the last tile ends exactly at the edge (tiles never
    stick out, so every tile is a full-size crop when the side is at least ``size`` long)."""
    if size <= 0 or not 0 <= overlap < size:
        raise ValueError("a tile needs a positive size and an overlap smaller than it")
    if length <= size:
        return [0]
    stride = size - overlap
    count = -(-(length - overlap) // stride)  # ceil: enough tiles to cover the side
    # Spread the tiles evenly: the overlaps come out equal (within a pixel) and >= overlap.
    span = length - size
    return [round(index * span / (count - 1)) for index in range(count)]


def tile_boxes(width: int, height: int, size: int, overlap: int
               ) -> list[tuple[int, int, int, int]]:
    """The grid of overlapping tiles covering a ``width`` x ``height`` image, row by row, as
    ``(x0, y0, x1, y1)`` boxes. Each tile is ``size`` square (smaller only where the image is),
    neighbours overlap by at least ``overlap`` pixels, and the tiles cover every pixel."""
    if width <= 0 or height <= 0:
        raise ValueError("an image has a positive width and height")
    xs = tile_starts(width, size, overlap)
    ys = tile_starts(height, size, overlap)
    return [(x, y, min(x + size, width), min(y + size, height)) for y in ys for x in xs]


def fit_tiling(width: int, height: int, size: int, overlap: int, max_tiles: int
               ) -> tuple[int, int]:
    """``(size, overlap)`` for a ``width`` x ``height`` image: the task's own, or, where its
    grid would hold more than ``max_tiles`` tiles, the smallest larger tiles (the overlap
    grown in proportion) whose grid holds no more."""

    def count(side: int, shared: int) -> int:
        return len(tile_starts(width, side, shared)) * len(tile_starts(height, side, shared))

    if count(size, overlap) <= max_tiles:
        return size, overlap
    low, high = size, max(width, height, size)  # one tile of the whole image always fits
    while low + 1 < high:  # the count falls as tiles grow: the smallest side that fits
        middle = (low + high) // 2
        if count(middle, overlap * middle // size) <= max_tiles:
            high = middle
        else:
            low = middle
    return high, overlap * high // size


def area(box: Sequence[float]) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def intersection(a: Sequence[float], b: Sequence[float]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return width * height if width > 0 and height > 0 else 0.0


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (0 when either is empty)."""
    shared = intersection(a, b)
    if shared == 0.0:
        return 0.0
    return shared / (area(a) + area(b) - shared)


def containment(a: Sequence[float], b: Sequence[float]) -> float:
    """How much of the smaller box lies inside the other (intersection over the smaller area):
    1.0 for an object cut by a tile's edge against the whole object seen by its neighbour,
    where IoU may be as low as the cut fraction."""
    shared = intersection(a, b)
    if shared == 0.0:
        return 0.0
    return shared / min(area(a), area(b))


def suppress_duplicates(
    items: Sequence[Item],
    box: Callable[[Item], Sequence[float]],
    rank: Callable[[Item], Any],
    *,
    iou_threshold: float = 0.5,
    containment_threshold: float | None = 0.8,
    same: Callable[[Item, Item], bool] | None = None,
) -> list[Item]:
    """Non-maximum suppression across tiles: keep items best ``rank`` first, dropping each item
    that overlaps a kept one by IoU >= ``iou_threshold`` or (when set) has >= ``containment``
    of the smaller box inside the other, and for which ``same(kept, item)`` holds (e.g. the
    same label; None: any two). Rank by size first to prefer the whole object over the part of
    it a tile's edge cut off. Returns the kept items in their original order.

    Each item is compared only with the kept items near it (a grid of cells about a box's
    size): hundreds of tiles of a detector give tens of thousands of boxes, which all-pairs
    comparison took minutes over."""
    boxes = [box(item) for item in items]
    order = sorted(range(len(items)), key=lambda index: rank(items[index]), reverse=True)
    # Boxes that do not overlap are never duplicates, unless a threshold of 0 says so.
    nearby_only = iou_threshold > 0 and (containment_threshold is None
                                         or containment_threshold > 0)
    cell = _cell_size(boxes)
    grid: dict[tuple[int, int], list[int]] = {}
    kept: list[int] = []
    for index in order:
        candidate = items[index]
        candidate_box = boxes[index]
        cells = _cells(candidate_box, cell) if nearby_only else [(0, 0)]
        compared: set[int] = set()
        duplicate = False
        for key in cells:
            for kept_index in grid.get(key, ()):
                if kept_index in compared:
                    continue
                compared.add(kept_index)
                other = items[kept_index]
                if same is not None and not same(other, candidate):
                    continue
                other_box = boxes[kept_index]
                if iou(other_box, candidate_box) >= iou_threshold or (
                    containment_threshold is not None
                    and containment(other_box, candidate_box) >= containment_threshold
                ):
                    duplicate = True
                    break
            if duplicate:
                break
        if not duplicate:
            kept.append(index)
            for key in cells:
                grid.setdefault(key, []).append(index)
    return [items[index] for index in sorted(kept)]


def _cell_size(boxes: Sequence[Sequence[float]]) -> float:
    """The median box's longer side: most boxes then span at most four cells."""
    if not boxes:
        return 1.0
    sides = sorted(max(b[2] - b[0], b[3] - b[1]) for b in boxes)
    return max(1.0, float(sides[len(sides) // 2]))


def _cells(box: Sequence[float], cell: float) -> list[tuple[int, int]]:
    """The grid cells a box touches: two boxes that overlap share at least one."""
    x0, x1 = math.floor(box[0] / cell), math.floor(box[2] / cell)
    y0, y1 = math.floor(box[1] / cell), math.floor(box[3] / cell)
    return [(x, y) for x in range(x0, x1 + 1) for y in range(y0, y1 + 1)]
