"""Vision engines: thin wrappers over libraries that ship their weights in their packages.

One module per engine. Importing a module is cheap: each imports its library when an engine
object is built (in a worker's ``setup``), never at import time, so the gateway can import
the tasks built on them without loading onnxruntime, OpenCV or LiteRT.
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

Engine = TypeVar("Engine")


class Loading(Generic[Engine]):
    """An engine built when a task first needs it, in the worker that needs it.

    Every worker sets up every built-in task, and a deployment may use few of them: building
    all four engines took 2.6 s here and brought a process's peak RSS to 203 MB, on every
    worker's start, for tasks it may never be asked for. So ``setup`` only prepares this,
    and the first ``predict`` of the task builds the engine (once; its load time counts in
    that job's inference time). :meth:`get` raises what building raised, and tries again
    next time."""

    def __init__(self, build: Callable[[], Engine]) -> None:
        self._build = build
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    def get(self) -> Engine:
        with self._lock:
            if self._engine is None:
                self._engine = self._build()
            return self._engine


def package_version(distribution: str) -> str:
    """The installed version of ``distribution`` ("" when it is not installed): the revision
    of weights a package ships, so that cached results change when the package does."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


def thread_count() -> int | None:
    """Threads an engine's runtime may use: the worker's ``OMP_NUM_THREADS`` (set before it
    loads its tasks, so that several workers do not each take every core), else None (the
    runtime's default)."""
    try:
        threads = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return threads if threads > 0 else None
