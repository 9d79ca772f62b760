"""A worker's open images for tiles: decoded once by the planner, attached by other workers,
decoded again only where the file is not on this machine."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from server.pipeline.pixel_source import open_pixels
from server.runtime.pixels import PixelCache, attach_possible, handle_of, shared_from

MAX_PIXELS = 10_000


def exif_rotated_jpeg() -> tuple[bytes, np.ndarray]:
    """A JPEG stored 40x30 whose EXIF orientation (6) shows it 30x40; and those pixels."""
    stored = np.zeros((30, 40, 3), np.uint8)
    stored[:, :20] = 255
    out = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored, "RGB").save(out, "JPEG", quality=95, exif=exif)
    decoded = Image.open(io.BytesIO(out.getvalue())).convert("RGB")
    return out.getvalue(), np.asarray(decoded.transpose(Image.Transpose.ROTATE_270))


def png(width: int, height: int) -> bytes:
    pixels = np.arange(width * height * 3, dtype=np.uint32).reshape(height, width, 3) % 251
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(out, "PNG")
    return out.getvalue()


def test_a_handle_names_the_shared_pixels_as_a_string() -> None:
    data, _ = exif_rotated_jpeg()
    with open_pixels(data, max_pixels=MAX_PIXELS) as source:
        shared = source.share()
        handle = handle_of(shared)
        assert isinstance(handle, str)
        assert shared_from(handle) == shared


def test_other_caches_attach_the_planners_decode_and_read_displayed_regions() -> None:
    data, shown = exif_rotated_jpeg()
    planner = PixelCache()
    handle = planner.share(open_pixels(data, max_pixels=MAX_PIXELS))
    other = PixelCache()
    pixels = other.get(handle, None, max_pixels=MAX_PIXELS)  # no upload: it must attach
    assert pixels.original == (30, 40)
    assert np.array_equal(np.asarray(pixels.region((5, 10, 25, 30))), shown[10:30, 5:25])
    assert other.decodes == 0
    other.close()
    assert attach_possible(handle)  # only the planner removes the file
    planner.release(handle)
    assert not attach_possible(handle)
    with pytest.raises(FileNotFoundError):
        PixelCache().get(handle, None, max_pixels=MAX_PIXELS)


def test_where_it_cannot_attach_a_cache_decodes_once_for_all_its_tiles() -> None:
    data = png(40, 40)
    planner = PixelCache()
    handle = planner.share(open_pixels(data, max_pixels=MAX_PIXELS))
    planner.close()  # as on another machine: the file is not here
    cache = PixelCache()
    for box in ((0, 0, 20, 20), (20, 0, 40, 20), (0, 20, 20, 40)):
        assert cache.get(handle, data, max_pixels=MAX_PIXELS).region(box).size == (20, 20)
    assert cache.decodes == 1
    cache.close()


def test_a_cache_closes_the_least_recently_used_and_removes_what_it_decoded() -> None:
    cache = PixelCache(capacity=2)
    handles = [cache.share(open_pixels(png(20, 10 + n), max_pixels=MAX_PIXELS))
               for n in range(3)]
    assert handles[0] not in cache
    assert not os.path.exists(shared_from(handles[0]).path)
    assert all(attach_possible(handle) for handle in handles[1:])
    cache.close()
    assert not any(attach_possible(handle) for handle in handles)
