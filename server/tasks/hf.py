"""The Hugging Face adapter: a task per pipeline kind, served from a local model folder.

A tasks file names the kind and the folder::

    [tasks.mine]
    kind = "image-classification"
    model = "/models/my-classifier"      # anything from_pretrained loads offline

:class:`HFTask` does what every kind shares (the model's id and revision from the folder
without loading it, the decode size from ``preprocessor_config.json``, loading with the
kind's ``Auto*`` class onto the device, batching through the image processor); a kind is one
small subclass that says which ``Auto*`` class it loads, what its options and result are,
and how one output becomes the protocol's result. :data:`server.tasks.hf_kinds.KINDS` maps
kind names to them.

Importing this module is cheap: torch and transformers are imported in :meth:`HFTask.setup`.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, create_model

from server.pipeline.model_store import (
    bundled_weights_revision,
    folder_revision,
    model_id_for,
    quiet_transformers,
    resolve_model,
)
from server.tasks import results
from server.tasks.contract import DecodeHint, ModelInfo, Task, TaskOptions, View, parse_options
from server.tasks.hf_fast import FastPreprocessor, optimize_for_cpu
from server.tasks.optimize import TracedForward, trace_forward

DEFAULT_TOP_K = 5
MAX_TOP_K = 1000
"""Upper bound on ``top_k`` when a model's label count cannot be read without loading it."""
DEFAULT_NUM_LABELS = 1000
DEFAULT_MIN_SHORT_SIDE = 256
"""The bundled classifier resizes the shorter side to 256 before its 224x224 centre crop."""

log = logging.getLogger("pixelstream.tasks")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _side_of(size: Any) -> int | None:
    """The shortest source side that still gives a processor's ``size`` at full quality."""
    if isinstance(size, int) and not isinstance(size, bool):
        return _positive_int(size)
    if isinstance(size, Mapping):
        shortest = _positive_int(size.get("shortest_edge"))
        if shortest is not None:
            return shortest
        height = _positive_int(size.get("height"))
        width = _positive_int(size.get("width"))
        if height is not None and width is not None:
            # A fixed (height, width) output: the decoder keeps the aspect ratio, so only a
            # shorter side of max(height, width) guarantees neither output side is upsampled.
            return max(height, width)
        return _positive_int(size.get("longest_edge"))
    return None


def decode_hint_from_processor(config: Mapping[str, Any]) -> DecodeHint:
    """How far the decoder may shrink an image for a processor with this config
    (``preprocessor_config.json`` or ``processor.to_dict()``)."""
    if config.get("do_resize", True) is False:
        # The model sees native pixels (e.g. a crop only): shrinking would change the input.
        return DecodeHint(min_short_side=None)
    side = _side_of(config.get("size"))
    if side is None and config.get("do_center_crop"):
        side = _side_of(config.get("crop_size"))
    return DecodeHint(min_short_side=side)


def groups_of_equal(keys: Sequence[Any]) -> list[list[int]]:
    """Indices of equal keys, each group in order, groups in order of first appearance: the
    items of a batch that can share one forward pass (same tensor shape, same options)."""
    found: dict[Any, list[int]] = {}
    for index, key in enumerate(keys):
        found.setdefault(key, []).append(index)
    return list(found.values())


class ModelFolderError(ValueError):
    """A task's model folder is missing or unreadable (said before anything loads)."""


