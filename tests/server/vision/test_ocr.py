"""server.vision.ocr: rendered lines of text are read back word for word, boxed where they
were drawn; small text in a tile-sized image still reads."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

from server.vision.ocr import TILE_SIDE, TextReader
from tests.support.vision_inputs import encloses, font, page

LINES = ["Invoice number 48213", "Part PX-7731 rev B", "Shipped to Lisbon, Portugal"]


@pytest.fixture(scope="module")
def reader() -> TextReader:
    return TextReader(threads=1)


def test_lines_are_read_with_their_boxes(reader: TextReader) -> None:
    image, written = page(LINES)
    found = reader.read(image)
    assert [line.text for line in found] == LINES
    for line, drawn in zip(found, written, strict=True):
        assert 0.8 <= line.score <= 1.0
        assert encloses(line.box, drawn.box, margin=16), (line, drawn)


def test_13_px_text_reads_in_a_tile_but_not_in_a_larger_image(reader: TextReader) -> None:
    """Why the ``ocr`` task reads large images in tiles of TILE_SIDE."""
    lines = ["Serial 0042-7781-AC", "Torque 12 Nm max"]
    tile, _ = page(lines, size=(TILE_SIDE, TILE_SIDE), text_px=13, at=(460, 660), spacing=40)
    assert [line.text for line in reader.read(tile)] == lines
    larger, _ = page(lines, size=(1536, 1536), text_px=13, at=(700, 900), spacing=40)
    assert reader.read(larger) == []


@pytest.mark.parametrize("corner", ["top left", "middle", "bottom right"])
def test_a_lone_line_of_13_px_text_reads_anywhere_in_a_tile(reader: TextReader,
                                                            corner: str) -> None:
    """A scan's tile often holds one short line and nothing else: it must read wherever it
    lies. In 1024-px squares the detector missed it at the top left and the bottom right."""
    at = {"top left": (24, 100), "middle": (TILE_SIDE // 2 - 70, TILE_SIDE // 2),
          "bottom right": (TILE_SIDE - 200, TILE_SIDE - 40)}[corner]
    tile, _ = page(["Lot 4471 expires 2027"], size=(TILE_SIDE, TILE_SIDE), text_px=13, at=at)
    assert [line.text for line in reader.read(tile)] == ["Lot 4471 expires 2027"]


def test_a_blank_page_has_no_text(reader: TextReader) -> None:
    assert reader.read(Image.new("RGB", (800, 600), "white")) == []


def test_faint_text_is_still_read(reader: TextReader) -> None:
    """The blank-page shortcut only skips images with (almost) no contrast."""
    image = Image.new("RGB", (600, 200), (250, 250, 250))
    ImageDraw.Draw(image).text((40, 60), "Faint pencil note", fill=(175, 175, 175),
                               font=font(28))
    assert [line.text for line in reader.read(image)] == ["Faint pencil note"]


def test_grey_images_are_read_too(reader: TextReader) -> None:
    image, _ = page(LINES[:1], size=(600, 200), at=(40, 60))
    assert [line.text for line in reader.read(image.convert("L"))] == LINES[:1]
