"""The ``classify`` task: whole-image classification with a transformers model.

:class:`ClassifySpec` is the gateway side and imports neither torch nor transformers;
:class:`ClassifyAnalyzer` is the worker side and imports them in :meth:`ClassifyAnalyzer.load`.

The default model is the bundled MobileNetV2 (see :mod:`server.pipeline.model_store`); any other
transformers image-classification folder or hub id works too (``ClassifySpec("path/or/id")``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from server.pipeline.analyzers.base import DecodeHint, OptionsError
from server.pipeline.model_store import (
    folder_revision,
    model_id_for,
    quiet_transformers,
    resolve_model,
)

if TYPE_CHECKING:
    import torch
    from PIL import Image

TASK = "classify"
DEFAULT_TOP_K = 5
MAX_TOP_K = 1000
"""Upper bound on ``top_k`` when the model's label count is not known without loading it."""
DEFAULT_NUM_LABELS = 1000
DEFAULT_MIN_SHORT_SIDE = 256
"""The default model resizes the shorter side to 256 before its 224x224 centre crop."""

_ALLOWED_OPTIONS = ("top_k",)
# Processors whose pipeline is exactly resize(shortest_edge) -> centre crop -> rescale -> normalize,
# which :class:`_FastPreprocessor` reproduces.
_FAST_PROCESSOR_TYPES = (
    "MobileNetV2ImageProcessor",
    "MobileNetV2ImageProcessorPil",
    "MobileNetV1ImageProcessor",
    "MobileNetV1ImageProcessorPil",
)


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


