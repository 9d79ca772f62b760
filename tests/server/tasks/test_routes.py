"""``GET /v1/tasks`` and tasks from a file served end to end: a real server, a tiny ViT folder
and a user's Python task, over the WebSocket and HTTP."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from server.tasks.builtin.colors import Colors
from server.tasks.registry import load_registry
from tests.conftest import RunningServer, fast_settings, start_server, unique_image
from tests.support.tiny_models import tiny_vit

pytestmark = pytest.mark.asyncio(loop_scope="function")

PETS = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("tasks")
    folder = tiny_vit(root / "tiny-pets", labels=PETS)
    path = root / "tasks.toml"
    path.write_text(f"""
[tasks.pets]
kind = "image-classification"
model = "{folder}"
max_batch_size = 2

[tasks.mean]
kind = "python"
entry = "tests.support.sample_tasks:MeanBrightness"
device = "cpu"
""", encoding="utf-8")
    registry = load_registry(path, builtins=[Colors()])
    running = start_server(fast_settings(tasks=path), tasks=registry)
    yield running
    running.stop()


async def test_v1_tasks_describes_every_task(served: RunningServer) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.get(served.http_url + "/v1/tasks")
    assert response.status_code == 200
    body = response.json()
    assert body["default_task"] == "colors"
    by_name = {task["name"]: task for task in body["tasks"]}
    assert list(by_name) == ["colors", "pets", "mean"]
    pets = by_name["pets"]
    assert pets["kind"] == "image-classification"
    assert pets["model"] == "tiny-pets"
    assert len(pets["revision"]) == 16
    assert pets["options"]["properties"]["top_k"]["maximum"] == 3
    assert pets["result"]["required"] == ["labels"]
    assert by_name["mean"]["kind"] == "python"
    for task in body["tasks"]:
        assert set(task) >= {"name", "kind", "model", "revision", "options", "result"}


async def test_welcome_lists_the_same_tasks(served: RunningServer,
                                            open_client: Callable[..., Any]) -> None:
    async with open_client(served.ws_url) as client:
        assert client.welcome["tasks"] == ["colors", "pets", "mean"]
        assert client.welcome["default_task"] == "colors"


async def test_a_model_folder_from_the_file_answers_an_upload(
        served: RunningServer, open_client: Callable[..., Any]) -> None:
    data = unique_image(120, 90, "JPEG")
    async with open_client(served.ws_url) as client:
        await client.send_upload("u1", data, task="pets", options={"top_k": 2})
        result = await client.outcome("u1")
    assert result["type"] == "result", result
    assert result["task"] == "pets"
    assert result["model"] == "tiny-pets"
    labels = result["result"]["labels"]
    assert len(labels) == 2
    assert {label["label"] for label in labels} <= set(PETS)
    assert labels[0]["score"] >= labels[1]["score"]


async def test_a_python_task_from_the_file_answers_http(served: RunningServer) -> None:
    data = unique_image(64, 64, "PNG")
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(served.http_url + "/api/analyze", json={
            "image": base64.b64encode(data).decode(), "task": "mean", "options": {"digits": 3}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tests/mean-brightness"
    assert body["result"]["device"] == "cpu"
    assert 0 < body["result"]["mean"] < 1


@pytest.mark.parametrize("options", [{"top_k": 4}, {"top_k": "2"}, {"k": 1}])
async def test_options_outside_the_schema_are_bad_message(
        served: RunningServer, open_client: Callable[..., Any], options: dict[str, Any]) -> None:
    async with open_client(served.ws_url) as client:
        await client.upload("u2", 100, task="pets", options=options)
        error = await client.expect("error")
    assert error["code"] == "bad_message"
    assert "task 'pets'" in error["message"]
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(served.http_url + "/api/analyze", json={
            "image": base64.b64encode(unique_image()).decode(), "task": "pets",
            "options": options})
    assert response.status_code == 400
    assert response.json()["code"] == "bad_message"
