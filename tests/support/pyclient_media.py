"""Images and videos the client tests generate: each one's right answer is known in advance."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload)))


def solid_png(rgb: tuple[int, int, int], *, pad: int = 0, seed: int = 0,
              size: tuple[int, int] = (64, 48)) -> bytes:
    """A PNG of one colour, made ``pad`` bytes larger by a private ancillary chunk (random
    bytes, which decoders skip): big enough to need many chunks, and the ``colors`` task
    still answers exactly ``[{"hex": <that colour>, "fraction": 1.0}]``."""
    out = io.BytesIO()
    Image.new("RGB", size, rgb).save(out, "PNG")
    data = out.getvalue()
    if pad <= 0:
        return data
    filler = np.random.default_rng(seed).bytes(pad)
    ihdr_end = 8 + 25  # signature, then IHDR (length, type, 13 bytes, CRC)
    return data[:ihdr_end] + _png_chunk(b"prVt", filler) + data[ihdr_end:]


def hex_of(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def distinct_colors(count: int) -> list[tuple[int, int, int]]:
    """``count`` colours far apart from each other (the palette reproduces them exactly)."""
    colors = []
    for index in range(count):
        colors.append(((37 * index + 20) % 256, (91 * index + 60) % 256, (53 * index + 100) % 256))
    assert len(set(colors)) == count
    return colors


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header announcing ``width`` x ``height`` and no pixel data: a decompression-bomb
    stand-in that the server must refuse from its header alone."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def write_video(path: Path, colors: Sequence[tuple[int, int, int]], *, size: tuple[int, int]
                = (160, 120), fps: float = 30.0) -> Path:
    """An MJPG .avi with one solid frame per colour (OpenCV's BGR order handled here)."""
    import cv2

    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    assert writer.isOpened(), "OpenCV cannot write MJPG here"
    for r, g, b in colors:
        writer.write(np.full((height, width, 3), (b, g, r), np.uint8))
    writer.release()
    return path
