"""Helpers of the Python client's tests: images never sent before, the server's counters, and a
recorder of a call's callbacks that tests wait on."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from tests.conftest import WAIT_S, RunningServer
from tests.support.pyclient_media import solid_png

_SEEDS = itertools.count(1)


def padded(rgb: tuple[int, int, int], pad: int) -> bytes:
    """A solid image never sent before (servers cache by content)."""
    return solid_png(rgb, pad=pad, seed=next(_SEEDS))


def top_hex(result: Any) -> str:
    colors = result.result["colors"]
    assert colors[0]["fraction"] == 1.0, colors
    return str(colors[0]["hex"])


def appended_bytes(server: RunningServer) -> float:
    """Chunk bytes the server appended (replays are not counted)."""
    value = server.state.metrics.registry.get_sample_value("pixelstream_upload_bytes_total")
    return value or 0.0


def errors_sent(server: RunningServer, code: str) -> float:
    value = server.state.metrics.registry.get_sample_value("pixelstream_errors_total",
                                                           {"code": code})
    return value or 0.0


def uploads_with_outcome(server: RunningServer, outcome: str) -> float:
    value = server.state.metrics.registry.get_sample_value(
        "pixelstream_uploads_total", {"outcome": outcome})
    return value or 0.0


class Recorder:
    """Collects a call's callbacks, with an event per stage for tests to wait on."""

    def __init__(self) -> None:
        self.progress: list[tuple[int, int, int]] = []
        self.stages: list[tuple[str, dict[str, Any]]] = []
        self.timeline: list[tuple[str, Any]] = []
        self._events: dict[str, asyncio.Event] = {}

    def on_progress(self, sent: int, acknowledged: int, total: int) -> None:
        self.progress.append((sent, acknowledged, total))
        self.timeline.append(("progress", acknowledged))

    def on_stage(self, stage: str, detail: dict[str, Any]) -> None:
        self.stages.append((stage, detail))
        self.timeline.append((stage, detail))
        self.event(stage).set()

    def event(self, stage: str) -> asyncio.Event:
        return self._events.setdefault(stage, asyncio.Event())

    async def wait(self, stage: str) -> None:
        async with asyncio.timeout(WAIT_S):
            await self.event(stage).wait()

    @property
    def callbacks(self) -> dict[str, Any]:
        return {"on_progress": self.on_progress, "on_stage": self.on_stage}

    def acknowledged_before(self, stage: str) -> int:
        """The last acknowledged offset seen before the first ``stage``."""
        acknowledged = 0
        for name, value in self.timeline:
            if name == stage:
                break
            if name == "progress":
                acknowledged = value
        return acknowledged