class HFTask(Task):
    """What every Hugging Face kind shares. ``model``: a local folder (or, where the hub is
    reachable, a hub id); ``None`` only for kinds with a bundled default."""

    auto_model: ClassVar[str] = ""
    """The transformers ``Auto*`` class that loads the kind's models."""
    default_decode: ClassVar[DecodeHint] = DecodeHint(min_short_side=None)
    """The decode size when the folder's processor does not say."""
    trace: bool = True
    """On CPU, run :meth:`forward` as a traced, frozen TorchScript module optimized for
    inference (:mod:`server.tasks.optimize`), where it answers as the eager model does. Kinds
    that override :meth:`forward` stay eager."""

    def __init__(self, model: str | None = None, *, name: str | None = None) -> None:
        self.model_path = model
        if name is not None:
            self.name = name
        self._info: ModelInfo | None = None
        self.device = "cpu"
        self.net: Any = None
        self.processor: Any = None
        self.processor_path: str | None = None
        self.traced: TracedForward | None = None
        self._optimizing: threading.Thread | None = None
        self.decode = self._initial_decode()

    def __getstate__(self) -> dict[str, Any]:
        # Workers receive the task before setup: never ship loaded weights through a pipe.
        state = dict(self.__dict__)
        state["net"] = state["processor"] = state["traced"] = state["_optimizing"] = None
        return state

    @property
    def folder(self) -> Path | None:
        if self.model_path is None:
            return None
        path = Path(self.model_path).expanduser()
        return path if path.is_dir() else None

    def check_folder(self) -> None:
        """Raise :class:`ModelFolderError` unless the model folder is there and has a
        ``config.json`` (cheap; whether the weights load is found by :meth:`setup`)."""
        if self.model_path is None:
            return
        path = Path(self.model_path).expanduser()
        if not path.exists():
            raise ModelFolderError(f"model folder {self.model_path} does not exist")
        if not path.is_dir():
            raise ModelFolderError(f"model {self.model_path} is not a folder")
        if _read_json(path / "config.json") is None:
            raise ModelFolderError(f"model folder {self.model_path} has no readable config.json")

    @property
    def model(self) -> ModelInfo:
        if self._info is None:
            folder = self.folder
            if folder is not None:
                revision = folder_revision(folder)
            elif self.model_path is None:  # the bundled weights: their package's release
                revision = bundled_weights_revision()
            else:
                revision = ""
            self._info = ModelInfo(id=model_id_for(self.model_path), revision=revision)
        return self._info

    def config(self) -> dict[str, Any] | None:
        """The folder's ``config.json`` (None: no local folder or no readable file)."""
        folder = self.folder
        return _read_json(folder / "config.json") if folder is not None else None

    def image_processor_config(self) -> dict[str, Any] | None:
        """The folder's image processor settings: ``preprocessor_config.json``, or the
        ``image_processor`` of a combined ``processor_config.json`` (CLIP, BLIP...)."""
        folder = self.folder
        if folder is None:
            return None
        config = _read_json(folder / "preprocessor_config.json")
        if config is None:
            nested = (_read_json(folder / "processor_config.json") or {}).get("image_processor")
            config = nested if isinstance(nested, dict) else None
        return config

    def _initial_decode(self) -> DecodeHint:
        processor = self.image_processor_config()
        return decode_hint_from_processor(processor) if processor else self.default_decode

    # Worker side --------------------------------------------------------------------------------

    def setup(self, device: str) -> None:
        path, _ = resolve_model(self.model_path)
        with quiet_transformers():
            net = self.load_model(path)
            processor = self.load_processor(path)
        net.eval()
        net.to(device)
        self.device = device
        self.net = net
        self.processor = processor
        self.processor_path = path
        with quiet_transformers():
            self.loaded()
        self.traced = None
        self._optimizing = self._optimize_in_background()

    def _optimize_in_background(self) -> threading.Thread:
        """Tracing and checking the optimized forward pass take seconds (over 10 s a worker
        on a busy 2-core machine): the worker reports ready at once and answers with the eager
        model meanwhile, then switches by one attribute assignment."""
        # Not a daemon: a worker told to stop finishes the trace before its interpreter goes
        # (killed mid-trace, torch's C++ threads abort the process: "terminate called...").
        thread = threading.Thread(target=self._optimize, name=f"optimize-{self.name}")
        thread.start()
        return thread

    def _optimize(self) -> None:
        try:
            traced = self._traced_forward()
        except Exception:  # the eager model keeps answering
            log.exception("%s: optimizing the forward pass failed; staying eager", self.name)
            return
        self.traced = traced

    def wait_optimized(self, timeout: float | None = None) -> TracedForward | None:
        """Wait for the background optimization that :meth:`setup` started (benchmarks and
        tests); the optimized forward pass, or None where the model stays eager."""
        if self._optimizing is not None:
            self._optimizing.join(timeout)
        return self.traced

    def load_model(self, path: str) -> Any:
        import transformers

        auto_model: Any = getattr(transformers, self.auto_model)
        return auto_model.from_pretrained(path)

    def load_processor(self, path: str) -> Any:
        from transformers import AutoImageProcessor

        auto: Any = AutoImageProcessor
        return auto.from_pretrained(path)

    def loaded(self) -> None:
        """Called at the end of :meth:`setup`, once ``net`` and ``processor`` are set."""

    def _traced_forward(self) -> TracedForward | None:
        """The optimized forward pass, for items of the shape :meth:`preprocess` gives a
        photo; None where it does not apply or does not answer as the eager model does."""
        if not (self.trace and self.device == "cpu" and type(self).forward is HFTask.forward):
            return None
        import torch
        from PIL import Image

        photo = Image.new("RGB", (640, 480), (128, 128, 128))
        try:
            item = self.preprocess(View.whole(photo, photo.size), parse_options(self, {}))
        except Exception:  # a kind whose preprocessing needs more than a photo
            return None
        if not isinstance(item, torch.Tensor) or item.dim() != 3:
            return None
        return trace_forward(self.net, tuple(item.shape), dtype=item.dtype, name=self.name)

    def _require_loaded(self) -> None:
        if self.net is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must be called first")

    def preprocess(self, view: View, options: Any) -> Any:
        """One image → its ``pixel_values`` (float32, [3, H, W]) by the folder's processor."""
        self._require_loaded()
        image = view.image if view.image.mode == "RGB" else view.image.convert("RGB")
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def forward(self, batch: Sequence[Any]) -> Any:
        """One forward pass over equally sized items, on the task's device."""
        import torch

        self._require_loaded()
        pixels = batch[0].unsqueeze(0) if len(batch) == 1 else torch.stack(list(batch))
        pixels = pixels.to(self.device)
        with torch.inference_mode():
            if self.traced is not None and self.traced.accepts(pixels):
                return self.traced(pixels)
            return self.net(pixel_values=pixels)


