"""Rollouts on a running server: the admin routes, a switch under load, rollback."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import httpx
import pytest

from server.cli import main
from server.models.store import ModelVersions
from server.models.versioned import VersionedClassification
from server.tasks.builtin import builtin_tasks
from server.tasks.contract import Task
from tests.conftest import fast_settings, start_server, unique_image

TOKEN = "admin-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LABELS = {"a": {"a1", "a2"}, "b": {"b1", "b2"}}


def served(model: str) -> list[Task]:
    """The classify task ``--model MODELS/<name>`` gives (the other built-ins load slowly)."""
    classify = builtin_tasks(model)[0]
    assert isinstance(classify, VersionedClassification)
    return [classify]


@pytest.fixture
def server(versions: tuple[ModelVersions, str, str]) -> Any:
    store, _, _ = versions
    running = start_server(fast_settings(model=str(store.folder), admin_token=TOKEN),
                           tasks=served(str(store.folder)))
    yield running
    running.stop()


async def classify(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    answer = await http.post(url + "/v1/analyze", files={
        "file": ("x.png", unique_image(), "image/png")})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def test_a_rollout_under_load_fails_no_request(
        server: Any, versions: tuple[ModelVersions, str, str]) -> None:
    store, first, second = versions
    url = server.http_url
    labels_of = {first: LABELS["a"], second: LABELS["b"]}
    answers: list[tuple[float, float, str]] = []  # (sent, answered, revision)
    stop = asyncio.Event()
    progress = asyncio.Condition()

    async def client(http: httpx.AsyncClient) -> None:
        for _ in range(400):  # bounded, whatever happens
            if stop.is_set():
                return
            sent = time.monotonic()
            body = await classify(http, url)
            revision = body["revision"]
            assert {x["label"] for x in body["result"]["labels"]} <= labels_of[revision]
            async with progress:
                answers.append((sent, time.monotonic(), revision))
                progress.notify_all()

    async def answered(count: int) -> None:
        async with progress:
            await progress.wait_for(lambda: len(answers) >= count)

    async def switch(http: httpx.AsyncClient, path: str, **body: str) -> tuple[float, float]:
        started = time.monotonic()
        response = await http.post(url + path, headers=AUTH, json=body or None)
        assert response.status_code == 200, response.text
        return started, time.monotonic()

    async with httpx.AsyncClient(timeout=60) as http:
        clients = [asyncio.create_task(client(http)) for _ in range(4)]

        async def scenario() -> tuple[tuple[float, float], tuple[float, float]]:
            await answered(8)
            rolled_out = await switch(http, "/v1/admin/models/shapes/activate",
                                      revision=second[:8])
            await answered(len(answers) + 12)
            rolled_back = await switch(http, "/v1/admin/models/shapes/rollback")
            await answered(len(answers) + 12)
            return rolled_out, rolled_back

        try:
            rolled_out, rolled_back = await asyncio.wait_for(scenario(), 120)
        finally:
            stop.set()
            await asyncio.gather(*clients)  # re-raises any failed request
    assert store.active() == first
    before = [r for sent, done, r in answers if done < rolled_out[0]]
    between = [r for sent, done, r in answers if sent > rolled_out[1] and done < rolled_back[0]]
    after = [r for sent, done, r in answers if sent > rolled_back[1]]
    assert set(before) == {first}
    assert set(between) == {second}  # switched atomically: nothing old after
    assert set(after) == {first}


async def test_the_admin_routes_list_refuse_and_keep_the_old_revision_on_errors(
        server: Any, versions: tuple[ModelVersions, str, str]) -> None:
    store, first, second = versions
    url = server.http_url
    async with httpx.AsyncClient(timeout=60) as http:
        assert (await http.get(url + "/v1/admin/models")).status_code == 401
        wrong = await http.post(url + "/v1/admin/models/shapes/activate",
                                headers={"Authorization": "Bearer nope"},
                                json={"revision": second})
        assert wrong.status_code == 401
        listed = (await http.get(url + "/v1/admin/models", headers=AUTH)).json()["models"]
        assert [(m["name"], m["serving"], m["tasks"]) for m in listed] == [
            ("shapes", first, ["classify"])]
        assert [r["revision"] for r in listed[0]["revisions"]] == [first, second]
        for path, body in [("/v1/admin/models/shapes/activate", {"revision": "abcdef12"}),
                           ("/v1/admin/models/shapes/activate", {}),
                           ("/v1/admin/models/other/activate", {"revision": second}),
                           ("/v1/admin/models/shapes/rollback", None)]:
            refused = await http.post(url + path, headers=AUTH, json=body)
            assert refused.status_code == 400, (path, refused.text)
            assert refused.json()["code"] == "bad_message"
        assert (await classify(http, url))["revision"] == first
        assert store.active() == first
        done = await http.post(url + "/v1/admin/models/shapes/activate", headers=AUTH,
                               json={"revision": second})
        assert done.json() == {"name": "shapes", "revision": second, "previous": first}
        tasks = (await http.get(url + "/v1/tasks")).json()["tasks"]
        assert next(t for t in tasks if t["name"] == "classify")["revision"] == second
        assert (await classify(http, url))["revision"] == second
    # the command line's --server does the same through the routes
    command = ["models", "rollback", "shapes", "--server", url, "--token", TOKEN]
    assert await asyncio.to_thread(main, command) == 0
    assert store.active() == first
    assert await asyncio.to_thread(main, ["models", "list", "--server", url, "--token", "x"]) == 1


def test_the_admin_routes_are_off_without_a_token(
        versions: tuple[ModelVersions, str, str]) -> None:
    store, _, second = versions
    running = start_server(fast_settings(model=str(store.folder)),
                           tasks=served(str(store.folder)))
    try:
        refused = httpx.post(running.http_url + "/v1/admin/models/shapes/activate",
                             headers=AUTH, json={"revision": second})
        assert refused.status_code == 404
    finally:
        running.stop()


REDIS_URL = os.environ.get("PIXELSTREAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


def _redis_or_skip() -> None:
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
        client.flushdb()
        client.close()
    except redis.RedisError:
        pytest.skip(f"no Redis at {REDIS_URL}")


async def _switched(task: VersionedClassification, revision: str) -> None:
    """Until ``task`` (another gateway's) has followed the switch: the announcement arrives
    on that gateway's own pub/sub connection, with no event to wait on from here."""
    deadline = time.monotonic() + 30
    while task.active != revision:
        assert time.monotonic() < deadline, "the other gateway did not follow the switch"
        await asyncio.sleep(0.02)


async def test_with_redis_every_gateway_follows_a_switch(
        versions: tuple[ModelVersions, str, str]) -> None:
    _redis_or_skip()
    store, first, second = versions
    folder = str(store.folder)
    switching = start_server(fast_settings(redis_url=REDIS_URL, workers=1, admin_token=TOKEN),
                             tasks=served(folder))
    following = start_server(fast_settings(redis_url=REDIS_URL, workers=0), tasks=served(folder))
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            assert (await classify(http, following.http_url))["revision"] == first
            done = await http.post(switching.http_url + "/v1/admin/models/shapes/activate",
                                   headers=AUTH, json={"revision": second})
            assert done.status_code == 200, done.text
            task = following.state.service.specs["classify"]
            assert isinstance(task, VersionedClassification)
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                _switched(task, second), following.loop))
            body = await classify(http, following.http_url)
            assert body["revision"] == second
            assert {x["label"] for x in body["result"]["labels"]} <= LABELS["b"]
            assert (await classify(http, switching.http_url))["revision"] == second
    finally:
        following.stop()
        switching.stop()
