from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from server.finetune.data import DataError, Dataset, preprocess, scan, split


def small(image: object) -> np.ndarray:
    """A stand-in transform: the image's mean colour as a [3, 1, 1] array."""
    return np.asarray(image, dtype=np.float32).mean(axis=(0, 1)).reshape(3, 1, 1)


def test_scan_lists_classes_and_files_in_order(image_set: Callable[..., Path]) -> None:
    root = image_set({"red": 3, "blue": 2})
    (root / "red" / ".hidden.png").write_bytes(b"x")
    dataset = scan(root)
    assert dataset.labels == ["blue", "red"]
    assert dataset.counts() == [2, 3]
    assert [s.path.name for s in dataset.samples] == ["000.png", "001.png", "000.png",
                                                      "001.png", "002.png"]


@pytest.mark.parametrize(("layout", "message"), [
    ({}, "is empty: it needs one sub-folder of images per class"),
    ({"red": 4}, "has a single class (red): a classifier needs at least two"),
    ({"red": 4, "blue": 1}, "class 'blue' has 1 images; each class needs at least 2"),
    ({"red": 4, "blue": 0}, "class 'blue' has 0 images"),
])
def test_scan_refuses_data_that_cannot_train(tmp_path: Path, layout: dict[str, int],
                                             message: str) -> None:
    from tests.server.finetune.conftest import write_set

    root = tmp_path / "data"
    root.mkdir()
    write_set(root, layout)
    with pytest.raises(DataError) as caught:
        scan(root)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_scan_refuses_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        scan(tmp_path / "nowhere")


def test_preprocess_skips_and_names_unreadable_files(image_set: Callable[..., Path],
                                                    tmp_path: Path) -> None:
    root = image_set({"red": 10, "blue": 10})
    (root / "red" / "notes.txt").write_text("not an image")
    (root / "blue" / "truncated.png").write_bytes((root / "blue" / "000.png").read_bytes()[:60])
    warnings: list[str] = []
    prepared = preprocess(scan(root), small, tmp_path / "cache.npy", warn=warnings.append,
                          progress=False)
    assert len(prepared.labels) == 20
    assert sorted(p.name for p, _ in prepared.skipped) == ["notes.txt", "truncated.png"]
    assert len(warnings) == 2
    assert all(w.startswith("warning: skipped ") for w in warnings)
    assert any("notes.txt" in w for w in warnings)
    # rows are the readable files in order, each with its own pixels
    assert prepared.pixels.shape == (20, 3, 1, 1)
    assert prepared.pixels.dtype == np.float16
    blue = prepared.pixels[prepared.labels == 0, 2, 0, 0]
    red = prepared.pixels[prepared.labels == 1, 0, 0, 0]
    assert blue.min() > 150
    assert red.min() > 150


def test_too_many_unreadable_files_stop_the_run(image_set: Callable[..., Path],
                                                tmp_path: Path) -> None:
    root = image_set({"red": 5, "blue": 5})
    for i in range(3):
        (root / "red" / f"bad{i}.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(DataError, match=r"3 of 13 files .* are not readable images \(at most 2"):
        preprocess(scan(root), small, tmp_path / "cache.npy", warn=lambda _: None,
                   progress=False)


def test_a_class_left_with_too_few_readable_images_stops_the_run(
        image_set: Callable[..., Path], tmp_path: Path) -> None:
    root = image_set({"red": 20, "blue": 1})
    (root / "blue" / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="class 'blue' has 1 readable images"):
        preprocess(scan(root), small, tmp_path / "cache.npy", warn=lambda _: None,
                   progress=False)


def test_split_is_per_class_reproducible_and_disjoint() -> None:
    labels = np.array([0] * 10 + [1] * 3 + [2] * 2)
    train, val = split(labels, 0.2, seed=7)
    assert split(labels, 0.2, seed=7) == (train, val)
    assert split(labels, 0.2, seed=8) != (train, val)
    assert sorted(train + val) == list(range(15))
    assert np.bincount(labels[val]).tolist() == [2, 1, 1]  # at least one of each
    assert np.bincount(labels[train]).tolist() == [8, 2, 1]  # at least one left to train


def test_split_refuses_a_fraction_out_of_range() -> None:
    with pytest.raises(DataError, match="between 0 and 1"):
        split(np.array([0, 0, 1, 1]), 1.0, seed=0)


def test_dataset_counts_of_a_subset() -> None:
    from server.finetune.data import Sample

    dataset = Dataset(Path("."), ["a", "b"], [Sample(Path("x"), 0), Sample(Path("y"), 1)])
    assert dataset.counts(dataset.samples[:1]) == [1, 0]
