from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from server.finetune.train import FinetuneConfig, FinetuneError, finetune
from server.pipeline.model_store import folder_revision
from server.tasks.contract import View
from server.tasks.hf import ImageClassification
from tests.server.finetune.conftest import COLOURS, PHOTOS, calibrated_mobilenet, noisy, photo_set


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return calibrated_mobilenet(tmp_path_factory.mktemp("base") / "tiny", ["x", "y", "z"])


def run(data: Path, out: Path, base: Path | None, **options: Any) -> Any:
    lines: list[str] = []
    outcome = finetune(FinetuneConfig(data_dir=data, out=out,
                                      base=str(base) if base else None, progress=False,
                                      **options), say=lines.append)
    outcome.lines = lines
    return outcome


def classify(folder: Path, images: list[Any]) -> list[str]:
    task = ImageClassification(str(folder))
    task.setup("cpu")
    options = task.options_model()()
    items = [task.preprocess(View.whole(image, image.size), options) for image in images]
    outputs = task.predict(items)
    return [task.encode(output, View.whole(image, image.size), options)["labels"][0]["label"]
            for output, image in zip(outputs, images, strict=True)]


@pytest.mark.parametrize("mode", ["head", "full"])
def test_the_default_model_learns_new_labels_and_serves_them(
        tmp_path: Path, models_root: Path, mode: str) -> None:
    data = photo_set(tmp_path / "data", 10, seed=0)
    out = tmp_path / "photos"
    outcome = run(data, out, None, mode=mode, epochs=None if mode == "head" else 2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] == outcome.metrics["accuracy"]
    assert metrics["accuracy"] >= 0.8
    assert metrics["images"] == 6  # 0.2 of 10 per class
    assert set(metrics["per_class"]) == set(PHOTOS)
    assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == 6
    assert metrics["training"]["mode"] == mode
    assert any(line.startswith("validation accuracy: ") for line in outcome.lines)
    assert outcome.lines[-1] == f"saved photos revision {outcome.revision} to {out}"
    # served as it is: the new labels, right on crops it never saw
    task = ImageClassification(str(out))
    assert task.model.id == "photos"
    assert task.model.revision == outcome.revision == folder_revision(out)
    unseen = photo_set(tmp_path / "unseen", 4, seed=99)
    images, truth = [], []
    for path in sorted(unseen.rglob("*.jpg")):
        images.append(Image.open(path).convert("RGB"))
        truth.append(path.parent.name)
    answers = classify(out, images)
    assert set(answers) <= set(PHOTOS)
    assert np.mean([a == t for a, t in zip(answers, truth, strict=True)]) >= 0.8


def test_a_tiny_base_learns_colours(image_set: Callable[..., Path], tmp_path: Path,
                                    tiny_base: Path) -> None:
    """Any image-classification folder can be the base; its new head names the data's
    labels."""
    out = tmp_path / "colours"
    outcome = run(image_set({"red": 6, "green": 6, "blue": 6}), out, tiny_base, mode="head",
                  epochs=10, learning_rate=1e-2, batch_size=8)
    assert outcome.metrics["images"] == 3
    answers = classify(out, [noisy(COLOURS["red"], np.random.default_rng(5))])
    assert answers[0] in {"red", "green", "blue"}


def test_head_mode_leaves_the_backbone_and_its_batchnorm_statistics_alone(
        image_set: Callable[..., Path], tmp_path: Path, tiny_base: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "model"
    run(image_set(), out, tiny_base, mode="head", epochs=2)
    trained = load_file(str(out / "model.safetensors"))
    original = load_file(str(tiny_base / "model.safetensors"))
    backbone = [name for name in original if not name.startswith("classifier.")]
    assert any("running_mean" in name for name in backbone)
    for name in backbone:
        assert trained[name].equal(original[name]), name


def test_the_same_seed_gives_the_same_model(image_set: Callable[..., Path], tmp_path: Path,
                                            tiny_base: Path) -> None:
    data = image_set()
    first = run(data, tmp_path / "a", tiny_base, mode="full", epochs=1, seed=3)
    second = run(data, tmp_path / "b", tiny_base, mode="full", epochs=1, seed=3)
    third = run(data, tmp_path / "c", tiny_base, mode="full", epochs=1, seed=4)
    assert first.revision == second.revision
    assert third.revision != first.revision


def test_resume_continues_from_the_last_checkpoint(image_set: Callable[..., Path],
                                                   tmp_path: Path, tiny_base: Path) -> None:
    """A run stopped after its third epoch (its last checkpoint removed) and resumed ends
    with the weights of the run that was never stopped."""
    import shutil

    from safetensors.torch import load_file

    data = image_set()
    out = tmp_path / "model"
    run(data, out, tiny_base, mode="head", epochs=4)
    straight = load_file(str(out / "model.safetensors"))
    checkpoints = sorted((out / "checkpoints").glob("checkpoint-*"),
                         key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == 2  # the last two epochs
    shutil.rmtree(checkpoints[-1])
    (out / "model.safetensors").unlink()
    run(data, out, tiny_base, mode="head", epochs=4, resume=True)
    resumed = load_file(str(out / "model.safetensors"))
    assert set(resumed) == set(straight)
    for name, tensor in straight.items():
        assert resumed[name].equal(tensor), name


def test_resume_refuses_what_it_cannot_continue(image_set: Callable[..., Path],
                                                tmp_path: Path, tiny_base: Path) -> None:
    data = image_set()
    out = tmp_path / "model"
    with pytest.raises(FinetuneError, match=r"no checkpoint in .* to resume from"):
        run(data, out, tiny_base, mode="head", epochs=1, resume=True)
    run(data, out, tiny_base, mode="head", epochs=1)
    with pytest.raises(FinetuneError, match="trained with another mode"):
        run(data, out, tiny_base, mode="full", epochs=2, resume=True)


def test_options_out_of_range_are_refused(image_set: Callable[..., Path],
                                          tmp_path: Path) -> None:
    with pytest.raises(FinetuneError, match="--val-split must be between 0 and 1"):
        run(image_set(), tmp_path / "m", None, val_split=0.0)
    with pytest.raises(FinetuneError, match="epochs and batch size must be at least 1"):
        run(image_set(), tmp_path / "m", None, epochs=0)
    with pytest.raises(FinetuneError, match=r"base model folder .* does not exist"):
        run(image_set(), tmp_path / "m", tmp_path / "missing")
