"""server.tasks.builtin.faces: the ``faces`` task answers PROTOCOL.md's shape in ORIGINAL
pixels, finds faces in tiles of a large photo, and reports a face two tiles saw once."""

from __future__ import annotations

import pytest
from PIL import Image

from server.tasks.builtin.faces import Faces
from server.tasks.contract import OptionsError, validate_options
from server.tasks.results import Faces as FacesResult
from tests.support.vision_inputs import ASTRONAUT_FACE, overlap, photo, run_task


@pytest.fixture(scope="module")
def faces() -> Faces:
    task = Faces()
    task.setup("cpu")
    return task


def test_the_astronaut(faces: Faces) -> None:
    result = run_task(faces, photo("astronaut"))
    FacesResult.model_validate(result)
    [face] = result["faces"]
    assert face["score"] > 0.8
    assert overlap(face["box"], ASTRONAUT_FACE) > 0.7


def test_boxes_of_a_downscaled_decode_are_in_original_pixels(faces: Faces) -> None:
    """The astronaut enlarged 4x (2048x2048) and decoded at 1/4: the box is 4x the original's."""
    large = photo("astronaut").resize((2048, 2048), Image.Resampling.BICUBIC)
    [face] = run_task(faces, large, {"tiles": False}, decode_scale=0.25)["faces"]
    expected = [4 * value for value in ASTRONAUT_FACE]
    assert overlap(face["box"], expected) > 0.7


def test_a_face_in_the_band_two_tiles_share_is_reported_once(faces: Faces) -> None:
    """3000x2100 in 2048-px tiles: columns at 0 and 952 share x 952..2048; a face there is
    found by both tiles and merged; a second face lies in one tile only."""
    head = photo("astronaut").crop((140, 30, 310, 220))
    image = Image.new("RGB", (3000, 2100), (120, 130, 140))
    image.paste(head.resize((300, 300)), (1200, 300))
    image.paste(head.resize((300, 300)), (2500, 1700))
    result = run_task(faces, image)
    FacesResult.model_validate(result)
    boxes = sorted(face["box"] for face in result["faces"])
    assert len(boxes) == 2
    assert 1200 <= boxes[0][0] < boxes[0][2] <= 1500
    assert 2500 <= boxes[1][0] < boxes[1][2] <= 2800


def test_the_threshold_option(faces: Faces) -> None:
    assert run_task(faces, photo("astronaut"), {"threshold": 0.99})["faces"] == []
    with pytest.raises(OptionsError, match="threshold"):
        validate_options(faces, {"threshold": 0.2})


def test_no_faces_on_a_cup_of_coffee(faces: Faces) -> None:
    assert run_task(faces, photo("coffee")) == {"faces": []}
