"""server.vision.moderate: benign photographs, text and drawings score as safe; a batch
scores as its images do one by one."""

from __future__ import annotations

import pytest
from PIL import Image

from server.vision.moderate import NsfwScorer, prepare
from tests.support.vision_inputs import page, photo

BENIGN = ["astronaut", "coffee", "chelsea", "rocket", "camera"]


@pytest.fixture(scope="module")
def scorer() -> NsfwScorer:
    return NsfwScorer(threads=1)


def test_benign_images_are_safe(scorer: NsfwScorer) -> None:
    images = [photo(name) for name in BENIGN] + [page(["Quarterly report"])[0]]
    scores = scorer.score([prepare(image) for image in images])
    assert len(scores) == len(images)
    # Yahoo's guidance: below 0.2 is safe.
    assert all(0.0 <= score < 0.2 for score in scores), dict(zip(BENIGN, scores, strict=False))


def test_a_batch_scores_as_single_images(scorer: NsfwScorer) -> None:
    images = [photo("astronaut"), photo("coffee"), Image.new("RGB", (300, 200), (200, 90, 60))]
    inputs = [prepare(image) for image in images]
    together = scorer.score(inputs)
    alone = [scorer.score([item])[0] for item in inputs]
    assert together == pytest.approx(alone, abs=1e-4)
    assert len(set(together)) == 3  # different images, different scores


def test_an_empty_batch(scorer: NsfwScorer) -> None:
    assert scorer.score([]) == []
