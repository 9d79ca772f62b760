"""Geometry shared by spatial tasks: the tile grid (the runtime cuts images with it)."""

from __future__ import annotations

import math

__all__ = ["tile_boxes"]


def _starts(length: int, size: int, overlap: int) -> list[int]:
    if length <= size:
        return [0]
    stride = size - overlap
    count = math.ceil((length - size) / stride) + 1
    # Spread evenly, the last tile flush with the far edge: neighbours overlap by at least
    # ``overlap`` and every tile is full size.
    return [round(index * (length - size) / (count - 1)) for index in range(count)]


def tile_boxes(width: int, height: int, size: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Overlapping ``size``-pixel squares ``(x0, y0, x1, y1)`` covering a ``width`` x
    ``height`` image, row by row; a side no longer than ``size`` is one tile long."""
    return [
        (x, y, min(width, x + size), min(height, y + size))
        for y in _starts(height, size, overlap)
        for x in _starts(width, size, overlap)
    ]
