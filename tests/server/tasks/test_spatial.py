"""The tile grid: full-size tiles covering the image, overlapping by at least the overlap."""

from __future__ import annotations

import itertools

import pytest

from server.tasks.spatial import tile_boxes


@pytest.mark.parametrize(("width", "height"), [(300, 200), (1024, 1024), (1025, 64), (4000, 3000)])
def test_tiles_cover_the_image_full_size_and_overlap_enough(width: int, height: int) -> None:
    size, overlap = 64 if width < 1000 else 1024, 16 if width < 1000 else 128
    boxes = tile_boxes(width, height, size, overlap)
    covered = set()
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= width
        assert 0 <= y0 < y1 <= height
        assert x1 - x0 == min(size, width)
        assert y1 - y0 == min(size, height)
        covered.add((x0, y0))
    xs = sorted({b[0] for b in boxes})
    ys = sorted({b[1] for b in boxes})
    assert xs[0] == 0
    assert ys[0] == 0
    assert max(b[2] for b in boxes) == width
    assert max(b[3] for b in boxes) == height
    for starts, length in ((xs, width), (ys, height)):
        for a, b in itertools.pairwise(starts):
            assert min(a + size, length) - b >= overlap  # neighbours overlap enough
    assert len(covered) == len(boxes) == len(xs) * len(ys)


def test_an_image_no_larger_than_a_tile_is_one_tile() -> None:
    assert tile_boxes(64, 30, 64, 16) == [(0, 0, 64, 30)]
