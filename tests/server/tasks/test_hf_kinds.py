"""server.tasks.hf_kinds: every Hugging Face kind from a tasks file of tiny random-init model
folders: loaded, refused when a folder does not fit, and served over the WebSocket."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.tasks import results
from server.tasks.builtin.colors import Colors
from server.tasks.hf import ImageClassification
from server.tasks.hf_caption import ImageToText
from server.tasks.hf_detect import ObjectDetection
from server.tasks.hf_embed import ImageFeatureExtraction
from server.tasks.hf_kinds import KINDS
from server.tasks.hf_zero_shot import ZeroShotImageClassification
from server.tasks.registry import TasksFileError, load_registry, read_tasks_file, verify_setup
from server.tasks.spatial import tile_boxes
from tests.conftest import RunningServer, fast_settings, start_server, unique_image
from tests.support.tiny_models import tiny_captioner, tiny_clip, tiny_detr, tiny_vit_features

DETECTED = ["cat", "dog"]
WORDS = ["cat", "dog", "car"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    return {
        "detect": tiny_detr(root / "tiny-detr", labels=DETECTED),
        "zero-shot": tiny_clip(root / "tiny-clip", words=WORDS),
        "caption": tiny_captioner(root / "tiny-captioner", words=WORDS),
        "embed": tiny_vit_features(root / "tiny-features"),
    }


def tasks_file(folder: Path, folders: dict[str, Path]) -> Path:
    path = folder / "tasks.toml"
    path.write_text(f"""
[tasks.detect]
kind = "object-detection"
model = "{folders['detect']}"
max_batch_size = 4

[tasks.zero-shot]
kind = "zero-shot-image-classification"
model = "{folders['zero-shot']}"

[tasks.caption]
kind = "image-to-text"
model = "{folders['caption']}"

