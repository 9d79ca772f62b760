"""Machine-derived defaults and the worker's malloc tuning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.settings import Settings
from server.tuning import (
    MAX_AUTO_WORKERS,
    cgroup_cpu_limit,
    inference_summary,
    machine_plan,
    plan_for,
    threads_for,
    usable_cores,
)


@pytest.mark.parametrize(
    ("cores", "workers", "threads", "batch"),
    [(1, 1, 1, 4), (2, 2, 1, 4), (4, 4, 1, 4), (8, 8, 1, 4), (16, 8, 1, 4), (17, 8, 2, 8),
     (32, 8, 3, 12), (64, 8, 7, 16)],
)
def test_plan_fills_the_cores_with_single_threaded_workers_first(
        cores: int, workers: int, threads: int, batch: int) -> None:
    plan = plan_for(cores)
    assert (plan.workers, plan.torch_threads, plan.max_batch_size) == (workers, threads, batch)
    assert plan.workers <= MAX_AUTO_WORKERS
    # Never more torch threads than cores (the gateway's core aside, once there are spares).
    assert plan.workers * plan.torch_threads <= max(cores, 1)


def test_threads_for_an_explicit_worker_count_leave_the_gateway_a_core() -> None:
    assert threads_for(8, 1) == 7
    assert threads_for(8, 2) == 3
    assert threads_for(2, 2) == 1
    assert threads_for(1, 4) == 1


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 3.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path) is None
    assert cgroup_cpu_limit(tmp_path / "absent") is None


def test_settings_default_to_the_machine_and_explicit_values_win() -> None:
    plan = machine_plan()
    assert plan.cores == usable_cores()
    settings = Settings()
    assert (settings.workers, settings.max_batch_size) == (plan.workers, plan.max_batch_size)
    assert Settings.from_env({"PIXELSTREAM_WORKERS": "3"}).workers == 3
    assert Settings(workers=1, max_batch_size=2).max_batch_size == 2


def test_summary_says_which_values_came_from_the_machine() -> None:
    settings = Settings(workers=3, torch_threads=2, max_batch_size=6)
    line = inference_summary(settings, explicit={"workers"})
    assert "3 worker(s) x 2 torch thread(s), batches of up to 6" in line
    assert f"torch_threads, max_batch_size chosen for {usable_cores()} usable core(s)" in line
    everything = inference_summary(settings, {"workers", "torch_threads", "max_batch_size"})
    assert "all set explicitly" in everything


# A 30 MiB block allocated, written and freed three times; the minor page faults of the second
# and third rounds. glibc's defaults map the first block on its own and unmap it on free, so
# the second is fresh pages again; tuned, the freed block stays in the heap for the next.
FAULTS = r"""
import ctypes, ctypes.util, resource, sys
sys.path.insert(0, {root!r})
from server.tuning import tune_gateway_malloc, tune_worker_malloc
if {tune}:
    assert {tune}()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size = {size}
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    libc.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[1] + faults[2])
"""


def _faults(tune: str | None, size: int = 30 * 1024 * 1024) -> int:
    root = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", FAULTS.format(root=root, tune=tune, size=size)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("tune", ["tune_worker_malloc", "tune_gateway_malloc"])
def test_tuned_malloc_keeps_freed_pages_for_the_next_allocation(tune: str) -> None:
    pages = 30 * 1024 * 1024 // 4096
    assert _faults(None) >= pages // 2  # the defaults: the second block is fresh pages
    assert _faults(tune) < pages // 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_worker_keeps_blocks_above_glibcs_largest_mmap_threshold_too() -> None:
    """A detector's activations on 1024 px tiles (tens of MiB each) stay in a worker's heap;
    the gateway still maps blocks that large on their own."""
    size = 80 * 1024 * 1024
    pages = size // 4096
    assert _faults("tune_gateway_malloc", size) >= pages // 2
    assert _faults("tune_worker_malloc", size) < pages // 20
