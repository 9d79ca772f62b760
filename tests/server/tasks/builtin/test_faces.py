"""server.tasks.builtin.faces: the ``faces`` task answers PROTOCOL.md's shape in ORIGINAL
pixels, finds faces in tiles of a large photo, and reports a face two tiles saw once."""

from __future__ import annotations

import pytest
from PIL import Image

from server.tasks.builtin.faces import Faces
from server.tasks.contract import OptionsError, parse_options, validate_options
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


def test_a_loose_low_box_from_one_tile_does_not_swallow_the_face_another_saw() -> None:
    """Two tiles saw one astronaut: one reported her face, the other (its windows cutting her
    head) a box three times as wide around it at a lower score. The face is what stays."""
    loose = {"score": 0.63, "box": [1906.2, 1271.1, 2259.9, 1624.8]}
    face = {"score": 0.828, "box": [2074.0, 1270.0, 2175.0, 1371.0]}
    merged = Faces().merge([{"faces": [loose]}, {"faces": [face]}], (5000, 3000),
                           parse_options(Faces(), validate_options(Faces(), {})))
    assert merged == {"faces": [face]}


def test_astronauts_on_a_large_canvas_are_found_where_they_are(faces: Faces) -> None:
    """5000x3000 in 2048-px tiles, the astronaut pasted three times (once enlarged 2x)."""
    canvas = Image.new("RGB", (5000, 3000), (90, 100, 110))
    astronaut = photo("astronaut")
    placed = [((100, 100), 1), ((1900, 1200), 1), ((3800, 1900), 2)]
    for (x, y), scale in placed:
        canvas.paste(astronaut.resize((512 * scale, 512 * scale)), (x, y))
    result = run_task(faces, canvas)
    expected = [[x + scale * v if i % 2 == 0 else y + scale * v
                 for i, v in enumerate(ASTRONAUT_FACE)] for (x, y), scale in placed]
    found = sorted(face["box"] for face in result["faces"])
    assert len(found) == 3, result
    for box, want in zip(found, sorted(expected), strict=True):
        assert overlap(box, want) > 0.7, (box, want)


def test_the_threshold_option(faces: Faces) -> None:
    assert run_task(faces, photo("astronaut"), {"threshold": 0.99})["faces"] == []
    with pytest.raises(OptionsError, match="threshold"):
        validate_options(faces, {"threshold": 0.2})


def test_no_faces_on_a_cup_of_coffee(faces: Faces) -> None:
    assert run_task(faces, photo("coffee")) == {"faces": []}
