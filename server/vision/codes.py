"""QR codes and barcodes with zxing-cpp (Apache-2.0): QR, Micro QR, Data Matrix, Aztec,
PDF417, EAN-13/8, UPC-A/E, Code 128/39/93, ITF, Codabar, DataBar and more, read in one pass.

zxing-cpp was chosen over OpenCV's readers: it reads every common symbology in one call, and
on generated posters OpenCV 4.14's ``cv2.barcode`` read an EAN-13 but no Code 128.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["DISTRIBUTION", "CodeReader", "FoundCode", "format_name"]

DISTRIBUTION = "zxing-cpp"

# zxing-cpp's display names ("QR Code", "EAN-13", "Code 128") become the ZXing constants
# clients know (QR_CODE, EAN_13, CODE_128); these few differ from the plain rule.
_FORMAT_NAMES = {
    "PDF417": "PDF_417",
    "MaxiCode": "MAXICODE",
    "DataBar": "RSS_14",
    "DataBar Expanded": "RSS_EXPANDED",
}


def format_name(display_name: str) -> str:
    """zxing-cpp's name → ZXing's constant: ``"QR Code"`` → ``"QR_CODE"``, ``"EAN-13"`` →
    ``"EAN_13"``, ``"Code 128"`` → ``"CODE_128"``."""
    if display_name in _FORMAT_NAMES:
        return _FORMAT_NAMES[display_name]
    return display_name.upper().replace(" ", "_").replace("-", "_").replace("/", "_")


@dataclass(frozen=True)
class FoundCode:
    format: str
    text: str
    box: tuple[float, float, float, float]
    """``(x0, y0, x1, y1)`` around the symbol's corners, in the read image's pixels (a 1-D
    barcode found along one scan line gets at least one pixel of height)."""


class CodeReader:
    """Reads every code in an image. Build one per worker; :meth:`read` is thread-safe."""

    def __init__(self) -> None:
        import zxingcpp

        self._zxing: Any = zxingcpp

    def read(self, image: Image.Image) -> list[FoundCode]:
        # Grayscale: what the binarizer works on anyway, a third of the bytes to hand over.
        gray = image if image.mode == "L" else image.convert("L")
        found = []
        for code in self._zxing.read_barcodes(gray):
            if not code.valid:
                continue
            position = code.position
            corners = (position.top_left, position.top_right,
                       position.bottom_right, position.bottom_left)
            xs = [float(point.x) for point in corners]
            ys = [float(point.y) for point in corners]
            x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
            x1, y1 = max(x1, x0 + 1.0), max(y1, y0 + 1.0)
            found.append(FoundCode(format_name(str(code.format)), code.text, (x0, y0, x1, y1)))
        return found
