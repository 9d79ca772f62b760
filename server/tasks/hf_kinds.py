"""The Hugging Face kinds a tasks file may name: pipeline task names → the class serving them.

Each class serves models of one kind from a local folder (``model = "/models/..."``),
batched, offline; see :mod:`server.tasks.hf` for what they share.
"""

from __future__ import annotations

from server.tasks.hf import HFTask, ImageClassification
from server.tasks.hf_caption import ImageToText
from server.tasks.hf_detect import ObjectDetection
from server.tasks.hf_embed import ImageFeatureExtraction
from server.tasks.hf_zero_shot import ZeroShotImageClassification

KINDS: dict[str, type[HFTask]] = {
    kind.kind: kind
    for kind in (ImageClassification, ObjectDetection, ZeroShotImageClassification,
                 ImageToText, ImageFeatureExtraction)
}
"""``image-classification`` (answers like ``classify``), ``object-detection`` (``detect``),
``zero-shot-image-classification`` (``zero-shot``), ``image-to-text`` (``caption``),
``image-feature-extraction`` (``embed``)."""
