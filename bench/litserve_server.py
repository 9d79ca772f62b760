"""LitServe serving the same model as pixelstream: the same decode (reduced-scale JPEG), the
same preprocessing, the same MobileNetV2 with BatchNorm folded, the same top-5 answer; the
torch threads a pixelstream worker gets. Run by :mod:`bench.inference`::

    python -m bench.litserve_server PORT --max-batch-size 8 --batch-timeout-ms 5 --threads 1 \
        --workers 2

With ``--plain``, the same weights served as a LitServe user would write it from the model
card: Pillow's full decode, the folder's ``AutoImageProcessor`` and the eager
``AutoModelForImageClassification``, softmax, top 5.

LitServe is a benchmark dependency (``scripts/install.sh bench``), not the server's.

``POST /predict`` with ``{"image": "<base64>"}``.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
from typing import Any

import litserve as ls


class ClassifyAPI(ls.LitAPI):  # type: ignore[misc]
    """Module level: LitServe pickles it into its (spawned) inference worker."""

    def setup(self, device: str) -> None:
        import torch

        from server.pipeline.decode import decode
        from server.tasks.contract import View, parse_options
        from server.tasks.hf import ImageClassification

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        self.analyzer = ImageClassification()
        self.analyzer.setup("cpu")
        self.options = parse_options(self.analyzer, {"top_k": 5})
        self.decode = decode
        self.view = View.whole

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # unannotated: LitServe passes the parsed JSON
        data = base64.b64decode(request["image"])
        decoded = self.decode(data, max_pixels=178_956_970, hint=self.analyzer.decode)
        view = self.view(decoded.image, (decoded.info.width, decoded.info.height))
        return self.analyzer.preprocess(view, self.options)

    def batch(self, inputs: list[Any]) -> list[Any]:
        return inputs

    def predict(self, x: Any) -> Any:
        if isinstance(x, list):
            return self.analyzer.predict(x)
        return self.analyzer.predict([x])[0]

    def unbatch(self, output: Any) -> list[Any]:
        return list(output)

    def encode_response(self, output: Any) -> dict[str, Any]:
        return self.analyzer.encode(output, None, self.options)


class PlainClassifyAPI(ls.LitAPI):  # type: ignore[misc]
    """The same weights, served the usual way (see the module's docstring)."""

    def setup(self, device: str) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        from server.pipeline.model_store import prepare_default_model

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        folder = prepare_default_model()
        self.processor = AutoImageProcessor.from_pretrained(folder)
        self.model = AutoModelForImageClassification.from_pretrained(folder).eval()
        self.torch = torch

    def decode_request(self, request):  # type: ignore[no-untyped-def]  # unannotated: LitServe passes the parsed JSON
        from PIL import Image

        return Image.open(io.BytesIO(base64.b64decode(request["image"]))).convert("RGB")

    def batch(self, inputs: list[Any]) -> list[Any]:
        return inputs

    def predict(self, x: Any) -> Any:
        images = x if isinstance(x, list) else [x]
        with self.torch.inference_mode():
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
            scores = self.model(pixel_values=pixels).logits.softmax(-1)
        best = scores.topk(5, dim=-1)
        labels = self.model.config.id2label
        answers = [[{"label": labels[int(i)], "score": float(v)}
                    for v, i in zip(values, ids, strict=True)]
                   for values, ids in zip(best.values, best.indices, strict=True)]
        return answers if isinstance(x, list) else answers[0]

    def unbatch(self, output: Any) -> list[Any]:
        return list(output)

    def encode_response(self, output: Any) -> dict[str, Any]:
        return {"labels": output}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="inference workers")
    parser.add_argument("--plain", action="store_true",
                        help="the weights served the usual way, not pixelstream's pipeline")
    args = parser.parse_args()
    # Inherited by the inference worker LitServe spawns; read by torch when imported there.
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(args.threads)
    api = (PlainClassifyAPI if args.plain else ClassifyAPI)(
        max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers)
    server.run(port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
