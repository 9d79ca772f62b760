"""AnalysisService: task resolution, cache keys, cache lookups, capacity, and running a job."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ConfigDict, Field

from chunking.errors import ErrorCode, ProtocolError
from chunking.messages import Stage
from server.analysis import AnalysisService
from server.metrics import Metrics
from server.pipeline.pool import WorkerPool
from server.pipeline.worker import WorkerConfig
from server.storage.base import ImageRef
from server.storage.memory import LruResultCache
from server.tasks.builtin.colors import Colors
from server.tasks.contract import ModelInfo, Task, TaskOptions
from server.tasks.registry import Registry
from tests.conftest import make_image
from tests.support.gate import GateTask, gate_closed

WAIT_S = 30.0
MAX_PIXELS = 40_000_000
SHA = hashlib.sha256(b"image").hexdigest()


class FakeOptions(TaskOptions):
    """Options with a default, and any others except ``bad``."""

    model_config = ConfigDict(extra="allow")
    level: int = 1
    bad: None = Field(default=None, exclude=True)


class FakeSpec(Task):
    """A task that accepts any options, except ``{"bad": ...}``."""

    Options = FakeOptions

    def __init__(self, name: str = "fake", model_id: str = "test/fake-v1",
                 revision: str = "") -> None:
        self.name = name
        self.info = ModelInfo(model_id, revision)

    @property
    def model(self) -> ModelInfo:
        return self.info


def idle_pool(max_queue: int = 64, specs: tuple[Any, ...] = (Colors(),)) -> WorkerPool:
    """A pool that is never started: enough for everything but running jobs."""
    return WorkerPool(WorkerConfig(specs), workers=1, max_batch_size=4, max_wait_ms=0,
                      max_queue=max_queue)


def service(pool: WorkerPool | None = None, metrics: Metrics | None = None,
            cache_entries: int = 100) -> AnalysisService:
    registry = Registry([Colors(), FakeSpec()], default="colors")
    return AnalysisService(registry, pool or idle_pool(), LruResultCache(cache_entries),
                           metrics or Metrics(), MAX_PIXELS)


def cache_lookups(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("pixelstream_cache_lookups_total",
                                              {"outcome": outcome})
    return value or 0.0


# resolve --------------------------------------------------------------------------------------


def test_the_default_task_must_be_offered() -> None:
    with pytest.raises(ValueError, match="default task"):
        Registry([Colors()], default="classify")


def test_resolve_without_a_task_gives_the_default() -> None:
    svc = service()
    spec, options = svc.resolve(None, {})
    assert spec.name == "colors"
    assert options == {"colors": 5}  # defaults filled in
    assert svc.tasks == ["colors", "fake"]


def test_resolve_a_named_task_with_its_options() -> None:
    spec, options = service().resolve("fake", {"x": [1, 2]})
    assert spec.name == "fake"
    assert options == {"level": 1, "x": [1, 2]}


def test_resolve_an_unknown_task() -> None:
    with pytest.raises(ProtocolError) as caught:
        service().resolve("classify", {})
    assert caught.value.code is ErrorCode.UNKNOWN_TASK
    assert "classify" in caught.value.message
    assert "colors" in caught.value.message
    assert "fake" in caught.value.message
    assert caught.value.upload_id is None  # the caller adds the upload or frame


@pytest.mark.parametrize(("task", "options"), [
    ("colors", {"colors": 99}),
    ("colors", {"palette": "warm"}),
    ("fake", {"bad": True}),
    ("fake", {"level": "1"}),
    ("colors", {"colors": 2.0}),
    ("colors", []),
])
def test_resolve_bad_options_is_bad_message(task: str, options: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as caught:
        service().resolve(task, options)
    assert caught.value.code is ErrorCode.BAD_MESSAGE
    assert caught.value.message
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


# cache_key ------------------------------------------------------------------------------------


def test_cache_key_is_stable_under_option_key_order() -> None:
    spec = FakeSpec()
    one = AnalysisService.cache_key(SHA, spec, {"a": 1, "b": {"x": 1, "y": 2}})
    two = AnalysisService.cache_key(SHA, spec, {"b": {"y": 2, "x": 1}, "a": 1})
    assert one == two
    assert one.startswith(SHA + ":")


def test_cache_key_differs_by_image_task_options_model_and_revision() -> None:
    base = AnalysisService.cache_key(SHA, FakeSpec(), {"a": 1})
    others = [
        AnalysisService.cache_key(hashlib.sha256(b"other").hexdigest(), FakeSpec(), {"a": 1}),
        AnalysisService.cache_key(SHA, FakeSpec(name="fake2"), {"a": 1}),
        AnalysisService.cache_key(SHA, FakeSpec(model_id="test/fake-v2"), {"a": 1}),
        AnalysisService.cache_key(SHA, FakeSpec(revision="retrained"), {"a": 1}),
        AnalysisService.cache_key(SHA, FakeSpec(), {"a": 2}),
        AnalysisService.cache_key(SHA, FakeSpec(), {"a": "1"}),
        AnalysisService.cache_key(SHA, FakeSpec(), {}),
    ]
    assert len({base, *others}) == 1 + len(others)


# lookup and capacity --------------------------------------------------------------------------


async def test_lookup_counts_hits_and_misses() -> None:
    metrics = Metrics()
    svc = service(metrics=metrics)
    assert await svc.lookup("k") is None
    assert (cache_lookups(metrics, "hit"), cache_lookups(metrics, "miss")) == (0, 1)
    await svc.cache.set("k", {"task": "colors"})
    assert await svc.lookup("k") == {"task": "colors"}
    assert await svc.lookup("k") == {"task": "colors"}
    assert (cache_lookups(metrics, "hit"), cache_lookups(metrics, "miss")) == (2, 1)


async def test_check_capacity_raises_busy_when_the_queue_is_full() -> None:
    pool = idle_pool(max_queue=2)
    svc = service(pool)
    image = ImageRef(size=1, data=b"x")
    svc.check_capacity()
    pool.submit("colors", {}, image, MAX_PIXELS)
    svc.check_capacity()
    ticket = pool.submit("colors", {}, image, MAX_PIXELS)
    with pytest.raises(ProtocolError) as caught:
        svc.check_capacity()
    assert caught.value.code is ErrorCode.BUSY
    assert caught.value.retry_after_ms is not None
    assert caught.value.retry_after_ms > 0
    ticket.cancel()
    svc.check_capacity()


# run, with a real worker -----------------------------------------------------------------------


@pytest.fixture
def gate_path(tmp_path: Path) -> str:
    path = tmp_path / "gate.lock"
    path.touch()
    return str(path)


@pytest.fixture
async def running(gate_path: str) -> AsyncIterator[AnalysisService]:
    tasks = (Colors(), GateTask(gate_path))
    pool = WorkerPool(WorkerConfig(tasks), workers=1, max_batch_size=4,
                      max_wait_ms=0, max_queue=64)
    await pool.start()
    try:
        async with asyncio.timeout(WAIT_S):
            await pool.wait_ready()
        yield AnalysisService(Registry(tasks), pool, LruResultCache(10), Metrics(), MAX_PIXELS)
    finally:
        async with asyncio.timeout(WAIT_S):
            await pool.stop(grace_s=2)


async def test_run_reports_stages_and_caches_the_payload(running: AnalysisService) -> None:
    data = make_image(64, 48, "PNG", seed=5)
    spec, options = running.resolve(None, {"colors": 2})
    key = running.cache_key(hashlib.sha256(data).hexdigest(), spec, options)
    stages: list[tuple[Stage, int | None]] = []
    async with asyncio.timeout(WAIT_S):
        payload, timings = await running.run(spec, options, ImageRef(len(data), data=data), key,
                                             lambda stage, position: stages.append((stage,
                                                                                    position)))
    assert stages == [(Stage.QUEUED, 1), (Stage.DECODING, None), (Stage.INFERENCE, None)]
    assert payload["task"] == "colors"
    assert payload["model"] == spec.model.id
    assert payload["image"] == {"width": 64, "height": 48, "format": "PNG"}
    assert len(payload["result"]["colors"]) <= 2
    assert set(timings) == {"queue", "decode", "inference"}
    assert await running.cache.get(key) == payload


async def test_run_raises_the_jobs_error_and_caches_nothing(running: AnalysisService) -> None:
    spec, options = running.resolve(None, {})
    with pytest.raises(ProtocolError) as caught:
        async with asyncio.timeout(WAIT_S):
            await running.run(spec, options, ImageRef(4, data=b"junk"), "key")
    assert caught.value.code is ErrorCode.INVALID_IMAGE
    assert await running.cache.get("key") is None


class StageSeen:
    """An on_stage callback that tests can wait on."""

    def __init__(self) -> None:
        self.stages: list[tuple[Stage, int | None]] = []
        self._changed = asyncio.Event()

    def __call__(self, stage: Stage, position: int | None) -> None:
        self.stages.append((stage, position))
        self._changed.set()

    async def reached(self, stage: Stage) -> None:
        async with asyncio.timeout(WAIT_S):
            while not any(s is stage for s, _ in self.stages):
                self._changed.clear()
                await self._changed.wait()


async def start_held_and_queued(
    svc: AnalysisService,
) -> tuple[asyncio.Task[Any], asyncio.Task[Any], StageSeen]:
    """A gate job inside the worker (call with the gate closed), and a colors job behind it."""
    data = make_image(32, 32, "PNG", seed=6)
    gate, _ = svc.resolve("gate", {})
    colors, options = svc.resolve(None, {})
    held_stages, queued_stages = StageSeen(), StageSeen()
    held = asyncio.create_task(svc.run(gate, {}, ImageRef(len(data), data=data), None,
                                       held_stages))
    await held_stages.reached(Stage.DECODING)
    queued = asyncio.create_task(svc.run(colors, options, ImageRef(len(data), data=data), None,
                                         queued_stages))
    await queued_stages.reached(Stage.QUEUED)
    return held, queued, queued_stages


async def test_cancelling_run_withdraws_the_queued_job(running: AnalysisService,
                                                       gate_path: str) -> None:
    with gate_closed(gate_path):
        held, queued, stages = await start_held_and_queued(running)
        assert stages.stages == [(Stage.QUEUED, 1)]
        assert running.pool.depth == 1
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert running.pool.depth == 0
    async with asyncio.timeout(WAIT_S):
        payload, _ = await held
    assert payload["task"] == "gate"


async def test_a_busy_failure_carries_retry_after(running: AnalysisService,
                                                  gate_path: str) -> None:
    with gate_closed(gate_path):
        held, queued, _ = await start_held_and_queued(running)
        async with asyncio.timeout(WAIT_S):
            await running.pool.stop(grace_s=0.2)  # the server shuts down: its jobs fail
            results = await asyncio.gather(held, queued, return_exceptions=True)
    for result in results:
        assert isinstance(result, ProtocolError), result
        assert result.code is ErrorCode.BUSY
        assert result.retry_after_ms is not None
        assert result.retry_after_ms > 0
