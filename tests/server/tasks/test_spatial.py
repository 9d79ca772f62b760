"""server.tasks.spatial: the tile grid covers every pixel with the promised overlap; duplicates
found by two overlapping tiles are removed, distinct objects kept."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.tasks.spatial import (
    containment,
    fit_tiling,
    iou,
    suppress_duplicates,
    tile_boxes,
    tile_starts,
)


def test_a_small_image_is_one_tile() -> None:
    assert tile_boxes(800, 600, 1024, 128) == [(0, 0, 800, 600)]
    assert tile_boxes(1024, 1024, 1024, 128) == [(0, 0, 1024, 1024)]


def test_a_4000x3000_scan_in_1536_tiles() -> None:
    boxes = tile_boxes(4000, 3000, 1536, 192)
    # 3 columns (stride >= 1344 would need 2.83) and 3 rows, row by row, ending at the edges.
    assert len(boxes) == 9
    assert boxes[0] == (0, 0, 1536, 1536)
    assert boxes[2] == (2464, 0, 4000, 1536)
    assert boxes[-1] == (2464, 1464, 4000, 3000)
    assert all(x1 - x0 == 1536 and y1 - y0 == 1536 for x0, y0, x1, y1 in boxes)


def test_a_long_strip_is_tiled_along_one_side_only() -> None:
    boxes = tile_boxes(5000, 300, 1024, 100)
    assert {(y0, y1) for _, y0, _, y1 in boxes} == {(0, 300)}
    assert boxes[-1][2] == 5000


@given(length=st.integers(1, 20000), size=st.integers(16, 4096), data=st.data())
def test_tiles_cover_the_side_with_the_promised_overlap(length: int, size: int,
                                                        data: st.DataObject) -> None:
    overlap = data.draw(st.integers(0, size // 2 - 1))
    starts = tile_starts(length, size, overlap)
    assert starts[0] == 0
    assert min(starts[-1] + size, length) == length  # the last tile reaches the edge
    assert starts == sorted(set(starts))
    for before, after in itertools.pairwise(starts):
        assert before + size - after >= overlap  # neighbours overlap at least this much
    # No more tiles than needed: dropping one would leave a gap or too little overlap.
    if len(starts) > 1:
        stride = size - overlap
        assert (len(starts) - 2) * stride + size < length


def test_a_grid_within_the_budget_is_the_tasks_own() -> None:
    assert fit_tiling(12000, 9000, 768, 192, 512) == (768, 192)  # 336 tiles
    assert fit_tiling(512, 512, 64, 16, 512) == (64, 16)


def test_a_small_input_on_a_huge_image_gets_fewer_larger_tiles() -> None:
    """A 64-px detector on 12000x9000 would need 45,000 tiles; at most 512 it gets."""
    assert len(tile_boxes(12000, 9000, 64, 16)) > 40_000
    size, overlap = fit_tiling(12000, 9000, 64, 16, 512)
    assert len(tile_boxes(12000, 9000, size, overlap)) <= 512
    assert overlap == 16 * size // 64
    # The smallest such tiles: one pixel less and the grid is over the budget.
    assert len(tile_boxes(12000, 9000, size - 1, 16 * (size - 1) // 64)) > 512


@given(width=st.integers(1, 20000), height=st.integers(1, 20000), size=st.integers(16, 2048),
       budget=st.integers(1, 2000), data=st.data())
def test_a_fitted_grid_keeps_within_its_budget(width: int, height: int, size: int, budget: int,
                                               data: st.DataObject) -> None:
    overlap = data.draw(st.integers(0, size // 2 - 1))
    fitted, shared = fit_tiling(width, height, size, overlap, budget)
    assert fitted >= size
    assert 0 <= shared < fitted // 2
    assert len(tile_boxes(width, height, fitted, shared)) <= budget


def test_bad_grids_are_refused() -> None:
    with pytest.raises(ValueError, match="positive width"):
        tile_boxes(0, 10, 16, 4)
    with pytest.raises(ValueError, match="overlap smaller"):
        tile_starts(100, 16, 16)


def test_iou_and_containment() -> None:
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges share nothing
    assert iou([0, 0, 0, 10], [0, 0, 0, 10]) == 0.0  # empty boxes
    # Half an object (cut by a tile's edge) against the whole one.
    assert iou([0, 0, 50, 100], [0, 0, 100, 100]) == 0.5
    assert containment([0, 0, 50, 100], [0, 0, 100, 100]) == 1.0
    assert containment([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0


def face(box: list[float], score: float) -> dict[str, Any]:
    return {"box": box, "score": score}


def by_size_then_score(item: dict[str, Any]) -> tuple[float, float]:
    x0, y0, x1, y1 = item["box"]
    return (x1 - x0) * (y1 - y0), item["score"]


def test_an_object_cut_by_a_tile_edge_keeps_the_whole_copy() -> None:
    """Tile A (x < 1024) sees the left 40% of a face at x 1000..1060; tile B (x >= 896) sees it
    whole. The cut copy scores higher but is dropped: the whole one is larger."""
    cut = face([1000, 200, 1024, 260], 0.97)
    whole = face([1000, 200, 1060, 260], 0.91)
    other = face([1500, 200, 1560, 260], 0.8)
    assert iou(cut["box"], whole["box"]) < 0.5  # plain NMS would keep both
    kept = suppress_duplicates([cut, whole, other], lambda f: f["box"], by_size_then_score)
    assert kept == [whole, other]


def test_the_same_object_seen_whole_by_two_tiles_is_kept_once() -> None:
    first = face([1000, 200, 1060, 260], 0.91)
    second = face([1000.4, 200.2, 1060.1, 259.8], 0.93)
    kept = suppress_duplicates([first, second], lambda f: f["box"], lambda f: f["score"])
    assert kept == [second]


def test_neighbouring_distinct_objects_are_kept() -> None:
    left = face([0, 0, 60, 60], 0.9)
    right = face([50, 0, 110, 60], 0.9)  # overlapping a little: two faces side by side
    kept = suppress_duplicates([left, right], lambda f: f["box"], lambda f: f["score"])
    assert kept == [left, right]


def test_same_limits_suppression_to_matching_items() -> None:
    """Two codes at one place but different texts (a QR inside a poster's barcode area) stay."""
    qr = {"text": "a", "box": [0, 0, 100, 100]}
    again = {"text": "a", "box": [0, 0, 100, 100]}
    other = {"text": "b", "box": [10, 10, 90, 90]}
    kept = suppress_duplicates([qr, again, other], lambda c: c["box"], lambda c: 0,
                               same=lambda a, b: a["text"] == b["text"])
    assert kept == [qr, other]


def test_containment_can_be_switched_off() -> None:
    """Nested objects of one kind (a detector's 'person' within a crowd's box) need IoU only."""
    crowd = face([0, 0, 200, 200], 0.9)
    person = face([10, 10, 60, 60], 0.8)
    assert suppress_duplicates([crowd, person], lambda f: f["box"], lambda f: f["score"]) \
        == [crowd]
    assert suppress_duplicates([crowd, person], lambda f: f["box"], lambda f: f["score"],
                               containment_threshold=None) == [crowd, person]


def all_pairs_suppression(items: list[dict[str, Any]], iou_threshold: float,
                          containment_threshold: float | None) -> list[dict[str, Any]]:
    """The definition: every candidate against every kept item, best score first."""
    order = sorted(range(len(items)), key=lambda index: items[index]["score"], reverse=True)
    kept: list[int] = []
    for index in order:
        mine = items[index]["box"]
        if not any(iou(items[k]["box"], mine) >= iou_threshold
                   or (containment_threshold is not None
                       and containment(items[k]["box"], mine) >= containment_threshold)
                   for k in kept):
            kept.append(index)
    return [items[index] for index in sorted(kept)]


boxes_strategy = st.lists(
    st.tuples(st.floats(0, 500), st.floats(0, 500), st.floats(0.5, 120), st.floats(0.5, 120),
              st.floats(0, 1)),
    max_size=60)


@given(boxes=boxes_strategy, iou_threshold=st.sampled_from([0.0, 0.3, 0.5]),
       containment_threshold=st.sampled_from([None, 0.0, 0.7]))
def test_suppression_keeps_what_comparing_all_pairs_keeps(
        boxes: list[tuple[float, float, float, float, float]], iou_threshold: float,
        containment_threshold: float | None) -> None:
    items = [face([x, y, x + w, y + h], score) for x, y, w, h, score in boxes]
    kept = suppress_duplicates(items, lambda f: f["box"], lambda f: f["score"],
                               iou_threshold=iou_threshold,
                               containment_threshold=containment_threshold)
    assert kept == all_pairs_suppression(items, iou_threshold, containment_threshold)


def test_suppression_compares_only_items_near_each_other() -> None:
    """5,000 distinct objects of a 512-tile detection (50 px each, on a 100-px lattice): each
    is compared with its neighbours only, not with the thousands kept before it."""
    items = [face([x * 100.0, y * 100.0, x * 100.0 + 50, y * 100.0 + 50], 0.5)
             for x in range(100) for y in range(50)]
    compared = 0

    def same(kept: dict[str, Any], candidate: dict[str, Any]) -> bool:
        nonlocal compared
        compared += 1
        return True

    assert len(suppress_duplicates(items, lambda f: f["box"], lambda f: f["score"],
                                   same=same)) == 5000
    assert compared < 4 * len(items)
