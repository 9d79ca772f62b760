"""A worker process for supervisor tests: it does nothing but wait to be stopped."""

from __future__ import annotations

import threading
from multiprocessing.synchronize import Event

from server.runtime.supervisor import ignore_stop_signals, on_stop_request


def wait_for_stop(started: Event) -> None:
    """Ignore SIGINT/SIGTERM as workers do, say it started, and end when asked to."""
    stopped = threading.Event()
    ignore_stop_signals()
    on_stop_request(stopped.set)
    started.set()
    stopped.wait()
