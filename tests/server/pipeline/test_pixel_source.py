"""server.pipeline.pixel_source: regions at full resolution from one decode, shared across
processes, whole-image reads, limits and deadlines. Every image is generated here."""

from __future__ import annotations

import io
import multiprocessing
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chunking.errors import ErrorCode, ProtocolError
from server.pipeline import pixel_source
from server.pipeline.decode import decode
from server.pipeline.pixel_source import PixelSource, SharedPixels, attach, open_pixels
from server.tasks.contract import DecodeHint
from tests.support import hostile_images

ROOT = Path(__file__).resolve().parents[3]
MAX_PIXELS = 178_956_970


def pattern(width: int, height: int, seed: int = 0) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1),
                     (x * 7 + y * 3) % 256], axis=-1)
    noise = np.random.default_rng(seed).integers(-10, 11, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def with_orientation(image: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


def upright(data: bytes) -> Image.Image:
    """The reference: Pillow's full-resolution decode, upright, RGB."""
    return decode(data, max_pixels=MAX_PIXELS, hint=DecodeHint(None)).image


def difference(a: Image.Image, b: Image.Image) -> float:
    assert a.size == b.size
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


@pytest.fixture
def opened() -> list[PixelSource]:
    sources: list[PixelSource] = []
    yield sources
    for source in sources:
        source.close()


def open_(data: bytes | str, opened: list[PixelSource], **kwargs: object) -> PixelSource:
    source = open_pixels(data, max_pixels=int(kwargs.pop("max_pixels", MAX_PIXELS)),
                         **kwargs)  # type: ignore[arg-type]
    opened.append(source)
    return source


BOXES = [(0, 0, 40, 30), (17, 5, 90, 61), (60, 40, 97, 71), (0, 0, 97, 71)]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_regions_are_crops_of_the_upright_image(orientation: int,
                                                opened: list[PixelSource]) -> None:
    data = with_orientation(Image.fromarray(pattern(97, 71)), "PNG", orientation)
    reference = upright(data)
    source = open_(data, opened)
    assert source.info.width == 97
    assert source.info.height == 71
    assert source.original == reference.size
    for box in BOXES:
        box = (box[0], box[1], min(box[2], reference.width), min(box[3], reference.height))
        region = source.region(box)
        assert region.mode == "RGB"
        assert np.array_equal(np.asarray(region), np.asarray(reference.crop(box))), box


@pytest.mark.parametrize("orientation", [1, 6, 3])
def test_jpeg_regions_match_pillows_decode(orientation: int, opened: list[PixelSource]) -> None:
    data = with_orientation(Image.fromarray(pattern(160, 120, seed=3)), "JPEG", orientation)
    reference = upright(data)
    source = open_(data, opened)
    assert source.original == reference.size
    box = (10, 20, 100, 110)
    assert difference(source.region(box), reference.crop(box)) < 2.0


@pytest.mark.parametrize(
    ("name", "build"),
    [
        ("rgba png over white", lambda: encode(Image.fromarray(
            np.dstack([pattern(64, 48), np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))]),
            "RGBA"), "PNG")),
        ("16-bit grey png", lambda: encode(Image.fromarray(
            np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21), "PNG")),
        ("palette png", lambda: encode(Image.fromarray(pattern(64, 48)).quantize(16), "PNG")),
        ("grey jpeg", lambda: encode(Image.fromarray(pattern(64, 48)).convert("L"), "JPEG",
                                     quality=95)),
        ("cmyk jpeg", lambda: encode(Image.fromarray(pattern(64, 48)).convert("CMYK"), "JPEG",
                                     quality=95)),
        ("gif", lambda: encode(Image.fromarray(pattern(64, 48)).quantize(32), "GIF")),
        ("webp lossless", lambda: encode(Image.fromarray(pattern(64, 48)), "WEBP",
                                         lossless=True)),
        ("tiff", lambda: encode(Image.fromarray(pattern(64, 48)), "TIFF")),
        ("tiff deflate", lambda: encode(Image.fromarray(pattern(64, 48)), "TIFF",
                                        compression="tiff_adobe_deflate")),
        ("bmp", lambda: encode(Image.fromarray(pattern(64, 48)), "BMP")),
    ],
)
def test_every_format_and_mode_reads_as_the_decoder_shows_it(
        name: str, build: object, opened: list[PixelSource]) -> None:
    data = build()  # type: ignore[operator]
    reference = upright(data)
    source = open_(data, opened)
    box = (5, 7, 60, 44)
    region = source.region(box)
    assert difference(region, reference.crop(box)) < 1.5


