"""server.tasks.builtin.moderate: the ``moderate`` task answers PROTOCOL.md's shape."""

from __future__ import annotations

import pytest

from server.tasks.builtin.moderate import Moderate
from server.tasks.contract import OptionsError, validate_options
from server.tasks.results import Moderation
from tests.support.vision_inputs import photo, run_task


@pytest.fixture(scope="module")
def moderate() -> Moderate:
    task = Moderate()
    task.setup("cpu")
    return task


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_benign_photographs_are_safe(moderate: Moderate, name: str) -> None:
    result = run_task(moderate, photo(name))
    Moderation.model_validate(result)
    assert set(result) == {"nsfw"}
    assert 0.0 <= result["nsfw"] < 0.2


def test_a_downscaled_decode_scores_like_the_full_image(moderate: Moderate) -> None:
    """The model sees 256x256 whatever it is given: a decode at half size changes little."""
    image = photo("astronaut")
    full = run_task(moderate, image)["nsfw"]
    half = run_task(moderate, image, decode_scale=0.5)["nsfw"]
    assert half == pytest.approx(full, abs=0.05)


def test_it_takes_no_options(moderate: Moderate) -> None:
    with pytest.raises(OptionsError, match="unknown option 'tiles'"):
        validate_options(moderate, {"tiles": False})
