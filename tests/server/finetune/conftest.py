"""Small labelled image sets, made on the spot."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200)}


def noisy(colour: tuple[int, int, int], rng: np.random.Generator,
          size: tuple[int, int] = (40, 32)) -> Image.Image:
    """A plain colour with noise: classes a classifier tells apart at once."""
    base = np.array(colour, dtype=np.int16).reshape(1, 1, 3)
    pixels = base + rng.integers(-40, 40, size=(size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def write_set(root: Path, counts: Mapping[str, int], *, seed: int = 0,
              fmt: str = "PNG") -> Path:
    rng = np.random.default_rng(seed)
    for label, count in counts.items():
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            suffix = "png" if fmt == "PNG" else "jpg"
            noisy(COLOURS[label], rng).save(folder / f"{i:03d}.{suffix}", fmt)
    return root


PHOTOS = ("chelsea", "coffee", "rocket")
"""scikit-image's sample photos: one class each, as random crops."""


def photo_set(root: Path, count: int, *, seed: int) -> Path:
    """``count`` random crops (a third to a half of the photo's sides, resized to 120x90) of
    each of :data:`PHOTOS`, one class per photo."""
    from skimage import data

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        photo = Image.fromarray(getattr(data, name)()).convert("RGB")
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            scale = rng.uniform(0.33, 0.5)
            w, h = int(photo.width * scale), int(photo.height * scale)
            x, y = rng.integers(0, photo.width - w), rng.integers(0, photo.height - h)
            crop = photo.crop((int(x), int(y), int(x) + w, int(y) + h)).resize((120, 90))
            crop.save(folder / f"{i:03d}.jpg", "JPEG", quality=90)
    return root


@pytest.fixture
def image_set(tmp_path: Path) -> Callable[..., Path]:
    def make(counts: Mapping[str, int] | None = None, *, seed: int = 0,
             fmt: str = "PNG") -> Path:
        return write_set(tmp_path / "data", counts or {"red": 8, "blue": 8}, seed=seed,
                         fmt=fmt)

    return make


def calibrated_mobilenet(folder: Path, labels: list[str]) -> Path:
    """A tiny random MobileNetV2 whose BatchNorm statistics come from data: its features
    vary with the image (freshly initialised ones shrink to ~1e-26 through the layers)."""
    import torch
    from transformers import AutoModelForImageClassification

    from tests.support.tiny_models import tiny_mobilenet

    torch.manual_seed(0)
    tiny_mobilenet(folder, labels=labels)
    net = AutoModelForImageClassification.from_pretrained(str(folder))
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the calibration batches
            module.reset_running_stats()
    net.train()
    with torch.no_grad():
        for _ in range(4):
            net(pixel_values=torch.randn(16, 3, 64, 64))
    net.eval()
    net.save_pretrained(folder)
    return folder
