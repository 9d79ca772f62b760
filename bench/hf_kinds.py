"""The Hugging Face kinds batched against one image at a time, in one process, same run::

    python -m bench.hf_kinds [--size base|tiny] [--images 8] [--batch 4] [--rounds 3]
        [--threads 1] [--kinds object-detection,image-to-text,...]

For each kind, a random-initialised model of the usual architecture and size (``base``:
DETR with a ResNet-50 backbone at 512 px, CLIP ViT-B/32, a ViT-B/16 encoder with a 6-layer
BERT decoder, ViT-B/16; ``tiny``: the test suite's folders, for a quick check) is saved to a
folder and loaded by its task class, as a tasks file would; random weights cost what trained
ones do. ``--images`` photo-like images are preprocessed once, then ``predict`` runs them
one by one and in batches of ``--batch`` (the best of ``--rounds`` rounds each), with the
torch threads of one worker. Prints per kind the milliseconds per image both ways and their
ratio, as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

KINDS = ("object-detection", "zero-shot-image-classification", "image-to-text",
         "image-feature-extraction")
WORDS = ["a", "cat", "dog", "on", "the", "mat", "red", "car", "tree", "boat", "sits", "in"]
OPTIONS: dict[str, dict[str, Any]] = {
    "object-detection": {"threshold": 0.5, "tiles": False},
    "zero-shot-image-classification": {"labels": ["cat", "dog", "car", "tree", "boat"]},
    "image-to-text": {"max_tokens": 20},
    "image-feature-extraction": {},
}


def base_detr(folder: Path) -> Path:
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    backbone: Any = ResNetConfig(out_features=["stage4"])  # ResNet-50
    config: Any = DetrConfig(backbone_config=backbone,
                             id2label={i: f"class{i}" for i in range(91)})
    model: Any = DetrForObjectDetection(config)
    model.save_pretrained(folder)
    processor: Any = DetrImageProcessor(size={"shortest_edge": 512, "longest_edge": 853})
    processor.save_pretrained(folder)
    return folder


def base_clip(folder: Path) -> Path:
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    from tests.support.tiny_models import write_bpe_vocabulary

    with tempfile.TemporaryDirectory() as scratch:
        vocab, merges = write_bpe_vocabulary(Path(scratch), WORDS)
        tokenizer: Any = CLIPTokenizer(vocab=str(vocab), merges=str(merges))
    model: Any = CLIPModel(CLIPConfig())  # ViT-B/32 image tower, 12-layer text tower
    model.save_pretrained(folder)
    processor: Any = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def base_captioner(folder: Path) -> Path:
    from transformers import (
        BertConfig,
        BertTokenizer,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    with tempfile.TemporaryDirectory() as scratch:
        vocab_file = Path(scratch) / "vocab.txt"
        vocab_file.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]),
                              encoding="utf-8")
        tokenizer: Any = BertTokenizer(vocab=str(vocab_file))
    decoder: Any = BertConfig(vocab_size=len(tokenizer), num_hidden_layers=6, is_decoder=True,
                              add_cross_attention=True)
    config: Any = VisionEncoderDecoderConfig.from_encoder_decoder_configs(ViTConfig(), decoder)
    model: Any = VisionEncoderDecoderModel(config=config)
    for target in (model.config, model.generation_config):
        target.decoder_start_token_id = tokenizer.cls_token_id
        target.pad_token_id = tokenizer.pad_token_id
        target.eos_token_id = None  # always generate max_tokens: a fixed amount of work
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ViTImageProcessor().save_pretrained(folder)
    return folder


def base_features(folder: Path) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    model: Any = ViTModel(ViTConfig(), add_pooling_layer=True)  # ViT-B/16 at 224
    model.save_pretrained(folder)
    ViTImageProcessor().save_pretrained(folder)
    return folder


def builders(size: str) -> dict[str, Callable[[Path], Path]]:
    if size == "base":
        return {"object-detection": base_detr, "zero-shot-image-classification": base_clip,
                "image-to-text": base_captioner, "image-feature-extraction": base_features}
    from tests.support import tiny_models

    return {
        "object-detection": lambda f: tiny_models.tiny_detr(f, labels=["cat", "dog"]),
        "zero-shot-image-classification": lambda f: tiny_models.tiny_clip(f, words=WORDS),
        "image-to-text": lambda f: tiny_models.tiny_captioner(f, words=WORDS),
        "image-feature-extraction": tiny_models.tiny_vit_features,
    }


def photos(count: int) -> list[Any]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y = np.linspace(0, 1, 480, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, 640, dtype=np.float32)[None, :, None]
    images = []
    for _ in range(count):
        colour = rng.uniform(0, 255, (1, 1, 3)).astype(np.float32)
        pixels = colour * (0.5 + 0.5 * y * x) + rng.normal(0, 12, (480, 640, 3))
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images


def best_ms(run: Callable[[], Any], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        best = min(best, (time.perf_counter() - started) * 1000)
    return best


def measure(kind: str, folder: Path, images: Sequence[Any], batch: int,
            rounds: int) -> dict[str, Any]:
    from server.tasks.contract import View, parse_options, validate_options
    from server.tasks.hf_kinds import KINDS as TASKS

    task = TASKS[kind](str(folder))
    started = time.perf_counter()
    task.setup("cpu")
    load_s = time.perf_counter() - started
    task.wait_optimized()  # time the forward pass it settles on
    options = parse_options(task, validate_options(task, OPTIONS[kind]))
    views = [View.whole(image, image.size) for image in images]
    items = [task.preprocess(view, options) for view in views]
    task.predict(items[:1])  # warm: first-call allocations, text embeddings of the labels

    def one_by_one() -> None:
        for item in items:
            task.predict([item])

    def batched() -> None:
        for start in range(0, len(items), batch):
            task.predict(items[start:start + batch])

    alone = best_ms(one_by_one, rounds) / len(items)
    together = best_ms(batched, rounds) / len(items)
    return {"kind": kind, "model": type(task.net).__name__, "load_s": load_s,
            "alone_ms": alone, "batched_ms": together, "speedup": alone / together}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["base", "tiny"], default="base")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kinds", default=",".join(KINDS))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kinds = [kind for kind in args.kinds.split(",") if kind]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown kinds: {', '.join(unknown)}")
    images = photos(args.images)
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as root:
        build = builders(args.size)
        for kind in kinds:
            folder = build[kind](Path(root) / kind)
            rows.append(measure(kind, folder, images, args.batch, args.rounds))
            print(f"{kind}: done", file=sys.stderr, flush=True)
    print(f"{args.size} models, {args.images} images of 640x480, batches of {args.batch}, "
          f"{args.threads} torch thread(s), best of {args.rounds} rounds; load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after\n")
    print("| kind | model | one by one, ms/image | batched, ms/image | batched speed-up |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| `{row['kind']}` | {row['model']} | {row['alone_ms']:.1f} | "
              f"{row['batched_ms']:.1f} | {row['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
