"""Spool files: memory-mapped upload buffers that worker processes read by path."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.pipeline import spool as spool_module
from server.pipeline.spool import Spool, default_spool_root

MIB = 1024 * 1024


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    spool = Spool(tmp_path / "root")
    yield spool
    spool.close()


def test_a_spool_is_a_private_directory_under_its_root(tmp_path: Path) -> None:
    first, second = Spool(tmp_path / "root"), Spool(tmp_path / "root")
    try:
        assert first.directory.parent == tmp_path / "root"
        assert first.directory != second.directory
        assert first.directory.name.startswith("pixelstream-")
        assert stat.S_IMODE(first.directory.stat().st_mode) == 0o700
    finally:
        first.close()
        second.close()


def test_allocate_gives_a_file_of_exactly_the_declared_size(spool: Spool) -> None:
    spool_file = spool.allocate(12345)
    assert spool_file.size == 12345
    assert spool_file.path.parent == spool.directory
    assert spool_file.path.stat().st_size == 12345
    assert stat.S_IMODE(spool_file.path.stat().st_mode) == 0o600
    assert spool_file.buffer is not None
    assert len(spool_file.buffer) == 12345
    spool_file.close()


def test_pages_are_only_spent_as_bytes_arrive(spool: Spool) -> None:
    spool_file = spool.allocate(64 * MIB)
    assert spool_file.buffer is not None
    spool_file.buffer[:MIB] = b"\x01" * MIB
    spool_file.buffer.flush()
    info = spool_file.path.stat()
    assert info.st_size == 64 * MIB
    # A sparse file: blocks for the megabyte written, not for the 64 declared.
    assert info.st_blocks * 512 < 8 * MIB
    spool_file.close()


def test_the_bytes_written_are_what_another_reader_sees_by_path(spool: Spool) -> None:
    spool_file = spool.allocate(10)
    assert spool_file.buffer is not None
    spool_file.buffer[0:4] = b"abcd"
    spool_file.buffer[4:10] = memoryview(b"efghij")
    assert spool_file.path.read_bytes() == b"abcdefghij"
    spool_file.close()


def test_close_unmaps_and_removes_the_file_and_is_idempotent(spool: Spool) -> None:
    spool_file = spool.allocate(100)
    buffer = spool_file.buffer
    assert buffer is not None
    spool_file.close()
    assert spool_file.buffer is None
    assert buffer.closed
    assert not spool_file.path.exists()
    spool_file.close()


def test_a_reader_with_the_file_open_keeps_reading_after_close(spool: Spool) -> None:
    spool_file = spool.store(b"still here")
    with open(spool_file.path, "rb") as reader:
        spool_file.close()
        assert reader.read() == b"still here"


def test_store_copies_bytes_and_memoryviews(spool: Spool) -> None:
    for data in (b"x" * 1000, memoryview(bytearray(b"hello world"))):
        spool_file = spool.store(data)
        assert spool_file.size == len(data)
        assert spool_file.path.read_bytes() == bytes(data)
        spool_file.close()


def test_every_allocation_has_its_own_file(spool: Spool) -> None:
    files = [spool.allocate(1) for _ in range(20)]
    assert len({f.path for f in files}) == 20
    for f in files:
        f.close()
    assert list(spool.directory.iterdir()) == []


def test_a_failed_allocation_leaves_no_file(spool: Spool) -> None:
    with pytest.raises(ValueError, match="empty"):
        spool.allocate(0)  # mmap refuses an empty file; sizes are at least 1 byte
    assert list(spool.directory.iterdir()) == []


def test_spool_close_removes_the_directory_and_what_is_left_in_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "root")
    leftover = spool.allocate(100)
    spool.close()
    assert not spool.directory.exists()
    assert (tmp_path / "root").exists()  # only its own directory
    leftover.close()  # still safe: the file is already gone
    spool.close()


# default_spool_root ---------------------------------------------------------------------------


@pytest.fixture
def fake_shm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(spool_module, "SHM_DIR", shm)
    return shm


def free_space(monkeypatch: pytest.MonkeyPatch, shm: Path, free: int) -> None:
    real = shutil.disk_usage

    def disk_usage(path: str | os.PathLike[str]) -> shutil._ntuple_diskusage:
        if Path(path) == shm:
            return shutil._ntuple_diskusage(free, 0, free)
        return real(path)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def test_default_root_is_shm_when_it_has_room(fake_shm: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    free_space(monkeypatch, fake_shm, 2 * 1024 * MIB)
    assert default_spool_root(1024 * MIB) == fake_shm


def test_default_root_falls_back_from_a_small_shm(fake_shm: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    free_space(monkeypatch, fake_shm, 64 * MIB)  # a container's default /dev/shm
    assert default_spool_root(1024 * MIB) == Path(tempfile.gettempdir())


def test_default_root_falls_back_when_shm_cannot_be_measured(
    fake_shm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(path: str | os.PathLike[str]) -> shutil._ntuple_diskusage:
        raise OSError("statvfs failed")

    monkeypatch.setattr(shutil, "disk_usage", broken)
    assert default_spool_root(1) == Path(tempfile.gettempdir())


def test_default_root_falls_back_without_shm(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "SHM_DIR", tmp_path / "no-such-dir")
    assert default_spool_root(0) == Path(tempfile.gettempdir())


def test_a_spool_without_root_uses_the_default(fake_shm: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    free_space(monkeypatch, fake_shm, 2 * 1024 * MIB)
    spool = Spool(min_free_bytes=MIB)
    try:
        assert spool.directory.parent == fake_shm
    finally:
        spool.close()


def test_write_at_writes_through_the_file_and_the_map_shows_it(spool: Spool) -> None:
    spool_file = spool.allocate(10)
    assert spool_file.buffer is not None
    spool_file.write_at(3, b"abc")
    spool_file.write_at(6, memoryview(b"xyzw"))
    assert bytes(spool_file.buffer) == b"\0\0\0abcxyzw"
    assert spool_file.path.read_bytes() == b"\0\0\0abcxyzw"
    spool_file.close()
