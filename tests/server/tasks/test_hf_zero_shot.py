"""server.tasks.hf_zero_shot: kind ``zero-shot-image-classification`` on a tiny random-init
CLIP with a handmade tokenizer vocabulary."""

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
    View,
    check_contract,
    parse_options,
    validate_options,
)
from server.tasks.hf_zero_shot import (
    DEFAULT_TEMPLATE,
    MAX_LABELS,
    ZeroShotImageClassification,
)
from tests.support.tiny_models import tiny_clip

WORDS = ["cat", "dog", "car", "tree", "boat"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_clip(tmp_path_factory.mktemp("zero-shot") / "tiny-clip", words=WORDS)


@pytest.fixture
def task(folder: Path) -> ZeroShotImageClassification:
    created = ZeroShotImageClassification(str(folder), name="things")
    created.setup("cpu")
    return created


def images() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for w, h in ((80, 60), (50, 90), (40, 40))]


def opts(task: ZeroShotImageClassification, **options: Any) -> Any:
    return parse_options(task, validate_options(task, options))


def scores_by_reference(task: ZeroShotImageClassification, image: Image.Image,
                        labels: list[str]) -> np.ndarray:
    """The same question through CLIPModel's own forward pass and processor."""
    import torch

    inputs = task.processor(text=[DEFAULT_TEMPLATE.format(label) for label in labels],
                            images=image, return_tensors="pt", padding=True)
    with torch.inference_mode():
        logits = task.net(**inputs).logits_per_image[0]
    return torch.softmax(logits, dim=-1).numpy()


def test_description_and_options(folder: Path) -> None:
    task = ZeroShotImageClassification(str(folder))
    assert (task.name, task.kind) == ("zero-shot", "zero-shot-image-classification")
    assert task.model.id == "tiny-clip"
    assert task.decode.min_short_side == 32  # read from the combined processor_config.json
    assert check_contract(task) == []
    assert validate_options(task, {"labels": ["cat", "dog"]}) == {
        "labels": ["cat", "dog"], "template": DEFAULT_TEMPLATE}
    schema = task.options_model().model_json_schema()
    assert schema["required"] == ["labels"]
    assert schema["properties"]["labels"]["maxItems"] == MAX_LABELS


@pytest.mark.parametrize(("options", "message"), [
    ({}, "option 'labels' is required"),
    ({"labels": []}, "at least 1 item"),
    ({"labels": [f"l{i}" for i in range(MAX_LABELS + 1)]}, "at most 64 items"),
    ({"labels": ["cat", ""]}, "at least 1 character"),
    ({"labels": ["cat", "cat"]}, "distinct"),
    ({"labels": "cat"}, "valid list"),
    ({"labels": ["cat", 3]}, "valid string"),
    ({"labels": ["cat"], "template": "no place"}, "exactly once"),
    ({"labels": ["cat"], "top_k": 1}, "unknown option 'top_k'"),
])
def test_bad_options_are_refused(folder: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(OptionsError, match=message):
        validate_options(ZeroShotImageClassification(str(folder)), options)


@pytest.mark.parametrize("template", [
    "{}", "This is a photo of {}.", "{{}", "{}}", "a {b} {}", "{} and {}", "no place", "{ }",
    "{{}}", "}{", "", "{{{}", "}{}{",
])
def test_the_published_schema_says_what_the_validators_check(folder: Path,
                                                            template: str) -> None:
    """A client that builds options from ``GET /v1/tasks`` (a form, a schema-driven test)
    must not send ones the server refuses: repeated labels and a template without exactly
    one ``{}`` are refused, so the schema says so too."""
    import re

    task = ZeroShotImageClassification(str(folder))
    properties = task.options_model().model_json_schema()["properties"]
    assert properties["labels"]["uniqueItems"] is True
    by_schema = re.search(properties["template"]["pattern"], template) is not None
    try:
        validate_options(task, {"labels": ["cat"], "template": template})
        by_server = True
    except OptionsError:
        by_server = False
    assert by_schema == by_server == (template.count("{}") == 1)


def test_one_score_per_given_label_best_first(task: ZeroShotImageClassification) -> None:
    image = images()[0]
    view = View.whole(image, image.size)
    labels = ["dog", "car", "cat"]
    parsed = opts(task, labels=labels)
    result = task.encode(task.predict([task.preprocess(view, parsed)])[0], view, parsed)
    answered = result["labels"]
    assert sorted(item["label"] for item in answered) == sorted(labels)
    scores = [item["score"] for item in answered]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-5)  # CLIP: a softmax over the labels
    expected = dict(zip(labels, scores_by_reference(task, image, labels).tolist(), strict=True))
    for item in answered:
        assert item["score"] == pytest.approx(expected[item["label"]], abs=1e-5)


def test_a_batch_of_different_label_sets(task: ZeroShotImageClassification) -> None:
    questions = [["cat", "dog"], ["tree", "boat", "car"], ["cat", "dog"]]
    pictures = images()
    items = [task.preprocess(View.whole(image, image.size), opts(task, labels=labels))
             for image, labels in zip(pictures, questions, strict=True)]
    batched = task.predict(items)
    for image, labels, output in zip(pictures, questions, batched, strict=True):
        assert output.shape == (len(labels),)
        np.testing.assert_allclose(output, scores_by_reference(task, image, labels), atol=1e-5)


def test_text_embeddings_are_computed_once_per_label_set(
        task: ZeroShotImageClassification) -> None:
    calls: list[int] = []
    original = task.net.get_text_features

    def counting(**inputs: Any) -> Any:
        calls.append(int(inputs["input_ids"].shape[0]))
        return original(**inputs)

    task.net.get_text_features = counting
    pictures = images()
    for image in pictures:
        task.predict([task.preprocess(View.whole(image, image.size),
                                      opts(task, labels=["cat", "dog"]))])
    assert calls == [2]
    task.predict([task.preprocess(View.whole(pictures[0], pictures[0].size),
                                  opts(task, labels=["dog", "cat"]))])
    task.predict([task.preprocess(View.whole(pictures[0], pictures[0].size),
                                  opts(task, labels=["cat", "dog"], template="a {}"))])
    assert calls == [2, 2, 2]  # another order, another template: another question


def test_a_label_longer_than_the_text_tower_is_truncated(
        task: ZeroShotImageClassification) -> None:
    image = images()[2]
    long_label = " ".join(["cat"] * 40)  # more tokens than the tiny tower's 32 positions
    parsed = opts(task, labels=[long_label, "dog"])
    view = View.whole(image, image.size)
    result = task.encode(task.predict([task.preprocess(view, parsed)])[0], view, parsed)
    assert {item["label"] for item in result["labels"]} == {long_label, "dog"}


def test_ties_keep_the_given_order(folder: Path) -> None:
    task = ZeroShotImageClassification(str(folder))
    parsed = opts(task, labels=["b", "a", "c"])
    view = View.whole(Image.new("RGB", (8, 8)), (8, 8))
    result = task.encode(np.array([0.25, 0.5, 0.25], dtype=np.float32), view, parsed)
    assert [item["label"] for item in result["labels"]] == ["a", "b", "c"]
