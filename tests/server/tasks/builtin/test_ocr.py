"""server.tasks.builtin.ocr: the ``ocr`` task answers PROTOCOL.md's shape in ORIGINAL pixels,
reads a large page tile by tile, and merges lines across tile edges."""

from __future__ import annotations

from typing import Any

import pytest
from PIL import Image

from server.tasks.builtin.ocr import Ocr, merge_lines, reading_order, stitch
from server.tasks.results import Text
from tests.support.vision_inputs import encloses, page, run_task, write

LINES = ["Invoice number 48213", "Part PX-7731 rev B", "Shipped to Lisbon, Portugal"]


@pytest.fixture(scope="module")
def ocr() -> Ocr:
    task = Ocr()
    task.setup("cpu")
    return task


def test_a_small_page(ocr: Ocr) -> None:
    image, written = page(LINES)
    result = run_task(ocr, image)
    Text.model_validate(result)
    assert result["text"] == "\n".join(LINES)
    for line, drawn in zip(result["lines"], written, strict=True):
        assert encloses(line["box"], drawn.box, margin=16)


def test_boxes_of_a_downscaled_decode_are_in_original_pixels(ocr: Ocr) -> None:
    """Decoded at half size (a 2000x1400 page read at 1000x700): boxes come back doubled."""
    image, written = page(LINES, size=(2000, 1400), text_px=56, at=(120, 160), spacing=180)
    result = run_task(ocr, image, {"tiles": False}, decode_scale=0.5)
    assert result["text"] == "\n".join(LINES)
    for line, drawn in zip(result["lines"], written, strict=True):
        assert encloses(line["box"], drawn.box, margin=16), (line, drawn)


def test_a_large_page_is_read_in_tiles_with_lines_across_their_edges(ocr: Ocr) -> None:
    """2600x1800 in 768-px tiles (5x3): one line crosses a vertical tile edge, one lies in
    the band two tiles share, one is in a single tile; each is read once, whole."""
    image = Image.new("RGB", (2600, 1800), "white")
    across = write(image, "Lot 7731 shipped on Monday", (700, 300), 28)
    shared = write(image, "Gate B12", (840, 1000), 28)
    alone = write(image, "Net weight 12 kg", (1800, 1500), 28)
    result = run_task(ocr, image)
    Text.model_validate(result)
    assert [line["text"] for line in result["lines"]] == [across.text, shared.text, alone.text]
    for line, drawn in zip(result["lines"], [across, shared, alone], strict=True):
        assert encloses(line["box"], drawn.box, margin=16), (line, drawn)


def test_tiles_false_reads_a_large_page_in_one_pass(ocr: Ocr) -> None:
    image, _ = page(["LARGE PRINT"], size=(2600, 1800), text_px=120, at=(300, 600))
    assert run_task(ocr, image, {"tiles": False}, decode_scale=0.5)["text"] == "LARGE PRINT"


def line(text: str, box: list[float], score: float = 0.9) -> dict[str, Any]:
    return {"text": text, "score": score, "box": box}


def test_pieces_of_one_line_are_stitched_where_their_texts_repeat() -> None:
    left = line("Lot 7731 shipped on Mon", [700, 300, 1024, 330])
    right = line("ped on Monday", [840, 301, 1100, 331])
    merged = merge_lines([left, right])
    assert merged == [line("Lot 7731 shipped on Monday", [700, 300, 1100, 331])]


def test_a_line_cut_by_an_edge_loses_to_its_whole_copy() -> None:
    whole = line("Gate B12", [840, 1000, 960, 1030], 0.95)
    cut = line("Gate B", [840, 1000, 930, 1024], 0.99)  # the tile ended at x 930, y 1024
    assert merge_lines([cut, whole]) == [whole]


def test_lines_on_other_rows_are_left_alone() -> None:
    first = line("one", [0, 0, 100, 30])
    second = line("two", [50, 40, 150, 70])
    assert merge_lines([first, second]) == [first, second]


def test_a_glyph_cut_by_the_edge_is_taken_from_the_other_piece() -> None:
    """Read from a 4000x3000 scan: the left tile cut the "d" of "dock" and read it "o"; the
    right tile read the rest whole. Joined where both read the same, not after the "o"."""
    assert stitch("paint rotor lot flange o", "nt rotor lot flange dock 4403", 0.644) \
        == "paint rotor lot flange dock 4403"


def test_stitch_without_a_repeat_cuts_by_the_overlap() -> None:
    # The glyph at the edge was read differently: cut the right piece by its overlap.
    assert stitch("Lot 7731 shi", "hlpped on", 0.25) == "Lot 7731 shipped on"[:12] + "pped on"
    assert stitch("abc", "", 0.5) == "abc"


def test_reading_order_is_rows_then_left_to_right() -> None:
    lines = [line("right", [500, 102, 600, 128]), line("below", [0, 200, 100, 230]),
             line("left", [0, 100, 100, 130])]
    assert [item["text"] for item in reading_order(lines)] == ["left", "right", "below"]


def test_pieces_that_overlap_almost_wholly_are_still_joined() -> None:
    """A 28-px line a little longer than the tiles' overlap: each tile reads all but its last
    (or first) glyphs, and the pieces share 93% of the narrower one's width. Dropping one of
    them as a duplicate lost the line's last glyph ("Invoice 88213 due Marc")."""
    left = line("Invoice 88213 due Marc", [695, 298, 1023, 337])
    right = line("ice 88213 due March 4", [744, 299, 1050, 336])
    merged = merge_lines([left, right])
    assert merged == [line("Invoice 88213 due March 4", [695, 298, 1050, 337])]


def test_two_whole_readings_of_one_line_are_one_line() -> None:
    """Both tiles saw the line whole; their boxes differ by the reader's padding."""
    first = line("Gate B12", [840, 1000, 960, 1030], 0.95)
    second = line("Gate B12", [838, 999, 963, 1031], 0.97)
    assert [item["text"] for item in merge_lines([first, second])] == ["Gate B12"]
