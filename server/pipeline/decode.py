"""Image bytes → a Pillow RGB image at the size a model needs: safely (bombs, truncation) and fast.

Two entry points:

* :func:`probe` reads only the header at the front of a file (pure Python, a few ``struct``
  calls, nothing allocated from claimed sizes). It is cheap enough for the gateway to call on
  an upload still in progress, e.g. to reject a decompression bomb after its first kilobytes.
* :func:`decode` turns a whole file (a buffer or a path) into a :class:`DecodedImage`. It is
  CPU-bound and may take hundreds of milliseconds on a large image: call it in a worker
  process or thread, never on the asyncio loop.

Every failure the client caused is a :class:`~chunking.errors.ProtocolError` with code
``invalid_image`` (not an image we support, truncated, corrupt) or ``too_many_pixels`` (over
``max_pixels``); its message is short and carries no file paths or tracebacks. Supported
formats: JPEG (incl. MPO), PNG (incl. APNG), GIF, WebP, BMP, TIFF.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Protocol, TypeVar, cast

import numpy as np
from PIL import Image, ImageFile

from chunking.errors import ErrorCode, ProtocolError
from server.tasks.contract import DecodeHint

__all__ = [
    "DECODE_MEMORY_BUDGET",
    "DEFAULT_DECODE_DEADLINE_S",
    "JPEG_SCAN_SAMPLES",
    "MAX_JPEG_SCANS",
    "MIN_JPEG_SCANS",
    "SUPPORTED_FORMATS",
    "DecodedImage",
    "Header",
    "ImageInfo",
    "check_pixels",
    "deadline_error",
    "decode",
    "header_of",
    "jpeg_scan_limit",
    "orientation_method",
    "probe",
    "read_orientation",
    "vips",
    "vips_open",
    "vips_rgb8",
    "vips_run",
    "working_bytes",
]

SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
"""Format names as Pillow spells them; :func:`probe` and :func:`decode` accept nothing else."""

MAX_JPEG_SCANS = 100
"""Scans (SOS segments) a JPEG may have: a progressive JPEG from a camera or encoder has about
ten; each scan costs a pass over the image's coefficients, so thousands of empty ones make a
small file take tens of seconds."""

JPEG_SCAN_SAMPLES = 3_000_000_000
"""Scans times samples (pixels times components, after subsampling) a JPEG may cost: a large
image gets fewer scans (about half a second per 10^9 here), never fewer than
:data:`MIN_JPEG_SCANS`. A 12000x9000 4:2:0 JPEG (162 M samples) may have 18 scans."""

MIN_JPEG_SCANS = 12
"""The scans every JPEG may have, whatever its size (encoders' progressive scripts use ten)."""

DECODE_MEMORY_BUDGET = 256 * 1024 * 1024
"""Bytes a decode may need BESIDE the pixels it returns (estimated from the header, see
:func:`working_bytes`): a progressive or multi-scan JPEG's coefficients (2 bytes per sample,
kept whole even at 1/8 scale), the full frame of a decoder that cannot stream (GIF, BMP,
WebP, interlaced PNG), a TIFF's largest strip.
Over it, the image is answered ``too_many_pixels`` before any pixel is decoded: e.g. a
progressive 4:2:0 JPEG may have about 89 MP, a 4:4:4 one 44 MP, a WebP 67 MP."""

DEFAULT_DECODE_DEADLINE_S = 30.0
"""Wall time a decode may take before it is stopped and answered ``too_many_pixels``."""

READ_WHOLE_BYTES = 1 << 20
"""A file up to this size is read whole and decoded from memory: one read instead of a
seek and a read for each header field and decoder block (about 0.35 ms of a 640x480 JPEG's
1.4 ms decode, from tmpfs)."""
_STREAMED_FORMATS = frozenset({"PNG", "TIFF", "WEBP"})
"""Formats :func:`decode` hands to libvips when the whole file is there: PNG and TIFF are
read a strip at a time and shrunk as they stream (Pillow would decode them whole first)."""

# A JPEG puts its frame header after its APPn/COM segments; real files have a few dozen
# (EXIF, XMP, ICC profiles split in 64 KiB pieces). Bounding the count bounds the work a
# hostile file of tiny segments can cause.
_JPEG_MAX_SEGMENTS = 4096
# TIFF: directory entries scanned for the width/height tags (classic TIFF allows 65535).
_TIFF_MAX_ENTRIES = 65535
# Bytes examined per step when skipping fill bytes or junk between JPEG segments.
_SCAN_CHUNK = 4096

_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0..SOF15 less DHT, JPG, DAC
_BMP_INFO_HEADERS = frozenset({40, 52, 56, 64, 108, 124})  # BITMAPINFOHEADER and its successors
_WHITE = (255, 255, 255)

# Exceptions Pillow and its codecs raise on bad input (its own `Image.open` treats the same
# set as "not this format"). UnidentifiedImageError is an OSError.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    struct.error,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ArithmeticError,
)

# Same table as PIL.ImageOps.exif_transpose. Applied by hand, to the final small image, so a
# rotated 100-megapixel photo is not transposed at full size.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class ImageInfo:
    """An image's stored size and its format name as Pillow spells it ("JPEG", "PNG", ...)."""

    width: int
    height: int
    format: str

    def to_dict(self) -> dict[str, int | str]:
        """``{"width": ..., "height": ..., "format": ...}`` as stored."""
        return {"width": self.width, "height": self.height, "format": self.format}

    def described(self, displayed: tuple[int, int]) -> dict[str, int | str]:
        """The protocol's ``image`` object: the size as displayed (EXIF orientation applied,
        the frame boxes are reported in) and the format."""
        return {"width": displayed[0], "height": displayed[1], "format": self.format}


