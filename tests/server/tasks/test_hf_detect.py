"""server.tasks.hf_detect: kind ``object-detection`` on a tiny random-init DETR with a
transformers ResNet backbone; boxes in ORIGINAL pixels from downscaled decodes and tiles."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from server.tasks.contract import (
    OptionsError,
    Tiling,
    View,
    check_contract,
    parse_options,
    validate_options,
)
from server.tasks.hf_detect import DEFAULT_MAX_OBJECTS, Detections, ObjectDetection
from server.tasks.spatial import tile_boxes
from tests.support.tiny_models import tiny_detr, tiny_yolos

LABELS = ["cat", "dog", "car"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_detr(tmp_path_factory.mktemp("detect") / "tiny-detr", labels=LABELS)


@pytest.fixture(scope="module")
def task(folder: Path) -> ObjectDetection:
    created = ObjectDetection(str(folder), name="things")
    created.setup("cpu")
    return created


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def opts(task: ObjectDetection, **options: Any) -> Any:
    return parse_options(task, validate_options(task, options))


def detect(task: ObjectDetection, view: View, **options: Any) -> list[dict[str, Any]]:
    parsed = opts(task, **options)
    result = task.encode(task.predict([task.preprocess(view, parsed)])[0], view, parsed)
    assert list(result) == ["objects"]
    objects: list[dict[str, Any]] = result["objects"]
    return objects


def expected_boxes(task: ObjectDetection, image: Image.Image, original: tuple[int, int]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """DETR's raw answer read by hand: per query the best real class's probability and its
    normalised (cx, cy, w, h) box scaled to the ORIGINAL size."""
    import torch

    pixels = task.processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        raw = task.net(pixel_values=pixels)
    probs = torch.softmax(raw.logits[0], dim=-1)[:, :-1]  # the last class is "no object"
    scores = probs.max(dim=-1).values.numpy()
    cx, cy, w, h = raw.pred_boxes[0].numpy().T
    width, height = original
    boxes = np.stack([(cx - w / 2) * width, (cy - h / 2) * height,
                      (cx + w / 2) * width, (cy + h / 2) * height], axis=1)
    return scores, np.clip(boxes, 0, [width, height, width, height])


def test_description(folder: Path) -> None:
    task = ObjectDetection(str(folder))
    assert (task.name, task.kind) == ("detect", "object-detection")
    assert task.model.id == "tiny-detr"
    assert task.decode.min_short_side == 64
    assert task.tiling == Tiling(size=64, overlap=16)  # the processor's short side
    assert ObjectDetection(str(folder), tile_size=200, tile_overlap=40).tiling == Tiling(200, 40)
    assert check_contract(task) == []
    assert validate_options(task, {}) == {"tiles": True, "threshold": 0.5,
                                          "max_objects": DEFAULT_MAX_OBJECTS}
    for bad, message in (({"threshold": 1.5}, "less than or equal to 1"),
                         ({"max_objects": 0}, "greater than or equal to 1"),
                         ({"tiles": "yes"}, "valid boolean"),
                         ({"labels": ["cat"]}, "unknown option 'labels'")):
        with pytest.raises(OptionsError, match=message):
            validate_options(task, bad)


def test_boxes_of_a_downscaled_decode_are_in_original_pixels(task: ObjectDetection) -> None:
    original = (400, 300)
    decoded = noise(*original).resize((200, 150), Image.Resampling.BILINEAR)
    view = View.whole(decoded, original)  # the decoder shrank it by half
    objects = detect(task, view, threshold=0.0, max_objects=1000)
    scores, boxes = expected_boxes(task, decoded, original)
    assert len(objects) == len(scores)  # threshold 0: every query
    got = sorted((o["score"], *o["box"]) for o in objects)
    want = sorted((round(float(s), 6), *(round(float(v), 1) for v in b))
                  for s, b in zip(scores, boxes, strict=True))
    np.testing.assert_allclose(np.array(got), np.array(want), atol=0.15)
    for found in objects:
        x0, y0, x1, y1 = found["box"]
        assert 0 <= x0 < x1 <= 400
        assert 0 <= y0 < y1 <= 300
        assert found["label"] in LABELS


def test_threshold_and_max_objects(task: ObjectDetection) -> None:
    view = View.whole(noise(120, 90, seed=1), (120, 90))
    everything = detect(task, view, threshold=0.0, max_objects=1000)
    scores = [o["score"] for o in everything]
    assert scores == sorted(scores, reverse=True)
    distinct = sorted(set(scores))
    assert len(distinct) >= 2
    gap = max(range(len(distinct) - 1), key=lambda i: distinct[i + 1] - distinct[i])
    assert distinct[gap + 1] - distinct[gap] > 1e-4  # far from rounding's reach
    middle = (distinct[gap] + distinct[gap + 1]) / 2
    above = detect(task, view, threshold=middle, max_objects=1000)
    assert above == [o for o in everything if o["score"] >= middle]
    assert 0 < len(above) < len(everything)
    assert detect(task, view, threshold=0.0, max_objects=3) == everything[:3]
    assert detect(task, view, threshold=1.0) == []


def test_a_batch_matches_one_by_one(task: ObjectDetection) -> None:
    pictures = [noise(96, 64, seed=2), noise(64, 96, seed=3), noise(96, 64, seed=4)]
    thresholds = [0.0, 0.2, 0.0]
    items = [task.preprocess(View.whole(p, p.size), opts(task, threshold=t))
             for p, t in zip(pictures, thresholds, strict=True)]
    batched = task.predict(items)
    for item, output in zip(items, batched, strict=True):
        alone = task.predict([item])[0]
        assert isinstance(output, Detections)
        assert all(score >= item.threshold for score in output.scores)
        assert output.labels == alone.labels
        np.testing.assert_allclose(output.scores, alone.scores, atol=1e-5)
        np.testing.assert_allclose(output.boxes, alone.boxes, atol=1e-3)
    assert task.predict([]) == []


def test_tiles_report_original_pixels_and_merge_without_duplicates(
        task: ObjectDetection) -> None:
    """The runtime's way: every tile a view of its region of the original, then merge."""
    width, height = 160, 120
    image = noise(width, height, seed=6)
    tiling = task.tiling
    assert tiling is not None
    parsed = opts(task, threshold=0.0, max_objects=1000)
    regions = tile_boxes(width, height, tiling.size, tiling.overlap)
    assert len(regions) > 1
    views = [View(image.crop(region), (width, height), region) for region in regions]
    outputs = task.predict([task.preprocess(view, parsed) for view in views])
    parts = [task.encode(output, view, parsed) for output, view in zip(outputs, views,
                                                                        strict=True)]
    for part, view in zip(parts, views, strict=True):
        x0, y0, x1, y1 = view.region
        for found in part["objects"]:  # each tile's boxes lie inside its own region
            bx0, by0, bx1, by1 = found["box"]
            assert x0 - 0.1 <= bx0 < bx1 <= x1 + 0.1
            assert y0 - 0.1 <= by0 < by1 <= y1 + 0.1
    merged = task.merge(parts, (width, height), parsed)["objects"]
    total = sum(len(part["objects"]) for part in parts)
    assert 0 < len(merged) <= total
    assert [o["score"] for o in merged] == sorted((o["score"] for o in merged), reverse=True)
    capped = task.merge(parts, (width, height), opts(task, threshold=0.0, max_objects=2))
    assert capped["objects"] == merged[:2]


