"""Shared pieces of the benchmarks: servers in subprocesses, memory sampling, test photos."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
MB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def photo_jpeg(width: int, height: int, *, quality: int = 88, grain: int = 16) -> bytes:
    """A large JPEG shaped like a photo: smooth gradients with sensor-like grain."""
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[..., 0] = (y * 0.5 + x * 0.5).astype(np.uint8)
    pixels[..., 1] = x.astype(np.uint8)
    pixels[..., 2] = y.astype(np.uint8)
    pixels[..., 1] += np.random.default_rng(0).integers(0, grain, size=(height, width),
                                                        dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=quality)
    return out.getvalue()


def photo_png(width: int, height: int, *, grain: int = 0) -> bytes:
    """A PNG of gradients; ``grain`` adds sensor-like noise (photos compress poorly)."""
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[..., 0] = x.astype(np.uint8)
    pixels[..., 1] = y.astype(np.uint8)
    pixels[..., 2] = ((x + y) / 2).astype(np.uint8)
    if grain:
        pixels += np.random.default_rng(1).integers(0, grain, size=pixels.shape, dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG", compress_level=1)
    return out.getvalue()


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    pids = [pid]
    for current in pids:
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{current}/task/{current}/children").read_text().split():
                pids.append(int(child))
    return pids


MEMORY_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def memory(pids: Sequence[int]) -> dict[str, int]:
    """The process tree's summed ``/proc/PID/status`` memory fields, in bytes.

    ``VmRSS`` = ``RssAnon`` + ``RssFile`` + ``RssShmem``: pages of a memory-mapped tmpfs file
    (pixelstream's spool files in /dev/shm) count as ``RssShmem`` of each process that
    touched them; bytes a server ``write()``s to a file (tus) count in nobody's RSS.
    """
    total = dict.fromkeys(MEMORY_FIELDS, 0)
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in total:
                    total[name] += int(value.split()[0]) * 1024
    return total


def rss_bytes(pids: Sequence[int]) -> int:
    return memory(pids)["VmRSS"]


def cpu_seconds(pids: Sequence[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def allocated_bytes(directories: Sequence[str | Path]) -> int:
    """Bytes allocated to the files under ``directories`` (on tmpfs: RAM)."""
    total = 0
    for directory in directories:
        for root, _, files in os.walk(directory):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total


class PeakSampler:
    """Samples the memory a server holds every few milliseconds: its process tree's RSS less
    shared memory, plus the bytes of its files in ``directories`` (a tmpfs spool: RAM too).
    Shared memory is left out because mapped tmpfs pages are those files' bytes (counted once).

    ``peak`` is the largest total seen; ``at_peak`` that sample's breakdown."""

    def __init__(self, pid: int, directories: Sequence[str | Path] = (),
                 interval: float = 0.005) -> None:
        self.pid = pid
        self.directories = list(directories)
        self.interval = interval
        self.peak = 0
        self.at_peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def measure(self) -> dict[str, int]:
        current = memory(tree_pids(self.pid))
        current["files"] = allocated_bytes(self.directories) if self.directories else 0
        current["held"] = current["VmRSS"] - current["RssShmem"] + current["files"]
        return current

    def sample(self) -> None:
        current = self.measure()
        if current["held"] >= self.peak:
            self.peak, self.at_peak = current["held"], current

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


LOG_DIR = Path(tempfile.gettempdir()) / "pixelstream-bench-logs"


@contextlib.contextmanager
def server_process(argv: Sequence[str], port: int, env: dict[str, str] | None = None,
                   ready_path: str = "/healthz") -> Iterator[subprocess.Popen[bytes]]:
    """Start a server subprocess and wait (bounded) until ``ready_path`` answers 200.

    Its output goes to a log file in :data:`LOG_DIR`, whose tail is shown if it fails."""
    import httpx

    LOG_DIR.mkdir(exist_ok=True)
    log_path = LOG_DIR / f"{Path(argv[1] if len(argv) > 1 else argv[0]).stem}-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(argv), cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{list(argv)} exited with {process.returncode}:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{argv} did not become ready")
            time.sleep(0.1)
        yield process
    finally:
        # Its children too: LitServe forks API servers that outlive a terminated parent.
        family = tree_pids(process.pid)[1:]
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for pid in family:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def paused(pids: Sequence[int]) -> Iterator[None]:
    """SIGSTOP the process trees of ``pids`` (servers waiting for their turn), so their idle
    work (LitServe's workers poll their queues) takes no CPU from the one being measured."""
    stopped = [pid for root in pids for pid in tree_pids(root)]
    for pid in stopped:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in stopped:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGCONT)


def pixelstream_argv(port: int, *flags: str) -> list[str]:
    """``pixelstream serve`` on ``port``, result cache off, quiet; extra ``flags`` appended."""
    return [str(VENV_BIN / "pixelstream"), "serve", "--port", str(port), "--cache-entries", "0",
            "--log-level", "warning", *flags]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores, {cpu}"