@dataclass
class DecodedImage:
    """What :func:`decode` returns.

    ``image``: loaded, mode ``RGB``, EXIF orientation applied, possibly shrunk (see
    :func:`decode`); it holds no reference to the input buffer or file.
    ``info``: the ORIGINAL stored width, height and format, for the protocol's ``image`` field.
    """

    image: Image.Image
    info: ImageInfo


def _invalid(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID_IMAGE, message)


def deadline_error(deadline_s: float) -> ProtocolError:
    """The answer to a decode stopped at its deadline: the image costs too much to decode."""
    return ProtocolError(
        ErrorCode.TOO_MANY_PIXELS,
        f"decoding the image took longer than {deadline_s:g} s and was stopped",
    )


class _DeadlinePassed(Exception):
    """Raised by a reader when its decode's deadline has passed, to stop the decoder."""


def check_pixels(info: ImageInfo, max_pixels: int) -> None:
    """Raise ``too_many_pixels`` when ``info.width * info.height`` exceeds ``max_pixels``."""
    pixels = info.width * info.height
    if pixels > max_pixels:
        raise ProtocolError(
            ErrorCode.TOO_MANY_PIXELS,
            f"image is {info.width}x{info.height} ({pixels} pixels), "
            f"over the limit of {max_pixels} pixels",
        )


# --------------------------------------------------------------------------------------------
# Header parsing. The parsers read through a `_Source` so the same code serves a prefix in
# memory (an upload in progress, or a whole buffer) and a file on disk (seeking past segments
# instead of reading them). `None` from a source or a parser means "the data ends first".


