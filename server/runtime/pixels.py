"""A worker's open images for tiled analyses, over :mod:`server.pipeline.pixel_source`.

A tiled analysis decodes its image ONCE, in the worker that plans the tiles
(:meth:`PixelSource.share`: a streaming decode into a raw file); every tile job names that
file by a handle (a string, so it travels through Redis too), and a worker reads each tile's
box from it (:func:`server.pipeline.pixel_source.attach`), never decoding again. A worker on
another machine (``pixelstream worker`` over Redis) cannot attach the file: it decodes the
upload once itself and serves all its tiles of that image from its own copy.

The raw file belongs to the source that decoded it and goes when that source is closed:
evicted from its worker's :class:`PixelCache`, released by the gateway once the analysis
ends, or at the worker's exit.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import orjson

from server.pipeline.decode import ImageInfo
from server.pipeline.pixel_source import PixelSource, SharedPixels, attach, open_pixels

CACHE_IMAGES = 3
"""Images a worker keeps open for their tiles (the least recently used is closed first)."""


def handle_of(shared: SharedPixels) -> str:
    """A string naming ``shared`` for :func:`shared_from` in another process."""
    return orjson.dumps({"path": shared.path, "info": shared.info.to_dict(),
                         "stored": shared.stored, "orientation": shared.orientation}).decode()


def shared_from(handle: str) -> SharedPixels:
    fields = orjson.loads(handle)
    info = fields["info"]
    return SharedPixels(fields["path"], ImageInfo(info["width"], info["height"], info["format"]),
                        tuple(fields["stored"]), fields["orientation"])


def attach_possible(handle: str) -> bool:
    """Whether the pixels' file is on this machine (so a tile needs no copy of the upload)."""
    shared = shared_from(handle)
    try:
        return os.stat(shared.path).st_size == shared.stored[0] * shared.stored[1] * 3
    except OSError:
        return False


class PixelCache:
    """A worker's open images by handle, least recently used closed first."""

    def __init__(self, capacity: int = CACHE_IMAGES) -> None:
        self.capacity = capacity
        self._open: OrderedDict[str, PixelSource] = OrderedDict()
        self.decodes = 0
        """Images this worker decoded for tiles of another's plan (a file it could not
        attach); tests and benchmarks count them."""

    def __contains__(self, handle: str) -> bool:
        return handle in self._open

    def share(self, source: PixelSource) -> str:
        """Decode ``source`` once into its raw file and keep it open here; its handle."""
        handle = handle_of(source.share())
        self._keep(handle, source)
        return handle

    def get(self, handle: str, source: str | bytes | None, *, max_pixels: int) -> PixelSource:
        """The pixels ``handle`` names: open here already, attached, or (``source``: the whole
        upload) decoded here once when the file is not on this machine."""
        pixels = self._open.get(handle)
        if pixels is None:
            if attach_possible(handle):
                pixels = attach(shared_from(handle))
            elif source is None:
                raise FileNotFoundError("the decoded image is gone")
            else:
                pixels = open_pixels(source, max_pixels=max_pixels)
                pixels.share()
                self.decodes += 1
            self._keep(handle, pixels)
        self._open.move_to_end(handle)
        return pixels

    def release(self, handle: str) -> None:
        pixels = self._open.pop(handle, None)
        if pixels is not None:
            pixels.close()

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

    def _keep(self, handle: str, pixels: PixelSource) -> None:
        self._open[handle] = pixels
        self._open.move_to_end(handle)
        while len(self._open) > self.capacity:
            self._open.popitem(last=False)[1].close()
