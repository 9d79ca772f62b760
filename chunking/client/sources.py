"""What an upload reads from: a file, streamed from disk one span at a time, or bytes.

Spans are read when they are about to be sent (``os.pread`` in a thread); nothing reads a whole
file. The SHA-256 is computed in a thread with a bounded buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from pathlib import Path
from typing import Final

__all__ = ["HASH_BUFFER_BYTES", "BytesSource", "FileSource", "ImageSource", "Source",
           "open_source"]

HASH_BUFFER_BYTES: Final = 1 << 20
"""Read size while hashing a file: memory stays bounded whatever the file's size."""

Source = str | os.PathLike[str] | bytes | bytearray | memoryview
"""What ``analyze`` uploads: a file's path (streamed from disk) or the image's bytes."""

_pread = os.pread  # module-level, so tests can observe every read


class ImageSource:
    """An image to upload: its size, a name, spans read on demand, and its SHA-256."""

    size: int
    name: str | None

    async def read(self, offset: int, length: int) -> bytes | memoryview:
        raise NotImplementedError

    async def sha256(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the source holds."""


class BytesSource(ImageSource):
    def __init__(self, data: bytes | bytearray | memoryview, name: str | None) -> None:
        self._view = memoryview(data).cast("B")
        self.size = self._view.nbytes
        self.name = name

    async def read(self, offset: int, length: int) -> memoryview:
        return self._view[offset : offset + length]

    async def sha256(self) -> str:
        if self.size <= HASH_BUFFER_BYTES:
            return hashlib.sha256(self._view).hexdigest()
        return await asyncio.to_thread(lambda: hashlib.sha256(self._view).hexdigest())


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(HASH_BUFFER_BYTES)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as fh:
        while count := fh.readinto(buffer):
            digest.update(view[:count])  # hashlib releases the GIL on large updates
    return digest.hexdigest()


class FileSource(ImageSource):
    def __init__(self, path: Path, name: str | None) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            self.size = os.fstat(self._fd).st_size
        except OSError:
            os.close(self._fd)
            raise
        self.name = name if name is not None else path.name

    async def read(self, offset: int, length: int) -> bytes:
        data = await asyncio.to_thread(_pread, self._fd, length, offset)
        if len(data) != length:
            raise OSError(f"{self.path} changed size while it was being uploaded")
        return data

    async def sha256(self) -> str:
        return await asyncio.to_thread(_hash_file, self.path)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def open_source(source: Source, name: str | None) -> ImageSource:
    """A path opens a :class:`FileSource` (the caller closes it), bytes a :class:`BytesSource`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return BytesSource(source, name)
    if isinstance(source, (str, os.PathLike)):
        return FileSource(Path(source), name)
    raise TypeError(f"cannot upload a {type(source).__name__}: pass a path or bytes")
