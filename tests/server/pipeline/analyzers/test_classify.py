"""Tests for server.pipeline.analyzers.classify: the ``classify`` task with the real model."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported anywhere: never the hub

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from server.pipeline.analyzers.base import DecodeHint, OptionsError
from server.pipeline.analyzers.classify import (
    ClassifyAnalyzer,
    ClassifySpec,
    decode_hint_from_processor,
)
from server.pipeline.model_store import DEFAULT_MODEL_ID

ROOT = Path(__file__).resolve().parents[4]
CAT_CLASSES = {"Egyptian cat", "tabby, tabby cat", "tiger cat"}


def _skimage(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)())



@pytest.fixture(scope="module")
def analyzer(models_root: Path) -> ClassifyAnalyzer:
    created = ClassifySpec().create_analyzer()
    assert isinstance(created, ClassifyAnalyzer)
    created.load()
    return created


@pytest.fixture(scope="module")
def reference(analyzer: ClassifyAnalyzer) -> ClassifyAnalyzer:
    """The same model through the plain transformers processor and an unmodified network."""
    plain = ClassifyAnalyzer(fast_preprocess=False, optimize=False)
    plain.load()
    return plain


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    return {name: _skimage(name) for name in ("chelsea", "coffee", "astronaut", "rocket")}


def classify(
    analyzer: ClassifyAnalyzer, image: Image.Image, **options: Any
) -> list[dict[str, Any]]:
    opts = ClassifySpec().validate_options(options)
    output = analyzer.predict([analyzer.preprocess(image, opts)])[0]
    labels: list[dict[str, Any]] = analyzer.encode(output, opts)["labels"]
    return labels


# -- spec --------------------------------------------------


def test_spec_basics() -> None:
    spec = ClassifySpec()
    assert spec.task == "classify"
    assert spec.model_id == DEFAULT_MODEL_ID
    assert ClassifySpec("acme/vit-birds").model_id == "acme/vit-birds"
    analyzer = spec.create_analyzer()
    assert isinstance(analyzer, ClassifyAnalyzer)
    assert analyzer.task == "classify"
    assert analyzer.model_id == DEFAULT_MODEL_ID
    assert analyzer.decode_hint == DecodeHint(min_short_side=256)
    assert not analyzer.loaded


def test_spec_of_a_local_folder_reads_only_its_json(tmp_path: Path) -> None:
    folder = tmp_path / "birds"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"id2label": {"0": "robin", "1": "wren", "2": "jay"}}), encoding="utf-8"
    )
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"do_resize": True, "size": {"height": 384, "width": 384}}), encoding="utf-8"
    )
    spec = ClassifySpec(str(folder))
    assert spec.model_id == "birds"
    assert len(spec.model_revision) == 16
    assert spec.max_top_k == 3
    assert spec.validate_options({}) == {"top_k": 3}
    assert spec.validate_options({"top_k": 2}) == {"top_k": 2}
    with pytest.raises(OptionsError, match="from 1 to 3"):
        spec.validate_options({"top_k": 4})
    assert spec.create_analyzer().decode_hint == DecodeHint(min_short_side=384)


def test_validate_options_defaults_and_normalizes() -> None:
    spec = ClassifySpec()
    assert spec.validate_options({}) == {"top_k": 5}
    assert spec.validate_options({"top_k": 1}) == {"top_k": 1}
    assert spec.validate_options({"top_k": 1000}) == {"top_k": 1000}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"top_k": 0}, "from 1 to 1000"),
        ({"top_k": -3}, "from 1 to 1000"),
        ({"top_k": 1001}, "from 1 to 1000"),
        ({"top_k": True}, "must be an integer"),
        ({"top_k": 5.0}, "must be an integer"),
        ({"top_k": "5"}, "must be an integer"),
        ({"top_k": None}, "must be an integer"),
        ({"topk": 5}, "unknown option"),
        ({"top_k": 5, "threshold": 0.5}, "'threshold'"),
    ],
)
def test_validate_options_rejects(options: dict[str, Any], message: str) -> None:
    with pytest.raises(OptionsError, match=message):
        ClassifySpec().validate_options(options)


def test_validate_options_rejects_non_mapping() -> None:
    with pytest.raises(OptionsError, match="must be an object"):
        ClassifySpec().validate_options([("top_k", 5)])  # type: ignore[arg-type]


def test_spec_import_does_not_import_torch_or_transformers() -> None:
    code = (
        "import sys\n"
        "from server.pipeline.analyzers.classify import ClassifySpec\n"
        "spec = ClassifySpec()\n"
        "assert spec.model_id == 'pixelstream/mobilenet_v2-imagenet'\n"
        "assert spec.validate_options({'top_k': 3}) == {'top_k': 3}\n"
        "analyzer = spec.create_analyzer()\n"
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


def test_loaded_decode_hint(analyzer: ClassifyAnalyzer) -> None:
    assert analyzer.decode_hint == DecodeHint(min_short_side=256)


# -- the real model --------------------------------------------------


def test_chelsea_is_a_cat(analyzer: ClassifyAnalyzer, images: dict[str, Image.Image]) -> None:
    top3 = [item["label"] for item in classify(analyzer, images["chelsea"], top_k=3)]
    assert CAT_CLASSES & set(top3), top3


def test_coffee_is_espresso(analyzer: ClassifyAnalyzer, images: dict[str, Image.Image]) -> None:
    labels = classify(analyzer, images["coffee"])
    assert labels[0]["label"] == "espresso"
    assert labels[0]["score"] > 0.9


def test_result_shape(analyzer: ClassifyAnalyzer, images: dict[str, Image.Image]) -> None:
    opts = {"top_k": 5}
    payload = analyzer.encode(
        analyzer.predict([analyzer.preprocess(images["rocket"], opts)])[0], opts
    )
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
    analyzer: ClassifyAnalyzer, images: dict[str, Image.Image], top_k: int
) -> None:
    labels = classify(analyzer, images["astronaut"], top_k=top_k)
    assert len(labels) == top_k
    scores = [item["score"] for item in labels]
    assert scores == sorted(scores, reverse=True)
    assert len({item["label"] for item in labels}) == top_k - (top_k == 1000)  # "crane" twice
    if top_k == 1000:
        assert sum(scores) == pytest.approx(1.0, abs=1e-3)


def test_batch_matches_one_by_one(
    analyzer: ClassifyAnalyzer, images: dict[str, Image.Image]
) -> None:
    opts = {"top_k": 5}
    prepared = [analyzer.preprocess(image, opts) for image in images.values()]
    batched = analyzer.predict(prepared)
    assert len(batched) == len(prepared)
    for item, from_batch in zip(prepared, batched, strict=True):
        alone = analyzer.predict([item])[0]
        np.testing.assert_allclose(from_batch, alone, atol=1e-5)
        assert [x["label"] for x in analyzer.encode(from_batch, opts)["labels"]][:2] == [
            x["label"] for x in analyzer.encode(alone, opts)["labels"]
        ][:2]
    assert analyzer.predict([]) == []


def test_preprocess_output(analyzer: ClassifyAnalyzer, images: dict[str, Image.Image]) -> None:
    import torch

    for image in [
        images["chelsea"],
        images["chelsea"].convert("L"),
        images["coffee"].convert("RGBA"),
    ]:
        tensor = analyzer.preprocess(image, {"top_k": 5})
        assert isinstance(tensor, torch.Tensor)
        assert tensor.shape == (3, 224, 224)
        assert tensor.dtype == torch.float32
        assert tensor.is_contiguous()


@pytest.mark.parametrize("size", [(451, 300), (256, 192), (1500, 1125), (1125, 1500), (224, 224)])
def test_fast_path_matches_transformers_processor(
    analyzer: ClassifyAnalyzer,
    reference: ClassifyAnalyzer,
    images: dict[str, Image.Image],
    size: tuple[int, int],
) -> None:
    assert analyzer._fast is not None
    assert reference._fast is None
    for name in ("chelsea", "coffee"):
        image = images[name].resize(size, Image.Resampling.BICUBIC)
        fast = analyzer.preprocess(image, {})
        slow = reference.preprocess(image, {})
        # the same pixels up to a rare one-level rounding difference of the resampler
        assert float((fast - slow).abs().max()) < 0.02
        p_fast = analyzer.predict([fast])[0]
        p_slow = reference.predict([slow])[0]
        assert int(p_fast.argmax()) == int(p_slow.argmax())
        assert float(np.abs(p_fast - p_slow).max()) < 1e-3


def test_real_images_match_reference(
    analyzer: ClassifyAnalyzer, reference: ClassifyAnalyzer, images: dict[str, Image.Image]
) -> None:
    for name in ("chelsea", "coffee"):
        fast = classify(analyzer, images[name], top_k=3)
        slow = classify(reference, images[name], top_k=3)
        assert fast[0]["label"] == slow[0]["label"]
        for a, b in zip(fast, slow, strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-3)


def test_hooks_require_load() -> None:
    fresh = ClassifyAnalyzer()
    with pytest.raises(RuntimeError, match="load"):
        fresh.preprocess(Image.new("RGB", (300, 300)), {"top_k": 5})


# -- encode --------------------------------------------------


def test_encode_orders_ties_by_class_index() -> None:
    analyzer = ClassifyAnalyzer()
    analyzer.labels = ["a", "b", "c", "d"]
    probs = np.array([0.2, 0.3, 0.2, 0.3], dtype=np.float32)
    labels = analyzer.encode(probs, {"top_k": 4})["labels"]
    assert [x["label"] for x in labels] == ["b", "d", "a", "c"]
    assert [x["label"] for x in analyzer.encode(probs, {"top_k": 9})["labels"]] == [
        "b",
        "d",
        "a",
        "c",
    ]
    assert analyzer.encode(probs, {})["labels"][0] == {"label": "b", "score": 0.3}


# -- any transformers folder (tiny random models) ----------------------------------------------


def _tiny_model(folder: Path, *, problem_type: str | None, labels: list[str]) -> Path:
    import transformers
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    config_cls: Any = MobileNetV2Config
    config = config_cls(
        depth_multiplier=0.35,
        image_size=64,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        problem_type=problem_type,
    )
    model: Any = MobileNetV2ForImageClassification(config)
    model.save_pretrained(folder)
    processor_cls = getattr(transformers, "MobileNetV2ImageProcessorPil", None)
    processor_cls = processor_cls or transformers.MobileNetV2ImageProcessor
    processor_cls(
        size={"shortest_edge": 72}, crop_size={"height": 64, "width": 64}
    ).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("problem_type", [None, "multi_label_classification"])
def test_other_model_folders(tmp_path: Path, problem_type: str | None) -> None:
    labels = ["red", "green", "blue", "cyan"]
    folder = _tiny_model(tmp_path / "tiny-colours", problem_type=problem_type, labels=labels)
    spec = ClassifySpec(str(folder))
    assert spec.model_id == "tiny-colours"
    assert spec.validate_options({}) == {"top_k": 4}
    analyzer = spec.create_analyzer()
    assert analyzer.decode_hint == DecodeHint(min_short_side=72)
    analyzer.load()
    assert analyzer.labels == labels
    images = [Image.new("RGB", (100, 80), colour) for colour in ("red", "green", "blue")]
    batch = [analyzer.preprocess(image, {}) for image in images]
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
            logits = analyzer._net(pixel_values=torch.stack(batch)).logits
        np.testing.assert_allclose(np.stack(outputs), torch.sigmoid(logits).numpy(), atol=1e-6)
        assert not np.allclose(np.stack(outputs).sum(axis=1), 1.0)
    encoded = analyzer.encode(outputs[0], spec.validate_options({"top_k": 2}))
    assert len(encoded["labels"]) == 2
    assert {item["label"] for item in encoded["labels"]} <= set(labels)


def test_weights_replaced_in_a_folder_get_a_new_revision(tmp_path: Path) -> None:
    folder = tmp_path / "birds"
    folder.mkdir()
    (folder / "config.json").write_text("{}", encoding="utf-8")
    weights = folder / "model.safetensors"
    weights.write_bytes(b"v1" * 100)
    before = ClassifySpec(str(folder)).model_revision
    assert ClassifySpec(str(folder)).model_revision == before  # stable while nothing changes
    weights.write_bytes(b"v2" * 100)  # retrained in place: same name, same size
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    after = ClassifySpec(str(folder)).model_revision
    assert after != before
    assert ClassifySpec(str(folder)).model_id == "birds"  # results still name it the same
    assert ClassifySpec().model_revision == ""  # the bundled weights are pinned
    assert ClassifySpec("acme/vit-birds").model_revision == ""