class _Source(Protocol):
    def peek(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset``; fewer (or none) where the data ends."""


class _BufferSource:
    def __init__(self, view: memoryview) -> None:
        self._view = view

    def peek(self, offset: int, size: int) -> bytes:
        return self._view[offset : offset + size].tobytes()


class _FileSource:
    def __init__(self, fp: IO[bytes]) -> None:
        self._fp = fp
        self._size = os.fstat(fp.fileno()).st_size

    def peek(self, offset: int, size: int) -> bytes:
        if offset >= self._size:
            return b""  # also keeps a claimed 64-bit offset away from seek()
        self._fp.seek(offset)
        return self._fp.read(size)


def _read(src: _Source, offset: int, size: int) -> bytes | None:
    data = src.peek(offset, size)
    return data if len(data) == size else None


def _info(width: int, height: int, fmt: str) -> ImageInfo:
    if width <= 0 or height <= 0:
        raise _invalid(f"{fmt} header gives an empty image ({width}x{height})")
    return ImageInfo(width, height, fmt)


def _scan_jpeg(src: _Source, pos: int, *, for_ff: bool) -> int | None:
    """Offset of the first byte at/after ``pos`` that is (``for_ff``) or is not 0xFF."""
    # Between well-formed segments it is the very next byte: look a few bytes ahead first.
    size = 16
    while chunk := src.peek(pos, size):
        found = chunk.find(b"\xff") if for_ff else len(chunk) - len(chunk.lstrip(b"\xff"))
        if 0 <= found < len(chunk):
            return pos + found
        pos += len(chunk)
        size = _SCAN_CHUNK
    return None


def _probe_jpeg(src: _Source) -> ImageInfo | None:
    pos = 2  # after SOI
    for _ in range(_JPEG_MAX_SEGMENTS):
        # Stray bytes between segments are skipped, as libjpeg and Pillow do; any number of
        # 0xFF fill bytes may precede a marker.
        start = _scan_jpeg(src, pos, for_ff=True)
        if start is None:
            return None
        at = _scan_jpeg(src, start, for_ff=False)
        if at is None:
            return None
        marker = src.peek(at, 1)[0]
        pos = at + 1
        if marker == 0x00 or marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue  # a stuffed 0xFF (junk here), TEM or RSTn: no length field
        if marker in _JPEG_SOF:
            sof = _read(src, pos, 7)
            if sof is None:
                return None
            length, _precision, height, width = struct.unpack(">HBHH", sof)
            if length < 8:
                raise _invalid("JPEG frame header is too short")
            return _info(width, height, "JPEG")
        if marker in (0xD8, 0xD9, 0xDA):
            raise _invalid("JPEG has no frame header before its image data")
        if marker < 0xC0 or marker == 0xC8:
            raise _invalid(f"JPEG uses reserved marker 0xFF{marker:02X}")
        field = _read(src, pos, 2)  # APPn, COM, DQT, DHT, DRI, ...: skip by their length
        if field is None:
            return None
        (length,) = struct.unpack(">H", field)
        if length < 2:
            raise _invalid("JPEG segment has an invalid length")
        pos += length
    raise _invalid("JPEG has too many segments before its frame header")


def _probe_png(src: _Source) -> ImageInfo | None:
    head = src.peek(8, 16)
    if len(head) >= 8:
        length, chunk_type = struct.unpack(">I4s", head[:8])
        if chunk_type != b"IHDR" or length < 13:
            raise _invalid("PNG does not start with an IHDR chunk")
    if len(head) < 16:
        return None
    width, height = struct.unpack(">II", head[8:16])
    if width > 0x7FFFFFFF or height > 0x7FFFFFFF:
        raise _invalid("PNG dimensions are out of range")
    return _info(width, height, "PNG")


def _probe_gif(src: _Source) -> ImageInfo | None:
    # The logical screen; frames may reach past it, which decode() checks on Pillow's size.
    head = _read(src, 6, 4)
    if head is None:
        return None
    width, height = struct.unpack("<HH", head)
    return _info(width, height, "GIF")


def _probe_webp(src: _Source) -> ImageInfo | None:
    head = src.peek(0, 30)
    if not b"WEBP".startswith(head[8:12]):
        raise _invalid("RIFF file is not a WebP image")
    if len(head) < 16:
        return None
    chunk = head[12:16]
    if chunk == b"VP8 ":  # lossy: frame tag, start code, 14-bit dimensions (+2 scale bits)
        if len(head) < 30:
            return None
        if head[23:26] != b"\x9d\x01\x2a":
            raise _invalid("WebP VP8 bitstream has no start code")
        width, height = struct.unpack("<HH", head[26:30])
        return _info(width & 0x3FFF, height & 0x3FFF, "WEBP")
    if chunk == b"VP8L":  # lossless: signature, then 14-bit width-1 and height-1
        if len(head) < 25:
            return None
        if head[20] != 0x2F:
            raise _invalid("WebP VP8L bitstream has a bad signature")
        (bits,) = struct.unpack("<I", head[21:25])
        return _info((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, "WEBP")
    if chunk == b"VP8X":  # extended: 24-bit canvas width-1 and height-1
        if len(head) < 30:
            return None
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return _info(width, height, "WEBP")
    raise _invalid("WebP starts with an unknown chunk")


def _probe_bmp(src: _Source) -> ImageInfo | None:
    head = src.peek(0, 26)
    if len(head) < 18:
        return None
    (header_size,) = struct.unpack("<I", head[14:18])
    if header_size == 12:  # BITMAPCOREHEADER: unsigned 16-bit sizes
        if len(head) < 22:
            return None
        width, height = struct.unpack("<HH", head[18:22])
        return _info(width, height, "BMP")
    if header_size not in _BMP_INFO_HEADERS:
        raise _invalid(f"unsupported BMP header ({header_size} bytes)")
    if len(head) < 26:
        return None
    width, height = struct.unpack("<ii", head[18:26])
    # A negative height means rows are stored top-down; the size is its magnitude.
    return _info(width, abs(height), "BMP")


def _probe_tiff(src: _Source) -> ImageInfo | None:
    endian = "<" if src.peek(0, 2) == b"II" else ">"
    big = src.peek(2, 2) in (b"+\x00", b"\x00+")
    if big:  # BigTIFF: 8-byte offsets and counts, 20-byte entries
        head = _read(src, 4, 12)
        if head is None:
            return None
        offset_size, _zero, ifd = struct.unpack(endian + "HHQ", head)
        if offset_size != 8:
            raise _invalid("BigTIFF header is malformed")
        count_fmt, entry_fmt, entry_size, first = "Q", "HHQ", 20, 16
    else:
        head = _read(src, 4, 4)
        if head is None:
            return None
        (ifd,) = struct.unpack(endian + "I", head)
        count_fmt, entry_fmt, entry_size, first = "H", "HHI", 12, 8
    if ifd < first:
        raise _invalid("TIFF directory offset is invalid")
    count_field = _read(src, ifd, struct.calcsize(endian + count_fmt))
    if count_field is None:
        return None
    (count,) = struct.unpack(endian + count_fmt, count_field)
    if count == 0:
        raise _invalid("TIFF directory is empty")
    count = min(count, _TIFF_MAX_ENTRIES)
    entries = src.peek(ifd + len(count_field), count * entry_size)
    value_formats = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8
    size: dict[int, int] = {}
    for start in range(0, len(entries) - entry_size + 1, entry_size):
        tag, kind, n = struct.unpack_from(endian + entry_fmt, entries, start)
        if tag not in (256, 257):  # ImageWidth, ImageLength
            continue
        value_format = value_formats.get(kind)
        if value_format is None or n < 1:
            raise _invalid("TIFF image size tag has an invalid type")
        value_at = start + struct.calcsize(endian + entry_fmt)
        (size[tag],) = struct.unpack_from(endian + value_format, entries, value_at)
        if len(size) == 2:
            return _info(size[256], size[257], "TIFF")
    if len(entries) < count * entry_size:
        return None
    raise _invalid("TIFF directory has no image size")


_SIGNATURES: tuple[tuple[bytes, Callable[[_Source], ImageInfo | None]], ...] = (
    (b"\xff\xd8\xff", _probe_jpeg),
    (b"\x89PNG\r\n\x1a\n", _probe_png),
    (b"GIF87a", _probe_gif),
    (b"GIF89a", _probe_gif),
    (b"RIFF", _probe_webp),
    (b"BM", _probe_bmp),
    (b"II*\x00", _probe_tiff),
    (b"MM\x00*", _probe_tiff),
    (b"II+\x00", _probe_tiff),
    (b"MM\x00+", _probe_tiff),
)


def _probe_source(src: _Source) -> ImageInfo | None:
    head = src.peek(0, 8)
    could_be = False
    for signature, parser in _SIGNATURES:
        if head.startswith(signature):
            return parser(src)
        could_be = could_be or (len(head) < len(signature) and signature.startswith(head))
    if could_be:
        return None
    raise _invalid("not an image in a supported format (JPEG, PNG, GIF, WebP, BMP, TIFF)")


def probe(prefix: bytes | bytearray | memoryview) -> ImageInfo | None:
    """Read the size and format from the header at the front of an image file.

    ``prefix``: the first bytes of the file, any length (the whole file is fine: only the
    header is looked at, nothing is copied beyond a few KiB). Returns ``None`` when the bytes
    end before the header does (call again once more bytes have arrived); raises
    ``ProtocolError(invalid_image)`` as soon as the bytes cannot be a supported image.
    Never decodes pixels and never allocates from a claimed size: cheap enough to run on the
    event loop. For GIF the logical screen size is returned (frames may reach past it).
    Pair it with :func:`check_pixels` to reject decompression bombs early.
    """
    return _probe_source(_BufferSource(_byte_view(prefix)))


def _byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


# --------------------------------------------------------------------------------------------
# Decode cost, from the header: what a decoder must hold beside the pixels it returns.


@dataclass(frozen=True)
class _JpegLayout:
    components: tuple[tuple[int, int], ...]
    """(horizontal, vertical) sampling factors, one pair per component."""
    progressive: bool
    first_scan_components: int | None
    """Components in the first scan; None when the data ends before it."""

    @property
    def multi_scan(self) -> bool:
        """libjpeg then buffers every coefficient of the image (it decides at the first
        scan: progressive, or a first scan without every component)."""
        first = self.first_scan_components
        return self.progressive or first is None or first < len(self.components)


def _jpeg_layout(src: _Source) -> _JpegLayout | None:
    """Sampling factors and scan layout, from the segments up to the first scan."""
    pos = 2
    frame: tuple[tuple[tuple[int, int], ...], bool] | None = None
    for _ in range(_JPEG_MAX_SEGMENTS):
        start = _scan_jpeg(src, pos, for_ff=True)
        at = None if start is None else _scan_jpeg(src, start, for_ff=False)
        if at is None:
            break
        marker = src.peek(at, 1)[0]
        pos = at + 1
        if marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD7:
            continue
        field = _read(src, pos, 2)
        if marker in (0xD8, 0xD9) or field is None:
            break
        (length,) = struct.unpack(">H", field)
        if marker in _JPEG_SOF and frame is None:
            body = _read(src, pos + 2, max(0, length - 2)) or b""
            count = body[5] if len(body) > 5 else 0
            components = tuple(
                (max(1, body[7 + 3 * i] >> 4), max(1, body[7 + 3 * i] & 0x0F))
                for i in range(count) if 7 + 3 * i < len(body)
            )
            frame = (components or ((1, 1),), marker in (0xC2, 0xC6, 0xCA, 0xCE))
        elif marker == 0xDA:
            first = src.peek(pos + 2, 1)
            if frame is not None:
                return _JpegLayout(frame[0], frame[1], first[0] if first else None)
            break
        pos += max(2, length)
    return None if frame is None else _JpegLayout(frame[0], frame[1], None)


def _jpeg_layout_or_worst(src: _Source) -> _JpegLayout:
    """The layout, or where the segments do not say, the costliest (progressive, 3 full-size
    components)."""
    return _jpeg_layout(src) or _JpegLayout(((1, 1),) * 3, True, None)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _jpeg_coefficient_bytes(width: int, height: int, layout: _JpegLayout) -> int:
    h_max = max(h for h, _ in layout.components)
    v_max = max(v for _, v in layout.components)
    blocks = sum(
        _ceil_div(_ceil_div(width * h, h_max), 8) * _ceil_div(_ceil_div(height * v, v_max), 8)
        for h, v in layout.components
    )
    return blocks * 64 * 2  # 64 coefficients of 16 bits per 8x8 block


def _jpeg_scale(width: int, height: int, min_short: int | None) -> int:
    """The 1/s scale libjpeg decodes at for ``min_short`` (see :func:`_draft_request`)."""
    if min_short is None:
        return 1
    scale = 1
    while scale < 8 and min(width, height) // (scale * 2) >= min_short:
        scale *= 2
    return scale


def _count_jpeg_scans(src: _Source, limit: int) -> int:
    """SOS markers in the file, counting up to ``limit + 1``. Entropy-coded data never holds
    0xFF 0xDA (a 0xFF there is followed by 0x00 or a restart marker), so the count can only
    err upwards, for an embedded thumbnail or metadata that happens to hold those bytes."""
    count, pos, last = 0, 0, b""
    while count <= limit:
        chunk = src.peek(pos, 1 << 16)
        if not chunk:
            break
        count += chunk.count(b"\xff\xda") + (last == b"\xff" and chunk[:1] == b"\xda")
        last = chunk[-1:]
        pos += len(chunk)
    return count


def _tiff_layout(src: _Source) -> dict[int, int]:
    """The first value of the tags that size a TIFF's strips or tiles and its samples."""
    endian = "<" if src.peek(0, 2) == b"II" else ">"
    big = src.peek(2, 2) in (b"+\x00", b"\x00+")
    head = src.peek(4, 12)
    if big:
        if len(head) < 12:
            return {}
        ifd = struct.unpack(endian + "Q", head[4:12])[0]
        count_fmt, entry_fmt, entry_size, inline = "Q", "HHQ", 20, 8
    else:
        if len(head) < 4:
            return {}
        ifd = struct.unpack(endian + "I", head[:4])[0]
        count_fmt, entry_fmt, entry_size, inline = "H", "HHI", 12, 4
    count_field = src.peek(ifd, struct.calcsize(count_fmt))
    if len(count_field) < struct.calcsize(count_fmt):
        return {}
    count = min(struct.unpack(endian + count_fmt, count_field)[0], _TIFF_MAX_ENTRIES)
    entries = src.peek(ifd + len(count_field), count * entry_size)
    sizes = {3: 2, 4: 4, 16: 8}
    formats = {3: "H", 4: "I", 16: "Q"}
    wanted = {258, 277, 278, 322, 323}  # BitsPerSample, SamplesPerPixel, RowsPerStrip, Tile*
    tags: dict[int, int] = {}
    for start in range(0, len(entries) - entry_size + 1, entry_size):
        tag, kind, n = struct.unpack_from(endian + entry_fmt, entries, start)
        if tag not in wanted or kind not in formats or n < 1:
            continue
        value_at = start + struct.calcsize(endian + entry_fmt)
        if n * sizes[kind] <= inline:
            (tags[tag],) = struct.unpack_from(endian + formats[kind], entries, value_at)
        else:  # an array elsewhere in the file: its first value
            (offset,) = struct.unpack_from(endian + ("Q" if big else "I"), entries, value_at)
            value = src.peek(offset, sizes[kind])
            if len(value) == sizes[kind]:
                (tags[tag],) = struct.unpack(endian + formats[kind], value)
    return tags


def working_bytes(src: _Source, info: ImageInfo, min_short: int | None, *,
                  streaming: bool, layout: _JpegLayout | None = None) -> int:
    """Estimated bytes a decode of ``info``'s image needs beside the pixels it returns.

    ``streaming``: decoded by libvips (PNG, TIFF, WebP, and JPEG/GIF for full-resolution
    regions), else by Pillow. The returned pixels themselves are not counted: ``max_pixels``
    bounds them, and the caller chose their scale.
    """
    width, height, fmt = info.width, info.height, info.format
    pixels = width * height
    if fmt == "JPEG":
        layout = layout or _jpeg_layout_or_worst(src)
        need = _jpeg_coefficient_bytes(width, height, layout) if layout.multi_scan else 0
        channels = len(layout.components)
        scale = _jpeg_scale(width, height, min_short)
        if min_short is not None and not streaming:  # libjpeg's scaled output, before reduce
            need += -(-width // scale) * -(-height // scale) * channels
        if channels == 4:  # CMYK: converted beside the RGB result
            need += -(-width // scale) * -(-height // scale) * channels
        return need
    if fmt == "PNG":
        ihdr = src.peek(24, 5)
        depth, colour = (ihdr[0], ihdr[1]) if len(ihdr) >= 2 else (16, 6)
        interlaced = len(ihdr) < 5 or ihdr[4] != 0
        channels = {0: 1, 2: 3, 3: 4, 4: 2, 6: 4}.get(colour, 4)
        sample = 2 if depth == 16 else 1
        if streaming:  # libspng streams rows, but an interlaced image is read whole
            return pixels * channels * sample if interlaced else 0
        return pixels * (channels * sample + 4)  # the frame, and its conversion to RGB
    if fmt == "TIFF":
        tags = _tiff_layout(src)
        pixel_bytes = max(1, tags.get(277, 1)) * max(1, -(-tags.get(258, 8) // 8))
        if not streaming:
            return pixels * (pixel_bytes + 4)
        if 322 in tags and 323 in tags:  # tiled: a row of tiles at a time
            rows = min(height, tags[323])
            return rows * -(-width // max(1, tags[322])) * max(1, tags[322]) * pixel_bytes
        rows = min(height, tags.get(278, height) or height)  # default: one strip, the image
        return rows * width * pixel_bytes
    if fmt == "WEBP":
        return pixels * 4  # libwebp decodes the whole frame
    if fmt == "GIF":
        return pixels * (4 if streaming else 5)  # the canvas (and, in Pillow, RGB(A))
    # BMP: Pillow's frame (1 to 4 bytes a pixel), then RGB beside a palette image.
    bits = src.peek(28, 2) if src.peek(14, 4)[:1] != b"\x0c" else src.peek(24, 2)
    count = struct.unpack("<H", bits)[0] if len(bits) == 2 else 32
    return pixels * (max(1, count // 8) + (3 if count <= 8 else 0))


def _too_costly(info: ImageInfo, need: int) -> ProtocolError:
    mib = 1024 * 1024
    return ProtocolError(
        ErrorCode.TOO_MANY_PIXELS,
        f"decoding this {info.width}x{info.height} {info.format} would need about "
        f"{-(-need // mib)} MiB, over the limit of {DECODE_MEMORY_BUDGET // mib} MiB",
    )


def jpeg_scan_limit(src: _Source, info: ImageInfo, layout: _JpegLayout | None = None) -> int:
    """The scans a JPEG of this size and layout may have (see :data:`JPEG_SCAN_SAMPLES`)."""
    layout = layout or _jpeg_layout_or_worst(src)
    samples = _jpeg_coefficient_bytes(info.width, info.height, layout) // 2
    return max(MIN_JPEG_SCANS, min(MAX_JPEG_SCANS, JPEG_SCAN_SAMPLES // max(1, samples)))


def _too_many_scans(limit: int) -> ProtocolError:
    return ProtocolError(ErrorCode.TOO_MANY_PIXELS,
                         f"JPEG has more than {limit} scans, the limit for its size")


# --------------------------------------------------------------------------------------------
# Decoding.


class _Reader(io.RawIOBase):
    """A read-only, seekable raw file: subclasses provide ``tell``, ``seek`` and ``read``."""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readall(self) -> bytes:
        return self.read()

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


class _BufferReader(_Reader):
    """A file over a memoryview: Pillow reads from it without a full copy (``io.BytesIO``
    would copy a bytearray or memoryview up front)."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        start = min(self._pos, len(self._view))
        end = len(self._view) if size is None or size < 0 else min(start + size, len(self._view))
        self._pos = end
        return self._view[start:end].tobytes()


def decode(
    data: bytes | bytearray | memoryview | str | os.PathLike[str],
    *,
    max_pixels: int,
    hint: DecodeHint,
    deadline_s: float | None = DEFAULT_DECODE_DEADLINE_S,
) -> DecodedImage:
    """Decode a whole image file into an RGB Pillow image no larger than the model needs.

    ``data``: the file's bytes (``bytes``/``bytearray``/``memoryview``, read in place; do not
    mutate it during the call), or a path (``str``/``os.PathLike``) to a file that is opened
    and read from directly (one of at most :data:`READ_WHOLE_BYTES` is read whole first).
    PNG, TIFF and WebP are decoded by libvips, which streams them strip by strip and shrinks
    as it goes (WebP's frame is decoded whole); JPEG, GIF and BMP by Pillow, which reads them
    a piece at a time. Before any pixel is decoded, the header must pass
    ``max_pixels``, :data:`DECODE_MEMORY_BUDGET` and, for JPEG, the scan limit (see
    :func:`jpeg_scan_limit`); all answer ``too_many_pixels``. CPU-bound and blocking:
    call it in a worker process or thread, not on the event loop.

    Steps: the header is parsed (:func:`probe`) and ``width * height`` checked against
    ``max_pixels`` before Pillow even opens the file; Pillow's lazily-opened size is checked
    again (a GIF frame may grow the canvas) before any pixel is decoded. Only the first frame
    of animated images (GIF, WebP, APNG) is decoded. With ``hint.min_short_side`` set, JPEGs
    are decoded at 1/2, 1/4 or 1/8 scale by libjpeg (``draft``) and any image whose shorter
    side is still at least twice ``min_short_side`` is box-reduced by an integer factor: the
    result's shorter side lies in ``[min_short_side, 2 * min_short_side)`` for images at least
    that large; smaller images are never upscaled. ``min_short_side=None`` keeps full size.
    Palette, grayscale, 16-bit, CMYK and YCbCr images become RGB; alpha is composited over
    white. The EXIF orientation is applied to the pixels, while ``info`` keeps the stored
    width and height as the header gives them (what the client sent; a model sees the upright
    image).

    ``deadline_s``: the decode stops once it has run that long (checked whenever the decoder
    reads, so within one read's work) and raises ``too_many_pixels``.

    Raises ``ProtocolError``: ``too_many_pixels`` over ``max_pixels`` (or over Pillow's own
    ``2 * Image.MAX_IMAGE_PIXELS``, whichever is lower); ``invalid_image`` for anything not a
    whole, decodable image of a supported format, truncated data included (never padded).
    ``OSError`` from opening or reading the given path itself (e.g. ``FileNotFoundError``)
    propagates: that is the server's problem, not the client's.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Pillow would then pad truncated images with grey instead of failing.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay False")
    if hint.min_short_side is not None and hint.min_short_side < 1:
        raise ValueError("hint.min_short_side must be positive or None")
    give_up_at = None if deadline_s is None else time.monotonic() + deadline_s
    min_short = hint.min_short_side
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        with open(path, "rb") as file:
            if os.fstat(file.fileno()).st_size > READ_WHOLE_BYTES:
                src = _FileSource(file)
                info = _probe_header(src, max_pixels)
                streaming = info.format in _STREAMED_FORMATS
                _check_cost(src, info, min_short, streaming=streaming)
                if streaming:
                    return _decode_vips(path, info, min_short, deadline_s)
                return _decode_file(_guarded(file, give_up_at), info, max_pixels, min_short,
                                    deadline_s)
            data = file.read()
    view = _byte_view(data)
    buffer_src = _BufferSource(view)
    info = _probe_header(buffer_src, max_pixels)
    streaming = info.format in _STREAMED_FORMATS
    _check_cost(buffer_src, info, min_short, streaming=streaming)
    if streaming:
        return _decode_vips(view, info, min_short, deadline_s)
    # BytesIO shares a bytes object's memory; other buffers get the zero-copy reader.
    reader = io.BytesIO(data) if isinstance(data, bytes) else cast(IO[bytes], _BufferReader(view))
    return _decode_file(_guarded(reader, give_up_at), info, max_pixels, min_short, deadline_s)


def _guarded(fp: IO[bytes], give_up_at: float | None) -> IO[bytes]:
    """``fp``, or a reader over it that enforces the deadline."""
    if give_up_at is None:
        return fp
    return cast(IO[bytes], _GuardedReader(fp, give_up_at))


class _GuardedReader(_Reader):
    """Passes reads through, stopping the decoder once ``give_up_at`` (``time.monotonic``)
    has passed. Pillow's decoders read a block at a time, so none runs long past it."""

    def __init__(self, inner: IO[bytes], give_up_at: float) -> None:
        super().__init__()
        self._inner = inner
        self._give_up_at = give_up_at

    def tell(self) -> int:
        return self._inner.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._inner.seek(offset, whence)

    def read(self, size: int | None = -1) -> bytes:
        if time.monotonic() > self._give_up_at:
            raise _DeadlinePassed
        return self._inner.read(-1 if size is None else size)


@dataclass(frozen=True)
class Header:
    """What the header of an image file says, read before any pixel is decoded."""

    info: ImageInfo


def _probe_header(src: _Source, max_pixels: int) -> ImageInfo:
    info = _probe_source(src)
    if info is None:
        raise _invalid("image data ends inside its header")
    check_pixels(info, max_pixels)
    return info


def _check_cost(src: _Source, info: ImageInfo, min_short: int | None, *,
                streaming: bool) -> None:
    """Every check made before decoding beyond the pixel count: decode memory
    (:data:`DECODE_MEMORY_BUDGET`) and a JPEG's scans."""
    # A JPEG's segments are walked once for both checks.
    layout = _jpeg_layout_or_worst(src) if info.format == "JPEG" else None
    need = working_bytes(src, info, min_short, streaming=streaming, layout=layout)
    if need > DECODE_MEMORY_BUDGET:
        raise _too_costly(info, need)
    if layout is None:
        return
    limit = jpeg_scan_limit(src, info, layout)
    if _count_jpeg_scans(src, limit) > limit:
        raise _too_many_scans(limit)


def header_of(data: str | bytes | memoryview, max_pixels: int) -> Header:
    """Read and check a whole file's header (a path, or the file's bytes) for a
    full-resolution decode by libvips (:mod:`server.pipeline.pixel_source`): the pixel
    count, decode memory and scan checks :func:`decode` makes. Raises ``ProtocolError`` as
    :func:`decode` does."""
    with contextlib.ExitStack() as stack:
        src: _Source
        if isinstance(data, str):
            src = _FileSource(stack.enter_context(open(data, "rb")))
        else:
            src = _BufferSource(_byte_view(data))
        info = _probe_header(src, max_pixels)
        _check_cost(src, info, None, streaming=info.format != "BMP")
        return Header(info)


def orientation_method(orientation: int) -> Image.Transpose | None:
    """The transpose that shows pixels stored with EXIF ``orientation`` upright (None: 1)."""
    return _ORIENTATION.get(orientation)


def read_orientation(data: str | bytes | memoryview, header: Header) -> int:
    """The EXIF orientation (1..8) from the metadata at the front of a file, without
    decoding pixels; 1 when there is none or it is damaged. A PNG's eXIf chunk counts only
    before its pixel data (reading further would mean decoding)."""
    fmt = header.info.format
    if fmt not in ("JPEG", "PNG", "TIFF", "WEBP"):
        return 1
    try:
        with contextlib.ExitStack() as stack, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fp: IO[bytes]
            if isinstance(data, str):
                fp = stack.enter_context(open(data, "rb"))
            else:
                fp = cast(IO[bytes], _BufferReader(_byte_view(data)))
            image = stack.enter_context(Image.open(fp, formats=[fmt]))
            if fmt == "PNG" and "exif" not in image.info:
                return 1  # Pillow would decode the whole image to look behind it
            value = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _decode_file(
    fp: IO[bytes], header: ImageInfo, max_pixels: int, min_short: int | None,
    deadline_s: float | None = None,
) -> DecodedImage:
    try:
        with warnings.catch_warnings():
            # Our own limit has already been applied; Pillow's MAX_IMAGE_PIXELS warning would
            # only be noise (or, under -W error, an exception of the wrong kind). Likewise its
            # UserWarnings about damaged metadata ("Corrupt EXIF data", "Tag data larger than
            # file"): a client's bad file is answered, not logged. (catch_warnings swaps the
            # process-wide filter list, so decodes on concurrent threads may restore each
            # other's filters: at worst a metadata warning reaches the log. Workers set no
            # pixel limit of Pillow's, so no bomb warning can turn up in their place.)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            image = Image.open(fp, formats=[header.format])
            return _decode_opened(image, header, max_pixels, min_short)
    except ProtocolError:
        raise
    except _DeadlinePassed:
        raise deadline_error(deadline_s or 0.0) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise ProtocolError(
            ErrorCode.TOO_MANY_PIXELS, f"image is over the decoder's limit of {limit} pixels"
        ) from None
    except _DECODE_ERRORS as exc:
        problem = "truncated" if "truncated" in str(exc).lower() else "corrupt or unsupported"
        raise _invalid(f"{problem} {header.format} data") from exc


# --------------------------------------------------------------------------------------------
# libvips: streaming decodes.

_vips_lock = threading.Lock()
_vips_module: Any = None


def vips() -> Any:
    """pyvips, imported on first use (it loads libvips) with its operation cache off: a
    cached decode would keep an image's pixels alive after its caller is done with them."""
    global _vips_module
    with _vips_lock:
        if _vips_module is None:
            import pyvips

            pyvips.cache_set_max(0)
            _vips_module = pyvips
        return _vips_module


def vips_open(source: str | bytes | memoryview, info: ImageInfo) -> Any:
    """A libvips image over the file or buffer, read once from top to bottom. Raises
    ``invalid_image`` where libvips cannot read the header or it disagrees with ours."""
    pyvips = vips()
    options: dict[str, Any] = {"access": "sequential", "fail_on": "error"}
    try:
        if isinstance(source, str):
            image = pyvips.Image.new_from_file(source, **options)
        else:
            # A source over the memory, not new_from_buffer: no copy, memoryviews too.
            image = pyvips.Image.new_from_source(pyvips.Source.new_from_memory(source), "",
                                                 **options)
    except pyvips.Error as exc:
        raise _invalid(f"corrupt or unsupported {info.format} data") from exc
    if (image.width, image.height) != (info.width, info.height):
        raise _invalid(f"{info.format} headers disagree on the image size")
    return image


def vips_rgb8(image: Any) -> Any:
    """8-bit sRGB, 3 bands, alpha composited over white: what :func:`decode` returns."""
    if image.interpretation == "cmyk" and image.format == "uchar" and image.bands == 4:
        # Pillow's formula (no colour profile), so both decoders agree.
        ink = 255 - image.extract_band(3)
        return ((255 - image.extract_band(0, n=3)) * ink / 255).cast("uchar")
    if image.interpretation not in ("srgb", "b-w") or image.format != "uchar":
        image = image.colourspace("srgb")  # 16-bit, Lab...: to 8-bit sRGB
    if image.hasalpha():
        image = image.flatten(background=[255, 255, 255])
    if image.bands == 1:
        image = image.bandjoin([image, image])
    elif image.bands > 3:
        image = image.extract_band(0, n=3)
    return image.cast("uchar")


_T = TypeVar("_T")


def vips_run(image: Any, action: Callable[[Any], _T], info: ImageInfo,
             deadline_s: float | None) -> _T:
    """Run ``action(image)`` (the call that makes libvips compute, e.g. a save), stopping
    it at the deadline: a timer kills the image, and libvips checks that flag between
    the strips it computes."""
    pyvips = vips()
    stopped = threading.Event()
    timer: threading.Timer | None = None
    if deadline_s is not None:
        if deadline_s <= 0:
            raise deadline_error(deadline_s)

        def stop() -> None:
            stopped.set()
            image.set_kill(True)

        timer = threading.Timer(deadline_s, stop)
        timer.daemon = True
        timer.start()
    try:
        return action(image)
    except pyvips.Error as exc:
        if stopped.is_set():
            raise deadline_error(deadline_s or 0.0) from None
        message = str(exc).lower()
        problem = "truncated" if "truncated" in message or "read error" in message \
            else "corrupt or unsupported"
        raise _invalid(f"{problem} {info.format} data") from exc
    finally:
        if timer is not None:
            timer.cancel()


def _decode_vips(source: str | memoryview, info: ImageInfo, min_short: int | None,
                 deadline_s: float | None) -> DecodedImage:
    """PNG, TIFF and WebP: libvips reads the file strip by strip and shrinks (a box filter,
    by the same integer factor as :func:`_shrink`) before converting, so neither the
    full-size image nor its conversion is ever held (WebP's frame excepted, which libwebp
    decodes whole and the cost check accounts for)."""
    pyvips = vips()
    image = vips_open(source, info)
    orientation = read_orientation(source, Header(info))
    try:
        factor = 1 if min_short is None else min(info.width, info.height) // min_short
        if factor >= 2 and image.hasalpha():
            # Averaged with their alpha as weights, as Pillow's reduce does: a transparent
            # pixel's colour must not bleed into its neighbours.
            band_format = image.format
            image = image.premultiply().shrink(factor, factor).unpremultiply() \
                .cast(band_format)
        elif factor >= 2:
            image = image.shrink(factor, factor)
        rgb = vips_rgb8(image)
    except pyvips.Error as exc:
        raise _invalid(f"corrupt or unsupported {info.format} data") from exc
    pixels = vips_run(rgb, lambda target: target.write_to_memory(), info, deadline_s)
    result = Image.frombuffer("RGB", (rgb.width, rgb.height), pixels, "raw", "RGB", 0, 1)
    method = _ORIENTATION.get(orientation)
    if method is not None:
        result = result.transpose(method)
    return DecodedImage(result, info)


def _decode_opened(
    image: ImageFile.ImageFile, header: ImageInfo, max_pixels: int, min_short: int | None
) -> DecodedImage:
    width, height = image.size
    # Pillow grows a GIF's canvas to fit a first frame that reaches past the logical screen:
    # the size checked (and reported) is Pillow's. Other formats must agree with the header;
    # e.g. a JPEG with two frame headers: Pillow sizes by the last, libjpeg by the first.
    if header.format != "GIF" and (width, height) != (header.width, header.height):
        raise _invalid(f"{header.format} headers disagree on the image size")
    info = ImageInfo(width, height, header.format)
    check_pixels(info, max_pixels)

    if min_short is not None and header.format == "JPEG":
        request = _draft_request(width, height, min_short)
        if request is not None:
            image.draft("RGB", request)
    image.load()
    orientation = _orientation(image)

    result = _to_rgb(_shrink(_normalize(image), min_short))
    method = _ORIENTATION.get(orientation)
    if method is not None:
        result = result.transpose(method)
    if result is image:
        # Nothing was converted: hand out a plain Image over the same pixels, so the result
        # keeps no reference to the input buffer or file.
        result = image._new(image.im)
    return DecodedImage(result, info)


def _draft_request(width: int, height: int, min_short: int) -> tuple[int, int] | None:
    """The size to ask libjpeg for: the image's aspect ratio, shorter side ``min_short``.

    JpegImageFile.draft picks the largest scale 1/s (s in 8, 4, 2) that keeps the decoded
    size at least this large in both directions, so the shorter side stays >= min_short.
    """
    short, long_ = min(width, height), max(width, height)
    if short < 2 * min_short:
        return None  # libjpeg could not scale by even 1/2
    long_request = -(-long_ * min_short // short)  # ceil: never ask for less than the ratio
    return (min_short, long_request) if width <= height else (long_request, min_short)


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:
        # EXIF is optional metadata: a damaged block must not fail an image whose pixels
        # decoded fine; it is then shown as stored.
        return 1
    return value if isinstance(value, int) else 1


def _normalize(image: Image.Image) -> Image.Image:
    """Convert to a mode that ``reduce`` and :func:`_to_rgb` handle (L, LA, RGB, RGBA, CMYK,
    YCbCr), keeping transparency as an alpha band. Cheap modes are left alone so the
    conversion happens after shrinking."""
    mode = image.mode
    transparent = "transparency" in image.info
    if mode in ("RGB", "L"):
        return image.convert("RGBA") if transparent else image
    if mode in ("RGBA", "LA", "CMYK", "YCbCr"):
        return image
    if mode in ("P", "PA"):
        return image.convert("RGBA" if transparent or mode == "PA" else "RGB")
    if mode == "1":
        return image.convert("L")
    if mode in ("La", "RGBa"):
        return image.convert("RGBA")  # un-premultiply
    if mode == "I" or mode.startswith("I;16"):
        # Pillow's own I;16 -> L conversion clips at 255 (nearly everything turns white);
        # keep the 8 most significant bits of the 16-bit samples instead. Mode I (32-bit) is
        # assumed to hold 16-bit samples too, as Pillow's 16-bit PNG/TIFF readers produce.
        samples = np.asarray(image)
        return Image.fromarray((np.clip(samples, 0, 0xFFFF) >> 8).astype(np.uint8))
    return image.convert("RGB")  # RGBX, HSV, F...; a mode Pillow cannot convert is invalid


def _shrink(image: Image.Image, min_short: int | None) -> Image.Image:
    if min_short is None:
        return image
    factor = min(image.size) // min_short
    if factor < 2:
        return image
    # Box-average by an integer factor (alpha is premultiplied by Pillow): cheap, free of
    # aliasing, and its rounded-up output keeps the shorter side >= min_short.
    return image.reduce(factor)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA"):
        rgba = image.convert("RGBA") if image.mode == "LA" else image
        flattened = Image.new("RGB", rgba.size, _WHITE)
        flattened.paste(rgba, mask=rgba.getchannel("A"))
        return flattened
    return image.convert("RGB")
