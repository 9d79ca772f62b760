"""Kind ``image-feature-extraction``: one vector per image from a model folder; answers like
``embed``.

The vector is the model's own image embedding where it has one (CLIP, SigLIP:
``get_image_features``, the space their text embeddings share), else its pooled output
(``pooler_output``: ViT, DINOv2, ConvNeXt...), else the mean of its last hidden state over
tokens or positions. It is L2-normalised by default (option ``normalize``), so that the dot
product of two embeddings is their cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import Field

from server.tasks import results
from server.tasks.contract import TaskOptions, View
from server.tasks.hf import HFTask, groups_of_equal

DIGITS = 6
"""Decimals of each component in the answer: float32 carries about 7 significant digits."""


class EmbedOptions(TaskOptions):
    normalize: bool = Field(default=True,
                            description="Scale the vector to unit length (L2), so that dot "
                                        "products are cosine similarities.")


def pooled(output: Any, *, use_pooler: bool = True) -> Any:
    """One vector per image from a model's output (see the module's docstring).
    ``use_pooler`` False: ignore a pooler the checkpoint did not train (its weights would be
    random, and different in every process that loads them)."""
    if not hasattr(output, "keys"):  # a tensor: already the embedding
        return output
    pooler = output.get("pooler_output") if use_pooler else None
    if pooler is not None and pooler.dim() == 2:
        return pooler
    hidden = output["last_hidden_state"]
    if hidden.dim() == 4:  # convolutional: [batch, channels, height, width]
        return hidden.mean(dim=(2, 3))
    return hidden.mean(dim=1)  # [batch, tokens, width]


class ImageFeatureExtraction(HFTask):
    """``AutoModel`` plus its image processor; one embedding per image."""

    name = "embed"
    kind = "image-feature-extraction"
    auto_model = "AutoModel"
    trace = False  # predict runs its own passes, not HFTask.forward
    Options = EmbedOptions
    Result = results.Embedding

    def __init__(self, model: str | None = None, *, name: str | None = None) -> None:
        super().__init__(model, name=name)
        self.use_pooler = True

    def load_model(self, path: str) -> Any:
        from transformers import AutoModel

        auto: Any = AutoModel
        net, info = auto.from_pretrained(path, output_loading_info=True)
        # A classifier's folder loaded as a backbone has no trained pooler: pool the hidden
        # states instead of a randomly initialised layer.
        self.use_pooler = not any("pooler" in key for key in info.get("missing_keys", ()))
        return net

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        """Per item, a float32 vector (not yet normalised: :meth:`encode` does that per the
        item's options)."""
        import torch

        if not batch:
            return []
        self._require_loaded()
        outputs: list[Any] = [None] * len(batch)
        for group in groups_of_equal([tuple(item.shape) for item in batch]):
            pixels = torch.stack([batch[i] for i in group]).to(self.device)
            with torch.inference_mode():
                image_features = getattr(self.net, "get_image_features", None)
                raw = (image_features(pixel_values=pixels) if callable(image_features)
                       else self.net(pixel_values=pixels))
                vectors = pooled(raw, use_pooler=self.use_pooler).to(torch.float32)
            vectors = vectors.cpu().numpy()
            for row, index in enumerate(group):
                outputs[index] = vectors[row]
        return outputs

    def encode(self, output: Any, view: View, options: Any) -> dict[str, Any]:
        import numpy as np

        vector = np.asarray(output, dtype=np.float64).reshape(-1)
        if getattr(options, "normalize", True):
            norm = float(np.linalg.norm(vector))
            if norm > 0.0:
                vector = vector / norm
        return {"embedding": [round(float(v), DIGITS) for v in vector]}
