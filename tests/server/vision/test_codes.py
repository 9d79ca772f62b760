"""server.vision.codes: QR codes and barcodes zxing-cpp draws are read back, named as ZXing
names them, and boxed where they were put."""

from __future__ import annotations

import pytest
from PIL import Image

from server.vision.codes import CodeReader, format_name
from tests.support.vision_inputs import barcode, overlap


@pytest.fixture(scope="module")
def reader() -> CodeReader:
    return CodeReader()


@pytest.mark.parametrize(("drawn", "text", "expected"), [
    ("QRCode", "https://example.org/parts/PX-7731?rev=B", "QR_CODE"),
    ("EAN13", "4006381333931", "EAN_13"),
    ("Code128", "PX-7731-B/42", "CODE_128"),
    ("DataMatrix", "lot 2026-12-05", "DATA_MATRIX"),
])
def test_each_symbology_is_read_where_it_was_put(reader: CodeReader, drawn: str, text: str,
                                                 expected: str) -> None:
    symbol = barcode(drawn, text)
    poster = Image.new("RGB", (1200, 900), (235, 230, 220))
    poster.paste(symbol, (310, 260))
    found = reader.read(poster)
    assert [(code.format, code.text) for code in found] == [(expected, text)]
    where = (310, 260, 310 + symbol.width, 260 + symbol.height)
    # The box bounds the symbol itself (the drawn image adds a quiet zone around it).
    assert overlap(found[0].box, where) > 0.5
    x0, y0, x1, y1 = found[0].box
    assert where[0] <= x0 < x1 <= where[2]
    assert where[1] <= y0 < y1 <= where[3]


def test_several_codes_in_one_image(reader: CodeReader) -> None:
    poster = Image.new("RGB", (1600, 700), "white")
    poster.paste(barcode("QRCode", "first"), (50, 50))
    poster.paste(barcode("Code128", "SECOND-2"), (700, 80))
    poster.paste(barcode("QRCode", "third"), (300, 400))
    assert sorted(code.text for code in reader.read(poster)) == ["SECOND-2", "first", "third"]


def test_a_blank_or_photographic_image_has_no_codes(reader: CodeReader) -> None:
    from tests.support.vision_inputs import photo

    assert reader.read(Image.new("RGB", (640, 480), "white")) == []
    assert reader.read(photo("coffee")) == []


def test_format_names_are_zxing_s_constants() -> None:
    assert format_name("QR Code") == "QR_CODE"
    assert format_name("EAN-13") == "EAN_13"
    assert format_name("Code 128") == "CODE_128"
    assert format_name("UPC-A") == "UPC_A"
    assert format_name("PDF417") == "PDF_417"
    assert format_name("EAN/UPC") == "EAN_UPC"