# image-classification ---------------------------------------------------------------------------


@functools.cache
def classification_options(labels: int) -> type[TaskOptions]:
    """Options of a classifier with ``labels`` classes: ``top_k`` from 1 to that."""
    return create_model(
        "ClassifyOptions",
        __base__=TaskOptions,
        top_k=(int, Field(default=min(DEFAULT_TOP_K, labels), ge=1, le=labels,
                          description="How many labels to return, best first.")),
    )


class ImageClassification(HFTask):
    """``AutoModelForImageClassification``; answers like ``classify``.

    ``fast_preprocess``: use :class:`FastPreprocessor` where the processor allows it (the
    bundled model does); ``optimize``: for MobileNet models, fold BatchNorm into the
    convolutions and use channels-last (about 1.4x faster per image on CPU, logits within
    1e-4 of the unmodified network), then trace the forward pass (:attr:`HFTask.trace`);
    ``optimize=False`` runs the unmodified eager network.
    """

    name = "classify"
    kind = "image-classification"
    auto_model = "AutoModelForImageClassification"
    Result = results.Labels

    def __init__(self, model: str | None = None, *, name: str | None = None,
                 fast_preprocess: bool = True, optimize: bool = True) -> None:
        super().__init__(model, name=name)
        self.fast_preprocess = fast_preprocess
        self.optimize = optimize
        self.trace = optimize
        self.labels: list[str] = []
        self._fast: FastPreprocessor | None = None
        self._multi_label = False

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_fast"] = None
        return state

    def _initial_decode(self) -> DecodeHint:
        if self.model_path is None:
            return DecodeHint(min_short_side=DEFAULT_MIN_SHORT_SIDE)
        return super()._initial_decode()

    def label_count(self) -> int:
        """From the folder's ``config.json`` where it says, else :data:`MAX_TOP_K`."""
        if self.model_path is None:
            return DEFAULT_NUM_LABELS
        config = self.config()
        if config is not None:
            id2label = config.get("id2label")
            if isinstance(id2label, Mapping) and id2label:
                return len(id2label)
            count = _positive_int(config.get("num_labels"))
            if count is not None:
                return count
        return MAX_TOP_K

    def options_model(self) -> type[TaskOptions]:
        return classification_options(self.label_count())

    def prepare(self) -> None:
        if self.model_path is None:
            from server.pipeline.model_store import prepare_default_model

            prepare_default_model()  # the bundled classifier's folder, built once

    def loaded(self) -> None:
        if self.optimize and self.device == "cpu":
            optimize_for_cpu(self.net)
        config = self.net.config
        id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
        self.labels = [id2label.get(i, f"LABEL_{i}") for i in range(int(config.num_labels))]
        self._multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
        self._fast = (FastPreprocessor.from_processor(self.processor)
                      if self.fast_preprocess else None)
        self.decode = decode_hint_from_processor(self.processor.to_dict())

    def preprocess(self, view: View, options: Any) -> Any:
        self._require_loaded()
        if self._fast is not None:
            return self._fast(view.image)
        return super().preprocess(view, options)

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        """Per item, a float32 vector of probabilities (softmax, or sigmoid for multi-label
        models)."""
        import torch

        if not batch:
            return []
        logits = self.forward(batch).logits
        probs = torch.sigmoid(logits) if self._multi_label else torch.softmax(logits, dim=-1)
        array = probs.to(torch.float32).cpu().numpy()
        return [array[i] for i in range(array.shape[0])]

    def encode(self, output: Any, view: View, options: Any) -> dict[str, Any]:
        """The ``top_k`` best labels, best first (ties: lower class index first)."""
        import numpy as np

        probs = np.asarray(output)
        count = probs.shape[0]
        top_k = max(1, min(int(getattr(options, "top_k", DEFAULT_TOP_K)), count))
        order = np.lexsort((np.arange(count), -probs))[:top_k]
        labels = self.labels
        return {"labels": [
            {"label": labels[i] if i < len(labels) else f"LABEL_{i}",
             "score": round(float(probs[i]), 6)}
            for i in order.tolist()
        ]}
