"""A folder of model versions made of tiny classifiers, each revision with its own labels."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.models.store import ModelVersions
from tests.support.tiny_models import tiny_mobilenet


def tiny_version(tmp: Path, versions: ModelVersions, labels: list[str], seed: int) -> str:
    """Add a tiny MobileNetV2 answering ``labels`` as a revision; returns the revision."""
    import torch

    torch.manual_seed(seed)
    folder = tiny_mobilenet(tmp / f"src-{seed}", labels=labels)
    return versions.add(folder)


@pytest.fixture
def versions(tmp_path: Path) -> tuple[ModelVersions, str, str]:
    """``MODELS/shapes`` with revisions A (labels a1, a2; active) and B (b1, b2)."""
    store = ModelVersions(tmp_path / "models" / "shapes")
    first = tiny_version(tmp_path, store, ["a1", "a2"], seed=1)
    second = tiny_version(tmp_path, store, ["b1", "b2"], seed=2)
    return store, first, second
