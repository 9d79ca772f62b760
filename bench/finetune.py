"""Fine-tuning on a real labelled set: time per epoch and held-out accuracy, per mode.

The data: ``conformal-clip-data`` (MIT; the ``bench`` extra installs it), 2,000 RGB textile
photos of 250x250 in three classes (nominal 1,000, local defect 500, global defect 500). The
run takes ``--per-class`` of each class (seeded), then runs ``pixelstream finetune`` from the
bundled MobileNetV2 once per mode, in this one process, with ``--threads`` torch threads::

    python -m bench.finetune [--per-class 200] [--threads 1] [--modes head,full]
                             [--head-epochs 30] [--full-epochs 2] [--batchnorm]
                             [--json OUT.json]

Held-out accuracy is on the validation split (``--val-split``, 0.2 of each class), which no
mode trains on. Printed: a Markdown table per mode (preprocessing, features, seconds per
epoch, total, accuracy) and the ratios of full fine-tuning to head-only training.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def subset(root: Path, target: Path, per_class: int, seed: int) -> dict[str, int]:
    """Symlinks to ``per_class`` files of each class (all of them for 0)."""
    counts = {}
    rng = random.Random(seed)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.is_file())
        if per_class:
            files = rng.sample(files, min(per_class, len(files)))
        (target / folder.name).mkdir(parents=True)
        for path in files:
            (target / folder.name / path.name).symlink_to(path)
        counts[folder.name] = len(files)
    return counts


def batchnorm_ablation(data: Path, scratch: Path, *, seed: int, val_split: float,
                       epochs: int) -> dict[str, float]:
    """Held-out accuracy of a head trained on features from the frozen backbone with its
    BatchNorm in eval mode (what ``--mode head`` does) and in training mode (batch
    statistics), both scored as served: eval-mode features of the held-out images."""
    import copy

    import torch

    from server.finetune import data as datamod
    from server.finetune import model as modelmod
    from server.pipeline.model_store import prepare_default_model

    dataset = datamod.scan(data)
    net, processor = modelmod.load_base(str(prepare_default_model()), dataset.labels, seed)
    prepared = datamod.preprocess(dataset, modelmod.transform_for(processor),
                                  scratch / "ablation.npy", progress=False,
                                  warn=lambda line: None)
    train, val = datamod.split(prepared.labels, val_split, seed)
    served = modelmod.head_inputs(net, prepared.pixels, val, batch_size=32, device="cpu",
                                  progress=False, desc="features")
    eval_mode = modelmod.head_inputs(net, prepared.pixels, train, batch_size=32, device="cpu",
                                     progress=False, desc="features")
    captured: list[Any] = []
    training = copy.deepcopy(net).train()  # a copy: its running statistics change
    hook = training.classifier.register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].detach().float()))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    with torch.no_grad():
        for part in modelmod.batches(len(order), 32):
            rows = [train[i] for i in order[part]]
            training(pixel_values=torch.from_numpy(prepared.pixels[rows].astype("float32")))
    hook.remove()
    train_mode = torch.empty_like(eval_mode)
    train_mode[torch.tensor(order)] = torch.cat(captured)
    labels = torch.from_numpy(prepared.labels[train])
    truth = prepared.labels[val]
    accuracy = {}
    for name, features in (("eval", eval_mode), ("train", train_mode)):
        torch.manual_seed(seed)
        head = torch.nn.Linear(features.shape[1], len(dataset.labels))
        optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
        for _ in range(epochs):
            for part in modelmod.batches(len(labels), 32):
                optimizer.zero_grad()
                loss: Any = torch.nn.functional.cross_entropy(head(features[part]),
                                                              labels[part])
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            picked = head(served).argmax(dim=-1).numpy()
        accuracy[name] = float((picked == truth).mean())
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=200,
                        help="images of each class (0: all 2,000)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--modes", default="head,full")
    parser.add_argument("--head-epochs", type=int, default=None)
    parser.add_argument("--full-epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--val-split", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--batchnorm", action="store_true",
                        help="also: a head trained on features with BatchNorm in eval vs "
                             "training mode (frozen backbone), scored as served")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import conformal_clip_data
    except ImportError:
        sys.exit("bench.finetune needs the bench extra: pip install -e '.[bench]'")
    import torch

    from server.finetune.train import FinetuneConfig, finetune

    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as scratch:
        data = Path(scratch) / "data"
        counts = subset(Path(conformal_clip_data.textile_simulated_root()), data,
                        args.per_class, args.seed)
        print(f"data: {counts}, torch threads {args.threads}", file=sys.stderr)
        for mode in args.modes.split(","):
            epochs = args.head_epochs if mode == "head" else args.full_epochs
            started = time.perf_counter()
            outcome = finetune(FinetuneConfig(
                data_dir=data, out=Path(scratch) / f"model-{mode}", mode=mode, epochs=epochs,
                batch_size=args.batch_size, val_split=args.val_split, seed=args.seed,
                progress=False), say=lambda line: print(line, file=sys.stderr))
            total = time.perf_counter() - started
            training = outcome.metrics["training"]
            rows.append({
                "mode": mode, "epochs": training["epochs"],
                "batch_size": training["batch_size"], "train_images": training["train_images"],
                "val_images": training["val_images"],
                "preprocess_s": training["preprocess_s"],
                "features_s": training.get("features_s", 0.0),
                "per_epoch_s": training["per_epoch_s"], "train_s": training["train_s"],
                "total_s": round(total, 1), "accuracy": outcome.metrics["accuracy"],
            })
        ablation = (batchnorm_ablation(data, Path(scratch), seed=args.seed,
                                       val_split=args.val_split,
                                       epochs=args.head_epochs or 30)
                    if args.batchnorm else None)
    print("| mode | epochs | batch | train / held-out images | preprocess s | features s "
          "| s per epoch | ms per image-epoch | total s | held-out accuracy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        per_image = 1000 * row["per_epoch_s"] / row["train_images"]
        print(f"| {row['mode']} | {row['epochs']} | {row['batch_size']} | "
              f"{row['train_images']} / {row['val_images']} | {row['preprocess_s']:.1f} | "
              f"{row['features_s']:.1f} | {row['per_epoch_s']:.2f} | {per_image:.1f} | "
              f"{row['total_s']:.1f} | {row['accuracy']:.3f} |")
    by_mode = {row["mode"]: row for row in rows}
    if {"head", "full"} <= set(by_mode):
        head, full = by_mode["head"], by_mode["full"]
        print(f"\nfull / head: {full['per_epoch_s'] / head['per_epoch_s']:.0f}x the time per "
              f"epoch, {full['total_s'] / head['total_s']:.2f}x the total time, accuracy "
              f"{full['accuracy']:.3f} vs {head['accuracy']:.3f}")
    if ablation is not None:
        print(f"\nfrozen backbone, BatchNorm in eval mode: held-out accuracy "
              f"{ablation['eval']:.3f}; in training mode: {ablation['train']:.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
