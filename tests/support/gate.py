"""A test task that holds the inference worker until the test lets it go.

``gate`` analyses like ``colors`` but first takes a shared lock on a file; a test that holds
the exclusive lock keeps the worker inside that job, so the queue behind it is deterministic.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from typing import Any

from server.tasks.builtin.colors import Colors
from server.tasks.contract import ModelInfo, TaskOptions, View


class GateTask(Colors):
    name = "gate"
    kind = "python"
    Options = TaskOptions

    def __init__(self, lock_path: str) -> None:
        self.lock_path = lock_path

    @property
    def model(self) -> ModelInfo:
        return ModelInfo(id="test/gate")

    def preprocess(self, view: View, options: Any) -> Any:
        with open(self.lock_path, "rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)  # blocks while a test holds the gate closed
            fcntl.flock(lock, fcntl.LOCK_UN)
        return super().preprocess(view, options)

    def encode(self, output: Any, view: View, options: Any) -> dict[str, Any]:
        return super().encode(output, view, Colors.Options(colors=1))


@contextlib.contextmanager
def gate_closed(lock_path: str) -> Iterator[None]:
    """While inside, any ``gate`` job blocks in its worker."""
    with open(lock_path, "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
