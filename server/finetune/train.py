"""``pixelstream finetune``: from a folder of labelled images to a served model folder.

Two modes (``--mode``), both trained by transformers' ``Trainer``:

* ``head``: the backbone stays as it is; its features are computed once per image (eval
  mode) and only a new linear head learns, for many epochs, on those cached features.
* ``full``: every weight learns, from the preprocessed images, each epoch a full pass of the
  network forwards and backwards (random horizontal flips as augmentation).

The run is deterministic for a given ``--seed`` (same data, same base, same thread count):
the split, the head's initial weights and the batches' order all follow from it. Checkpoints
go to ``OUT/checkpoints`` at the end of an epoch, five times a run at most (the last two are
kept); ``--resume`` continues from the last one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.finetune import data as datamod
from server.finetune import model as modelmod

MODES = ("head", "full")
DEFAULT_MODE = "head"
"""Chosen by measurement (README, "Fine-tune on your own images"): on the textile benchmark
head-only training reached the accuracy of full fine-tuning at a fraction of its time."""


@dataclass(frozen=True)
class ModeDefaults:
    epochs: int
    learning_rate: float
    batch_size: int


MODE_DEFAULTS = {
    "head": ModeDefaults(epochs=30, learning_rate=1e-3, batch_size=32),
    "full": ModeDefaults(epochs=3, learning_rate=1e-4, batch_size=16),
}
CHECKPOINTS = "checkpoints"
RUN_NAME = "finetune-run.json"
"""Beside the checkpoints: what they were trained on, so --resume refuses another run's."""


class FinetuneError(ValueError):
    """Anything that stops a run before it trains; the message is one line."""


@dataclass(frozen=True)
class FinetuneConfig:
    data_dir: Path
    out: Path
    base: str | None = None
    """A model folder; None: the bundled default."""
    mode: str = DEFAULT_MODE
    epochs: int | None = None
    val_split: float = 0.2
    learning_rate: float | None = None
    batch_size: int | None = None
    seed: int = 0
    resume: bool = False
    name: str | None = None
    """The model id results report; None: the output folder's name."""
    progress: bool = True
    min_per_class: int = datamod.MIN_IMAGES_PER_CLASS
    max_skipped_fraction: float = datamod.MAX_SKIPPED_FRACTION

    def resolved(self) -> ModeDefaults:
        defaults = MODE_DEFAULTS[self.mode]
        return ModeDefaults(
            epochs=self.epochs if self.epochs is not None else defaults.epochs,
            learning_rate=(self.learning_rate if self.learning_rate is not None
                           else defaults.learning_rate),
            batch_size=self.batch_size if self.batch_size is not None else defaults.batch_size,
        )

    def check(self) -> None:
        if self.mode not in MODES:
            raise FinetuneError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        hyper = self.resolved()
        if hyper.epochs < 1 or hyper.batch_size < 1 or not hyper.learning_rate > 0:
            raise FinetuneError("epochs and batch size must be at least 1, the learning rate "
                                "positive")
        if not 0 < self.val_split < 1:
            raise FinetuneError(f"--val-split must be between 0 and 1, not {self.val_split}")


@dataclass
class Outcome:
    folder: Path
    revision: str
    metrics: dict[str, Any]


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _base_path(base: str | None) -> str:
    from server.pipeline.model_store import ModelUnavailable, prepare_default_model

    if base is None or base == "default":
        try:
            return str(prepare_default_model())
        except ModelUnavailable as exc:
            raise FinetuneError(str(exc)) from None
    path = Path(base).expanduser()
    if not path.is_dir():
        raise FinetuneError(f"base model folder {base} does not exist")
    if not (path / "config.json").is_file():
        raise FinetuneError(f"base model folder {base} has no config.json")
    return str(path.absolute())


def _run_identity(config: FinetuneConfig, labels: list[str], base: str) -> dict[str, Any]:
    return {"labels": labels, "mode": config.mode, "base": base, "seed": config.seed,
            "val_split": config.val_split, "data_dir": str(config.data_dir.absolute())}


