"""server.tasks.optimize: a traced, optimized forward pass kept only where it answers as the
eager model does; and its use by the Hugging Face tasks (tiny random-init folders)."""

from __future__ import annotations

import logging
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported anywhere: never the hub

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from server.tasks.contract import View, parse_options
from server.tasks.hf import ImageClassification
from server.tasks.optimize import CHECK_BATCHES, TracedForward, trace_forward
from tests.support.tiny_models import tiny_mobilenet, tiny_vit

LABELS = ["red", "green", "blue", "grey"]


def _loaded(folder: Path, **flags: Any) -> ImageClassification:
    task = ImageClassification(str(folder), **flags)
    task.setup("cpu")
    task.wait_optimized(120)
    return task


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_mobilenet(tmp_path_factory.mktemp("mobilenet") / "model", labels=LABELS)


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_vit(tmp_path_factory.mktemp("vit") / "model", labels=LABELS)


@pytest.fixture(scope="module")
def traced_mobilenet(mobilenet: Path) -> ImageClassification:
    return _loaded(mobilenet)


def _photos() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (120 + 10 * i, 160, 3), dtype=np.uint8))
            for i in range(5)]


def _predict(task: ImageClassification, photos: list[Image.Image]) -> np.ndarray:
    options = parse_options(task, {})
    items = [task.preprocess(View.whole(photo, photo.size), options) for photo in photos]
    return np.stack(task.predict(items))


@pytest.mark.parametrize("family", ["mobilenet", "vit"])
def test_the_optimized_classifier_answers_what_the_eager_one_does(
        request: pytest.FixtureRequest, family: str) -> None:
    folder = request.getfixturevalue(family)
    optimized = request.getfixturevalue("traced_mobilenet") if family == "mobilenet" \
        else _loaded(folder)
    eager = _loaded(folder, optimize=False)
    assert optimized.traced is not None
    assert eager.traced is None
    photos = _photos()
    for batch in (photos[:1], photos):  # a batch size checked at load, and one not
        got, expected = _predict(optimized, batch), _predict(eager, batch)
        assert got.shape == expected.shape == (len(batch), len(LABELS))
        assert np.abs(got - expected).max() < 1e-4
        assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()


def test_the_traced_forward_keeps_the_output_type_and_runs_only_its_shape(
        traced_mobilenet: ImageClassification) -> None:
    task = traced_mobilenet
    traced = task.traced
    assert isinstance(traced, TracedForward)
    assert traced.item_shape == (3, 64, 64)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        output = traced(pixels)
        eager = task.net(pixel_values=pixels)
    assert type(output) is type(eager)
    assert torch.allclose(output.logits, eager.logits, atol=1e-4)
    assert traced.accepts(pixels)
    assert not traced.accepts(torch.randn(2, 3, 72, 72))
    assert not traced.accepts(pixels.double())
    # Another item size runs eagerly, and answers.
    other = task.forward([torch.randn(3, 72, 72)])
    assert other.logits.shape == (1, len(LABELS))


def test_a_task_pickles_without_its_traced_module(
        traced_mobilenet: ImageClassification) -> None:
    task = traced_mobilenet
    assert task.traced is not None
    copy = pickle.loads(pickle.dumps(task))
    assert copy.traced is None
    assert copy.net is None


class BakesTheBatchSize(torch.nn.Module):
    """Its trace turns ``x.shape[0]`` into a constant: right at the traced batch only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.conv(pixel_values) * int(pixel_values.shape[0])


class AnswersText(torch.nn.Module):
    def forward(self, pixel_values: torch.Tensor) -> dict[str, Any]:
        return {"logits": pixel_values.mean(), "label": "cat"}


class BranchesOnData(torch.nn.Module):
    """Data-dependent control flow that tracing cannot follow into Python."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if float(pixel_values.mean()) > 0:
            return pixel_values * 2
        return pixel_values * -1


class Conv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.act = torch.nn.ReLU()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(pixel_values))


def test_a_trace_that_differs_falls_back_with_a_log_line(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pixelstream.optimize"):
        assert trace_forward(BakesTheBatchSize().eval(), (3, 16, 16), name="baked") is None
    [record] = caplog.records
    assert record.getMessage().startswith("baked: running the eager model")
    assert "differs" in record.getMessage()


def test_a_data_dependent_branch_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    # The probes are seeded: their means are not all of one sign, so one takes the branch
    # the trace did not record.
    module = BranchesOnData().eval()
    with caplog.at_level(logging.WARNING, logger="pixelstream.optimize"):
        assert trace_forward(module, (3, 8, 8), name="branch") is None
    assert "branch: running the eager model; the traced one does not answer the same" \
        in caplog.text


def test_outputs_that_are_not_tensors_fall_back(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pixelstream.optimize"):
        assert trace_forward(AnswersText().eval(), (3, 8, 8), name="text") is None
    assert "not tensors" in caplog.text


def test_a_forward_that_cannot_run_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pixelstream.optimize"):
        assert trace_forward(Conv().eval(), (5, 8, 8), name="wrong") is None  # 5 channels
    assert "wrong: running the eager model; tracing failed: RuntimeError" in caplog.text


def test_a_plain_module_is_optimized_and_checked_at_every_batch_size(
        caplog: pytest.LogCaptureFixture) -> None:
    module = Conv().eval()
    with caplog.at_level(logging.INFO, logger="pixelstream.optimize"):
        traced = trace_forward(module, (3, 16, 16), name="conv")
    assert traced is not None
    assert traced.keys is None
    assert f"checked against the eager model at batches {', '.join(map(str, CHECK_BATCHES))}" \
        in caplog.text
    for batch in (1, 5):
        pixels = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            assert torch.allclose(traced(pixels), module(pixels), atol=1e-5)
