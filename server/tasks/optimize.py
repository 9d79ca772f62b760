"""A traced, frozen, oneDNN-optimized forward pass, used only where it answers as the eager
model does.

:func:`trace_forward` traces ``net(pixel_values=x)`` with TorchScript, freezes it (weights
become constants; BatchNorm folds into the convolutions) and runs
``torch.jit.optimize_for_inference`` (oneDNN convolution + activation fusion, prepacked
weights). It then runs the eager and the optimized model on probe inputs of several batch
sizes and keeps the optimized one only when every output agrees within a tolerance. Tracing
records one path through ``forward``: data-dependent branches, Python numbers taken from
shapes, or outputs that are not tensors make a trace wrong or impossible, and the checks catch
what tracing itself does not say. Whatever fails, the caller keeps the eager model (with a log
line saying why).

:class:`TracedForward` answers only inputs of the item shape it was checked at (any batch
size); the caller runs anything else eagerly.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger("pixelstream.optimize")

TRACE_BATCH = 2
CHECK_BATCHES = (1, 2, 3)
"""Batch sizes the optimized model is checked at: the traced one, and one on either side (a
batch size baked into the trace shows at the others)."""
RTOL = 1e-3
"""Allowed difference, relative to the largest magnitude of each eager output."""
ATOL = 1e-4
PROBE_SEED = 20260105


class NotTraceable(Exception):
    """Why a model's forward pass was not optimized."""


@dataclass
class TracedForward:
    """``net(pixel_values=x)``, traced and optimized, for inputs of one item shape."""

    module: Any
    item_shape: tuple[int, ...]
    dtype: Any
    keys: tuple[str, ...] | None
    """The eager output's fields (a transformers ``ModelOutput``); None: a bare tensor."""
    output_type: Any
    seconds: float
    """Time spent tracing, optimizing and checking."""

    def accepts(self, pixels: torch.Tensor) -> bool:
        return tuple(pixels.shape[1:]) == self.item_shape and pixels.dtype == self.dtype

    def __call__(self, pixels: torch.Tensor) -> Any:
        outputs = self.module(pixels)
        if self.keys is None:
            return outputs
        return self.output_type(**dict(zip(self.keys, outputs, strict=True)))


def _output_fields(output: Any) -> tuple[tuple[str, ...] | None, Any]:
    import torch

    if isinstance(output, torch.Tensor):
        return None, None
    keys = getattr(output, "keys", None)
    if keys is None or not callable(keys):
        raise NotTraceable(f"its output is a {type(output).__name__}, not tensors")
    names = tuple(keys())
    if not names or not all(isinstance(output[name], torch.Tensor) for name in names):
        raise NotTraceable("its output holds values that are not tensors")
    return names, type(output)


def _difference(eager: Any, optimized: Any, keys: tuple[str, ...] | None) -> str | None:
    """None where the two outputs agree; else what differs."""
    import torch

    pairs = ([("output", eager, optimized)] if keys is None
             else [(key, eager[key], getattr(optimized, key, None)) for key in keys])
    for name, expected, got in pairs:
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
            return f"{name} has shape {getattr(got, 'shape', None)}, not {tuple(expected.shape)}"
        expected, got = expected.float(), got.float()
        allowed = ATOL + RTOL * float(expected.abs().max())
        worst = float((expected - got).abs().max())
        if not worst <= allowed:  # NaN differs too
            return f"{name} differs by {worst:.3g} (allowed {allowed:.3g})"
    return None


def trace_forward(net: Any, item_shape: Sequence[int], *, dtype: Any = None,
                  name: str = "model") -> TracedForward | None:
    """``net``'s forward pass over ``pixel_values`` of ``item_shape`` ([C, H, W]), traced,
    frozen and optimized for inference on CPU; None (and one log line) where that fails or
    answers differently from ``net`` on the probes. ``net`` must be in eval mode and is left
    unchanged."""
    import torch
    from torch.jit._trace import TracerWarning

    started = time.perf_counter()
    dtype = dtype or torch.float32
    shape = tuple(int(side) for side in item_shape)
    generator = torch.Generator().manual_seed(PROBE_SEED)
    probes = {batch: torch.randn((batch, *shape), generator=generator).to(dtype)
              for batch in CHECK_BATCHES}
    try:
        with torch.no_grad():
            eager = {batch: net(pixel_values=probe) for batch, probe in probes.items()}
            keys, output_type = _output_fields(eager[TRACE_BATCH])

            class PixelsOnly(torch.nn.Module):
                """The traceable signature: a tensor in, a tensor or a tuple out."""

                def __init__(self) -> None:
                    super().__init__()
                    self.net = net

                def forward(self, pixel_values: torch.Tensor) -> Any:
                    output = self.net(pixel_values=pixel_values)
                    return output if keys is None else tuple(output[k] for k in keys)

            wrapper = PixelsOnly().eval()
            trace: Any = torch.jit.trace  # untyped in torch
            with warnings.catch_warnings():
                # "Converting a tensor to a Python value...": the checks below judge that.
                warnings.simplefilter("ignore", TracerWarning)
                # torch.jit is deprecated in favour of torch.compile, which costs tens of
                # seconds of start-up per worker on a small CPU; TorchScript still works.
                warnings.simplefilter("ignore", DeprecationWarning)
                # transformers' deprecated properties, which tracing reads with the others.
                warnings.simplefilter("ignore", FutureWarning)
                traced = trace(wrapper, (probes[TRACE_BATCH],), check_trace=False)
                module = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
            optimized = TracedForward(module, shape, dtype, keys, output_type, 0.0)
            for batch, probe in probes.items():
                # Twice: TorchScript's profiling executor specializes on its first runs.
                for _ in range(2):
                    problem = _difference(eager[batch], optimized(probe), keys)
                    if problem is not None:
                        raise NotTraceable(f"at batch {batch}, {problem}")
    except NotTraceable as exc:
        log.warning("%s: running the eager model; the traced one does not answer the same: %s",
                    name, exc)
        return None
    except Exception as exc:  # tracing raises many kinds of errors; none is fatal here
        log.warning("%s: running the eager model; tracing failed: %s: %s",
                    name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None
    optimized.seconds = time.perf_counter() - started
    log.info("%s: traced and optimized for inference in %.2f s (checked against the eager "
             "model at batches %s)", name, optimized.seconds,
             ", ".join(str(b) for b in CHECK_BATCHES))
    return optimized