def test_a_region_is_clipped_and_an_empty_one_refused(opened: list[PixelSource]) -> None:
    data = encode(Image.fromarray(pattern(50, 40)), "PNG")
    source = open_(data, opened)
    assert source.region((-10, -10, 20, 500)).size == (20, 40)
    with pytest.raises(ValueError, match="outside"):
        source.region((60, 0, 80, 10))


def test_the_image_is_decoded_once_for_all_regions(monkeypatch: pytest.MonkeyPatch,
                                                   opened: list[PixelSource]) -> None:
    calls: list[str] = []
    real = pixel_source._decode_to_raw

    def counting(*args: object, **kwargs: object) -> SharedPixels:
        calls.append("decode")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pixel_source, "_decode_to_raw", counting)
    data = encode(Image.fromarray(pattern(200, 150)), "PNG")
    source = open_(data, opened)
    assert calls == []  # opening reads the header only
    tiles = [source.region((x, y, x + 64, y + 64)) for y in range(0, 150, 48)
             for x in range(0, 200, 48)]
    whole = source.whole(None)
    assert calls == ["decode"]
    assert len(tiles) == 20
    assert np.array_equal(np.asarray(whole), pattern(200, 150))


def read_tile(shared: SharedPixels, box: tuple[int, int, int, int]) -> bytes:
    with attach(shared) as source:
        return source.region(box).tobytes()


def test_other_processes_read_tiles_of_the_one_decode(opened: list[PixelSource]) -> None:
    data = with_orientation(Image.fromarray(pattern(300, 200)), "PNG", 6)
    source = open_(data, opened)
    shared = source.share()
    boxes = [(0, 0, 100, 100), (100, 150, 200, 300), (50, 20, 180, 240)]
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        tiles = pool.starmap(read_tile, [(shared, box) for box in boxes])
    for box, tile in zip(boxes, tiles, strict=True):
        assert tile == source.region(box).tobytes()
    assert os.path.exists(shared.path)  # the attached sources left it to its maker
    source.close()
    assert not os.path.exists(shared.path)


def test_closing_frees_the_raw_file_and_refuses_reads(tmp_path: Path) -> None:
    data = encode(Image.fromarray(pattern(40, 30)), "PNG")
    source = open_pixels(data, max_pixels=MAX_PIXELS, scratch_dir=str(tmp_path))
    source.region((0, 0, 10, 10))
    assert len(list(tmp_path.iterdir())) == 1
    source.close()
    source.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="closed"):
        source.region((0, 0, 10, 10))


@pytest.mark.parametrize("after_regions", [False, True])
def test_whole_is_upright_and_no_smaller_than_asked(after_regions: bool,
                                                    opened: list[PixelSource]) -> None:
    data = with_orientation(Image.fromarray(pattern(900, 600)), "PNG", 8)
    source = open_(data, opened)
    if after_regions:
        source.region((0, 0, 10, 10))
    image = source.whole(128)
    assert image.mode == "RGB"
    assert 128 <= min(image.size) < 256
    assert image.width < image.height  # turned a quarter, as displayed
    reference = upright(data).resize(image.size, Image.Resampling.BOX)
    assert difference(image, reference) < 3.0


def test_a_path_is_read_in_place(tmp_path: Path, opened: list[PixelSource]) -> None:
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode(Image.fromarray(pattern(120, 90)), "JPEG", quality=95))
    source = open_(str(path), opened)
    assert source.info.format == "JPEG"
    assert difference(source.region((0, 0, 120, 90)), upright(path.read_bytes())) < 2.0