class ClassifySpec:
    """Gateway-side description of ``classify``. Cheap: loads no model, imports no torch.

    ``model``: ``None`` for the bundled MobileNetV2, else a transformers model folder or hub id.
    """

    task = TASK

    def __init__(self, model: str | None = None) -> None:
        self.model = model
        self._model_id: str | None = None
        self._model_revision: str | None = None
        self._max_top_k: int | None = None

    @property
    def model_id(self) -> str:
        """``DEFAULT_MODEL_ID`` for the default model, else the configured name (a folder's
        marker/config name or directory name, or the hub id)."""
        if self._model_id is None:
            self._model_id = model_id_for(self.model)
        return self._model_id

    @property
    def model_revision(self) -> str:
        """For a model folder, a fingerprint of its files (see :func:`folder_revision`):
        weights retrained into the same folder get new cache keys. The bundled model's weights
        are pinned by a package version, and a hub id names its own weights: empty."""
        if self._model_revision is None:
            folder = Path(self.model).expanduser() if self.model is not None else None
            is_folder = folder is not None and folder.is_dir()
            self._model_revision = folder_revision(folder) if folder and is_folder else ""
        return self._model_revision

    @property
    def max_top_k(self) -> int:
        """The number of labels where it can be read cheaply (a local ``config.json``),
        else :data:`MAX_TOP_K`."""
        if self._max_top_k is None:
            self._max_top_k = self._count_labels()
        return self._max_top_k

    def _count_labels(self) -> int:
        if self.model is None:
            return DEFAULT_NUM_LABELS
        folder = Path(self.model).expanduser()
        config = _read_json(folder / "config.json") if folder.is_dir() else None
        if config is not None:
            id2label = config.get("id2label")
            if isinstance(id2label, Mapping) and id2label:
                return len(id2label)
            num_labels = _positive_int(config.get("num_labels"))
            if num_labels is not None:
                return num_labels
        return MAX_TOP_K

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``{"top_k": int}``; ``top_k`` defaults to 5 (or the label count, if smaller)."""
        if not isinstance(options, Mapping):
            raise OptionsError(f"options for task {TASK!r} must be an object")
        unknown = [key for key in options if key not in _ALLOWED_OPTIONS]
        if unknown:
            names = ", ".join(sorted(repr(key) for key in unknown))
            raise OptionsError(
                f"unknown option(s) for task {TASK!r}: {names}; allowed: "
                + ", ".join(_ALLOWED_OPTIONS)
            )
        limit = self.max_top_k
        if "top_k" not in options:
            return {"top_k": min(DEFAULT_TOP_K, limit)}
        top_k = options["top_k"]
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise OptionsError(
                f"option 'top_k' must be an integer from 1 to {limit}, "
                f"got {type(top_k).__name__} {top_k!r}"
            )
        if not 1 <= top_k <= limit:
            raise OptionsError(f"option 'top_k' must be from 1 to {limit}, got {top_k}")
        return {"top_k": top_k}

    def create_analyzer(self) -> ClassifyAnalyzer:
        return ClassifyAnalyzer(self.model, model_id=self.model_id)


class _FastPreprocessor:
    """resize(shorter side) -> centre crop -> rescale -> normalize, straight from PIL.

    Equivalent to the transformers processor of the MobileNet family (same PIL resampling
    filter, same integer sizes and crop offsets), but it resamples only the pixels that the crop
    keeps (``Image.resize(box=...)``), never converts the full-size image to an array, and
    normalizes in one fused float32 pass.
    """

    def __init__(
        self,
        *,
        shortest_edge: int,
        crop_height: int,
        crop_width: int,
        resample: int,
        rescale_factor: float,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.shortest_edge = shortest_edge
        self.crop_height = crop_height
        self.crop_width = crop_width
        self.resample = resample
        std_arr = np.asarray(std, dtype=np.float64)
        mean_arr = np.asarray(mean, dtype=np.float64)
        # (x * rescale - mean) / std == x * scale + bias
        self.scale = (rescale_factor / std_arr).astype(np.float32).reshape(3, 1, 1)
        self.bias = (-mean_arr / std_arr).astype(np.float32).reshape(3, 1, 1)

    @classmethod
    def from_processor(cls, processor: Any) -> _FastPreprocessor | None:
        """A fast equivalent of ``processor``, or ``None`` where its pipeline differs."""
        if type(processor).__name__ not in _FAST_PROCESSOR_TYPES:
            return None
        cfg = processor.to_dict()
        size = cfg.get("size")
        crop = cfg.get("crop_size")
        mean, std = cfg.get("image_mean"), cfg.get("image_std")
        if not (
            cfg.get("do_resize") is True
            and cfg.get("do_center_crop") is True
            and cfg.get("do_rescale") is True
            and cfg.get("do_normalize") is True
            and not cfg.get("do_pad")
            and isinstance(size, Mapping)
            and set(k for k, v in size.items() if v is not None) == {"shortest_edge"}
            and isinstance(crop, Mapping)
            and isinstance(mean, Sequence)
            and isinstance(std, Sequence)
            and len(mean) == 3
            and len(std) == 3
        ):
            return None
        shortest = _positive_int(size["shortest_edge"])
        crop_h = _positive_int(crop.get("height"))
        crop_w = _positive_int(crop.get("width"))
        resample = cfg.get("resample")
        rescale = cfg.get("rescale_factor")
        if (
            shortest is None
            or crop_h is None
            or crop_w is None
            or max(crop_h, crop_w) > shortest  # the processor would pad; leave that to it
            or not isinstance(resample, int)
            or not isinstance(rescale, int | float)
        ):
            return None
        return cls(
            shortest_edge=shortest,
            crop_height=crop_h,
            crop_width=crop_w,
            resample=int(resample),
            rescale_factor=float(rescale),
            mean=[float(v) for v in mean],
            std=[float(v) for v in std],
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        import torch

        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        edge = self.shortest_edge
        # Same integer arithmetic as transformers' get_resize_output_image_size + center_crop.
        if width <= height:
            new_w, new_h = edge, int(edge * height / width)
        else:
            new_w, new_h = int(edge * width / height), edge
        top = (new_h - self.crop_height) // 2
        left = (new_w - self.crop_width) // 2
        sx, sy = width / new_w, height / new_h
        box = (
            left * sx,
            top * sy,
            (left + self.crop_width) * sx,
            (top + self.crop_height) * sy,
        )
        # Resampling just the kept box at the full resize's scale gives the crop of the full
        # resize (same filter centres and support) without computing the discarded pixels.
        cropped = image.resize((self.crop_width, self.crop_height), self.resample, box=box)
        chw = np.asarray(cropped).transpose(2, 0, 1).astype(np.float32, order="C")
        chw *= self.scale
        chw += self.bias
        return torch.from_numpy(chw)


# Modules whose forward is exactly ``convolution`` -> ``normalization`` -> ``activation``.
_CONV_BN_LAYERS = ("MobileNetV1ConvLayer", "MobileNetV2ConvLayer")


def _optimize_for_cpu(net: Any) -> int:
    """Fold each eval-mode BatchNorm into the convolution before it and switch to channels-last
    (oneDNN's fast layout), for the MobileNet family only. Returns the number of folds."""
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for module in net.modules():
        if type(module).__name__ not in _CONV_BN_LAYERS:
            continue
        conv = getattr(module, "convolution", None)
        norm = getattr(module, "normalization", None)
        if (
            isinstance(conv, torch.nn.Conv2d)
            and isinstance(norm, torch.nn.BatchNorm2d)
            and norm.track_running_stats
            and norm.running_mean is not None
            and norm.running_var is not None
        ):
            module.convolution = fuse_conv_bn_eval(conv, norm)
            module.normalization = torch.nn.Identity()
            folded += 1
    if folded:
        net.to(memory_format=torch.channels_last)
    return folded


class ClassifyAnalyzer:
    """Worker-side ``classify``: ``AutoModelForImageClassification`` + ``AutoImageProcessor``.

    ``fast_preprocess``: use :class:`_FastPreprocessor` where the processor allows it (the
    default model does); ``False`` always runs the transformers processor.
    ``optimize``: for MobileNet models, fold BatchNorm into the convolutions and use the
    channels-last layout (about 1.4x faster per image on CPU, logits within 1e-4).
    """

    task = TASK

    def __init__(
        self,
        model: str | None = None,
        *,
        model_id: str | None = None,
        fast_preprocess: bool = True,
        optimize: bool = True,
    ) -> None:
        self.model = model
        self.optimize = optimize
        self.model_id: str = model_id if model_id is not None else model_id_for(model)
        self.decode_hint: DecodeHint = self._initial_decode_hint()
        self.fast_preprocess = fast_preprocess
        self.labels: list[str] = []
        self._net: Any = None
        self._processor: Any = None
        self._fast: _FastPreprocessor | None = None
        self._multi_label = False

    def _initial_decode_hint(self) -> DecodeHint:
        """Before :meth:`load`: known for the default model and local folders, else full
        resolution (``load`` replaces it with the processor's)."""
        if self.model is None:
            return DecodeHint(min_short_side=DEFAULT_MIN_SHORT_SIDE)
        folder = Path(self.model).expanduser()
        config = _read_json(folder / "preprocessor_config.json") if folder.is_dir() else None
        if config is None:
            return DecodeHint(min_short_side=None)
        return decode_hint_from_processor(config)

    @property
    def loaded(self) -> bool:
        return self._net is not None

    def load(self) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        path, _ = resolve_model(self.model)
        auto_model: Any = AutoModelForImageClassification
        auto_processor: Any = AutoImageProcessor
        with quiet_transformers():
            net = auto_model.from_pretrained(path)
            processor = auto_processor.from_pretrained(path)
        net.eval()
        if self.optimize:
            _optimize_for_cpu(net)
        config = net.config
        id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
        self.labels = [id2label.get(i, f"LABEL_{i}") for i in range(int(config.num_labels))]
        self._multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
        self._processor = processor
        self._fast = _FastPreprocessor.from_processor(processor) if self.fast_preprocess else None
        self.decode_hint = decode_hint_from_processor(processor.to_dict())
        self._net = net

    def _require_loaded(self) -> None:
        if self._net is None:
            raise RuntimeError("ClassifyAnalyzer.load() must be called first")

    def preprocess(self, image: Image.Image, options: Mapping[str, Any]) -> torch.Tensor:
        """One RGB image -> a float32 tensor [3, H, W]."""
        self._require_loaded()
        if self._fast is not None:
            return self._fast(image)
        if image.mode != "RGB":
            image = image.convert("RGB")
        pixel_values: torch.Tensor = self._processor(images=image, return_tensors="pt")[
            "pixel_values"
        ]
        return pixel_values[0]

    def predict(self, batch: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """One forward pass for the whole batch; per item, a float32 vector of probabilities
        (softmax, or sigmoid for multi-label models)."""
        import torch

        self._require_loaded()
        if not batch:
            return []
        pixels = batch[0].unsqueeze(0) if len(batch) == 1 else torch.stack(list(batch))
        with torch.inference_mode():
            logits = self._net(pixel_values=pixels).logits
            probs = torch.sigmoid(logits) if self._multi_label else torch.softmax(logits, dim=-1)
        array = probs.to(torch.float32).numpy()
        return [array[i] for i in range(array.shape[0])]

    def encode(self, output: np.ndarray, options: Mapping[str, Any]) -> dict[str, Any]:
        """``{"labels": [{"label": ..., "score": ...}, ...]}``, the ``top_k`` best, best first
        (ties: lower class index first)."""
        probs = np.asarray(output)
        count = probs.shape[0]
        top_k = int(options.get("top_k", DEFAULT_TOP_K))
        top_k = max(1, min(top_k, count))
        order = np.lexsort((np.arange(count), -probs))[:top_k]
        labels = self.labels
        return {
            "labels": [
                {
                    "label": labels[i] if i < len(labels) else f"LABEL_{i}",
                    "score": round(float(probs[i]), 6),
                }
                for i in order.tolist()
            ]
        }
