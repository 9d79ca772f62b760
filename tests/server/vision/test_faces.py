"""server.vision.faces: faces in real photographs are found and boxed, other things are not;
large and small faces in one image are both found."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from server.vision.faces import FaceDetector
from tests.support.vision_inputs import ASTRONAUT_FACE, framed, lfw_crops, overlap, photo


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def test_the_astronaut_s_face(detector: FaceDetector) -> None:
    found = detector.detect(photo("astronaut"))
    assert len(found) == 1
    assert found[0].score > 0.8
    assert overlap(found[0].box, ASTRONAUT_FACE) > 0.7


def test_labeled_faces_in_the_wild(detector: FaceDetector) -> None:
    """100 face crops and 100 crops of other things, each enlarged to 96 px on grey."""
    faces, others = lfw_crops()
    found = sum(1 for crop in faces if detector.detect(framed(crop, 96), min_score=0.6))
    flagged = sum(1 for crop in others if detector.detect(framed(crop, 96), min_score=0.6))
    assert found >= 95
    assert flagged <= 8


@pytest.mark.parametrize("name", ["coffee", "rocket", "brick", "coins", "text", "horse"])
def test_photographs_without_people_have_no_faces(detector: FaceDetector, name: str) -> None:
    assert detector.detect(photo(name), min_score=0.6) == []


def test_large_and_small_faces_in_one_image(detector: FaceDetector) -> None:
    """A 2048x1536 picture with the astronaut's head at 900 px and at 110 px: the whole-image
    pass finds the large one, the windows the small one."""
    head = photo("astronaut").crop((140, 30, 310, 220))
    picture = Image.new("RGB", (2048, 1536), (90, 110, 130))
    picture.paste(head.resize((900, 900)), (1000, 500))
    picture.paste(head.resize((110, 110)), (300, 200))
    found = detector.detect(picture)
    assert len(found) == 2
    large = max(found, key=lambda face: face.box[2] - face.box[0])
    small = min(found, key=lambda face: face.box[2] - face.box[0])
    assert 1000 <= large.box[0] < large.box[2] <= 1900
    assert 300 <= small.box[0] < small.box[2] <= 410


def test_the_shims_are_gone_after_loading(detector: FaceDetector) -> None:
    assert "tensorflow" not in sys.modules
    assert not hasattr(np, "math")


def test_a_grey_image_is_read(detector: FaceDetector) -> None:
    assert len(detector.detect(photo("astronaut").convert("L"))) == 1
