"""One uploaded image's pixels: read whole (downscaled) or a full-resolution region at a time.

:func:`open_pixels` checks the header against the limits (nothing is decoded yet) and returns
a :class:`PixelSource`. Its two readers decode lazily, each at most once per image:

* :meth:`PixelSource.whole` — the whole image downscaled for one model pass, through
  :func:`server.pipeline.decode.decode` (JPEG DCT scaling, streaming decoders; no full-size
  buffer for a large image).
* :meth:`PixelSource.region` — a full-resolution crop. The first call decodes the image ONCE,
  streaming, with libvips, into a raw RGB file (3 bytes per stored pixel, on disk in
  ``scratch_dir``): a 12000x9000 JPEG costs the process tens of MiB, not the 324 MB of its
  pixels. Every region is then a few ``pread`` calls of just its rows: memory per tile is the
  tile's. :meth:`PixelSource.share` gives a picklable :class:`SharedPixels` that
  :func:`attach` opens in another process, so several workers read tiles of one image
  decoded once.

Everything here is CPU-bound and blocking: call it in a worker process or thread, never on
the asyncio loop. Errors the client caused are ``ProtocolError`` (``invalid_image``,
``too_many_pixels``), as from :func:`~server.pipeline.decode.decode`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from chunking.errors import ErrorCode, ProtocolError
from server.pipeline.decode import (
    DEFAULT_DECODE_DEADLINE_S,
    ImageInfo,
    decode,
    header_of,
    orientation_method,
    read_orientation,
    vips,
    vips_open,
    vips_rgb8,
    vips_run,
)
from server.tasks.contract import DecodeHint

__all__ = ["PixelSource", "SharedPixels", "attach", "open_pixels"]

BANDS = 3
"""The raw file holds 8-bit RGB, rows top to bottom, in the image's STORED orientation."""

# Orientations that swap width and height (EXIF 5..8: a quarter turn, possibly mirrored).
_QUARTER_TURNS = frozenset({5, 6, 7, 8})
# Formats libvips decodes here (pyvips-binary builds it with libjpeg-turbo, libspng, libtiff,
# libwebp and its own GIF reader); anything else (BMP) is decoded by Pillow into the raw file.
_VIPS_FORMATS = frozenset({"JPEG", "PNG", "GIF", "WEBP", "TIFF"})

@dataclass(frozen=True)
class SharedPixels:
    """A decoded image's raw file, for :func:`attach` in another process (picklable).

    Valid while the :class:`PixelSource` that made it is open: its ``close`` deletes the file.
    """

    path: str
    info: ImageInfo
    stored: tuple[int, int]
    """Width and height of the raw file's pixels (the stored orientation)."""
    orientation: int
    """EXIF orientation (1..8) still to apply to what is read from the file."""


def _displayed(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation in _QUARTER_TURNS else size


def _stored_box(box: tuple[int, int, int, int], stored: tuple[int, int],
                orientation: int) -> tuple[int, int, int, int]:
    """The box of the stored pixels that shows ``box`` of the displayed image (edges in pixel
    units, so a box maps to a box of the same area)."""
    w, h = stored
    x0, y0, x1, y1 = box
    corners = {
        1: ((x0, y0), (x1, y1)),
        2: ((w - x0, y0), (w - x1, y1)),
        3: ((w - x0, h - y0), (w - x1, h - y1)),
        4: ((x0, h - y0), (x1, h - y1)),
        5: ((y0, x0), (y1, x1)),
        6: ((y0, h - x0), (y1, h - x1)),
        7: ((w - y0, h - x0), (w - y1, h - x1)),
        8: ((w - y0, x0), (w - y1, x1)),
    }[orientation]
    (ax, ay), (bx, by) = corners
    return min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)


