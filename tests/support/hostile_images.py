"""Crafted images: decompression bombs in every supported format, truncated and corrupt files,
polyglots. Small on the wire, each built from a real image with its header patched (checksums
fixed where the format has them), or from scratch where that is simpler."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

from tests.conftest import make_image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR claims other dimensions, CRC fixed."""
    data = bytearray(make_image(1, 1, "PNG"))
    ihdr = 16
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def png_zero_bomb(side: int = 8000) -> bytes:
    """An honest PNG bomb: a side x side greyscale image of zeros, which deflate squeezes
    about a thousandfold (64 MB of pixels in tens of kilobytes)."""
    raw = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte, then the row
    body = b"".join(raw.compress(row) for _ in range(side)) + raw.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body)
            + png_chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) claims other dimensions."""
    data = bytearray(make_image(16, 16, "JPEG"))
    at = data.index(b"\xff\xc0")
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    """A real GIF whose logical screen and image descriptor claim other dimensions."""
    data = bytearray(make_image(8, 8, "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    at = data.index(b"\x2c", 13)  # the image descriptor
    data[at + 5 : at + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def webp_claiming(width: int, height: int) -> bytes:
    """A real lossless WebP (VP8L) whose bitstream header claims other dimensions (14 bits
    each: at most 16384)."""
    out = io.BytesIO()
    Image.frombytes("RGB", (8, 8), bytes(range(192))).save(out, "WEBP", lossless=True)
    data = bytearray(out.getvalue())
    assert data[12:16] == b"VP8L"
    (bits,) = struct.unpack("<I", data[21:25])
    bits = (bits & ~0x0FFFFFFF) | (width - 1) | ((height - 1) << 14)
    data[21:25] = struct.pack("<I", bits)
    return bytes(data)


def webp_vp8x_claiming(width: int, height: int) -> bytes:
    """An extended WebP whose canvas (24-bit sizes) claims other dimensions."""
    header = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00"
    header += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(header)) + b"WEBP" + header


def bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(make_image(4, 4, "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def tiff_claiming(width: int, height: int, *, bits: int | None = None,
                  samples: int | None = None) -> bytes:
    """A minimal little-endian TIFF directory with a width and a height (and, if given,
    BitsPerSample and SamplesPerPixel; no RowsPerStrip: one strip of the whole image)."""
    tags = [(256, 4, width), (257, 4, height)]
    if bits is not None:
        tags.append((258, 3, bits))
    if samples is not None:
        tags.append((277, 3, samples))
    entries = b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in tags)
    return (b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags)) + entries
            + b"\x00" * 4)


def png_interlaced_claiming(width: int, height: int) -> bytes:
    """A real 1x1 Adam7-interlaced RGB PNG whose IHDR claims other dimensions."""
    data = bytearray(png_claiming(width, height))
    ihdr = 16
    data[ihdr + 12] = 1  # interlace method: Adam7
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def png_16bit_zero_bomb(side: int = 13000) -> bytes:
    """An honest 16-bit greyscale PNG of zeros: side x side (13000: 338 MB of samples) in
    about 1.5 MB (deflate at its fastest level; level 9 would give about 330 KB)."""
    deflate = zlib.compressobj(1)
    row = b"\x00" * (2 * side + 1)
    body = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body)
            + png_chunk(b"IEND", b""))


def progressive_jpeg_claiming(width: int, height: int, *, extra_scans: int = 0,
                              subsampling: int = 2) -> bytes:
    """A real 16x16 progressive JPEG whose frame header (SOF2) claims other dimensions: its
    few bytes of scans leave libjpeg to fill every coefficient of the claimed size, which it
    keeps whole. ``extra_scans`` repeats the last scan that many times (each costs a pass
    over every coefficient). ``subsampling``: Pillow's code (0: 4:4:4, 2: 4:2:0)."""
    data = bytearray(make_image(16, 16, "JPEG", progressive=True, subsampling=subsampling))
    at = data.index(b"\xff\xc2")
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    last_scan = data.rindex(b"\xff\xda")
    end = data.rindex(b"\xff\xd9")
    scan = bytes(data[last_scan:end])
    return bytes(data[:end]) + scan * extra_scans + b"\xff\xd9"


def baseline_jpeg_non_interleaved_claiming(width: int, height: int) -> bytes:
    """A baseline JPEG whose first scan holds one component of three: libjpeg must then
    buffer every coefficient, as for a progressive one (built by splitting the single
    interleaved scan's header into the claim; the decoder fails later, after allocating)."""
    data = bytearray(jpeg_claiming(width, height))
    at = data.index(b"\xff\xda")
    # SOS: length, Ns, (Cs, Td/Ta) x Ns, Ss, Se, Ah/Al. Keep only the first component.
    ns = data[at + 4]
    components = bytes(data[at + 5 : at + 5 + 2 * ns])
    tail = bytes(data[at + 5 + 2 * ns : at + 8 + 2 * ns])
    header = b"\xff\xda" + struct.pack(">HB", 6 + 2, 1) + components[:2] + tail
    return bytes(data[:at]) + header + bytes(data[at + 8 + 2 * ns :])


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    return data[: int(len(data) * keep)]


def corrupt_png() -> bytes:
    """A PNG whose compressed pixels are garbage (checksums recomputed, so only inflating
    the data finds out)."""
    data = bytearray(make_image(64, 48, "PNG", seed=7))
    at = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[at - 4 : at])
    body = data[at + 4 : at + 4 + length]
    data[at + 4 : at + 4 + length] = bytes((b * 7 + 13) & 0xFF for b in body)
    crc = zlib.crc32(bytes(data[at : at + 4 + length])) & 0xFFFFFFFF
    data[at + 4 + length : at + 8 + length] = struct.pack(">I", crc)
    return bytes(data)


def jpeg_html_polyglot() -> bytes:
    """JPEG's magic, then a web page: a "JPEG" with no frame header."""
    return b"\xff\xd8\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9 + (
        b"<html><script>alert(document.cookie)</script></html>")


def gif_script_polyglot() -> bytes:
    """The classic GIF/JavaScript polyglot: ``GIF89a/*`` parses as a huge logical screen."""
    return b"GIF89a/*\x00\x00\x00\x00*/=alert(1);//" + b"\x00" * 32


def png_zip_polyglot() -> bytes:
    """A valid PNG with a ZIP archive after its IEND: an image to us, nothing more."""
    archive = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("payload.sh", "#!/bin/sh\necho pwned\n")
    return make_image(48, 32, "PNG", seed=8) + archive.getvalue()