[tasks.embed]
kind = "image-feature-extraction"
model = "{folders['embed']}"
""", encoding="utf-8")
    return path


def test_the_kinds_and_the_shapes_they_answer_in() -> None:
    assert {
        "image-classification": ImageClassification,
        "object-detection": ObjectDetection,
        "zero-shot-image-classification": ZeroShotImageClassification,
        "image-to-text": ImageToText,
        "image-feature-extraction": ImageFeatureExtraction,
    } == KINDS
    assert [(kind.name, kind.Result) for kind in KINDS.values()] == [
        ("classify", results.Labels), ("detect", results.Objects),
        ("zero-shot", results.Labels), ("caption", results.Caption),
        ("embed", results.Embedding)]


def test_a_tasks_file_loads_every_kind_from_its_folder(tmp_path: Path,
                                                       folders: dict[str, Path]) -> None:
    registry = load_registry(tasks_file(tmp_path, folders), builtins=[Colors()])
    assert registry.names == ["colors", "detect", "zero-shot", "caption", "embed"]
    described = {task["name"]: task for task in registry.describe()}
    assert described["detect"]["kind"] == "object-detection"
    assert described["detect"]["model"] == "tiny-detr"
    assert described["detect"]["spatial"] is True
    assert "tiles" in described["detect"]["options"]["properties"]
    assert described["zero-shot"]["options"]["required"] == ["labels"]
    assert described["caption"]["options"]["properties"]["max_tokens"]["maximum"] == 128
    assert described["embed"]["result"]["required"] == ["embedding"]
    assert not any(described[name]["spatial"] for name in ("zero-shot", "caption", "embed"))
    assert registry.entry("detect").serving.max_batch_size == 4
    verify_setup(registry, "cpu")  # every folder loads, in a short-lived process


def test_tile_arguments_come_from_the_file(tmp_path: Path, folders: dict[str, Path]) -> None:
    path = tmp_path / "tasks.toml"
    path.write_text(f'[tasks.big]\nkind = "object-detection"\nmodel = "{folders["detect"]}"\n'
                    'args = { tile_size = 512, tile_overlap = 64 }\n', encoding="utf-8")
    task = read_tasks_file(path)[0].task
    assert task.tiling is not None
    assert (task.tiling.size, task.tiling.overlap) == (512, 64)


@pytest.mark.parametrize(("args", "message"), [
    ("{ tile_size = 8 }", "a tile must be at least 16 px"),
    ("{ tile_overlap = 40 }", "overlap less than half"),
    ("{ speed = 2 }", "unexpected keyword argument 'speed'"),
])
def test_bad_args_are_one_line_naming_the_task(tmp_path: Path, folders: dict[str, Path],
                                               args: str, message: str) -> None:
    path = tmp_path / "tasks.toml"
    path.write_text(f'[tasks.spot]\nkind = "object-detection"\nmodel = "{folders["detect"]}"\n'
                    f"args = {args}\n", encoding="utf-8")
    with pytest.raises(TasksFileError) as caught:
        read_tasks_file(path)
    line = str(caught.value)
    assert "\n" not in line
    assert "task 'spot'" in line
    assert message in line


@pytest.mark.parametrize("kind", ["object-detection", "zero-shot-image-classification",
                                  "image-to-text", "image-feature-extraction"])
def test_a_missing_folder_is_refused_for_every_kind(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "tasks.toml"
    path.write_text(f'[tasks.mine]\nkind = "{kind}"\nmodel = "{tmp_path / "nowhere"}"\n',
                    encoding="utf-8")
    with pytest.raises(TasksFileError, match=r"task 'mine': model folder .*nowhere does not"):
        read_tasks_file(path)


@pytest.mark.parametrize(("kind", "folder", "message"), [
    ("object-detection", "zero-shot", "Unrecognized configuration class"),
    ("zero-shot-image-classification", "embed", "is not a CLIP-like model"),
    ("image-to-text", "detect", "no image-to-text model class loads it"),
])
def test_a_folder_of_another_kind_stops_serve_naming_the_task(
        tmp_path: Path, folders: dict[str, Path], kind: str, folder: str, message: str) -> None:
    path = tmp_path / "tasks.toml"
    path.write_text(f'[tasks.wrong]\nkind = "{kind}"\nmodel = "{folders[folder]}"\n',
                    encoding="utf-8")
    registry = load_registry(path, builtins=[Colors()])  # the cheap checks pass
    with pytest.raises(TasksFileError) as caught:
        verify_setup(registry, "cpu")
    line = str(caught.value)
    assert "\n" not in line
    assert line.startswith("task 'wrong': model folder ")
    assert "does not load" in line
    assert message in line


# -- served -----------------------------------------------------------------------------------

pytest_asyncio_marks = pytest.mark.asyncio(loop_scope="function")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory,
           folders: dict[str, Path]) -> Iterator[RunningServer]:
    path = tasks_file(tmp_path_factory.mktemp("served"), folders)
    registry = load_registry(path, builtins=[Colors()])
    running = start_server(fast_settings(tasks=path), tasks=registry)
    yield running
    running.stop()


async def ask(served: RunningServer, open_client: Callable[..., Any], task: str,
              options: dict[str, Any], data: bytes) -> dict[str, Any]:
    async with open_client(served.ws_url) as client:
        await client.send_upload("u1", data, task=task, options=options)
        message: dict[str, Any] = await client.outcome("u1")
    assert message["type"] == "result", message
    assert message["task"] == task
    return message


@pytest_asyncio_marks
async def test_served_tasks_are_listed(served: RunningServer) -> None:
    async with httpx.AsyncClient() as http:
        body = (await http.get(served.http_url + "/v1/tasks")).json()
    assert [(t["name"], t["kind"], t["model"]) for t in body["tasks"]] == [
        ("colors", "builtin", "pixelstream/median-cut-palette"),
        ("detect", "object-detection", "tiny-detr"),
        ("zero-shot", "zero-shot-image-classification", "tiny-clip"),
        ("caption", "image-to-text", "tiny-captioner"),
        ("embed", "image-feature-extraction", "tiny-features")]


@pytest_asyncio_marks
@pytest.mark.parametrize("tiles", [True, False])
async def test_detect_over_the_socket_answers_in_original_pixels(
        served: RunningServer, open_client: Callable[..., Any], tiles: bool) -> None:
    """A 300x200 image is larger than the tiny detector's 64-px tiles: with tiles, every
    tile runs as a job (progress counts them), and the merged boxes are in original pixels."""
    async with open_client(served.ws_url) as client:
        await client.send_upload("u1", unique_image(300, 200, "JPEG"), task="detect",
                                 options={"threshold": 0.0, "max_objects": 5, "tiles": tiles})
        seen = await client.messages_until(
            lambda m: m.get("id") == "u1" and m.get("type") in ("result", "error"))
    message = seen[-1]
    assert message["type"] == "result", message
    assert message["model"] == "tiny-detr"
    objects = results.Objects.model_validate(message["result"]).objects
    assert 1 <= len(objects) <= 5
    for found in objects:
        x0, y0, x1, y1 = found.box
        assert 0 <= x0 < x1 <= 300
        assert 0 <= y0 < y1 <= 200
        assert found.label in DETECTED
    counts = [(m["done"], m["total"]) for m in seen
              if m.get("stage") == "inference" and "total" in m]
    if tiles:
        total = len(tile_boxes(300, 200, 64, 16))
        assert counts
        assert {count[1] for count in counts} == {total}
        assert counts[-1][0] == total
    else:
        assert counts == []


@pytest_asyncio_marks
async def test_zero_shot_over_the_socket_scores_the_given_labels(
        served: RunningServer, open_client: Callable[..., Any]) -> None:
    message = await ask(served, open_client, "zero-shot", {"labels": ["car", "cat"]},
                        unique_image(90, 60, "PNG"))
    labels = results.Labels.model_validate(message["result"]).labels
    assert sorted(item.label for item in labels) == ["car", "cat"]
    assert sum(item.score for item in labels) == pytest.approx(1.0, abs=1e-4)


@pytest_asyncio_marks
async def test_zero_shot_without_labels_is_a_bad_message(
        served: RunningServer, open_client: Callable[..., Any]) -> None:
    async with open_client(served.ws_url) as client:
        await client.upload("u1", 100, task="zero-shot", options={})
        refused = await client.expect("error")
    assert refused["code"] == "bad_message"
    assert "'labels' is required" in refused["message"]


@pytest_asyncio_marks
async def test_caption_and_embed_over_the_socket(
        served: RunningServer, open_client: Callable[..., Any]) -> None:
    caption = await ask(served, open_client, "caption", {"max_tokens": 3},
                        unique_image(64, 64, "PNG"))
    text = results.Caption.model_validate(caption["result"]).caption
    assert len(text.split()) <= 3  # a random model may well say nothing at all
    assert set(text.split()) <= set(WORDS)
    first = await ask(served, open_client, "embed", {}, unique_image(64, 48, "PNG"))
    second = await ask(served, open_client, "embed", {}, unique_image(48, 64, "JPEG"))
    vectors = [results.Embedding.model_validate(m["result"]).embedding for m in (first, second)]
    assert [len(vector) for vector in vectors] == [24, 24]
    assert sum(v * v for v in vectors[0]) == pytest.approx(1.0, abs=1e-4)
