"""server.pipeline.decode_ahead: a worker decodes a spool file while its bytes arrive.

The spool file is preallocated as the gateway's is (its bytes beyond ``received`` are
garbage here, so a decode that read ahead of the reports would fail or differ). Tests wait on
the decode's future, never on time.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.pipeline.decode import decode
from server.pipeline.decode_ahead import AheadDecode, DecodeDropped, DecodesAhead
from server.pipeline.jobs import DecodeAhead
from server.tasks.contract import DecodeHint

WAIT_S = 30.0
MAX_PIXELS = 40_000_000


class HintOnly:
    """The one analyzer attribute a decode ahead reads."""

    name = "fake"
    decode = DecodeHint(min_short_side=64)


def jpeg(width: int = 1200, height: int = 800) -> bytes:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


class SpoolFile:
    """A file of the upload's size, filled in order as chunks would be."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path = path
        self.data = data
        path.write_bytes(b"\xa5" * len(data))
        self.written = 0

    def write_to(self, end: int) -> int:
        with open(self.path, "r+b") as file:
            file.seek(self.written)
            file.write(self.data[self.written:end])
        self.written = end
        return end


def request(spool: SpoolFile, job_id: str = "u-1", task: str = "fake") -> DecodeAhead:
    return DecodeAhead(job_id, task, str(spool.path), len(spool.data), MAX_PIXELS)


@pytest.fixture
def spool(tmp_path: Path) -> SpoolFile:
    return SpoolFile(tmp_path / "upload", jpeg())


@pytest.fixture
def threads() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        yield executor


def whole(data: bytes) -> bytes:
    return decode(data, max_pixels=MAX_PIXELS, hint=HintOnly.decode).image.tobytes()


def test_an_upload_decoded_as_it_arrives_is_the_image_decoded_whole(spool: SpoolFile) -> None:
    ahead = DecodesAhead({"fake": HintOnly()})  # type: ignore[dict-item]
    ahead.start(request(spool))
    size = len(spool.data)
    for end in range(0, size, size // 7 + 1):
        ahead.arrived("u-1", spool.write_to(end))
    spool.write_to(size)  # the last bytes: take() knows they are in
    decoded = ahead.take("u-1", str(spool.path))
    assert decoded is not None
    assert decoded.info.to_dict() == {"width": 1200, "height": 800, "format": "JPEG"}
    assert decoded.image.tobytes() == whole(spool.data)
    assert len(ahead) == 0


def test_only_jpegs_are_decoded_ahead_so_the_job_decodes_the_rest_its_own_way(
        tmp_path: Path) -> None:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(4).integers(0, 255, size=(400, 600, 3),
                                                       dtype=np.uint8)).save(out, "PNG")
    png = SpoolFile(tmp_path / "png", out.getvalue())
    ahead = DecodesAhead({"fake": HintOnly()})  # type: ignore[dict-item]
    ahead.start(request(png))
    ahead.arrived("u-1", png.write_to(len(png.data)))
    assert ahead.take("u-1", str(png.path)) is None
    ahead.close()


def test_a_decode_waits_for_reported_bytes_not_written_ones(
    spool: SpoolFile, threads: concurrent.futures.Executor
) -> None:
    """Bytes written but not yet reported are not read: reports are what count."""
    decode_ahead = AheadDecode(request(spool), HintOnly(), threads)  # type: ignore[arg-type]
    spool.write_to(len(spool.data))
    decode_ahead.arrived(100)
    decode_ahead.drop()
    with pytest.raises(DecodeDropped):
        decode_ahead.outcome.result(WAIT_S)


def test_a_dropped_decode_ends_and_is_forgotten(spool: SpoolFile) -> None:
    ahead = DecodesAhead({"fake": HintOnly()})  # type: ignore[dict-item]
    ahead.start(request(spool))
    running = ahead._running["u-1"]
    ahead.arrived("u-1", spool.write_to(len(spool.data) // 2))
    ahead.drop("u-1")
    assert isinstance(running.outcome.exception(WAIT_S), DecodeDropped)
    assert len(ahead) == 0
    assert ahead.take("u-1", str(spool.path)) is None


def test_a_decode_that_fails_ahead_leaves_the_job_to_decode(tmp_path: Path) -> None:
    spool = SpoolFile(tmp_path / "junk", os.urandom(50_000))
    spool.write_to(len(spool.data))
    ahead = DecodesAhead({"fake": HintOnly()})  # type: ignore[dict-item]
    ahead.start(request(spool))
    assert ahead.take("u-1", str(spool.path)) is None


def test_a_job_for_another_file_does_not_take_the_decode(spool: SpoolFile) -> None:
    ahead = DecodesAhead({"fake": HintOnly()})  # type: ignore[dict-item]
    ahead.start(request(spool))
    running = ahead._running["u-1"]
    assert ahead.take("u-1", "/elsewhere") is None
    assert isinstance(running.outcome.exception(WAIT_S), DecodeDropped)


def test_a_task_this_worker_lacks_is_not_decoded_ahead(spool: SpoolFile) -> None:
    ahead = DecodesAhead({"fake": HintOnly()})  # type: ignore[dict-item]
    ahead.start(request(spool, task="other"))
    assert len(ahead) == 0
    assert ahead.take("u-1", str(spool.path)) is None


def test_a_file_of_the_wrong_size_is_not_decoded(
    spool: SpoolFile, threads: concurrent.futures.Executor
) -> None:
    spool.write_to(len(spool.data))
    wrong = DecodeAhead("u-1", "fake", str(spool.path), len(spool.data) + 1, MAX_PIXELS)
    decode_ahead = AheadDecode(wrong, HintOnly(), threads)  # type: ignore[arg-type]
    assert isinstance(decode_ahead.outcome.exception(WAIT_S), ValueError)


def test_closing_ends_decodes_still_waiting_for_bytes(spool: SpoolFile) -> None:
    ahead = DecodesAhead({"fake": HintOnly()})  # type: ignore[dict-item]
    ahead.start(request(spool, "u-1"))
    ahead.start(request(spool, "u-2"))
    waiting = list(ahead._running.values())
    ahead.close()  # returns: no thread is left waiting for bytes that will never come
    assert all(isinstance(a.outcome.exception(0), DecodeDropped) for a in waiting)
