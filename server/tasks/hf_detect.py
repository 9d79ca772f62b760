"""Kind ``object-detection``: boxes from a detector folder (DETR, YOLOS, Conditional DETR,
RT-DETR...); answers like ``detect``.

A spatial task: on an image larger than one tile (the processor's short side, e.g. 800 px
for DETR) the runtime runs it on overlapping full-resolution tiles, so small objects of a
huge image are seen at their real size; :meth:`ObjectDetection.merge` joins the tiles'
objects and drops what two overlapping tiles both found
(:func:`server.tasks.spatial.suppress_duplicates`). Boxes are post-processed at the decoded
image's (or tile's) size, then mapped to ORIGINAL pixels by the view.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from server.tasks import results
from server.tasks.contract import SpatialOptions, Tiling, View
from server.tasks.hf import HFTask, groups_of_equal

DEFAULT_THRESHOLD = 0.5
DEFAULT_MAX_OBJECTS = 100
MAX_OBJECTS = 1000
DEFAULT_TILE = 800
"""Tile side when the processor does not say (DETR's own short side)."""
IOU_THRESHOLD = 0.5
CONTAINMENT_THRESHOLD = 0.8
"""A box this much inside a better one of the same label is the part of it that a tile's
edge cut off."""


class DetectOptions(SpatialOptions):
    threshold: float = Field(default=DEFAULT_THRESHOLD, ge=0.0, le=1.0,
                             description="Objects scoring below this are left out.")
    max_objects: int = Field(default=DEFAULT_MAX_OBJECTS, ge=1, le=MAX_OBJECTS,
                             description="The most objects to return, best first.")


@dataclass(frozen=True)
class DetectItem:
    pixels: Any
    """The image processor's ``pixel_values`` for one image or tile, [3, H, W]."""
    size: tuple[int, int]
    """The decoded image's (or tile's) ``(height, width)``: boxes come back in its pixels."""
    threshold: float


@dataclass(frozen=True)
class Detections:
    """One image's (or tile's) detections in its own pixels, best first."""

    scores: list[float]
    labels: list[int]
    boxes: list[list[float]]


class ObjectDetection(HFTask):
    """``AutoModelForObjectDetection`` with its image processor's post-processing.

    ``tile_size`` and ``tile_overlap`` (tasks-file ``args``) override the tiling: by default
    tiles are the processor's short side, overlapping by a quarter of it.
    """

    name = "detect"
    kind = "object-detection"
    auto_model = "AutoModelForObjectDetection"
    trace = False  # predict runs its own passes, not HFTask.forward
    Options = DetectOptions
    Result = results.Objects

    def __init__(self, model: str | None = None, *, name: str | None = None,
                 tile_size: int | None = None, tile_overlap: int | None = None) -> None:
        super().__init__(model, name=name)
        size = tile_size or self.decode.min_short_side or DEFAULT_TILE
        overlap = tile_overlap if tile_overlap is not None else size // 4
        self.tiling = Tiling(size=size, overlap=overlap)
        self.labels: dict[int, str] = {}
        self._label_names = self._labels_from_config()

    def _labels_from_config(self) -> dict[int, str]:
        config = self.config() or {}
        id2label = config.get("id2label")
        if not isinstance(id2label, Mapping):
            return {}
        return {int(key): str(value) for key, value in id2label.items()
                if str(key).lstrip("-").isdigit()}

    def loaded(self) -> None:
        if not callable(getattr(self.processor, "post_process_object_detection", None)):
            raise ValueError(f"{type(self.processor).__name__} cannot post-process detections")
        id2label = getattr(self.net.config, "id2label", None) or {}
        self.labels = {int(key): str(value) for key, value in id2label.items()}

    def preprocess(self, view: View, options: Any) -> Any:
        image = view.image
        return DetectItem(super().preprocess(view, options), (image.height, image.width),
                          float(options.threshold))

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        """Per item, its :class:`Detections` at or above its threshold, in its own pixels."""
        import torch

        if not batch:
            return []
        self._require_loaded()
        outputs: list[Any] = [None] * len(batch)
        for group in groups_of_equal([tuple(item.pixels.shape) for item in batch]):
            items = [batch[i] for i in group]
            pixels = torch.stack([item.pixels for item in items]).to(self.device)
            with torch.inference_mode():
                raw = self.net(pixel_values=pixels)
            found = self.processor.post_process_object_detection(
                raw, threshold=min(item.threshold for item in items),
                target_sizes=[item.size for item in items])
            for index, item, one in zip(group, items, found, strict=True):
                scores = one["scores"].to(torch.float32).cpu().tolist()
                labels = one["labels"].cpu().tolist()
                boxes = one["boxes"].to(torch.float32).cpu().tolist()
                keep = sorted((i for i, score in enumerate(scores) if score >= item.threshold),
                              key=lambda i: -scores[i])
                outputs[index] = Detections([scores[i] for i in keep],
                                            [int(labels[i]) for i in keep],
                                            [boxes[i] for i in keep])
        return outputs

    def encode(self, output: Any, view: View, options: Any) -> dict[str, Any]:
        """Boxes in ORIGINAL pixels, best first; ``max_objects`` of them for a whole image
        (a tile keeps all: :meth:`merge` caps after removing duplicates)."""
        objects = []
        for score, label, box in zip(output.scores, output.labels, output.boxes, strict=True):
            original = view.box_to_original(box)
            if original is None:
                continue
            name = self.labels.get(label) or self._label_names.get(label) or f"LABEL_{label}"
            objects.append({"label": name, "score": round(min(max(score, 0.0), 1.0), 6),
                            "box": original})
        objects.sort(key=lambda found: -found["score"])
        whole = view.region == (0, 0, view.original[0], view.original[1])
        return {"objects": objects[:options.max_objects] if whole else objects}

    def merge(self, parts: Sequence[dict[str, Any]], original: tuple[int, int],
              options: Any) -> dict[str, Any]:
        """The tiles' objects, each found once: of two boxes of one label that overlap (IoU
        :data:`IOU_THRESHOLD`) or where one lies mostly inside the other (a cut-off part,
        :data:`CONTAINMENT_THRESHOLD`), the better scoring stays; best first, capped."""
        from server.tasks.spatial import area, suppress_duplicates

        found = [item for part in parts for item in part.get("objects", [])]
        kept = suppress_duplicates(
            found, box=lambda item: item["box"],
            rank=lambda item: (item["score"], area(item["box"])),
            iou_threshold=IOU_THRESHOLD, containment_threshold=CONTAINMENT_THRESHOLD,
            same=lambda kept, item: kept["label"] == item["label"])
        kept.sort(key=lambda item: -item["score"])
        return {"objects": kept[:options.max_objects]}

