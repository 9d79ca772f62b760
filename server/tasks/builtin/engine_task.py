"""The shape the built-in tasks over :mod:`server.vision` engines share."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from server.tasks.contract import ModelInfo, Task
from server.vision import Loading, package_version

Engine = TypeVar("Engine")


class EngineTask(Task, Generic[Engine]):
    """A built-in task whose model is an engine a package ships (OCR, codes, faces,
    moderation). Subclasses name the engine's ``model_id`` and ``distribution`` (whose version
    is the revision: results cached under other weights are never served) and build it in
    :meth:`make_engine`. The engine is built the first time the task runs in a worker
    (:class:`~server.vision.Loading`), never in the gateway, and never travels to a worker."""

    kind = "builtin"
    model_id: str = ""
    distribution: str = ""

    def __init__(self) -> None:
        self._engine: Loading[Engine] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_engine": None}  # workers load their own

    @property
    def model(self) -> ModelInfo:
        return ModelInfo(id=self.model_id, revision=package_version(self.distribution))

    def make_engine(self) -> Engine:
        """Build the engine (in a worker, on the task's first job there)."""
        raise NotImplementedError

    def setup(self, device: str) -> None:
        self._engine = Loading(self.make_engine)

    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError(f"{type(self).__name__}.setup() was not called")
        return self._engine.get()
