"""Fitting the inference side to the machine: default worker count, torch threads and batch
size from the cores this process may use, and the allocator settings of a worker process.

:func:`plan_for` is the policy (pure); :func:`usable_cores` reads the machine (CPU affinity and
a cgroup CPU quota, as in a container with a CPU limit). :class:`server.settings.Settings`
fills the inference fields left unset from :func:`machine_plan`; explicit values always win.

:func:`tune_worker_malloc` is called once at the start of each worker process. glibc serves
allocations above a dynamic threshold (128 KiB at first) with ``mmap`` and gives freed memory
at the top of the heap back to the kernel; a forward pass allocates and frees activation
buffers of a few MB per layer, so every image paid thousands of fresh page faults (zeroed
pages, system time). A fixed threshold above those buffers and a trim threshold above a
batch's working set keep the pages in the process for the next batch. glibc caps that
threshold at 32 MiB, and a model on large inputs (a detector on 1024 px tiles, a batch of 4)
makes activations of 50-70 MiB: mapped and unmapped per layer, they cost 1.2 million page
faults per 35 tiles, more system time than the convolutions' user time (9 tiles/s against
28 with the heap). So a worker takes every allocation from the heap (``M_MMAP_MAX`` 0): what
is freed at its top beyond the trim threshold still goes back to the kernel, a huge decoded
image included.

:func:`tune_gateway_malloc` does the same for the gateway (``pixelstream serve``), whose
buffers are WebSocket messages: every chunk arrives as a few fresh MiB (the frame as read, its
unmasked copy) freed right after it is written. With the defaults the top of the heap went back
to the kernel every few chunks and came back as zeroed pages: about 10,400 page faults per
64 MiB binary upload, none once tuned.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.settings import Settings

log = logging.getLogger("pixelstream.tuning")

MAX_AUTO_WORKERS = 8
"""Workers started by default at most: each holds every task's models in its own memory."""
BATCH_PER_THREAD = 4
"""Default batch per torch thread: MobileNetV2 on one thread does most images/s at batch 4
(batch 8 spills the cache; bench.inference's model-alone rows)."""
MAX_AUTO_BATCH = 16

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
"""Allocations below this come from the heap: above every activation buffer of the bundled
model at the default batch, and the largest value glibc accepts on 64-bit. (A worker maps
nothing at all: :func:`tune_worker_malloc`.)"""
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024
"""Free memory at the top of the heap kept for the next batch rather than returned."""
GATEWAY_TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024
"""The gateway's: free memory at the top of the heap kept for the next messages. Room for a
few sockets' windows of chunk messages in flight (16 MiB each by default); beyond it, what a
burst of uploads freed goes back to the kernel."""


@dataclass(frozen=True)
class InferencePlan:
    cores: int
    workers: int
    torch_threads: int
    max_batch_size: int


def plan_for(cores: int) -> InferencePlan:
    """The default for a machine with ``cores`` usable cores.

    One worker per core (up to :data:`MAX_AUTO_WORKERS`), each with one torch thread while
    workers fill the cores: single-threaded workers never wait on each other, and a worker
    busy decoding leaves its core to the gateway rather than spinning. Cores beyond the
    workers' (less one for the gateway) are shared out as threads; batches grow with them.
    On 2 cores: 2 workers x 1 thread, so no core idles while a worker waits on the gateway.
    """
    cores = max(1, cores)
    workers = min(cores, MAX_AUTO_WORKERS)
    threads = threads_for(cores, workers)
    batch = min(MAX_AUTO_BATCH, BATCH_PER_THREAD * threads)
    return InferencePlan(cores=cores, workers=workers, torch_threads=threads,
                         max_batch_size=batch)


def threads_for(cores: int, workers: int) -> int:
    """Torch threads per worker: the cores but one (the gateway's), shared among the workers,
    at least one. Oversubscribed cores are far worse than idle ones for torch: its threads
    spin waiting for each other, and an 11 ms inference becomes a second when the gateway
    competes."""
    return max(1, (cores - 1) // max(1, workers))


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by a cgroup (v2 ``cpu.max``, else v1 quota/period); None: unlimited."""
    try:
        quota_text, period_text = (root / "cpu.max").read_text().split()[:2]
        if quota_text == "max":
            return None
        return int(quota_text) / int(period_text)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return max(1, cores)


def machine_plan() -> InferencePlan:
    return plan_for(usable_cores())


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def tune_worker_malloc() -> bool:
    """Fixed glibc malloc thresholds for this process (see the module's docstring). Call at
    a worker's start, before its models load. False, changing nothing, where the C library
    is not glibc (musl, macOS) or refuses a value."""
    return _tune_malloc(TRIM_THRESHOLD_BYTES, heap_only=True)


def tune_gateway_malloc() -> bool:
    """:func:`tune_worker_malloc` for the gateway's process, with a smaller trim threshold
    (:data:`GATEWAY_TRIM_THRESHOLD_BYTES`); blocks above the mmap threshold are still mapped
    on their own (its messages are at most a few MiB). Call before the server starts."""
    return _tune_malloc(GATEWAY_TRIM_THRESHOLD_BYTES, heap_only=False)


def _tune_malloc(trim_threshold: int, *, heap_only: bool) -> bool:
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
                   and mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
                   and (not heap_only or mallopt(M_MMAP_MAX, 0) == 1))
    if not applied:
        log.warning("malloc tuning refused by the C library; running with its defaults")
    return applied


def inference_summary(settings: Settings, explicit: Collection[str] = ()) -> str:
    """One line for the start-up log: what the workers run with, and which values came from
    the machine rather than from ``explicit`` (the settings given by flag or variable)."""
    cores = usable_cores()
    threads = settings.torch_threads or threads_for(cores, settings.workers)
    chosen = [name for name in ("workers", "torch_threads", "max_batch_size")
              if name not in explicit]
    origin = (f"{', '.join(chosen)} chosen for {cores} usable core(s)" if chosen
              else "all set explicitly")
    return (f"inference: {settings.workers} worker(s) x {threads} torch thread(s), batches of "
            f"up to {settings.max_batch_size} ({origin}; --workers, --torch-threads and "
            "--max-batch-size override)")
