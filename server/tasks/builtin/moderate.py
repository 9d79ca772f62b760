"""Task ``moderate``: how likely an image is to be pornographic, with Yahoo's Open-NSFW
classifier (:mod:`server.vision.moderate`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.tasks import results
from server.tasks.contract import DecodeHint, ModelInfo, Task, TaskOptions, View
from server.vision import Loading, package_version, thread_count
from server.vision import moderate as engine


class Moderate(Task):
    name = "moderate"
    kind = "builtin"
    Options = TaskOptions
    Result = results.Moderation
    decode = DecodeHint(min_short_side=engine.INPUT_SIDE)

    def __init__(self) -> None:
        self._scorer: Loading[engine.NsfwScorer] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_scorer": None}  # workers load their own

    @property
    def model(self) -> ModelInfo:
        return ModelInfo(id=engine.MODEL_ID, revision=package_version(engine.DISTRIBUTION))

    def setup(self, device: str) -> None:
        self._scorer = Loading(lambda: engine.NsfwScorer(threads=thread_count()))

    def preprocess(self, view: View, options: Any) -> Any:
        return engine.prepare(view.image)

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        if self._scorer is None:
            raise RuntimeError("setup() was not called")
        scorer = self._scorer.get()
        return scorer.score(batch)

    def encode(self, output: Any, view: View, options: Any) -> dict[str, Any]:
        return {"nsfw": round(float(output), 4)}
