"""Tiny random-init Hugging Face model folders, built with ``save_pretrained`` (never the hub).

Each builder writes a folder that ``from_pretrained`` loads offline, small enough to build in
well under a second; their answers are meaningless but have the real shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_mobilenet(folder: Path, *, labels: list[str], problem_type: str | None = None) -> Path:
    """A MobileNetV2 classifier (the bundled model's family, so the fast path applies)."""
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


def tiny_vit(folder: Path, *, labels: list[str], seed: int = 0) -> Path:
    """A 2-layer ViT classifier on 32x32 inputs."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config_cls: Any = ViTConfig
    config = config_cls(
        image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64,
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
    )
    model: Any = ViTForImageClassification(config)
    model.save_pretrained(folder)
    processor: Any = ViTImageProcessor(size={"height": 32, "width": 32})
    processor.save_pretrained(folder)
    return folder