def _check_resume(config: FinetuneConfig, identity: dict[str, Any]) -> None:
    from transformers import trainer_utils

    utils: Any = trainer_utils
    folder = config.out / CHECKPOINTS
    if not folder.is_dir() or utils.get_last_checkpoint(str(folder)) is None:
        raise FinetuneError(f"--resume: no checkpoint in {folder} to resume from")
    try:
        recorded = json.loads((folder / RUN_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise FinetuneError(f"--resume: {folder / RUN_NAME} is missing or damaged") from None
    for key, value in identity.items():
        if recorded.get(key) != value:
            raise FinetuneError(f"--resume: the checkpoints in {folder} were trained with "
                                f"another {key} ({recorded.get(key)!r}, now {value!r})")


class _Rows:
    """Training rows of the preprocessed array as the dicts ``Trainer`` batches."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, rows: list[int],
                 flip: bool) -> None:
        self.pixels, self.labels, self.rows, self.flip = pixels, labels, rows, flip

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        row = self.rows[index]
        pixels = torch.from_numpy(np.asarray(self.pixels[row], dtype=np.float32))
        # Trainer seeds torch's generator (and restores it on --resume): reproducible flips.
        if self.flip and bool(torch.rand(()) < 0.5):
            pixels = pixels.flip(-1)
        return {"pixel_values": pixels, "labels": int(self.labels[row])}


class _Features:
    def __init__(self, features: Any, labels: np.ndarray) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"features": self.features[index], "labels": int(self.labels[index])}


def _head_module(head: Any) -> Any:
    """The head alone as a module ``Trainer`` trains: features in, loss and logits out."""
    import torch
    from torch import nn

    class HeadOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = head

        def forward(self, features: Any, labels: Any = None) -> dict[str, Any]:
            logits = self.head(features)
            out = {"logits": logits}
            if labels is not None:
                out["loss"] = torch.nn.functional.cross_entropy(logits, labels)
            return out

    return HeadOnly()


SAVES_PER_RUN = 5
"""Checkpoints per run at most: saving one costs about as much as an epoch of head-only
training, so a long run saves every few epochs rather than after each."""


def _training_args(config: FinetuneConfig, hyper: ModeDefaults, device: str,
                   rows: int) -> Any:
    from transformers import TrainingArguments

    steps_per_epoch = math.ceil(rows / hyper.batch_size)
    every = math.ceil(hyper.epochs / SAVES_PER_RUN)

    return TrainingArguments(
        output_dir=str(config.out / CHECKPOINTS),
        per_device_train_batch_size=hyper.batch_size,
        learning_rate=hyper.learning_rate,
        num_train_epochs=hyper.epochs,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        seed=config.seed,
        data_seed=config.seed,
        eval_strategy="no",
        save_strategy="steps",
        save_steps=steps_per_epoch * every,
        save_total_limit=2,
        logging_strategy="epoch",
        report_to="none",
        disable_tqdm=not config.progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=device == "cpu",
    )


@contextlib.contextmanager
def _quiet_trainer_logs() -> Iterator[None]:
    """Keep transformers' warnings (about a plain module, unused columns) off the terminal;
    the progress bar and the per-epoch loss stay."""
    from transformers.utils import logging

    hf_logging: Any = logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _train(config: FinetuneConfig, hyper: ModeDefaults, net: Any, dataset: Any,
           device: str) -> float:
    """``Trainer.train`` on ``net`` and ``dataset``; returns the seconds it took."""
    from transformers import Trainer

    started = time.perf_counter()
    with _quiet_trainer_logs():
        trainer = Trainer(model=net, args=_training_args(config, hyper, device, len(dataset)),
                          train_dataset=dataset)
        if not config.progress:  # no bars: no per-epoch loss lines on stdout either
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)
        trainer.train(resume_from_checkpoint=True if config.resume else None)
    return time.perf_counter() - started


def finetune(config: FinetuneConfig, *, say: Callable[[str], None] | None = None) -> Outcome:
    """Train, evaluate and save (see the module's docstring). Raises :class:`FinetuneError`,
    :class:`~server.finetune.data.DataError` or :class:`~server.finetune.model.ModelError`
    with one line when the data, the base or the options do not allow a run."""
    say = say or (lambda line: print(line, file=sys.stderr))
    config.check()
    hyper = config.resolved()
    dataset = datamod.scan(config.data_dir, min_per_class=config.min_per_class)
    base = _base_path(config.base)
    identity = _run_identity(config, dataset.labels, base)
    if config.resume:
        _check_resume(config, identity)
    device = _device()
    net, processor = modelmod.load_base(base, dataset.labels, config.seed)
    net.to(device)
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="pixelstream-finetune-") as scratch:
        started = time.perf_counter()
        prepared = datamod.preprocess(
            dataset, modelmod.transform_for(processor), Path(scratch) / "pixels.npy",
            max_skipped_fraction=config.max_skipped_fraction,
            min_per_class=config.min_per_class, warn=say, progress=config.progress)
        timings["preprocess_s"] = time.perf_counter() - started
        train_rows, val_rows = datamod.split(prepared.labels, config.val_split, config.seed)

        checkpoints = config.out / CHECKPOINTS
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / RUN_NAME).write_text(json.dumps(identity, indent=2) + "\n",
                                            encoding="utf-8")
        eval_batch = max(hyper.batch_size, 32)
        if config.mode == "head":
            started = time.perf_counter()
            features = modelmod.head_inputs(
                net, prepared.pixels, train_rows, batch_size=eval_batch, device=device,
                progress=config.progress, desc="features")
            timings["features_s"] = time.perf_counter() - started
            head = _head_module(copy.deepcopy(net.classifier))
            timings["train_s"] = _train(
                config, hyper, head,
                _Features(features, prepared.labels[train_rows]), device)
            net.classifier = head.head.to(device)
        else:
            timings["train_s"] = _train(
                config, hyper, net,
                _Rows(prepared.pixels, prepared.labels, train_rows, flip=True), device)
        net.eval()
        predicted = modelmod.predict(net, prepared.pixels, val_rows, batch_size=eval_batch,
                                     device=device, progress=config.progress)
        scores = modelmod.scores(prepared.labels[val_rows], predicted, dataset.labels)
    timings["per_epoch_s"] = timings["train_s"] / hyper.epochs
    model_id = config.name or config.out.absolute().name
    details = {
        "base": base, "mode": config.mode, **asdict(hyper), "seed": config.seed,
        "val_split": config.val_split, "labels": dataset.labels,
        "train_images": len(train_rows), "val_images": len(val_rows),
    }
    metrics = {
        **scores,
        "training": {**details, **{k: round(v, 3) for k, v in timings.items()}},
        "skipped": {"count": len(prepared.skipped),
                    "files": [str(path) for path, _ in prepared.skipped]},
    }
    revision = modelmod.save(net.to("cpu"), processor, config.out, model_id=model_id,
                             details=details, metrics=metrics)
    say(modelmod.format_scores(scores))
    if prepared.skipped:
        say(f"skipped {len(prepared.skipped)} unreadable file(s) (listed in "
            f"{config.out / modelmod.METRICS_NAME})")
    say(f"saved {model_id} revision {revision} to {config.out}")
    return Outcome(config.out, revision, metrics)
