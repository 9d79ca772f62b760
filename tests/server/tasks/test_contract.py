"""server.tasks.contract: views map coordinates back to the original; options by schema."""

from __future__ import annotations

from typing import Any

import pytest
from PIL import Image
from pydantic import Field

from server.tasks.contract import (
    DecodeHint,
    OptionsError,
    SpatialOptions,
    Task,
    TaskOptions,
    Tiling,
    View,
    check_contract,
    json_schemas,
    parse_options,
    validate_options,
)
from server.tasks.results import Objects
from tests.support.sample_tasks import MeanBrightness, NoPredict


def test_a_whole_view_at_full_size_maps_boxes_unchanged() -> None:
    view = View.whole(Image.new("RGB", (400, 300)), (400, 300))
    assert view.scale == (1.0, 1.0)
    assert view.box_to_original([10, 20, 30.25, 40]) == [10.0, 20.0, 30.2, 40.0]


def test_a_downscaled_decode_maps_boxes_to_original_pixels() -> None:
    """A 12000x9000 image decoded at 1/8 (1500x1125): a box in decoded pixels is 8x larger."""
    view = View.whole(Image.new("RGB", (1500, 1125)), (12000, 9000))
    assert view.scale == (0.125, 0.125)
    assert view.box_to_original([100, 50, 200, 150]) == [800.0, 400.0, 1600.0, 1200.0]


def test_unequal_scales_from_rounded_up_reductions() -> None:
    """``Image.reduce`` rounds each side up: scales differ slightly per axis."""
    view = View.whole(Image.new("RGB", (334, 250)), (1001, 750))
    x0, y0, x1, y1 = view.box_to_original([0, 0, 334, 250]) or []
    assert (x0, y0, y1) == (0.0, 0.0, 750.0)
    assert x1 == 1001.0


def test_a_tile_maps_through_its_region() -> None:
    tile = View(Image.new("RGB", (512, 512)), (4000, 3000), (1024, 2488, 1536, 3000))
    assert tile.scale == (1.0, 1.0)
    assert tile.box_to_original([10, 10, 20, 30]) == [1034.0, 2498.0, 1044.0, 2518.0]


def test_boxes_are_clipped_to_the_image_and_ordered() -> None:
    view = View.whole(Image.new("RGB", (100, 100)), (100, 100))
    assert view.box_to_original([-5, 90, 20, 130]) == [0.0, 90.0, 20.0, 100.0]
    assert view.box_to_original([30, 40, 10, 20]) == [10.0, 20.0, 30.0, 40.0]
    assert view.box_to_original([120, 10, 140, 20]) is None  # wholly outside
    assert view.box_to_original([10, 10, 10, 20]) is None  # empty


class Thresholds(SpatialOptions):
    threshold: float = Field(default=0.5, ge=0, le=1)
    labels: list[str] = Field(default_factory=list, max_length=3)


class Spatial(Task):
    name = "spatial"
    Options = Thresholds
    Result = Objects
    tiling = Tiling(size=512, overlap=64)


@pytest.mark.parametrize(("options", "expected"), [
    ({}, {"tiles": True, "threshold": 0.5, "labels": []}),
    ({"tiles": False, "threshold": 1, "labels": ["cat"]},
     {"tiles": False, "threshold": 1.0, "labels": ["cat"]}),
])
def test_options_get_their_defaults(options: dict[str, Any], expected: dict[str, Any]) -> None:
    assert validate_options(Spatial(), options) == expected
    parsed = parse_options(Spatial(), expected)
    assert isinstance(parsed, Thresholds)
    assert parsed.tiles is expected["tiles"]


@pytest.mark.parametrize(("options", "message"), [
    ({"threshold": 2}, "option 'threshold': input should be less than or equal to 1"),
    ({"threshold": "0.5"}, "option 'threshold'"),
    ({"tiles": "no"}, "option 'tiles': input should be a valid boolean"),
    ({"tiles": 0}, "option 'tiles'"),
    ({"labels": ["a", "b", "c", "d"]}, "option 'labels'"),
    ({"labels": [1]}, "option 'labels.0'"),
    ({"size": 3}, "unknown option 'size'"),
    ([1, 2], "must be an object"),
    ("tiles", "must be an object"),
])
def test_bad_options_say_what_is_wrong(options: Any, message: str) -> None:
    with pytest.raises(OptionsError) as caught:
        validate_options(Spatial(), options)
    assert message in str(caught.value)
    assert "task 'spatial'" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_required_options_are_named() -> None:
    class Needs(TaskOptions):
        labels: list[str] = Field(min_length=1)

    class ZeroShot(Task):
        name = "zs"
        Options = Needs

    with pytest.raises(OptionsError, match="option 'labels' is required"):
        validate_options(ZeroShot(), {})


def test_schemas_of_options_and_result() -> None:
    options, result = json_schemas(Spatial())
    assert options["properties"]["tiles"]["default"] is True
    assert options["additionalProperties"] is False
    assert result["properties"]["objects"]["type"] == "array"


def test_check_contract() -> None:
    assert check_contract(MeanBrightness()) == []
    assert check_contract(Spatial()) == []
    problems = check_contract(NoPredict())
    assert "no predict() method" in problems
    assert "model is not a ModelInfo" in problems

    class Nameless(MeanBrightness):
        name = ""
        decode = None  # type: ignore[assignment]

    assert {"no name", "decode is not a DecodeHint"} <= set(check_contract(Nameless()))


def test_the_base_task_defaults() -> None:
    task = MeanBrightness()
    assert task.decode == DecodeHint(min_short_side=32)
    assert task.tiling is None
    with pytest.raises(NotImplementedError):
        task.merge([], (10, 10), None)
    assert Task().model.id == "python/server.tasks.contract.Task"


@pytest.mark.parametrize(("size", "overlap"), [(8, 0), (512, 256), (512, -1)])
def test_tilings_that_cannot_work_are_refused(size: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="tile"):
        Tiling(size, overlap)