@pytest.mark.parametrize(
    "bomb",
    [hostile_images.png_claiming(20000, 20000), hostile_images.jpeg_claiming(20000, 20000),
     hostile_images.webp_vp8x_claiming(16000, 16000), hostile_images.tiff_claiming(30000, 9000)],
)
def test_bombs_are_refused_from_their_header(bomb: bytes) -> None:
    with pytest.raises(ProtocolError) as raised:
        open_pixels(bomb, max_pixels=MAX_PIXELS)
    assert raised.value.code == ErrorCode.TOO_MANY_PIXELS


def test_truncated_and_corrupt_images_are_invalid(opened: list[PixelSource]) -> None:
    data = encode(Image.fromarray(pattern(300, 200)), "PNG")
    for broken in (hostile_images.truncated(data), hostile_images.corrupt_png()):
        source = open_(broken, opened)
        with pytest.raises(ProtocolError) as raised:
            source.region((0, 0, 10, 10))
        assert raised.value.code == ErrorCode.INVALID_IMAGE


def test_a_decode_past_its_deadline_is_stopped(opened: list[PixelSource]) -> None:
    data = encode(Image.fromarray(pattern(600, 400)), "PNG")
    source = open_(data, opened, deadline_s=0.0)
    for read in (lambda: source.region((0, 0, 10, 10)), lambda: source.whole(64)):
        with pytest.raises(ProtocolError) as raised:
            read()
        assert raised.value.code == ErrorCode.TOO_MANY_PIXELS
        assert "longer than 0 s" in raised.value.message


def test_a_running_decode_is_stopped_at_its_deadline(opened: list[PixelSource]) -> None:
    # About 48 MP of noise: seconds of work for libvips, stopped after a twentieth of one.
    noise = np.random.default_rng(9).integers(0, 256, size=(4000, 4000, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG", compress_level=1)
    source = open_(data, opened, deadline_s=0.05)
    with pytest.raises(ProtocolError) as raised:
        source.region((0, 0, 10, 10))
    assert raised.value.code == ErrorCode.TOO_MANY_PIXELS
    assert "longer than 0.05 s" in raised.value.message


MEASURE = textwrap.dedent(
    """
    import re, sys
    from server.pipeline.pixel_source import open_pixels
    from server.pipeline.decode import decode
    from server.tasks.contract import DecodeHint

    def status(key):
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{key}:\\s+(\\d+) kB", f.read(), re.M).group(1))

    path, how = sys.argv[1], sys.argv[2]
    import pyvips
    with open_pixels(path, max_pixels=10**9) as warm:
        warm.info  # modules loaded before measuring
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    if how == "tiles":
        with open_pixels(path, max_pixels=10**9, scratch_dir=sys.argv[3]) as source:
            width, height = source.original
            for y in range(0, height, 512):
                for x in range(0, width, 512):
                    source.region((x, y, x + 512, y + 512)).tobytes()
    else:
        decode(path, max_pixels=10**9, hint=DecodeHint(None))
    print(status("VmHWM") - before)
    """
)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="needs Linux /proc peak-RSS reset")
def test_tiling_a_large_image_costs_a_fraction_of_its_pixels(tmp_path: Path) -> None:
    path = tmp_path / "large.jpg"
    path.write_bytes(encode(Image.fromarray(pattern(4000, 3000)), "JPEG", quality=85))

    def peak_kib(*args: str) -> int:
        completed = subprocess.run([sys.executable, "-c", MEASURE, str(path), *args], cwd=ROOT,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)},
                                   capture_output=True, text=True, check=True, timeout=120)
        return int(completed.stdout.split()[-1])

    whole_kib = peak_kib("whole")
    tiles_kib = peak_kib("tiles", str(tmp_path))
    print(f"full decode {whole_kib} KiB, every 512 px tile {tiles_kib} KiB")
    assert whole_kib > 4000 * 3000 * 3 // 1024  # sanity: the measurement sees pixel memory
    assert tiles_kib * 2 < whole_kib
