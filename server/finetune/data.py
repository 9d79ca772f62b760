"""Labelled images from an "imagefolder" layout, checked, split and streamed from disk.

``DATA_DIR/<label>/<any file>``: one folder per class, every regular file in it a candidate
image (hidden files are ignored). :func:`scan` lists them and refuses data that cannot train a
classifier (no class, one class, a class with too few images) with one line naming the
problem; :func:`preprocess` decodes each image once, in order, into a file-backed array of
model inputs, skipping (and naming) files that do not decode; :func:`split` divides the
readable images into training and validation sets, per class, reproducibly.

Importing this module is cheap: numpy and PIL only; torch is imported where tensors are made.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MIN_IMAGES_PER_CLASS = 2
"""Each class needs one image to learn from and one to validate on, at least."""
MAX_SKIPPED_FRACTION = 0.1
"""More unreadable files than this share of all files (and more than
:data:`MIN_SKIPPED_LIMIT`) stops the run: the folder is likely not what was meant (or badly
damaged)."""
MIN_SKIPPED_LIMIT = 2
"""Unreadable files a run always tolerates: a stray file in a small set is not "too many"."""
_PREFETCH = 16
"""Images decoded ahead of the one being stored (bounds the memory held meanwhile)."""


class DataError(ValueError):
    """The data cannot train a classifier; the message is one line naming the problem."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class Dataset:
    """The classes (sorted folder names) and every candidate file with its class index."""

    root: Path
    labels: list[str]
    samples: list[Sample]

    def counts(self, samples: Sequence[Sample] | None = None) -> list[int]:
        counts = [0] * len(self.labels)
        for sample in self.samples if samples is None else samples:
            counts[sample.label] += 1
        return counts


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def scan(root: Path, *, min_per_class: int = MIN_IMAGES_PER_CLASS) -> Dataset:
    """The classes and files of ``root``; raises :class:`DataError` when it cannot train."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data folder {root} is not a folder")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    if not classes:
        raise DataError(f"data folder {root} is empty: it needs one sub-folder of images "
                        "per class (DATA_DIR/<label>/*.jpg)")
    if len(classes) == 1:
        raise DataError(f"data folder {root} has a single class ({classes[0].name}): "
                        "a classifier needs at least two")
    samples = []
    for index, folder in enumerate(classes):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and _visible(p)
                       and all(_visible(part) for part in p.relative_to(folder).parents
                               if part != Path(".")))
        samples += [Sample(path, index) for path in files]
    dataset = Dataset(root, [folder.name for folder in classes], samples)
    check_counts(dataset, dataset.counts(), min_per_class)
    return dataset


def check_counts(dataset: Dataset, counts: Sequence[int], min_per_class: int,
                 readable: bool = False) -> None:
    """Raise :class:`DataError` naming the first class with fewer than ``min_per_class``."""
    for label, count in zip(dataset.labels, counts, strict=True):
        if count < min_per_class:
            what = "readable images" if readable else "images"
            raise DataError(f"class {label!r} has {count} {what}; each class needs at least "
                            f"{min_per_class} (one to train on and one to validate)")


@dataclass
class Preprocessed:
    """Model inputs of the readable images, in a file-backed array (one row per image)."""

    pixels: np.ndarray
    """float16 ``[N, C, H, W]``, memory-mapped: rows are read from disk as they are used."""
    labels: np.ndarray
    """int64 ``[N]``, class indices."""
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """Files that did not decode, with the reason."""


def _load(path: Path, transform: Callable[[Any], Any]) -> tuple[np.ndarray | None, str]:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
        return np.asarray(transform(rgb), dtype=np.float16), ""
    except Exception as exc:  # any file that does not decode is skipped, whatever the reason
        return None, " ".join(f"{type(exc).__name__}: {exc}".split())[:200]


def _ahead(items: Sequence[Sample], transform: Callable[[Any], Any],
           threads: int) -> Iterator[tuple[Sample, np.ndarray | None, str]]:
    """Decode in a few threads (PIL releases the GIL), yielding in order, a bounded window
    ahead."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: list[Any] = []
        for sample in items:
            pending.append((sample, pool.submit(_load, sample.path, transform)))
            if len(pending) >= _PREFETCH:
                first, future = pending.pop(0)
                yield (first, *future.result())
        for sample, future in pending:
            yield (sample, *future.result())


def preprocess(dataset: Dataset, transform: Callable[[Any], Any], cache: Path, *,
               threads: int = 2, max_skipped_fraction: float = MAX_SKIPPED_FRACTION,
               min_per_class: int = MIN_IMAGES_PER_CLASS,
               warn: Callable[[str], None] = print, progress: bool = True) -> Preprocessed:
    """Decode every file once, apply ``transform`` (PIL RGB image → ``[C, H, W]`` array), and
    write the results to ``cache`` (a new file). Files that do not decode are skipped, each
    named through ``warn``; too many of them, or a class left with too few, raise
    :class:`DataError`."""
    from tqdm.auto import tqdm

    samples = dataset.samples
    pixels: np.memmap[Any, Any] | None = None
    labels: list[int] = []
    paths: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    limit = max(MIN_SKIPPED_LIMIT, math.floor(max_skipped_fraction * len(samples)))
    bar = tqdm(total=len(samples), desc="preprocessing", unit="img", disable=not progress)
    try:
        for sample, array, reason in _ahead(samples, transform, threads):
            bar.update(1)
            if array is None:
                skipped.append((sample.path, reason))
                warn(f"warning: skipped {sample.path}: not a readable image ({reason})")
                if len(skipped) > limit:
                    raise DataError(
                        f"{len(skipped)} of {len(samples)} files in {dataset.root} are not "
                        f"readable images (at most {limit}, {max_skipped_fraction:.0%}, may be); "
                        f"the last: {sample.path}")
                continue
            if pixels is None:
                pixels = np.lib.format.open_memmap(cache, mode="w+", dtype=np.float16,
                                                   shape=(len(samples), *array.shape))
            if array.shape != pixels.shape[1:]:
                raise DataError(f"{sample.path} preprocessed to {array.shape}, the others to "
                                f"{pixels.shape[1:]}: the base model's processor must give "
                                "one size")
            pixels[len(labels)] = array
            labels.append(sample.label)
            paths.append(sample.path)
    finally:
        bar.close()
    if pixels is None:
        raise DataError(f"no file in {dataset.root} is a readable image")
    pixels.flush()
    label_array = np.asarray(labels, dtype=np.int64)
    check_counts(dataset, np.bincount(label_array, minlength=len(dataset.labels)).tolist(),
                 min_per_class, readable=True)
    return Preprocessed(pixels[: len(labels)], label_array, paths, skipped)


def split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices for training and validation: per class, ``val_fraction`` of its images
    (at least one, and at least one left to train on), chosen by ``seed``."""
    if not 0 < val_fraction < 1:
        raise DataError(f"the validation split must be between 0 and 1, not {val_fraction}")
    rng = random.Random(seed)
    train: list[int] = []
    val: list[int] = []
    for label in sorted(set(labels.tolist())):
        rows = [int(i) for i in np.flatnonzero(labels == label)]
        rng.shuffle(rows)
        count = min(len(rows) - 1, max(1, round(len(rows) * val_fraction)))
        val += rows[:count]
        train += rows[count:]
    return sorted(train), sorted(val)
