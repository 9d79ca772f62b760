"""Kind ``zero-shot-image-classification``: labels chosen by the client, scored by a CLIP-like
model (one image tower, one text tower, one shared space); answers like ``zero-shot``.

Each request names its labels (option ``labels``). Their text embeddings are computed once
per label set and template and kept (:data:`TEXT_CACHE_ENTRIES` sets, least recently used
dropped), so a client asking the same question of many images pays for the text tower once.
Scores are the model's own: a softmax over the given labels for CLIP-style models (they sum
to 1), independent sigmoids for SigLIP-style models (trained that way).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field, StringConstraints, field_validator

from server.tasks import results
from server.tasks.contract import TaskOptions, View
from server.tasks.hf import HFTask, groups_of_equal

MAX_LABELS = 64
MAX_LABEL_CHARS = 200
DEFAULT_TEMPLATE = "This is a photo of {}."
"""The Hugging Face pipeline's default: CLIP was trained on captions, not bare words."""
TEXT_CACHE_ENTRIES = 256

Label = Annotated[str, StringConstraints(min_length=1, max_length=MAX_LABEL_CHARS)]


_NO_PLACE = r"(?:[^\{]|\{+[^\{\}])*\{*"
ONE_PLACE = "^" + _NO_PLACE + r"\{\}" + _NO_PLACE + "$"
"""A string with ``{}`` exactly once, as a JSON Schema pattern (no lookarounds, so any
schema validator reads it, braces escaped for browsers' "v" mode): what ``_one_place`` checks."""


class ZeroShotOptions(TaskOptions):
    # The schema says what the validators check, so that options valid by the published
    # schema are never refused.
    labels: list[Label] = Field(min_length=1, max_length=MAX_LABELS,
                                json_schema_extra={"uniqueItems": True},
                                description="The candidate labels (1-64, distinct); the "
                                            "answer scores each of them, best first.")
    template: str = Field(default=DEFAULT_TEMPLATE, max_length=MAX_LABEL_CHARS,
                          json_schema_extra={"pattern": ONE_PLACE},
                          description="The sentence each label is put into before the text "
                                      "model reads it; {} marks the label's place.")

    @field_validator("labels")
    @classmethod
    def _distinct(cls, labels: list[str]) -> list[str]:
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be distinct")
        return labels

    @field_validator("template")
    @classmethod
    def _one_place(cls, template: str) -> str:
        if template.count("{}") != 1:
            raise ValueError("template must contain {} exactly once")
        return template


@dataclass(frozen=True)
class ZeroShotItem:
    pixels: Any
    """The image processor's ``pixel_values`` for one image, [3, H, W]."""
    labels: tuple[str, ...]
    template: str


class ZeroShotImageClassification(HFTask):
    """``AutoModel`` (CLIPModel, SiglipModel, ...) with its ``AutoProcessor`` (image processor
    and tokenizer)."""

    name = "zero-shot"
    kind = "zero-shot-image-classification"
    auto_model = "AutoModel"
    trace = False  # predict runs its own passes, not HFTask.forward
    Options = ZeroShotOptions
    Result = results.Labels

    def __init__(self, model: str | None = None, *, name: str | None = None) -> None:
        super().__init__(model, name=name)
        self._texts: OrderedDict[tuple[tuple[str, ...], str], Any] = OrderedDict()
        self._sigmoid = False
        self._max_text_tokens: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_texts"] = OrderedDict()
        return state

    def load_processor(self, path: str) -> Any:
        from transformers import AutoProcessor

        auto: Any = AutoProcessor
        return auto.from_pretrained(path)

    def loaded(self) -> None:
        if not (callable(getattr(self.net, "get_text_features", None))
                and callable(getattr(self.net, "get_image_features", None))
                and getattr(self.processor, "tokenizer", None) is not None
                and getattr(self.processor, "image_processor", None) is not None):
            raise ValueError(f"{type(self.net).__name__} with {type(self.processor).__name__} "
                             "is not a CLIP-like model (image and text towers, a tokenizer)")
        model_type = str(getattr(self.net.config, "model_type", ""))
        self._sigmoid = "siglip" in model_type
        # The text tower's positions bound a label's length, whatever the tokenizer claims.
        positions = getattr(getattr(self.net.config, "text_config", None),
                            "max_position_embeddings", None)
        limit = int(getattr(self.processor.tokenizer, "model_max_length", 0) or 0)
        candidates = [value for value in (positions, limit) if isinstance(value, int) and value > 0]
        self._max_text_tokens = min(candidates) if candidates else None
        self._texts.clear()

    def preprocess(self, view: View, options: Any) -> Any:
        self._require_loaded()
        image = view.image if view.image.mode == "RGB" else view.image.convert("RGB")
        pixels = self.processor.image_processor(images=image, return_tensors="pt")
        return ZeroShotItem(pixels["pixel_values"][0], tuple(options.labels), options.template)

    def text_embeddings(self, labels: tuple[str, ...], template: str) -> Any:
        """The unit-length text embeddings of ``labels`` in ``template``, [labels, width];
        cached per label set."""
        import torch

        key = (labels, template)
        cached = self._texts.get(key)
        if cached is not None:
            self._texts.move_to_end(key)
            return cached
        tokenizer = self.processor.tokenizer
        padding: Any = "max_length" if self._sigmoid else True  # SigLIP was trained padded
        tokens = tokenizer([template.format(label) for label in labels], padding=padding,
                           truncation=True, max_length=self._max_text_tokens,
                           return_tensors="pt")
        inputs = {key: value.to(self.device) for key, value in tokens.items()
                  if key in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            embeds = _features(self.net.get_text_features(**inputs))
            embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        self._texts[key] = embeds
        while len(self._texts) > TEXT_CACHE_ENTRIES:
            self._texts.popitem(last=False)
        return embeds

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        """Per item, float32 scores of its labels, in the labels' given order."""
        import torch

        if not batch:
            return []
        self._require_loaded()
        images: list[Any] = [None] * len(batch)
        for group in groups_of_equal([tuple(item.pixels.shape) for item in batch]):
            pixels = torch.stack([batch[i].pixels for i in group]).to(self.device)
            with torch.inference_mode():
                embeds = _features(self.net.get_image_features(pixel_values=pixels))
                embeds = embeds / embeds.norm(dim=-1, keepdim=True)
            for row, index in enumerate(group):
                images[index] = embeds[row]
        scale = self.net.logit_scale.detach().exp()
        bias = getattr(self.net, "logit_bias", None)
        outputs = []
        for item, image in zip(batch, images, strict=True):
            texts = self.text_embeddings(item.labels, item.template)
            with torch.inference_mode():
                logits = scale * (texts @ image)
                if bias is not None:
                    logits = logits + bias.detach()
                scores = torch.sigmoid(logits) if self._sigmoid else torch.softmax(logits, -1)
            outputs.append(scores.to(torch.float32).cpu().numpy())
        return outputs

    def encode(self, output: Any, view: View, options: Any) -> dict[str, Any]:
        """Every given label with its score, best first (ties: the given order)."""
        scores = [float(score) for score in output]
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        labels = list(options.labels)
        return {"labels": [{"label": labels[i], "score": round(min(max(scores[i], 0.0), 1.0), 6)}
                           for i in order]}


def _features(output: Any) -> Any:
    """``get_*_features`` return a tensor in some transformers versions, an output object
    whose pooled output is the embedding in others."""
    if hasattr(output, "keys"):
        pooled = output.get("pooler_output")
        return pooled if pooled is not None else output[0]
    return output
