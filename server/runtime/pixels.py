"""Pixels of one image, decoded once and read as tiles by any worker process on this machine.

A tiled analysis decodes its image ONCE (:func:`decode_shared`, in the worker that plans the
tiles) into a raw RGB file; every tile job names that file by its handle, and a worker reads
a tile's box from it through a memory map (:func:`attach`), never decoding again. A worker on
another machine (``pixelstream worker`` over Redis) cannot attach the file: it decodes the
upload once itself and serves all its tiles of that image from its own copy
(:class:`PixelCache`).

Files are owned by the process that decoded them and removed when it closes them (evicted
from its cache, released by the gateway, or at exit).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import OrderedDict
from typing import Any

import numpy as np
from PIL import Image

from server.pipeline.decode import DecodedImage, decode
from server.tasks.contract import DecodeHint

log = logging.getLogger("pixelstream.worker")

STRIP_ROWS = 256
"""Rows copied to the file at a time: bounds the copy beside the decoded image."""

CACHE_IMAGES = 3
"""Images a worker keeps open for their tiles (most recently used first out last)."""


class SharedPixels:
    """A decoded RGB image in a raw file, read by region. ``handle`` names it for
    :func:`attach` in other processes."""

    def __init__(self, path: str, size: tuple[int, int], info: dict[str, Any],
                 *, owner: bool) -> None:
        self.path = path
        self.original = size
        self.info = info
        self.owner = owner
        width, height = size
        self._map: np.memmap[Any, np.dtype[np.uint8]] | None = np.memmap(
            path, dtype=np.uint8, mode="r", shape=(height, width, 3))

    @property
    def handle(self) -> str:
        width, height = self.original
        return f"{width}x{height}:{self.path}"

    def region(self, box: tuple[int, int, int, int]) -> Image.Image:
        """The full-resolution RGB crop ``box`` (clipped to the image)."""
        if self._map is None:
            raise ValueError("the pixels are closed")
        width, height = self.original
        x0, y0 = max(0, box[0]), max(0, box[1])
        x1, y1 = min(width, box[2]), min(height, box[3])
        return Image.fromarray(np.ascontiguousarray(self._map[y0:y1, x0:x1]), "RGB")

    def close(self) -> None:
        """Unmap; the owner also removes the file (attached maps stay valid until closed)."""
        self._map = None
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def decode_full(source: str | bytes, *, max_pixels: int) -> DecodedImage:
    """THE one decode of an image a spatial task may tile: full resolution, EXIF orientation
    applied. Raises what :func:`server.pipeline.decode.decode` raises (``too_many_pixels``
    before any pixel is decoded, ``invalid_image``)."""
    return decode(source, max_pixels=max_pixels, hint=DecodeHint(min_short_side=None))


def share(decoded: DecodedImage, directory: str | None = None) -> SharedPixels:
    """Write a decoded image to a raw file other processes can :func:`attach`."""
    image = decoded.image
    width, height = image.size
    fd, path = tempfile.mkstemp(prefix="pixelstream-pixels-", suffix=".rgb", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            for top in range(0, height, STRIP_ROWS):
                file.write(image.crop((0, top, width, min(height, top + STRIP_ROWS))).tobytes())
        return SharedPixels(path, (width, height), decoded.info.to_dict(), owner=True)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise


def decode_shared(source: str | bytes, *, max_pixels: int) -> SharedPixels:
    return share(decode_full(source, max_pixels=max_pixels))


def parse_handle(handle: str) -> tuple[tuple[int, int], str]:
    size, _, path = handle.partition(":")
    width, _, height = size.partition("x")
    return (int(width), int(height)), path


def attach_possible(handle: str) -> bool:
    """Whether :func:`attach` would find the pixels' file on this machine."""
    size, path = parse_handle(handle)
    try:
        return os.stat(path).st_size == size[0] * size[1] * 3
    except (OSError, ValueError):
        return False


def attach(handle: str, info: dict[str, Any] | None = None) -> SharedPixels | None:
    """The pixels another process decoded, or None when their file is not here (another
    machine, or already removed)."""
    size, path = parse_handle(handle)
    try:
        if os.stat(path).st_size != size[0] * size[1] * 3:
            return None
        return SharedPixels(path, size, info or {}, owner=False)
    except (OSError, ValueError):
        return None


class PixelCache:
    """A worker's open images by handle, least recently used closed first."""

    def __init__(self, capacity: int = CACHE_IMAGES) -> None:
        self.capacity = capacity
        self._open: OrderedDict[str, SharedPixels] = OrderedDict()
        self.decodes = 0
        """Images this worker decoded (tests and benchmarks count them)."""

    def __contains__(self, handle: str) -> bool:
        return handle in self._open

    def keep(self, handle: str, pixels: SharedPixels) -> None:
        self._open[handle] = pixels
        self._open.move_to_end(handle)
        while len(self._open) > self.capacity:
            _, evicted = self._open.popitem(last=False)
            evicted.close()

    def get(self, handle: str, source: str | bytes | None, *, max_pixels: int) -> SharedPixels:
        """The pixels ``handle`` names: open already, attached, or (``source``: the whole
        upload) decoded here once when the file is not on this machine."""
        pixels = self._open.get(handle)
        if pixels is None:
            pixels = attach(handle)
            if pixels is None:
                if source is None:
                    raise FileNotFoundError("the decoded image is gone")
                pixels = decode_shared(source, max_pixels=max_pixels)
                self.decodes += 1
            self.keep(handle, pixels)
        self._open.move_to_end(handle)
        return pixels

    def release(self, handle: str) -> None:
        pixels = self._open.pop(handle, None)
        if pixels is not None:
            pixels.close()

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()
