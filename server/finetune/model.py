"""The network being fine-tuned: a base classifier with a new head, its features, its scores,
and the folder it is saved to.

The base is any ``AutoModelForImageClassification`` folder whose head is a linear layer named
``classifier`` (MobileNet, ResNet, ViT, ConvNeXt... and the bundled default). The head is
replaced by a fresh one with the data's labels; the rest keeps its weights.

Head-only training never runs the backbone in training mode: its features are computed once
in eval mode (BatchNorm uses its running statistics, as when served) and only the head
learns. Left in training mode, a frozen backbone's BatchNorm layers would normalise each batch
by its own statistics, which the head then learns and serving never reproduces.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from server.pipeline.model_store import MARKER_NAME

MODEL_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
"""What a saved model consists of: its revision is the hash of these files' contents."""
METRICS_NAME = "metrics.json"
MARKER_FORMAT = 1


class ModelError(ValueError):
    """The base model cannot be fine-tuned here (one line)."""


def load_base(path: str, labels: Sequence[str], seed: int) -> tuple[Any, Any]:
    """``(model with a new head for labels, image processor)`` from the base folder."""
    import torch
    import transformers

    from server.pipeline.model_store import quiet_transformers

    auto_model: Any = transformers.AutoModelForImageClassification
    auto_processor: Any = transformers.AutoImageProcessor
    try:
        with quiet_transformers():
            model = auto_model.from_pretrained(path)
            processor = auto_processor.from_pretrained(path)
    except Exception as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ModelError(f"base model {path} does not load as an image classifier: "
                         f"{type(exc).__name__}: {detail}") from None
    torch.manual_seed(seed)
    replace_head(model, len(labels))
    config = model.config
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.num_labels = len(labels)
    config.problem_type = "single_label_classification"
    model.num_labels = len(labels)
    model.eval()
    return model, processor


def replace_head(model: Any, count: int) -> None:
    """A new, randomly initialised linear head of ``count`` outputs (torch's current seed)."""
    from torch import nn

    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Linear):
        model.classifier = nn.Linear(head.in_features, count)
    elif isinstance(head, nn.Sequential) and len(head) and isinstance(head[-1], nn.Linear):
        head[-1] = nn.Linear(head[-1].in_features, count)
    else:
        raise ModelError(f"base model {type(model).__name__} has no linear 'classifier' head "
                         "to replace")


def transform_for(processor: Any) -> Callable[[Any], Any]:
    """PIL RGB image → ``[C, H, W]`` float32 array, exactly as the served task prepares it."""
    from server.tasks.hf_fast import FastPreprocessor

    fast = FastPreprocessor.from_processor(processor)
    if fast is not None:
        return lambda image: fast(image).numpy()
    return lambda image: processor(images=image, return_tensors="np")["pixel_values"][0]


def batches(count: int, size: int) -> list[slice]:
    return [slice(start, min(count, start + size)) for start in range(0, count, size)]


def head_inputs(model: Any, pixels: np.ndarray, rows: Sequence[int], *, batch_size: int,
                device: str, progress: bool, desc: str) -> Any:
    """What the head receives for each row of ``pixels`` (the backbone's pooled features),
    computed in eval mode: float32 tensor ``[len(rows), ...]``."""
    import torch
    from tqdm.auto import tqdm

    captured: list[Any] = []

    def keep(_module: Any, args: tuple[Any, ...]) -> None:
        captured.append(args[0].detach().float().cpu())

    model.eval()
    hook = model.classifier.register_forward_pre_hook(keep)
    try:
        with torch.inference_mode():
            for part in tqdm(batches(len(rows), batch_size), desc=desc, unit="batch",
                             disable=not progress):
                chunk = torch.from_numpy(np.asarray(pixels[list(rows[part])], np.float32))
                model(pixel_values=chunk.to(device))
    finally:
        hook.remove()
    return torch.cat(captured) if captured else torch.empty(0)


