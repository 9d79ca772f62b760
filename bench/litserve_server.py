"""LitServe serving the same model as pixelstream: the same decode (reduced-scale JPEG), the
same preprocessing, the same MobileNetV2 with BatchNorm folded, the same top-5 answer; the
torch threads a pixelstream worker gets. Run by :mod:`bench.inference`::

    python -m bench.litserve_server PORT --max-batch-size 8 --batch-timeout-ms 5 --threads 1 \
        --workers 2

LitServe is a benchmark dependency (``scripts/install.sh bench``), not the server's.

``POST /predict`` with ``{"image": "<base64>"}``.
"""

from __future__ import annotations

import argparse
import base64
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="inference workers")
    args = parser.parse_args()
    # Inherited by the inference worker LitServe spawns; read by torch when imported there.
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(args.threads)
    api = ClassifyAPI(max_batch_size=args.max_batch_size,
                      batch_timeout=args.batch_timeout_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers)
    server.run(port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
