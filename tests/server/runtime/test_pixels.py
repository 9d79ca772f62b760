"""Shared pixels: decoded once, attached by other processes, decoded again only where the
file is not on this machine."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from chunking.errors import ErrorCode, ProtocolError
from server.runtime.pixels import PixelCache, attach, attach_possible, decode_shared


def exif_rotated_jpeg() -> tuple[bytes, np.ndarray]:
    """A JPEG stored 40x30 whose EXIF orientation (6) shows it 30x40; and those pixels."""
    stored = np.zeros((30, 40, 3), np.uint8)
    stored[:, :20] = 255
    out = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored, "RGB").save(out, "JPEG", quality=95, exif=exif)
    shown = np.asarray(Image.open(io.BytesIO(out.getvalue())).transpose(Image.Transpose.ROTATE_270))
    return out.getvalue(), shown


def png(width: int, height: int) -> bytes:
    pixels = np.arange(width * height * 3, dtype=np.uint32).reshape(height, width, 3) % 251
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(out, "PNG")
    return out.getvalue()


def test_regions_are_full_resolution_crops_of_the_displayed_image() -> None:
    data, shown = exif_rotated_jpeg()
    pixels = decode_shared(data, max_pixels=10_000)
    try:
        assert pixels.original == (30, 40)
        region = np.asarray(pixels.region((5, 10, 25, 30)))
        assert region.shape == (20, 20, 3)
        assert np.array_equal(region, shown[10:30, 5:25])
        # Clipped to the image.
        assert pixels.region((20, 30, 99, 99)).size == (10, 10)
    finally:
        pixels.close()


def test_another_process_attaches_without_decoding_and_the_owner_removes_the_file() -> None:
    data = png(50, 20)
    owner = decode_shared(data, max_pixels=10_000)
    attached = attach(owner.handle)
    assert attached is not None
    assert not attached.owner
    assert np.array_equal(np.asarray(attached.region((0, 0, 50, 20))),
                          np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    attached.close()
    assert os.path.exists(owner.path)  # only the owner removes it
    owner.close()
    assert not os.path.exists(owner.path)
    assert attach(owner.handle) is None
    assert not attach_possible(owner.handle)


def test_a_cache_decodes_an_image_once_for_all_its_tiles_when_it_cannot_attach() -> None:
    data = png(40, 40)
    elsewhere = decode_shared(data, max_pixels=10_000)
    handle = elsewhere.handle
    elsewhere.close()  # as on another machine: the file is not here
    cache = PixelCache()
    for box in ((0, 0, 20, 20), (20, 0, 40, 20), (0, 20, 20, 40)):
        assert cache.get(handle, data, max_pixels=10_000).region(box).size == (20, 20)
    assert cache.decodes == 1
    with pytest.raises(FileNotFoundError):
        PixelCache().get(handle, None, max_pixels=10_000)
    cache.close()


def test_a_cache_attaches_where_it_can_and_closes_the_least_recently_used() -> None:
    owners = [decode_shared(png(20, 10 + n), max_pixels=10_000) for n in range(3)]
    cache = PixelCache(capacity=2)
    for owner in owners:
        cache.get(owner.handle, None, max_pixels=10_000)
    assert cache.decodes == 0
    assert owners[0].handle not in cache
    assert owners[2].handle in cache
    cache.close()
    for owner in owners:
        owner.close()


def test_the_pixel_limit_is_checked_before_decoding() -> None:
    with pytest.raises(ProtocolError) as raised:
        decode_shared(png(100, 100), max_pixels=9_999)
    assert raised.value.code is ErrorCode.TOO_MANY_PIXELS
