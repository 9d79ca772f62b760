"""The baseline a user would write first: one JSON POST with the image in Base64, a Pydantic
model, a full decode, then a resize, then the same model. Run by the benchmarks only.

    python bench/naive_server.py PORT
"""

from __future__ import annotations

import base64
import io
import sys

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel
from transformers import AutoModelForImageClassification

from server.pipeline.model_store import resolve_model

path, model_id = resolve_model(None)
model = AutoModelForImageClassification.from_pretrained(path).eval()
labels = model.config.id2label
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)

app = FastAPI()


class AnalyzeRequest(BaseModel):
    image: str
    task: str = "classify"


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/analyze")
def analyze(request: AnalyzeRequest) -> dict[str, object]:
    data = base64.b64decode(request.image)
    image = Image.open(io.BytesIO(data))
    width, height, fmt = image.width, image.height, image.format
    image = image.convert("RGB")  # the full decode
    scale = 256 / min(width, height)
    image = image.resize((round(width * scale), round(height * scale)), Image.Resampling.BILINEAR)
    left, top = (image.width - 224) // 2, (image.height - 224) // 2
    image = image.crop((left, top, left + 224, top + 224))
    pixels = (np.asarray(image, np.float32) / 255 - MEAN) / STD
    tensor = torch.from_numpy(pixels.transpose(2, 0, 1)[None].copy())
    with torch.inference_mode():
        probs = model(pixel_values=tensor).logits.softmax(-1)[0]
    scores, indices = probs.topk(5)
    return {
        "result": {"labels": [{"label": labels[int(i)], "score": float(s)}
                              for s, i in zip(scores, indices, strict=True)]},
        "image": {"width": width, "height": height, "format": fmt},
    }


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