def test_merge_removes_an_object_seen_by_two_tiles(folder: Path) -> None:
    task = ObjectDetection(str(folder))
    parsed = opts(task)
    left = {"objects": [
        {"label": "cat", "score": 0.9, "box": [40.0, 10.0, 64.0, 50.0]},   # cut by the edge
        {"label": "dog", "score": 0.8, "box": [5.0, 5.0, 20.0, 20.0]},
    ]}
    right = {"objects": [
        {"label": "cat", "score": 0.95, "box": [40.0, 10.0, 80.0, 50.0]},  # the whole cat
        {"label": "dog", "score": 0.7, "box": [41.0, 11.0, 63.0, 49.0]},   # another label
    ]}
    merged = task.merge([left, right], (128, 64), parsed)["objects"]
    assert merged == [right["objects"][0], left["objects"][1], right["objects"][1]]


def test_encode_caps_a_whole_image_but_not_a_tile(folder: Path) -> None:
    task = ObjectDetection(str(folder))
    parsed = opts(task, max_objects=1)
    output = Detections([0.9, 0.8], [0, 1], [[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    whole = View.whole(Image.new("RGB", (64, 64)), (128, 128))
    assert task.encode(output, whole, parsed) == {"objects": [
        {"label": "cat", "score": 0.9, "box": [0.0, 0.0, 20.0, 20.0]}]}  # doubled: half scale
    tile = View(Image.new("RGB", (64, 64)), (128, 128), (64, 0, 128, 64))
    assert task.encode(output, tile, parsed) == {"objects": [
        {"label": "cat", "score": 0.9, "box": [64.0, 0.0, 74.0, 10.0]},
        {"label": "dog", "score": 0.8, "box": [84.0, 20.0, 94.0, 30.0]}]}


def test_a_yolos_folder_answers_in_original_pixels(tmp_path: Path) -> None:
    """YOLOS (a ViT with detection tokens, no backbone) through the same kind."""
    task = ObjectDetection(str(tiny_yolos(tmp_path / "tiny-yolos", labels=LABELS)))
    task.setup("cpu")
    original = (300, 200)
    decoded = noise(*original, seed=8).resize((150, 100), Image.Resampling.BILINEAR)
    view = View.whole(decoded, original)
    objects = detect(task, view, threshold=0.0, max_objects=1000)
    scores, boxes = expected_boxes(task, decoded, original)
    got = sorted((o["score"], *o["box"]) for o in objects)
    want = sorted((round(float(s), 6), *(round(float(v), 1) for v in b))
                  for s, b in zip(scores, boxes, strict=True))
    np.testing.assert_allclose(np.array(got), np.array(want), atol=0.15)
