"""Kind ``image-to-text``: a caption per image from an image-to-text model folder (BLIP, GIT,
a VisionEncoderDecoder...); answers like ``caption``.

Generation is bounded: ``max_tokens`` new tokens at most (:data:`MAX_TOKENS`) and
``num_beams`` at most :data:`MAX_BEAMS`, so that one request cannot hold a worker for long.
Decoding is deterministic (greedy or beam search, never sampling), so a cached caption is the
caption. Images of one batch with the same generation options run through ``generate``
together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from server.tasks import results
from server.tasks.contract import TaskOptions, View
from server.tasks.hf import HFTask, groups_of_equal

DEFAULT_TOKENS = 30
MAX_TOKENS = 128
MAX_BEAMS = 4
AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM")
"""Tried in order: the first whose mapping knows the folder's model type loads it."""


class CaptionOptions(TaskOptions):
    max_tokens: int = Field(default=DEFAULT_TOKENS, ge=1, le=MAX_TOKENS,
                            description="The most tokens the caption may have.")
    num_beams: int = Field(default=1, ge=1, le=MAX_BEAMS,
                           description="Beam search width; 1: greedy decoding (fastest).")


@dataclass(frozen=True)
class CaptionItem:
    pixels: Any
    """The image processor's ``pixel_values`` for one image, [3, H, W]."""
    max_tokens: int
    num_beams: int


class ImageToText(HFTask):
    """An image-to-text model, its image processor and its tokenizer."""

    name = "caption"
    kind = "image-to-text"
    auto_model = AUTO_CLASSES[0]
    trace = False  # predict runs its own passes, not HFTask.forward
    Options = CaptionOptions
    Result = results.Caption

    def __init__(self, model: str | None = None, *, name: str | None = None) -> None:
        super().__init__(model, name=name)
        self.tokenizer: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["tokenizer"] = None
        return state

    def load_model(self, path: str) -> Any:
        import transformers

        problems = []
        for name in AUTO_CLASSES:
            auto: Any = getattr(transformers, name, None)
            if auto is None:
                continue
            try:
                return auto.from_pretrained(path)
            except ValueError as exc:  # "Unrecognized configuration class ... for this kind"
                problems.append(f"{name}: {' '.join(str(exc).split())[:120]}")
        raise ValueError("no image-to-text model class loads it (" + "; ".join(problems) + ")")

    def loaded(self) -> None:
        from transformers import AutoTokenizer

        auto: Any = AutoTokenizer
        self.tokenizer = auto.from_pretrained(self.processor_path)

    def preprocess(self, view: View, options: Any) -> Any:
        return CaptionItem(super().preprocess(view, options), options.max_tokens,
                           options.num_beams)

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        """Per item, its caption (str)."""
        import torch

        if not batch:
            return []
        self._require_loaded()
        captions: list[Any] = [None] * len(batch)
        keys = [(tuple(item.pixels.shape), item.max_tokens, item.num_beams) for item in batch]
        for group in groups_of_equal(keys):
            first = batch[group[0]]
            pixels = torch.stack([batch[i].pixels for i in group]).to(self.device)
            with torch.inference_mode():
                tokens = self.net.generate(pixel_values=pixels, max_new_tokens=first.max_tokens,
                                           num_beams=first.num_beams, do_sample=False)
            texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
            for index, text in zip(group, texts, strict=True):
                captions[index] = " ".join(str(text).split())
        return captions

    def encode(self, output: Any, view: View, options: Any) -> dict[str, Any]:
        return {"caption": str(output)}
