"""server.tasks.builtin.codes: the ``codes`` task answers PROTOCOL.md's shape in ORIGINAL
pixels and reports a code that two tiles both read once."""

from __future__ import annotations

import pytest
from PIL import Image

from server.tasks.builtin.codes import Codes
from server.tasks.results import Codes as CodesResult
from tests.support.vision_inputs import barcode, overlap, run_task


@pytest.fixture(scope="module")
def codes() -> Codes:
    task = Codes()
    task.setup("cpu")
    return task


def test_a_poster_with_three_kinds_of_code(codes: Codes) -> None:
    poster = Image.new("RGB", (1500, 900), (240, 236, 228))
    placed = {"QR_CODE": (barcode("QRCode", "https://example.org/p/42"), (80, 80)),
              "EAN_13": (barcode("EAN13", "4006381333931"), (700, 100)),
              "CODE_128": (barcode("Code128", "PX-7731-B"), (600, 550))}
    for symbol, at in placed.values():
        poster.paste(symbol, at)
    result = run_task(codes, poster)
    CodesResult.model_validate(result)
    assert [(code["format"], code["text"]) for code in result["codes"]] == [
        ("QR_CODE", "https://example.org/p/42"), ("EAN_13", "4006381333931"),
        ("CODE_128", "PX-7731-B")]
    for code in result["codes"]:
        symbol, (x, y) = placed[code["format"]]
        assert overlap(code["box"], (x, y, x + symbol.width, y + symbol.height)) > 0.5


def test_boxes_of_a_downscaled_decode_are_in_original_pixels(codes: Codes) -> None:
    symbol = barcode("QRCode", "scaled", scale=12)
    image = Image.new("RGB", (1600, 1200), "white")
    image.paste(symbol, (500, 300))
    result = run_task(codes, image, {"tiles": False}, decode_scale=0.5)
    [code] = result["codes"]
    assert code["text"] == "scaled"
    quiet = 4 * 12  # the drawn QR code's quiet zone: 4 modules of 12 px
    symbol_box = (500 + quiet, 300 + quiet, 500 + symbol.width - quiet,
                  300 + symbol.height - quiet)
    assert overlap(code["box"], symbol_box) > 0.9


def test_a_code_in_the_band_two_tiles_share_is_reported_once(codes: Codes) -> None:
    """3000x2200 in 2048-px tiles: columns at 0 and 952 share x 952..2048; the QR code lies
    there whole, so both tiles read it, and the merge keeps one."""
    image = Image.new("RGB", (3000, 2200), "white")
    symbol = barcode("QRCode", "shared")
    image.paste(symbol, (1300, 400))
    image.paste(barcode("Code128", "ONLY-RIGHT"), (2300, 1800))  # x >= 2048: one column
    result = run_task(codes, image)
    assert [code["text"] for code in result["codes"]] == ["shared", "ONLY-RIGHT"]
    assert overlap(result["codes"][0]["box"],
                   (1300, 400, 1300 + symbol.width, 400 + symbol.height)) > 0.5


def test_two_equal_codes_in_different_places_are_both_reported(codes: Codes) -> None:
    image = Image.new("RGB", (1200, 500), "white")
    image.paste(barcode("QRCode", "same"), (50, 50))
    image.paste(barcode("QRCode", "same"), (700, 50))
    assert [code["text"] for code in run_task(codes, image)["codes"]] == ["same", "same"]


def test_a_code_wider_than_the_overlap_across_both_tiles_is_read_by_the_overview(
        codes: Codes) -> None:
    """3000x1200 in 2048-px tiles at x 0 and 952: a Code 128 from x 700 to 2680 lies whole in
    neither tile; the overview (the whole poster) reads it, and the QR code the tiles read
    too is reported once."""
    poster = Image.new("RGB", (3000, 1200), (240, 240, 235))
    long_code = barcode("Code128", "LONG-CODE-128-ACROSS-BOTH-TILE-EDGES-0042")
    assert long_code.width > 1500
    poster.paste(long_code, (700, 400))
    poster.paste(barcode("QRCode", "qr-in-band", scale=8), (1800, 700))
    result = run_task(codes, poster)
    assert sorted((code["format"], code["text"]) for code in result["codes"]) == [
        ("CODE_128", "LONG-CODE-128-ACROSS-BOTH-TILE-EDGES-0042"), ("QR_CODE", "qr-in-band")]
