"""server.pipeline.decode: header probing, bomb rejection, reduced decoding, RGB conversion.

Every image is generated here with Pillow/numpy (a few are assembled or patched by hand).
"""

from __future__ import annotations

import inspect
import io
import os
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, ImageOps

from chunking.errors import ErrorCode, ProtocolError
from server.pipeline import decode as decode_module
from server.pipeline.decode import (
    DECODE_MEMORY_BUDGET,
    DEFAULT_DECODE_DEADLINE_S,
    MAX_JPEG_SCANS,
    MIN_JPEG_SCANS,
    DecodedImage,
    ImageInfo,
    check_pixels,
    decode,
    header_of,
    probe,
)
from server.tasks.contract import DecodeHint
from tests.support import hostile_images as bad

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_MAX_PIXELS = 178_956_970  # the protocol's advertised default


# ------------------------------------------------------------------------------------------
# Builders


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def pattern(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth colour gradient plus noise: realistic for JPEG, not constant."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [
            x * 255 // max(width - 1, 1),
            y * 255 // max(height - 1, 1),
            (x + y) * 127 // (width + height),
        ],
        axis=-1,
    )
    noise = np.random.default_rng(seed).integers(-12, 13, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def pattern_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(pattern(width, height, seed))


def translucent(image: Image.Image) -> Image.Image:
    """The image with some alpha below 255 (so WebP writes an extended VP8X file)."""
    rgba = image.convert("RGBA")
    rgba.putalpha(200)
    return rgba


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG assembled by hand, for sample formats Pillow does not write (16-bit RGB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def jpeg_segments(data: bytes) -> Iterator[tuple[int, int]]:
    """(offset of the 0xFF, marker) for each segment up to the first SOS, walked by length."""
    pos = 2
    while True:
        assert data[pos] == 0xFF
        marker = data[pos + 1]
        yield pos, marker
        if marker == 0xDA:
            return
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]


def gif_descriptor_offset(data: bytes) -> int:
    """Offset of the first image descriptor's left/top/width/height fields."""
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while data[pos] == 0x21:  # extension: label, then sub-blocks up to a zero size
        pos += 2
        while data[pos]:
            pos += data[pos] + 1
        pos += 1
    assert data[pos] == 0x2C
    return pos + 1


# Header patches that claim another size without touching the pixel data.


def patch_png(data: bytes, width: int, height: int) -> bytes:
    body = struct.pack(">II", width, height) + data[24:29]
    return data[:8] + png_chunk(b"IHDR", body) + data[33:]


def patch_jpeg(data: bytes, width: int, height: int) -> bytes:
    at = next(pos for pos, marker in jpeg_segments(data) if marker in (0xC0, 0xC2))
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]


def patch_gif(data: bytes, width: int, height: int, *, frame: bool = True) -> bytes:
    out = bytearray(data)
    out[6:10] = struct.pack("<HH", width, height)
    if frame:
        at = gif_descriptor_offset(data)
        out[at + 4 : at + 8] = struct.pack("<HH", width, height)
    return bytes(out)


def patch_webp(data: bytes, width: int, height: int) -> bytes:
    out = bytearray(data)
    chunk = bytes(out[12:16])
    if chunk == b"VP8X":
        out[24:27] = (width - 1).to_bytes(3, "little")
        out[27:30] = (height - 1).to_bytes(3, "little")
    elif chunk == b"VP8L":
        (bits,) = struct.unpack("<I", out[21:25])
        bits = (bits & ~0x0FFFFFFF) | (width - 1) | ((height - 1) << 14)
        out[21:25] = struct.pack("<I", bits)
    else:
        assert chunk == b"VP8 "
        out[26:30] = struct.pack("<HH", width, height)
    return bytes(out)


def patch_bmp(data: bytes, width: int, height: int) -> bytes:
    return data[:18] + struct.pack("<ii", width, height) + data[26:]


def patch_tiff(data: bytes, width: int, height: int) -> bytes:
    assert data[:4] == b"II*\x00"
    out = bytearray(data)
    (ifd,) = struct.unpack("<I", data[4:8])
    (count,) = struct.unpack("<H", data[ifd : ifd + 2])
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        (tag,) = struct.unpack("<H", data[entry : entry + 2])
        if tag in (256, 257):
            value = width if tag == 256 else height
            out[entry + 2 : entry + 4] = struct.pack("<H", 4)  # LONG
            out[entry + 8 : entry + 12] = struct.pack("<I", value)
    return bytes(out)


def expect_error(code: ErrorCode, call: Callable[[], object]) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        call()
    assert caught.value.code == code, caught.value.message
    return caught.value


def outcome(call: Callable[[], object]) -> object:
    """The call's result, or the ProtocolError it raised (any other exception propagates)."""
    try:
        return call()
    except ProtocolError as exc:
        return exc


