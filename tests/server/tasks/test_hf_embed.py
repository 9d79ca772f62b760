"""server.tasks.hf_embed: kind ``image-feature-extraction`` on tiny random-init folders."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from server.tasks.contract import (
    OptionsError,
    View,
    check_contract,
    parse_options,
    validate_options,
)
from server.tasks.hf_embed import ImageFeatureExtraction
from tests.support.tiny_models import tiny_clip, tiny_vit, tiny_vit_features


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> ImageFeatureExtraction:
    folder = tiny_vit_features(tmp_path_factory.mktemp("embed") / "tiny-features")
    created = ImageFeatureExtraction(str(folder), name="features")
    created.setup("cpu")
    return created


def images() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for w, h in ((64, 48), (40, 70), (33, 33))]


def opts(task: ImageFeatureExtraction, **options: Any) -> Any:
    return parse_options(task, validate_options(task, options))


def embed(task: ImageFeatureExtraction, image: Image.Image, **options: Any) -> list[float]:
    view = View.whole(image, image.size)
    parsed = opts(task, **options)
    result = task.encode(task.predict([task.preprocess(view, parsed)])[0], view, parsed)
    assert list(result) == ["embedding"]
    embedding: list[float] = result["embedding"]
    return embedding


def test_description_is_cheap(tmp_path: Path) -> None:
    folder = tiny_vit_features(tmp_path / "tiny-features")
    task = ImageFeatureExtraction(str(folder))
    assert task.name == "embed"
    assert task.kind == "image-feature-extraction"
    assert task.model.id == "tiny-features"
    assert task.decode.min_short_side == 32
    assert task.net is None
    assert check_contract(task) == []
    assert validate_options(task, {}) == {"normalize": True}
    with pytest.raises(OptionsError, match="unknown option 'top_k'"):
        validate_options(task, {"top_k": 3})


def test_embeddings_are_unit_length_and_of_one_size(task: ImageFeatureExtraction) -> None:
    vectors = [np.array(embed(task, image)) for image in images()]
    assert {len(vector) for vector in vectors} == {24}  # the ViT's hidden size
    for vector in vectors:
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert not np.allclose(vectors[0], vectors[1], atol=1e-3)  # different images differ


def test_the_vector_is_the_models_pooled_output(task: ImageFeatureExtraction) -> None:
    import torch

    image = images()[0]
    raw = np.array(embed(task, image, normalize=False))
    pixels = task.processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        expected = task.net(pixel_values=pixels).pooler_output[0].numpy()
    np.testing.assert_allclose(raw, expected, atol=2e-6)
    normalised = np.array(embed(task, image))
    np.testing.assert_allclose(normalised, expected / np.linalg.norm(expected), atol=2e-6)


def test_batch_matches_one_by_one(task: ImageFeatureExtraction) -> None:
    parsed = opts(task)
    items = [task.preprocess(View.whole(image, image.size), parsed) for image in images()]
    batched = task.predict(items)
    assert len(batched) == len(items)
    for item, output in zip(items, batched, strict=True):
        np.testing.assert_allclose(task.predict([item])[0], output, atol=1e-5)
    assert task.predict([]) == []


def test_a_classifier_folder_pools_hidden_states_not_an_untrained_pooler(
        tmp_path: Path) -> None:
    """A classifier's checkpoint has no pooler weights: the answer must not depend on a
    layer initialised at random in each process."""
    folder = tiny_vit(tmp_path / "tiny-classifier", labels=["a", "b"])
    first = ImageFeatureExtraction(str(folder))
    first.setup("cpu")
    second = ImageFeatureExtraction(str(folder))
    second.setup("cpu")
    assert not first.use_pooler
    image = images()[1]
    np.testing.assert_allclose(embed(first, image), embed(second, image), atol=1e-6)


def test_a_clip_folder_gives_its_image_embedding(tmp_path: Path) -> None:
    """CLIP's embedding is the projected one its text embeddings share a space with."""
    import torch

    folder = tiny_clip(tmp_path / "tiny-clip", words=["cat"])
    task = ImageFeatureExtraction(str(folder))
    task.setup("cpu")
    image = images()[2]
    vector = np.array(embed(task, image, normalize=False))
    assert vector.shape == (8,)  # projection_dim, not the vision tower's width
    pixels = task.processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        expected = task.net.get_image_features(pixel_values=pixels).pooler_output[0].numpy()
    np.testing.assert_allclose(vector, expected, atol=2e-6)
