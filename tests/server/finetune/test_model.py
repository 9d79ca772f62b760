from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from server.finetune import model as modelmod
from server.pipeline.model_store import folder_revision
from tests.support.tiny_models import tiny_mobilenet, tiny_vit


def test_load_base_gives_a_new_head_with_the_labels(tmp_path: Path) -> None:
    import torch

    base = tiny_mobilenet(tmp_path / "base", labels=["a", "b", "c"])
    net, processor = modelmod.load_base(str(base), ["cat", "dog", "owl"], seed=1)
    again, _ = modelmod.load_base(str(base), ["cat", "dog", "owl"], seed=1)
    other, _ = modelmod.load_base(str(base), ["cat", "dog", "owl"], seed=2)
    from transformers import AutoModelForImageClassification

    original = AutoModelForImageClassification.from_pretrained(str(base))
    # same label count as the base, yet a new head: not the base's weights
    assert not torch.equal(net.classifier.weight, original.classifier.weight)
    assert torch.equal(net.classifier.weight, again.classifier.weight)  # seeded
    assert not torch.equal(net.classifier.weight, other.classifier.weight)
    assert net.config.id2label == {0: "cat", 1: "dog", 2: "owl"}
    assert net.config.problem_type == "single_label_classification"
    # the backbone keeps its weights
    assert torch.equal(net.mobilenet_v2.conv_stem.first_conv.convolution.weight,
                       original.mobilenet_v2.conv_stem.first_conv.convolution.weight)
    assert processor.crop_size == {"height": 64, "width": 64}


def test_load_base_of_a_vit(tmp_path: Path) -> None:
    base = tiny_vit(tmp_path / "vit", labels=["a", "b", "c", "d"])
    net, processor = modelmod.load_base(str(base), ["x", "y"], seed=0)
    assert net.classifier.out_features == 2
    transform = modelmod.transform_for(processor)
    from PIL import Image

    assert transform(Image.new("RGB", (50, 40), "red")).shape == (3, 32, 32)


def test_load_base_refuses_a_folder_that_is_no_classifier(tmp_path: Path) -> None:
    folder = tmp_path / "nothing"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(modelmod.ModelError, match="does not load as an image classifier"):
        modelmod.load_base(str(folder), ["a", "b"], seed=0)


def test_transform_matches_the_served_preprocessing(tmp_path: Path) -> None:
    from PIL import Image

    from server.tasks.contract import View
    from server.tasks.hf import ImageClassification

    base = tiny_mobilenet(tmp_path / "base", labels=["a", "b"])
    _, processor = modelmod.load_base(str(base), ["a", "b"], seed=0)
    image = Image.effect_mandelbrot((90, 70), (-2, -1.5, 1, 1.5), 60).convert("RGB")
    task = ImageClassification(str(base))
    task.setup("cpu")
    served = task.preprocess(View.whole(image, image.size), None).numpy()
    np.testing.assert_allclose(modelmod.transform_for(processor)(image), served, atol=1e-6)


def test_head_inputs_are_eval_mode_features(tmp_path: Path) -> None:
    """Each image's features do not depend on its batch (BatchNorm uses running statistics)."""
    base = tiny_mobilenet(tmp_path / "base", labels=["a", "b"])
    net, _ = modelmod.load_base(str(base), ["a", "b"], seed=0)
    net.train()  # whatever mode it was left in
    pixels = np.random.default_rng(0).normal(size=(6, 3, 64, 64)).astype(np.float16)
    together = modelmod.head_inputs(net, pixels, range(6), batch_size=6, device="cpu",
                                    progress=False, desc="features")
    alone = modelmod.head_inputs(net, pixels, [2], batch_size=1, device="cpu",
                                 progress=False, desc="features")
    assert together.shape == (6, net.classifier.in_features)
    np.testing.assert_allclose(alone[0].numpy(), together[2].numpy(), atol=1e-5)
    assert not net.training


def test_scores() -> None:
    truth = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 1, 0])
    report = modelmod.scores(truth, predicted, ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(4 / 6, abs=1e-4)
    assert report["confusion_matrix"]["matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert report["per_class"]["a"] == {"precision": round(2 / 3, 4), "recall": round(2 / 3, 4),
                                        "support": 3}
    assert report["per_class"]["b"] == {"precision": round(2 / 3, 4), "recall": 1.0,
                                        "support": 2}
    assert report["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "support": 1}
    text = modelmod.format_scores(report)
    assert "validation accuracy: 0.6667 (6 images)" in text
    assert "confusion matrix" in text


def test_saved_folder_carries_its_content_hash(tmp_path: Path) -> None:
    base = tiny_mobilenet(tmp_path / "base", labels=["a", "b"])
    net, processor = modelmod.load_base(str(base), ["x", "y"], seed=0)
    out = tmp_path / "out"
    revision = modelmod.save(net, processor, out, model_id="mine", details={"mode": "head"},
                             metrics={"accuracy": 1.0})
    assert revision == modelmod.content_revision(out)
    assert folder_revision(out) == revision
    marker = json.loads((out / "pixelstream-model.json").read_text())
    assert marker["model_id"] == "mine"
    assert json.loads((out / "metrics.json").read_text())["revision"] == revision
    # the same content elsewhere, with other times: the same revision once its hash is checked
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(out):
        (copy / name).write_bytes((out / name).read_bytes())
    assert modelmod.content_revision(copy) == revision
    # weights replaced behind the marker's back: it no longer speaks for the folder
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert folder_revision(out) != revision