def run_decode(
    data: bytes | bytearray | memoryview | str | os.PathLike[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    short: int | None = None,
) -> DecodedImage:
    result = decode(data, max_pixels=max_pixels, hint=DecodeHint(short))
    assert result.image.mode == "RGB"
    return result


def pixels(result: DecodedImage) -> np.ndarray:
    return np.asarray(result.image).astype(int)


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6000x4000 photo-like JPEG on disk (~8 MB)."""
    path = tmp_path_factory.mktemp("big") / "big.jpg"
    pattern_image(6000, 4000, seed=7).save(path, "JPEG", quality=90)
    return path


# ------------------------------------------------------------------------------------------
# probe


SMALL = pattern_image(123, 45)


def small_images() -> list[tuple[str, bytes]]:
    rgba = translucent(SMALL)
    bmp = encode(SMALL, "BMP")
    # BITMAPCOREHEADER (12 bytes): bottom-up rows of BGR pixels, each padded to 4 bytes.
    rows = np.asarray(SMALL)[::-1, :, ::-1].reshape(45, 369)
    pixel_data = np.hstack([rows, np.zeros((45, 3), np.uint8)]).tobytes()
    core_bmp = (
        b"BM"
        + struct.pack("<IHHI", 26 + len(pixel_data), 0, 0, 26)
        + struct.pack("<IHHHH", 12, 123, 45, 1, 24)
        + pixel_data
    )
    return [
        ("jpeg", encode(SMALL, "JPEG")),
        ("jpeg-progressive", encode(SMALL, "JPEG", progressive=True)),
        ("png", encode(SMALL, "PNG")),
        ("gif", encode(SMALL, "GIF")),
        ("webp-lossy", encode(SMALL, "WEBP")),
        ("webp-lossless", encode(SMALL, "WEBP", lossless=True)),
        ("webp-extended", encode(rgba, "WEBP")),  # alpha: a VP8X chunk first
        ("bmp", bmp),
        ("bmp-top-down", patch_bmp(bmp, 123, -45)),
        ("bmp-core", core_bmp),
        ("tiff", encode(SMALL, "TIFF")),
        ("tiff-big", encode(SMALL, "TIFF", big_tiff=True)),
        ("tiff-ifd-at-end", encode(SMALL, "TIFF", compression="tiff_lzw")),
    ]


SMALL_IMAGES = small_images()
EXPECTED_FORMAT = {
    "jpeg": "JPEG",
    "png": "PNG",
    "gif": "GIF",
    "webp": "WEBP",
    "bmp": "BMP",
    "tiff": "TIFF",
}


@pytest.mark.parametrize(("name", "data"), SMALL_IMAGES, ids=[i[0] for i in SMALL_IMAGES])
def test_probe_reads_each_format_and_waits_for_incomplete_headers(name: str, data: bytes) -> None:
    expected = ImageInfo(123, 45, EXPECTED_FORMAT[name.split("-")[0]])
    answers = [probe(data[:n]) for n in range(len(data) + 1)]
    # None while the header is incomplete, then the answer for every longer prefix.
    known_from = next(n for n, answer in enumerate(answers) if answer is not None)
    assert known_from > 0
    assert all(answer is None for answer in answers[:known_from])
    assert all(answer == expected for answer in answers[known_from:])
    for buffer in (bytearray(data), memoryview(data)):
        assert probe(buffer) == expected
    result = run_decode(data)
    assert result.info == expected
    if name in ("png", "bmp", "bmp-core", "tiff", "tiff-big", "tiff-ifd-at-end", "webp-lossless"):
        assert result.image.tobytes() == SMALL.tobytes()
    if name == "webp-extended":
        assert data[12:16] == b"VP8X"
    if name == "tiff-ifd-at-end":
        assert known_from > len(data) // 2  # the header really was at the end


def test_probe_big_endian_tiff() -> None:
    entries = [(256, 3, 1, 70 << 16), (257, 4, 1, 30)]  # SHORT values sit left-justified
    ifd = struct.pack(">H", len(entries)) + b"".join(struct.pack(">HHII", *e) for e in entries)
    data = b"MM\x00*" + struct.pack(">I", 8) + ifd + b"\0\0\0\0"
    assert probe(data) == ImageInfo(70, 30, "TIFF")
    assert probe(data[:20]) is None


@pytest.mark.parametrize("as_file", [False, True], ids=["buffer", "file"])
def test_tiff_directory_offsets_past_the_end(as_file: bool, tmp_path: Path) -> None:
    far = b"II+\x00\x08\x00\x00\x00" + struct.pack("<Q", 2**64 - 16) + b"\0" * 64
    assert probe(far) is None  # an upload could still reach it
    path = tmp_path / "far.tif"
    path.write_bytes(far)
    error = expect_error(ErrorCode.INVALID_IMAGE, lambda: run_decode(path if as_file else far))
    assert error.message == "image data ends inside its header"


def test_image_info_to_dict() -> None:
    assert ImageInfo(12000, 9000, "JPEG").to_dict() == {
        "width": 12000,
        "height": 9000,
        "format": "JPEG",
    }


def jpeg_with_big_segments() -> tuple[bytes, int]:
    """A JPEG with ~300 KB of APPn/COM segments and fill bytes ahead of its frame header."""
    exif = Image.Exif()
    exif[0x010E] = "x" * 60000  # ImageDescription: a near-maximal APP1 segment
    icc = b"\0" * 200_000  # split by Pillow over four APP2 segments
    data = encode(SMALL, "JPEG", exif=exif, icc_profile=icc)
    # Add a comment segment and 0xFF fill bytes before it (both legal, both must be skipped).
    com = b"\xff\xfe" + struct.pack(">H", 2 + 30_000) + b"c" * 30_000
    data = data[:2] + b"\xff" * 5 + com + data[2:]
    sof = next(
        pos for pos, marker in jpeg_segments(data.replace(b"\xff" * 5, b"", 1)) if marker == 0xC0
    )
    return data, sof + 5


def test_probe_skips_big_app_segments_and_fill_bytes() -> None:
    data, sof_offset = jpeg_with_big_segments()
    assert sof_offset > 290_000
    assert probe(data[: sof_offset + 4]) is None  # inside the frame header
    assert probe(data[: sof_offset + 9]) == ImageInfo(123, 45, "JPEG")
    assert probe(data) == ImageInfo(123, 45, "JPEG")
    result = run_decode(data)
    assert result.info == ImageInfo(123, 45, "JPEG")
    assert result.image.size == (123, 45)


@pytest.mark.parametrize(
    "insert",
    [b"\xff", b"\xff" * 300, b"\x00\x12junk", b"\xff\x00"],
    ids=["fill", "many-fill", "junk", "stuffed-junk"],
)
def test_probe_skips_fill_bytes_and_junk_before_the_frame_header(insert: bytes) -> None:
    data = encode(SMALL, "JPEG")
    sof = next(pos for pos, marker in jpeg_segments(data) if marker == 0xC0)
    data = data[:sof] + insert + data[sof:]
    assert probe(data[: sof + len(insert) + 8]) is None
    assert probe(data) == ImageInfo(123, 45, "JPEG")
    if insert.startswith(b"\xff\xff") or insert == b"\xff":
        assert run_decode(data).image.size == (123, 45)  # legal: libjpeg accepts it too


@pytest.mark.parametrize(
    "data",
    [
        b"hello, this is plain text and not an image",
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"RIFF\x24\x00\x00\x00WAVEfmt ",  # RIFF but not WebP
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\x04IDAT",  # PNG without IHDR first
        b"\xff\xd8\xff\xda\x00\x08" + b"\0" * 20,  # JPEG scan before any frame header
        b"\xff\xd8\xff\xe0\x00\x01",  # segment length below 2
        b"BM" + b"\0" * 12 + struct.pack("<I", 99) + b"\0" * 8,  # unknown BMP header size
        b"GIF89a\x00\x00\x10\x00\x00",  # zero width
        b"II*\x00\x08\x00\x00\x00\x01\x00" + struct.pack("<HHII", 258, 3, 1, 8) + b"\0" * 4,
        np.random.default_rng(3).bytes(4096),
    ],
    ids=[
        "text",
        "svg",
        "wav",
        "png-no-ihdr",
        "jpeg-no-sof",
        "jpeg-bad-length",
        "bmp",
        "gif-0",
        "tiff-no-size",
        "random",
    ],
)
def test_non_images_are_invalid(data: bytes) -> None:
    expect_error(ErrorCode.INVALID_IMAGE, lambda: probe(data))
    expect_error(ErrorCode.INVALID_IMAGE, lambda: run_decode(data))


@pytest.mark.parametrize(
    "data", [b"", b"\xff", b"\xff\xd8", b"\x89PN", b"GIF8", b"RIFF", b"B", b"II*"]
)
def test_prefixes_of_signatures_need_more_bytes(data: bytes) -> None:
    assert probe(data) is None
    message = expect_error(ErrorCode.INVALID_IMAGE, lambda: run_decode(data)).message
    assert "header" in message


signatures = st.sampled_from(
    [
        b"",
        b"\xff\xd8\xff",
        b"\x89PNG\r\n\x1a\n",
        b"GIF89a",
        b"RIFF\0\0\0\0WEBPVP8",
        b"BM",
        b"II*\x00",
        b"MM\x00+",
    ]
)


@settings(max_examples=1000, deadline=None)
@given(head=signatures, tail=st.binary(max_size=300))
def test_probe_on_arbitrary_bytes_only_raises_invalid_image(head: bytes, tail: bytes) -> None:
    answer = outcome(lambda: probe(head + tail))
    if isinstance(answer, ProtocolError):
        assert answer.code == ErrorCode.INVALID_IMAGE
    elif answer is not None:
        assert isinstance(answer, ImageInfo)
        assert answer.width > 0
        assert answer.height > 0


# ------------------------------------------------------------------------------------------
# Decompression bombs


def bomb_sources() -> list[tuple[str, bytes, Callable[[bytes, int, int], bytes]]]:
    tiny = pattern_image(8, 8)
    return [
        ("png", encode(tiny, "PNG"), patch_png),
        ("jpeg", encode(tiny, "JPEG"), patch_jpeg),
        ("gif", encode(tiny, "GIF"), patch_gif),
        ("webp-vp8x", encode(translucent(tiny), "WEBP"), patch_webp),
        ("webp-vp8l", encode(tiny, "WEBP", lossless=True), patch_webp),
        ("webp-vp8", encode(tiny, "WEBP"), patch_webp),
        ("bmp", encode(tiny, "BMP"), patch_bmp),
        ("tiff", encode(tiny, "TIFF"), patch_tiff),
    ]


BOMBS = bomb_sources()


@pytest.fixture
def no_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if Pillow is asked to open or decode anything."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Pillow was called for an image that the header already rejects")

    monkeypatch.setattr(Image, "open", refuse)
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.parametrize(("name", "tiny", "patch"), BOMBS, ids=[b[0] for b in BOMBS])
@pytest.mark.usefixtures("no_pillow")
def test_bombs_are_rejected_from_the_header(
    name: str, tiny: bytes, patch: Callable[[bytes, int, int], bytes]
) -> None:
    # VP8 and VP8L store 14-bit sizes: 16383x16383 is their largest claim.
    side = 16383 if name in ("webp-vp8l", "webp-vp8") else 20000
    if name.startswith("webp-"):
        assert tiny[12:16].decode().strip().lower() == name.split("-")[1]
    bomb = patch(tiny, side, side)
    assert len(bomb) < 4096
    assert probe(bomb) == ImageInfo(side, side, probe(tiny).format)  # type: ignore[union-attr]
    tracemalloc.start()
    try:
        error = expect_error(ErrorCode.TOO_MANY_PIXELS, lambda: run_decode(bytearray(bomb)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * 1024 * 1024
    assert f"{side}x{side}" in error.message
    assert str(DEFAULT_MAX_PIXELS) in error.message


@pytest.mark.parametrize(("name", "tiny", "patch"), BOMBS, ids=[b[0] for b in BOMBS])
@pytest.mark.usefixtures("no_pillow")
def test_bombs_under_pillows_own_limit_are_still_ours_to_reject(
    name: str, tiny: bytes, patch: Callable[[bytes, int, int], bytes], tmp_path: Path
) -> None:
    # 3000x3000 is far below Image.MAX_IMAGE_PIXELS: only our limit stands in the way.
    bomb = patch(tiny, 3000, 3000)
    error = expect_error(ErrorCode.TOO_MANY_PIXELS, lambda: run_decode(bomb, max_pixels=1_000_000))
    assert error.message == "image is 3000x3000 (9000000 pixels), over the limit of 1000000 pixels"
    path = tmp_path / "bomb"
    path.write_bytes(bomb)
    expect_error(ErrorCode.TOO_MANY_PIXELS, lambda: run_decode(path, max_pixels=1_000_000))


def test_check_pixels_boundary() -> None:
    check_pixels(ImageInfo(1000, 1000, "PNG"), 1_000_000)
    with pytest.raises(ProtocolError) as caught:
        check_pixels(ImageInfo(1001, 1000, "PNG"), 1_000_000)
    assert caught.value.code == ErrorCode.TOO_MANY_PIXELS
    assert "1001x1000" in caught.value.message
    assert "1000000" in caught.value.message


def test_gif_frame_larger_than_its_screen_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = encode(pattern_image(8, 8).convert("P"), "GIF")
    # The screen claims 10x10 (fine), the first frame 3000x3000: Pillow grows the canvas.
    at = gif_descriptor_offset(tiny)
    bomb = bytearray(patch_gif(tiny, 10, 10, frame=False))
    bomb[at + 4 : at + 8] = struct.pack("<HH", 3000, 3000)
    assert probe(bomb) == ImageInfo(10, 10, "GIF")

    def refuse(self: object) -> None:
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    error = expect_error(ErrorCode.TOO_MANY_PIXELS, lambda: run_decode(bomb, max_pixels=1_000_000))
    assert "3000x3000" in error.message


def test_gif_frame_past_its_screen_reports_the_grown_size() -> None:
    frame = np.zeros((20, 20, 3), np.uint8)
    frame[:, :, 0] = 255
    small_screen = patch_gif(encode(Image.fromarray(frame), "GIF"), 10, 10, frame=False)
    result = run_decode(small_screen)
    assert result.info == ImageInfo(20, 20, "GIF")
    assert result.image.size == (20, 20)
    assert (pixels(result)[:, :, 0] > 200).all()


def test_pillow_limit_maps_to_too_many_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(pattern_image(100, 100), "BMP")  # a format Pillow decodes
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses > 2000 pixels
    expect_error(ErrorCode.TOO_MANY_PIXELS, lambda: run_decode(data))


def test_pillow_bomb_warning_is_neither_raised_nor_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = encode(pattern_image(100, 100), "BMP")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 10000 pixels: Pillow only warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_decode(data).image.size == (100, 100)


@pytest.mark.parametrize("fake_first", [False, True], ids=["fake-last", "fake-first"])
def test_jpeg_headers_that_disagree_are_invalid_before_decoding(
    monkeypatch: pytest.MonkeyPatch, fake_first: bool
) -> None:
    # A second frame header: Pillow sizes the image by the last, libjpeg by the first.
    data = encode(SMALL, "JPEG")
    sof = next(pos for pos, marker in jpeg_segments(data) if marker == 0xC0)
    end = sof + 2 + struct.unpack(">H", data[sof + 2 : sof + 4])[0]
    fake = data[sof : sof + 5] + struct.pack(">HH", 200, 200) + data[sof + 9 : end]
    at = sof if fake_first else end
    data = data[:at] + fake + data[at:]
    assert probe(data) == ImageInfo(200 if fake_first else 123, 200 if fake_first else 45, "JPEG")

    def refuse(self: object) -> None:
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    error = expect_error(ErrorCode.INVALID_IMAGE, lambda: run_decode(data))
    assert error.message == "JPEG headers disagree on the image size"


# ------------------------------------------------------------------------------------------
# Reduced decoding


def test_large_jpeg_is_decoded_at_reduced_scale(big_jpeg: Path) -> None:
    data = big_jpeg.read_bytes()
    result = run_decode(data, short=256)
    assert result.info == ImageInfo(6000, 4000, "JPEG")
    assert 256 <= min(result.image.size) < 1024
    # 750x500 is libjpeg's 1/8 scale; shrinking a full decode would have given 400x267.
    assert result.image.size == (750, 500)
    # The content is the picture, not noise: compare with a full decode shrunk alike.
    reference = Image.open(big_jpeg).convert("RGB").resize((750, 500), Image.Resampling.BOX)
    difference = np.abs(pixels(result) - np.asarray(reference).astype(int))
    assert difference.mean() < 4


@pytest.mark.parametrize("source", ["path", "str", "bytes", "bytearray", "memoryview"])
def test_every_input_kind_gives_the_same_result(big_jpeg: Path, source: str) -> None:
    data = big_jpeg.read_bytes()
    given_data: object = {
        "path": big_jpeg,
        "str": str(big_jpeg),
        "bytes": data,
        "bytearray": bytearray(data),
        "memoryview": memoryview(data),
    }[source]
    result = run_decode(given_data, short=300)  # type: ignore[arg-type]
    expected = run_decode(data, short=300)
    assert result.info == expected.info == ImageInfo(6000, 4000, "JPEG")
    assert result.image.tobytes() == expected.image.tobytes()


@pytest.mark.parametrize("read_whole", [True, False], ids=["read-whole", "streamed"])
@pytest.mark.parametrize(("name", "data"), SMALL_IMAGES, ids=[n for n, _ in SMALL_IMAGES])
def test_a_file_decodes_as_its_bytes_whether_read_whole_or_not(
    name: str, data: bytes, read_whole: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "image"
    path.write_bytes(data)
    limit = len(data) if read_whole else len(data) - 1
    monkeypatch.setattr(decode_module, "READ_WHOLE_BYTES", limit)
    result = run_decode(path, short=20)
    expected = run_decode(data, short=20)
    assert result.info == expected.info
    assert result.image.size == expected.image.size
    assert result.image.tobytes() == expected.image.tobytes()


def test_a_small_file_is_read_whole_not_peeked_at(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(SMALL, "JPEG")
    assert len(data) <= decode_module.READ_WHOLE_BYTES
    path = tmp_path / "small.jpg"
    path.write_bytes(data)

    def no_file_source(*args: object) -> None:
        raise AssertionError("a small file was read a field at a time")

    monkeypatch.setattr(decode_module, "_FileSource", no_file_source)
    assert run_decode(path).info == ImageInfo(123, 45, "JPEG")


@pytest.mark.parametrize("source", ["path", "bytes", "bytearray", "memoryview"])
def test_input_is_not_copied_whole(big_jpeg: Path, source: str) -> None:
    # tracemalloc sees Python-level copies (bytes, BytesIO buffers), not Pillow's pixel
    # memory: exactly what this test is about.
    data = big_jpeg.read_bytes()
    given_data: object = {
        "path": big_jpeg,
        "bytes": data,
        "bytearray": bytearray(data),
        "memoryview": memoryview(bytearray(data)),
    }[source]
    tracemalloc.start()
    try:
        run_decode(given_data, short=256)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(data) // 8


MEASURE = textwrap.dedent(
    """
    import re, sys, time
    from PIL import Image
    from server.tasks.contract import DecodeHint
    from server.pipeline.decode import decode

    def status(key):
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{key}:\\s+(\\d+) kB", f.read(), re.M).group(1))

    path, short = sys.argv[1], sys.argv[2]
    hint = DecodeHint(None if short == "none" else int(short))
    warm = Image.new("RGB", (64, 64))
    warm.save("/dev/null", "JPEG")  # load the JPEG codec before measuring
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark to the current RSS
    before = status("VmRSS")
    started = time.perf_counter()
    result = decode(path, max_pixels=10**9, hint=hint)
    elapsed = time.perf_counter() - started
    print(status("VmHWM") - before, elapsed, *result.image.size)
    """
)


def peak_rss_kib(path: Path, short: int | None) -> tuple[int, float, tuple[int, int]]:
    """Peak memory (RSS above the start) of one decode in a fresh interpreter, with its time."""
    completed = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), "none" if short is None else str(short)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    kib, seconds, width, height = completed.stdout.split()
    return int(kib), float(seconds), (int(width), int(height))


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc peak-RSS reset"
)
def test_reduced_decode_needs_far_less_memory(big_jpeg: Path) -> None:
    # Measured as process RSS: Pillow's pixel buffers and libjpeg's work memory are malloc'ed
    # in C, invisible to tracemalloc.
    full_kib, full_s, full_size = peak_rss_kib(big_jpeg, None)
    reduced_kib, reduced_s, reduced_size = peak_rss_kib(big_jpeg, 256)
    print(
        f"full {full_size}: {full_kib} KiB, {full_s * 1000:.0f} ms; "
        f"reduced {reduced_size}: {reduced_kib} KiB, {reduced_s * 1000:.0f} ms"
    )
    assert full_size == (6000, 4000)
    assert reduced_size == (750, 500)
    assert full_kib > 6000 * 4000 * 3 // 1024  # sanity: the measurement sees pixel memory
    assert reduced_kib * 10 < full_kib


@pytest.mark.parametrize(
    ("size", "short", "expected"),
    [
        ((3000, 2000), 256, (429, 286)),  # reduce by 7
        ((2000, 3000), 256, (286, 429)),
        ((600, 511), 256, (600, 511)),  # under 2x: left alone
        ((600, 512), 256, (300, 256)),  # exactly 2x: halved, still >= 256
        ((100, 80), 256, (100, 80)),  # never upscaled
        ((3000, 2000), None, (3000, 2000)),  # full resolution asked
    ],
)
def test_shrinking_keeps_the_short_side_at_least_the_hint(
    size: tuple[int, int], short: int | None, expected: tuple[int, int]
) -> None:
    data = encode(pattern_image(*size), "PNG", compress_level=1)
    result = run_decode(data, short=short)
    assert result.image.size == expected
    assert result.info == ImageInfo(*size, "PNG")
    if short is not None and min(size) >= short:
        assert short <= min(result.image.size) < 2 * short


@pytest.mark.parametrize("short", [64, 100, 128, 200, 333, 500, 1000])
def test_jpeg_draft_and_reduce_never_go_below_the_hint(short: int) -> None:
    data = encode(pattern_image(1999, 1001), "JPEG")
    result = run_decode(data, short=short)
    assert short <= min(result.image.size) < 2 * short
    assert result.info == ImageInfo(1999, 1001, "JPEG")


def test_result_holds_no_reference_to_the_input() -> None:
    result = run_decode(encode(SMALL, "PNG"))
    assert type(result.image) is Image.Image
    assert np.array_equal(pixels(result), np.asarray(SMALL))


# ------------------------------------------------------------------------------------------
# Orientation and colour


def oriented(fmt: str, orientation: int, size: tuple[int, int] = (60, 40)) -> bytes:
    image = pattern_image(*size)
    image.paste((255, 0, 0), (0, 0, size[0] // 3, size[1] // 3))  # mark the top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, fmt, exif=exif)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_imageops(orientation: int) -> None:
    data = oriented("PNG", orientation)
    result = run_decode(data)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert result.info == ImageInfo(60, 40, "PNG")  # stored size, as the header says
    assert result.image.size == expected.size
    assert result.image.tobytes() == expected.tobytes()


def test_exif_orientation_with_reduced_jpeg() -> None:
    data = oriented("JPEG", 6, size=(1200, 800))  # 6: rotate 90 degrees clockwise to view
    result = run_decode(data, short=128)
    assert result.info == ImageInfo(1200, 800, "JPEG")
    assert result.image.size == (200, 300)  # 1/4 scale, then upright
    top_right = pixels(result)[5, -5]
    assert top_right[0] > 200
    assert top_right[1] < 60
    assert top_right[2] < 60


def grey16_png() -> bytes:
    ramp = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"
    return encode(image, "PNG")


def rgb16_png() -> bytes:
    row = struct.pack(">HHH", 0x8000, 0x4000, 0xFFFF) * 8
    return raw_png(8, 4, 16, 2, (b"\0" + row) * 4)


def transparent_gif() -> bytes:
    image = Image.new("P", (16, 16), 1)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(0, (0, 0, 8, 16))
    return encode(image, "GIF", transparency=0)


COLOUR_CASES: list[tuple[str, Callable[[], bytes], Callable[[np.ndarray], bool]]] = [
    # RGBA half-transparent red over white -> pink.
    (
        "rgba",
        lambda: encode(Image.new("RGBA", (16, 16), (255, 0, 0, 128)), "PNG"),
        lambda px: bool(np.all(np.abs(px - [255, 127, 127]) <= 2)),
    ),
    (
        "la",
        lambda: encode(Image.new("LA", (16, 16), (0, 128)), "PNG"),
        lambda px: bool(np.all(np.abs(px - 127) <= 2)),
    ),
    (
        "palette",
        lambda: encode(pattern_image(32, 32).convert("P"), "PNG"),
        lambda px: px.std() > 10,
    ),
    (
        "palette-transparency",
        transparent_gif,
        lambda px: bool(np.all(px[:, :8] == 255) and np.all(px[:, 8:] == [0, 0, 255])),
    ),
    (
        "grey16",
        grey16_png,
        lambda px: bool(px[0, 0, 0] == 0 and px[-1, -1, 0] == 255 and 120 < px.mean() < 135),
    ),
    ("rgb16", rgb16_png, lambda px: bool(np.all(px == [0x80, 0x40, 0xFF]))),
    (
        "cmyk-jpeg",
        lambda: encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"),
        lambda px: bool(np.all(np.abs(px - [255, 0, 0]) <= 8)),
    ),
    (
        "grey-jpeg",
        lambda: encode(Image.new("L", (16, 16), 77), "JPEG"),
        lambda px: bool(np.all(np.abs(px - 77) <= 2)),
    ),
    (
        "bilevel",
        lambda: encode(Image.new("1", (16, 16), 1), "PNG"),
        lambda px: bool(np.all(px == 255)),
    ),
    (
        "webp-alpha",
        lambda: encode(Image.new("RGBA", (16, 16), (0, 0, 255, 0)), "WEBP", lossless=True),
        lambda px: bool(np.all(px == 255)),
    ),
    (
        "bmp-top-down",
        lambda: patch_bmp(encode(Image.new("RGB", (16, 16), (9, 99, 199)), "BMP"), 16, -16),
        lambda px: bool(np.all(px == [9, 99, 199])),
    ),
]


@pytest.mark.parametrize(("name", "build", "check"), COLOUR_CASES, ids=[c[0] for c in COLOUR_CASES])
def test_modes_become_rgb(
    name: str, build: Callable[[], bytes], check: Callable[[np.ndarray], bool]
) -> None:
    result = run_decode(build())
    assert check(pixels(result)), pixels(result)[:2, :4]


def test_alpha_is_premultiplied_when_shrinking() -> None:
    # Alternate columns: opaque black, fully transparent green. Each reduced pixel is half
    # covered by black, so over white it is mid grey; averaging the colours without their
    # alpha would tint it green.
    rgba = np.zeros((512, 1024, 4), np.uint8)
    rgba[:, 0::2] = (0, 0, 0, 255)
    rgba[:, 1::2] = (0, 255, 0, 0)
    result = run_decode(encode(Image.fromarray(rgba), "PNG"), short=128)
    assert result.image.size == (256, 128)
    assert np.all(np.abs(pixels(result) - 127) <= 2)


# ------------------------------------------------------------------------------------------
# Truncation and corruption


def jpeg_variants() -> list[tuple[str, bytes]]:
    image = pattern_image(480, 320, seed=2)
    return [
        ("baseline", encode(image, "JPEG", quality=90)),
        ("progressive", encode(image, "JPEG", quality=90, progressive=True)),
    ]


@pytest.mark.parametrize(("kind", "data"), jpeg_variants(), ids=["baseline", "progressive"])
@pytest.mark.parametrize("cut", ["half", "before-eoi", "inside-eoi", "minus-64"])
@pytest.mark.parametrize("short", [None, 64], ids=["full", "draft"])
def test_truncated_jpeg_is_invalid(kind: str, data: bytes, cut: str, short: int | None) -> None:
    assert data.endswith(b"\xff\xd9")
    assert run_decode(data, short=short).image.size  # the whole file is fine
    end = {"half": len(data) // 2, "before-eoi": -2, "inside-eoi": -1, "minus-64": -64}[cut]
    error = expect_error(ErrorCode.INVALID_IMAGE, lambda: run_decode(data[:end], short=short))
    assert error.message == "truncated JPEG data"


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "TIFF", "WEBP"])
def test_truncated_files_are_invalid(fmt: str, tmp_path: Path) -> None:
    data = encode(pattern_image(120, 80, seed=4), fmt)
    cut = data[: len(data) // 2]
    error = expect_error(ErrorCode.INVALID_IMAGE, lambda: run_decode(cut))
    # From a file: the message still names no path.
    path = tmp_path / "secret-name.bin"
    path.write_bytes(cut)
    error = expect_error(ErrorCode.INVALID_IMAGE, lambda: run_decode(path))
    assert "secret-name" not in error.message
    assert str(tmp_path) not in error.message
    assert "Traceback" not in error.message
    assert len(error.message) < 80


def test_png_cut_inside_its_last_image_data_is_invalid() -> None:
    data = encode(pattern_image(120, 80, seed=5), "PNG")
    iend = data.rindex(b"IEND") - 4
    error = expect_error(ErrorCode.INVALID_IMAGE, lambda: run_decode(data[: iend - 40]))
    assert error.message == "truncated PNG data"


def test_truncated_loading_stays_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        run_decode(encode(SMALL, "PNG"))


def test_missing_file_is_not_blamed_on_the_client(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        run_decode(tmp_path / "gone.jpg")


FUZZ_SEEDS = [
    encode(pattern_image(24, 16, seed=9), fmt)
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(FUZZ_SEEDS),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, 10_000),
)
def test_damaged_images_decode_or_raise_protocol_errors(
    seed: bytes, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(seed)
    for at, value in edits:
        data[at % len(data)] = value
    del data[max(cut, 1) :]
    result = outcome(lambda: decode(bytes(data), max_pixels=1_000_000, hint=DecodeHint(8)))
    if isinstance(result, ProtocolError):
        assert result.code in (ErrorCode.INVALID_IMAGE, ErrorCode.TOO_MANY_PIXELS)
    else:
        assert isinstance(result, DecodedImage)
        assert result.image.mode == "RGB"
        assert result.info.width * result.info.height <= 1_000_000


# ------------------------------------------------------------------------------------------
# Animation: first frame only


def frames(mode: str = "RGB") -> list[Image.Image]:
    return [Image.new(mode, (32, 24), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})],
    ids=["gif", "webp", "apng"],
)
def test_animated_images_give_their_first_frame(fmt: str, params: dict[str, object]) -> None:
    first, *rest = frames()
    data = encode(first, fmt, save_all=True, append_images=rest, duration=100, **params)
    with Image.open(io.BytesIO(data)) as check:
        assert getattr(check, "n_frames", 1) == 3
    result = run_decode(data)
    assert result.info == ImageInfo(32, 24, fmt)
    assert np.all(np.abs(pixels(result) - [255, 0, 0]) <= 2)


# ------------------------------------------------------------------------------------------
# Decode cost: bombs under max_pixels, bounded before decoding (memory, scans, time)


@pytest.fixture
def no_decoder(monkeypatch: pytest.MonkeyPatch, no_pillow: None) -> None:
    """Fail the test if Pillow or libvips is asked to open or decode anything."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("libvips was called for an image that the header already rejects")

    monkeypatch.setattr(decode_module, "vips_open", refuse)


COSTLY = [
    # libjpeg keeps every coefficient (2 bytes a sample) of a progressive JPEG, whatever the
    # scale: 13000x13000 4:2:0 needs 484 MiB, 9000x9000 4:4:4 464 MiB.
    ("progressive_jpeg_13000", lambda: bad.progressive_jpeg_claiming(13000, 13000)),
    ("progressive_jpeg_444", lambda: bad.progressive_jpeg_claiming(9000, 9000, subsampling=0)),
    # A baseline JPEG whose first scan lacks components is buffered the same way.
    ("non_interleaved_jpeg", lambda: bad.baseline_jpeg_non_interleaved_claiming(12000, 12000)),
    # Whole frames: 16-bit RGBA TIFF in one strip, interlaced PNG, WebP, a GIF's canvas.
    ("tiff_16bit_one_strip", lambda: bad.tiff_claiming(10000, 10000, bits=16, samples=4)),
    ("png_interlaced", lambda: bad.png_interlaced_claiming(10000, 10000)),
    ("webp", lambda: bad.webp_vp8x_claiming(9000, 9000)),
    ("gif", lambda: bad.gif_claiming(9000, 9000)),
]


@pytest.mark.parametrize(("name", "build"), COSTLY, ids=[c[0] for c in COSTLY])
@pytest.mark.parametrize("short", [224, None])
@pytest.mark.usefixtures("no_decoder")
def test_images_too_costly_to_decode_are_refused_from_the_header(
        name: str, build: Callable[[], bytes], short: int | None) -> None:
    data = build()
    assert probe(data) is not None  # under max_pixels: the pixel count alone lets it in
    error = expect_error(ErrorCode.TOO_MANY_PIXELS,
                         lambda: run_decode(data, max_pixels=DEFAULT_MAX_PIXELS, short=short))
    assert f"over the limit of {DECODE_MEMORY_BUDGET // 2**20} MiB" in error.message
    # The same for a full-resolution decode by libvips (pixel_source's regions).
    error = expect_error(ErrorCode.TOO_MANY_PIXELS,
                         lambda: header_of(data, DEFAULT_MAX_PIXELS))


def test_the_documented_progressive_budget_lets_a_large_420_photo_in() -> None:
    # 9000x9000 4:2:0: 81 MP, 232 MiB of coefficients, under the budget.
    assert header_of(bad.progressive_jpeg_claiming(9000, 9000), DEFAULT_MAX_PIXELS)


@pytest.mark.usefixtures("no_decoder")
def test_a_jpeg_with_too_many_scans_is_refused_before_decoding() -> None:
    bomb = bad.progressive_jpeg_claiming(2000, 2000, extra_scans=1000)
    assert bomb.count(b"\xff\xda") > MAX_JPEG_SCANS
    error = expect_error(ErrorCode.TOO_MANY_PIXELS, lambda: run_decode(bomb))
    assert f"more than {MAX_JPEG_SCANS} scans" in error.message


def test_large_jpegs_may_have_fewer_scans() -> None:
    # 30 scans: fine for a 2000x2000 JPEG, too many for 9000x9000 (24 allowed).
    small = bad.progressive_jpeg_claiming(2000, 2000, extra_scans=20)
    large = bad.progressive_jpeg_claiming(9000, 9000, extra_scans=20)
    assert small.count(b"\xff\xda") == large.count(b"\xff\xda") == 30
    assert run_decode(small, short=64).info == ImageInfo(2000, 2000, "JPEG")
    error = expect_error(ErrorCode.TOO_MANY_PIXELS, lambda: run_decode(large, short=64))
    assert "more than 24 scans" in error.message
    assert MIN_JPEG_SCANS <= 24 <= MAX_JPEG_SCANS


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF"])
def test_a_decode_past_its_deadline_is_stopped(fmt: str) -> None:
    data = encode(pattern_image(600, 400), fmt)
    assert decode(data, max_pixels=DEFAULT_MAX_PIXELS, hint=DecodeHint(64),
                  deadline_s=None).image.size
    error = expect_error(ErrorCode.TOO_MANY_PIXELS, lambda: decode(
        data, max_pixels=DEFAULT_MAX_PIXELS, hint=DecodeHint(64), deadline_s=0.0))
    assert "longer than 0 s" in error.message


def test_every_decode_has_a_deadline_by_default() -> None:
    assert inspect.signature(decode).parameters["deadline_s"].default == \
        DEFAULT_DECODE_DEADLINE_S


@pytest.mark.parametrize("image", [
    pattern_image(640, 480),
    Image.fromarray(np.dstack([pattern(640, 480), np.tile(np.arange(640, dtype=np.uint8)[None],
                                                          (480, 1))]), "RGBA"),
    Image.fromarray(pattern(640, 480)[..., 0].astype(np.uint16) * 257),
    pattern_image(640, 480).quantize(64),
], ids=["rgb", "rgba", "grey16", "palette"])
@pytest.mark.parametrize("short", [100, None])
def test_streamed_png_matches_pillows_decode(image: Image.Image, short: int | None,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(image, "PNG")
    streamed = decode(data, max_pixels=DEFAULT_MAX_PIXELS, hint=DecodeHint(short))
    monkeypatch.setattr(decode_module, "_STREAMED_FORMATS", frozenset())  # Pillow decodes it
    by_pillow = decode(data, max_pixels=DEFAULT_MAX_PIXELS, hint=DecodeHint(short))
    assert streamed.info == by_pillow.info
    assert streamed.image.size == by_pillow.image.size
    assert streamed.image.mode == "RGB"
    difference = np.abs(np.asarray(streamed.image, np.int16)
                        - np.asarray(by_pillow.image, np.int16))
    assert difference.mean() < 1.0


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc peak-RSS reset"
)
def test_a_16bit_png_bomb_streams_in_bounded_memory(tmp_path: Path) -> None:
    # 13000x13000 16-bit grey: 338 MB of samples (Pillow held 1.3 GB decoding it whole).
    path = tmp_path / "bomb.png"
    path.write_bytes(bad.png_16bit_zero_bomb(13000))
    kib, seconds, size = peak_rss_kib(path, 224)
    print(f"16-bit PNG bomb: {kib} KiB, {seconds * 1000:.0f} ms")
    assert size == (224, 224)  # shrunk by 58
    assert kib * 1024 < 13000 * 13000 * 2 // 4
