"""A fast path for the MobileNet family's image processors and networks on CPU.

:class:`FastPreprocessor` reproduces ``resize(shortest_edge) -> centre crop -> rescale ->
normalize`` straight from PIL, resampling only the kept pixels; :func:`optimize_for_cpu` folds
BatchNorm into the convolutions. Both are exact to within 1e-4 of transformers' own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from PIL import Image

# Processors whose pipeline is exactly resize(shortest_edge) -> centre crop -> rescale -> normalize,
# which :class:`FastPreprocessor` reproduces.
_FAST_PROCESSOR_TYPES = (
    "MobileNetV2ImageProcessor",
    "MobileNetV2ImageProcessorPil",
    "MobileNetV1ImageProcessor",
    "MobileNetV1ImageProcessorPil",
)


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


class FastPreprocessor:
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
    def from_processor(cls, processor: Any) -> FastPreprocessor | None:
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


def optimize_for_cpu(net: Any) -> int:
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
