"""Task ``moderate``: how likely an image is to be pornographic, with Yahoo's Open-NSFW
classifier (:mod:`server.vision.moderate`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.tasks import results
from server.tasks.builtin.engine_task import EngineTask
from server.tasks.contract import DecodeHint, TaskOptions, View
from server.vision import moderate as engine
from server.vision import thread_count


class Moderate(EngineTask[engine.NsfwScorer]):
    name = "moderate"
    Options = TaskOptions
    Result = results.Moderation
    decode = DecodeHint(min_short_side=engine.INPUT_SIDE)

    model_id = engine.MODEL_ID
    distribution = engine.DISTRIBUTION

    def make_engine(self) -> engine.NsfwScorer:
        return engine.NsfwScorer(threads=thread_count())

    def preprocess(self, view: View, options: Any) -> Any:
        return engine.prepare(view.image)

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        scorer = self.engine()
        return scorer.score(batch)

    def encode(self, output: Any, view: View, options: Any) -> dict[str, Any]:
        return {"nsfw": round(float(output), 4)}