def predict(model: Any, pixels: np.ndarray, rows: Sequence[int], *, batch_size: int,
            device: str, progress: bool) -> np.ndarray:
    """The class index the model picks for each row (eval mode, as served)."""
    import torch
    from tqdm.auto import tqdm

    model.eval()
    picked: list[np.ndarray] = []
    with torch.inference_mode():
        for part in tqdm(batches(len(rows), batch_size), desc="evaluating", unit="batch",
                         disable=not progress):
            chunk = torch.from_numpy(np.asarray(pixels[list(rows[part])], np.float32))
            logits = model(pixel_values=chunk.to(device)).logits
            picked.append(logits.argmax(dim=-1).cpu().numpy())
    return np.concatenate(picked) if picked else np.empty(0, dtype=np.int64)


def scores(truth: np.ndarray, predicted: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/support and the confusion matrix (rows: true
    class, columns: predicted class)."""
    count = len(labels)
    matrix = np.zeros((count, count), dtype=np.int64)
    np.add.at(matrix, (truth.astype(np.int64), predicted.astype(np.int64)), 1)
    per_class = {}
    for i, label in enumerate(labels):
        hits = int(matrix[i, i])
        picked = int(matrix[:, i].sum())
        support = int(matrix[i].sum())
        per_class[label] = {
            "precision": round(hits / picked, 4) if picked else 0.0,
            "recall": round(hits / support, 4) if support else 0.0,
            "support": support,
        }
    total = int(matrix.sum())
    return {
        "accuracy": round(float(np.trace(matrix)) / total, 4) if total else 0.0,
        "images": total,
        "per_class": per_class,
        "confusion_matrix": {"labels": list(labels), "matrix": matrix.tolist()},
    }


def format_scores(report: dict[str, Any]) -> str:
    """The scores as a few lines of text for the terminal."""
    labels = report["confusion_matrix"]["labels"]
    width = max(9, *(len(label) for label in labels))
    lines = [f"validation accuracy: {report['accuracy']:.4f} ({report['images']} images)",
             f"{'class':<{width}}  precision  recall  support"]
    for label, row in report["per_class"].items():
        lines.append(f"{label:<{width}}  {row['precision']:>9.4f}  {row['recall']:>6.4f}  "
                     f"{row['support']:>7}")
    lines.append("confusion matrix (rows: true class, columns: predicted):")
    cell = max(5, *(len(label) for label in labels))
    lines.append(" " * width + "  " + " ".join(f"{label[:cell]:>{cell}}" for label in labels))
    for label, row in zip(labels, report["confusion_matrix"]["matrix"], strict=True):
        lines.append(f"{label:<{width}}  " + " ".join(f"{n:>{cell}}" for n in row))
    return "\n".join(lines)


def content_revision(folder: Path, names: Sequence[str] = MODEL_FILES) -> str:
    """The hash of the model files' names and contents (16 hex digits)."""
    digest = hashlib.sha256()
    for name in sorted(names):
        file_digest = hashlib.sha256()
        with (folder / name).open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                file_digest.update(block)
        digest.update(f"{name}\0{file_digest.hexdigest()}\n".encode())
    return digest.hexdigest()[:16]


def save(model: Any, processor: Any, folder: Path, *, model_id: str,
         details: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Write the served files, the scores and, last, the marker carrying the revision (the
    content hash). Returns the revision."""
    from server.pipeline.model_store import quiet_transformers

    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER_NAME).unlink(missing_ok=True)  # the folder is incomplete meanwhile
    model.config.name_or_path = model_id
    with quiet_transformers():
        model.save_pretrained(folder, safe_serialization=True)
        processor.save_pretrained(folder)
    revision = content_revision(folder)
    metrics = {"revision": revision, **metrics}
    _write_json(folder / METRICS_NAME, metrics)
    files = {}
    for name in MODEL_FILES:
        stat = (folder / name).stat()
        files[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    _write_json(folder / MARKER_NAME, {
        "format": MARKER_FORMAT, "model_id": model_id, "revision": revision,
        "files": files, "finetune": details,
    })
    return revision


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
