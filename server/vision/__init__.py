"""Vision engines: thin wrappers over libraries that ship their weights in their packages.

One module per engine. Importing a module is cheap: each imports its library when an engine
object is built (in a worker's ``setup``), never at import time, so the gateway can import
the tasks built on them without loading onnxruntime, OpenCV or LiteRT.
"""

from __future__ import annotations

import importlib.metadata
import os


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
