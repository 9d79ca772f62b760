"""What uploads read (chunking.client.sources): files span by span, bytes, their SHA-256."""

from __future__ import annotations

import hashlib

import pytest

import chunking.client.sources as sources_module
from chunking.client import (
    Client,
)
from tests.support.pyclient_media import (
    hex_of,
)
from tests.support.pyclient_record import (
    padded,
    top_hex,
)


async def test_a_file_is_streamed_from_disk_one_span_at_a_time(colors_server, tmp_path,
                                                               monkeypatch) -> None:
    color = (10, 200, 90)
    path = tmp_path / "scan.png"
    path.write_bytes(padded(color, 1_500_000))
    reads: list[int] = []
    real_pread = sources_module._pread

    def spy(fd: int, length: int, offset: int) -> bytes:
        reads.append(length)
        return real_pread(fd, length, offset)

    monkeypatch.setattr(sources_module, "_pread", spy)
    async with Client(colors_server.ws_url) as client:
        result = await client.analyze(path)
    assert top_hex(result) == hex_of(color)
    size = path.stat().st_size
    assert sum(reads) == size  # each byte read once, to be sent
    assert max(reads) <= colors_server.settings.max_chunk_bytes < size


async def test_bytes_and_files_give_the_same_spans_and_digest(tmp_path) -> None:
    data = bytes(range(256)) * (sources_module.HASH_BUFFER_BYTES // 256 + 3)  # hashed in a thread
    path = tmp_path / "image.bin"
    path.write_bytes(data)
    from_bytes = sources_module.open_source(data, None)
    from_file = sources_module.open_source(path, None)
    try:
        assert (from_bytes.size, from_file.size) == (len(data), len(data))
        assert (from_bytes.name, from_file.name) == (None, "image.bin")
        assert bytes(await from_bytes.read(1000, 77)) == data[1000:1077]
        assert await from_file.read(1000, 77) == data[1000:1077]
        digest = hashlib.sha256(data).hexdigest()
        assert await from_bytes.sha256() == digest
        assert await from_file.sha256() == digest
    finally:
        from_file.close()


async def test_a_file_that_shrinks_while_uploading_fails_its_read(tmp_path) -> None:
    path = tmp_path / "image.bin"
    path.write_bytes(b"x" * 1000)
    source = sources_module.open_source(path, "given name")
    try:
        assert source.name == "given name"
        path.write_bytes(b"x" * 10)
        with pytest.raises(OSError, match="changed size"):
            await source.read(500, 100)
    finally:
        source.close()


def test_only_paths_and_bytes_are_sources() -> None:
    with pytest.raises(TypeError, match="pass a path or bytes"):
        sources_module.open_source(12, None)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        sources_module.open_source("/no/such/image.png", None)
