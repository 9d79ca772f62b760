"""Task ``faces``: faces found with BlazeFace (:mod:`server.vision.faces`).

Spatial: a large image is read in overlapping full-resolution tiles of 2048 px, each read as a
small pyramid (the whole tile, then windows of it), so both a portrait's face and the faces of
a crowd are found; a face found by two tiles is reported once, the copy that scored best kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field

from server.tasks import results
from server.tasks.builtin.engine_task import EngineTask
from server.tasks.contract import DecodeHint, SpatialOptions, Tiling, View
from server.tasks.spatial import suppress_duplicates
from server.vision import faces as engine

DEFAULT_THRESHOLD = 0.6


class FacesOptions(SpatialOptions):
    threshold: float = Field(
        default=DEFAULT_THRESHOLD, ge=engine.MIN_SCORE, le=1.0,
        description="The lowest score reported (BlazeFace reports nothing below 0.5).")


def _score_then_area(face: dict[str, Any]) -> tuple[float, float]:
    x0, y0, x1, y1 = face["box"]
    return face["score"], (x1 - x0) * (y1 - y0)


def _best_first(faces: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(faces, key=lambda face: (-face["score"], face["box"][1], face["box"][0]))


class Faces(EngineTask[engine.FaceDetector]):
    name = "faces"
    Options = FacesOptions
    Result = results.Faces
    decode = DecodeHint(min_short_side=1024)
    tiling = Tiling(size=2048, overlap=512)

    model_id = engine.MODEL_ID
    distribution = engine.DISTRIBUTION

    def make_engine(self) -> engine.FaceDetector:
        return engine.FaceDetector()

    def preprocess(self, view: View, options: Any) -> Any:
        # The threshold goes with the image: duplicates are removed among the faces above it.
        return view.image, options.threshold

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        detector = self.engine()
        return [detector.detect(image, min_score=threshold) for image, threshold in batch]

    def encode(self, output: Any, view: View, options: Any) -> dict[str, Any]:
        found = []
        for face in output:
            box = view.box_to_original(face.box)
            if box is not None:
                found.append({"score": round(face.score, 4), "box": box})
        return {"faces": _best_first(found)}

    def merge(self, parts: Sequence[dict[str, Any]], original: tuple[int, int],
              options: Any) -> dict[str, Any]:
        found = [face for part in parts for face in part["faces"]]
        # Best score first, not largest first: a tile whose windows cut a head can report a
        # loose box around it at a low score, which would swallow the face a neighbour saw
        # whole. A face cut by a tile's edge scores lower than its whole copy anyway.
        kept = suppress_duplicates(found, lambda face: face["box"], _score_then_area,
                                   iou_threshold=0.4, containment_threshold=0.7)
        return {"faces": _best_first(kept)}
