"""A test task that fails to set up: the worker exits before it is ready."""

from __future__ import annotations

from server.tasks.builtin.colors import Colors
from server.tasks.contract import ModelInfo

LOAD_ERROR = "the broken test task refuses to load"


class BrokenTask(Colors):
    name = "broken"
    kind = "python"

    @property
    def model(self) -> ModelInfo:
        return ModelInfo(id="test/broken")

    def setup(self, device: str) -> None:
        raise RuntimeError(LOAD_ERROR)