class PixelSource:
    """One image's pixels; see the module's docstring. Not thread-safe: one user at a time.

    ``info``: the stored width, height and format (the protocol's ``image`` object).
    ``original``: the displayed ``(width, height)``, EXIF orientation applied; the boxes of
    :meth:`region` are in these coordinates.
    """

    def __init__(self, info: ImageInfo, original: tuple[int, int], *,
                 source: str | bytes | memoryview | None, max_pixels: int,
                 deadline_s: float | None, scratch_dir: str | None,
                 shared: SharedPixels | None = None) -> None:
        self.info = info
        self.original = original
        self._source = source
        self._max_pixels = max_pixels
        self._deadline_s = deadline_s
        self._scratch_dir = scratch_dir
        self._shared = shared
        self._owns_file = shared is None
        self._fd: int | None = None
        self._closed = False

    # -- readers ---------------------------------------------------------------------------

    def whole(self, min_short_side: int | None) -> Image.Image:
        """The whole image in RGB, upright, its shorter side shrunk to no less than
        ``min_short_side`` (never upscaled; ``None``: full size). Once :meth:`region` or
        :meth:`share` has decoded the image, this reads that decode instead of decoding
        again."""
        self._check_open()
        if self._shared is not None:
            return self._whole_from_raw(min_short_side)
        assert self._source is not None
        decoded = decode(self._source, max_pixels=self._max_pixels,
                         hint=DecodeHint(min_short_side), deadline_s=self._deadline_s)
        return decoded.image

    def region(self, box: tuple[int, int, int, int]) -> Image.Image:
        """A full-resolution RGB crop of the displayed image; ``box`` is ``(x0, y0, x1, y1)``
        in :attr:`original` pixels, clipped to the image (an empty result raises
        ``ValueError``). The first call decodes the image (see :meth:`share`)."""
        self._check_open()
        width, height = self.original
        x0, y0 = max(0, box[0]), max(0, box[1])
        x1, y1 = min(width, box[2]), min(height, box[3])
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {box} lies outside the {width}x{height} image")
        shared = self.share()
        sx0, sy0, sx1, sy1 = _stored_box((x0, y0, x1, y1), shared.stored, shared.orientation)
        pixels = np.empty((sy1 - sy0, sx1 - sx0, BANDS), np.uint8)
        row_bytes = shared.stored[0] * BANDS
        fd = self._raw_fd()
        for row in range(sy1 - sy0):
            wanted = pixels[row].nbytes
            got = os.preadv(fd, [pixels[row]], (sy0 + row) * row_bytes + sx0 * BANDS)
            if got != wanted:
                raise RuntimeError("the decoded image's file is shorter than its size")
        crop = Image.fromarray(pixels, "RGB")
        method = orientation_method(shared.orientation)
        return crop if method is None else crop.transpose(method)

    def share(self) -> SharedPixels:
        """Decode the image once, streaming, into a raw file and describe it for
        :func:`attach`. Later calls (and :meth:`region`) reuse it."""
        self._check_open()
        if self._shared is None:
            assert self._source is not None
            self._shared = _decode_to_raw(self._source, self.info, self._max_pixels,
                                          self._deadline_s, self._scratch_dir)
        return self._shared

    def close(self) -> None:
        """Free the raw file (when this source made it) and its descriptor. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._owns_file and self._shared is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._shared.path)
        self._source = None

    def __enter__(self) -> PixelSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the pixel source is closed")

    def _raw_fd(self) -> int:
        if self._fd is None:
            assert self._shared is not None
            self._fd = os.open(self._shared.path, os.O_RDONLY)
        return self._fd

    def _whole_from_raw(self, min_short_side: int | None) -> Image.Image:
        assert self._shared is not None
        shared = self._shared
        width, height = shared.stored
        raw = vips().Image.rawload(shared.path, width, height, BANDS)
        factor = 1 if min_short_side is None else min(width, height) // min_short_side
        if factor >= 2:
            raw = raw.shrink(factor, factor)  # a box filter, streamed over the file's rows
        pixels = raw.write_to_memory()
        image = Image.frombytes("RGB", (raw.width, raw.height), pixels)
        method = orientation_method(shared.orientation)
        return image if method is None else image.transpose(method)


def open_pixels(source: str | bytes | memoryview, *, max_pixels: int,
                deadline_s: float | None = DEFAULT_DECODE_DEADLINE_S,
                scratch_dir: str | None = None) -> PixelSource:
    """Open an image file (a path) or buffer for :meth:`PixelSource.whole` / ``region``.

    Reads only the header here: the size and format are checked against ``max_pixels`` and
    the same limits :func:`~server.pipeline.decode.decode` applies before any
    pixel is decoded; raises ``ProtocolError(invalid_image | too_many_pixels)``.
    ``deadline_s`` bounds every decode this source makes (each one, from its start; None:
    no limit): one running past it stops and raises ``too_many_pixels``. ``scratch_dir``:
    where the raw file of a region decode goes (default: the temp directory; a disk, not a
    tmpfs, keeps the memory flat). A buffer must not change while the source is open.
    Close the source (or use it as a context manager) to free its file.
    """
    data: str | bytes | memoryview = source if isinstance(source, (str, bytes)) \
        else memoryview(source).cast("B")
    header = header_of(data, max_pixels)
    orientation = read_orientation(data, header)
    original = _displayed((header.info.width, header.info.height), orientation)
    return PixelSource(header.info, original, source=data, max_pixels=max_pixels,
                       deadline_s=deadline_s, scratch_dir=scratch_dir)


def attach(shared: SharedPixels) -> PixelSource:
    """Open, in any process, the raw file another :class:`PixelSource` made with
    :meth:`~PixelSource.share`: ``region`` and ``whole`` read that file without decoding
    again. Closing the attached source leaves the file to its maker."""
    original = _displayed(shared.stored, shared.orientation)
    return PixelSource(shared.info, original, source=None, max_pixels=0, deadline_s=None,
                       scratch_dir=None, shared=shared)


# ------------------------------------------------------------------------------------------
# The one full-resolution decode.


def _raw_path(scratch_dir: str | None) -> str:
    directory = Path(scratch_dir or tempfile.gettempdir())
    return str(directory / f"pixelstream-pixels-{secrets.token_hex(8)}.rgb")


def _decode_to_raw(source: str | bytes | memoryview, info: ImageInfo, max_pixels: int,
                   deadline_s: float | None, scratch_dir: str | None) -> SharedPixels:
    path = _raw_path(scratch_dir)
    try:
        if info.format in _VIPS_FORMATS:
            stored, orientation = _vips_to_raw(source, info, deadline_s, path)
        else:
            stored, orientation = _pillow_to_raw(source, max_pixels, deadline_s, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    return SharedPixels(path, info, stored, orientation)


def _vips_to_raw(source: str | bytes | memoryview, info: ImageInfo,
                 deadline_s: float | None, path: str) -> tuple[tuple[int, int], int]:
    pyvips = vips()
    image = vips_open(source, info)
    try:
        orientation = image.get("orientation") if image.get_typeof("orientation") else 1
        rgb = vips_rgb8(image)
    except pyvips.Error as exc:
        raise ProtocolError(ErrorCode.INVALID_IMAGE,
                            f"corrupt or unsupported {info.format} data") from exc
    vips_run(rgb, lambda target: target.rawsave(path), info, deadline_s)
    return (rgb.width, rgb.height), orientation if orientation in range(1, 9) else 1


def _pillow_to_raw(source: str | bytes | memoryview, max_pixels: int,
                   deadline_s: float | None, path: str) -> tuple[tuple[int, int], int]:
    """For formats libvips does not read here: Pillow decodes the whole image (the decode
    cost was bounded by the header checks), written upright, so no orientation is left."""
    image = decode(source, max_pixels=max_pixels, hint=DecodeHint(None),
                   deadline_s=deadline_s).image
    with open(path, "wb") as file:
        step = max(1, (1 << 22) // max(1, image.width * BANDS))  # about 4 MiB of rows a write
        for top in range(0, image.height, step):
            file.write(image.crop((0, top, image.width, min(image.height, top + step)))
                       .tobytes())
    return image.size, 1
