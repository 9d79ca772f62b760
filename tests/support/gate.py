"""A test task that holds the inference worker until the test lets it go.

``gate`` analyses like ``colors`` but first takes a shared lock on a file; a test that holds
the exclusive lock keeps the worker inside that job, so the queue behind it is deterministic.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from server.pipeline.analyzers.colors import ColorsAnalyzer


@dataclass(frozen=True)
class GateSpec:
    lock_path: str
    task: str = "gate"

    @property
    def model_id(self) -> str:
        return "test/gate"

    @property
    def model_revision(self) -> str:
        return ""

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def create_analyzer(self) -> GateAnalyzer:
        return GateAnalyzer(self.lock_path)


class GateAnalyzer(ColorsAnalyzer):
    task = "gate"
    model_id = "test/gate"

    def __init__(self, lock_path: str) -> None:
        self.lock_path = lock_path

    def preprocess(self, image: Any, options: Mapping[str, Any]) -> Any:
        with open(self.lock_path, "rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)  # blocks while a test holds the gate closed
            fcntl.flock(lock, fcntl.LOCK_UN)
        return super().preprocess(image, options)

    def encode(self, output: Any, options: Mapping[str, Any]) -> dict[str, Any]:
        return super().encode(output, {"colors": 1})


@contextlib.contextmanager
def gate_closed(lock_path: str) -> Iterator[None]:
    """While inside, any ``gate`` job blocks in its worker."""
    with open(lock_path, "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
