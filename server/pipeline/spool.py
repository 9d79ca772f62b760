"""Upload buffers as memory-mapped files, so worker processes read them without a copy.

The gateway reassembles straight into the file (large chunks with ``os.pwrite`` from an I/O
thread, see :meth:`SpoolFile.write_at`; the map shows the same pages); a worker opens the same
file by path. On a
tmpfs (``/dev/shm``) this is plain shared memory; on a disk directory it keeps the gateway's
memory flat whatever the upload's size. Pages are only spent as bytes arrive: a 256 MB
upload that sends 1 MB costs 1 MB.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import shutil
import tempfile
from pathlib import Path

SHM_DIR = Path("/dev/shm")


def default_spool_root(min_free_bytes: int) -> Path:
    """/dev/shm when it exists and has room for a few maximal uploads, else the temp dir.

    (Containers often mount a 64 MB /dev/shm: too small for one large upload.)
    """
    if SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(SHM_DIR).free >= min_free_bytes:
                return SHM_DIR
    return Path(tempfile.gettempdir())


class SpoolFile:
    """One upload's buffer: a file of exactly ``size`` bytes, mapped read-write."""

    __slots__ = ("_fd", "buffer", "path", "size")

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(self._fd, size)
            self.buffer: mmap.mmap | None = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            path.unlink(missing_ok=True)
            raise

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` through the file; the map shows it at once (same pages).

        ``os.pwrite`` releases the GIL, so this may run in a thread beside the event loop (a
        copy into the map would hold the GIL, page faults included). Not after :meth:`close`.
        """
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written

    def close(self) -> None:
        """Unmap, close and delete. A worker that has the file open keeps reading safely."""
        if self.buffer is not None:
            self.buffer.close()
            self.buffer = None
            os.close(self._fd)
            self.path.unlink(missing_ok=True)


class Spool:
    """A private directory of spool files; removed, with anything left in it, on close."""

    def __init__(self, root: Path | None = None, *, min_free_bytes: int = 0) -> None:
        base = root if root is not None else default_spool_root(min_free_bytes)
        base.mkdir(parents=True, exist_ok=True)
        self.directory = Path(tempfile.mkdtemp(prefix="pixelstream-", dir=base))

    def allocate(self, size: int) -> SpoolFile:
        return SpoolFile(self.directory / secrets.token_hex(12), size)

    def store(self, data: bytes | memoryview) -> SpoolFile:
        """A spool file holding a copy of ``data`` (for images that arrive whole, over HTTP)."""
        spool_file = self.allocate(len(data))
        assert spool_file.buffer is not None
        spool_file.buffer[:] = data
        return spool_file

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
