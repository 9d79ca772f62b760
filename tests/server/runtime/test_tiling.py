"""Tiled analyses through a real WorkerPool: each tile one job through the batcher, results in
original pixels, merged across tile edges, progress as tiles finish, and cancellation.

The ``spots`` task (tests/support/sample_tasks.py) finds bright squares and reports which
regions ran in each ``predict`` call; ``gated-spots`` also waits at the test's gate."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from chunking.errors import ErrorCode, ProtocolError
from chunking.messages import Stage
from server.analysis import AnalysisService
from server.metrics import Metrics
from server.pipeline.jobs import JobDone, Ticket, TileSpec, TilesPlanned
from server.pipeline.pool import WorkerPool
from server.pipeline.worker import WorkerConfig
from server.runtime.tiling import needs_tiles, run_tiles, wants_tiles
from server.storage.base import ImageRef
from server.storage.memory import LruResultCache
from server.tasks.contract import SpatialOptions, Tiling, View
from server.tasks.registry import Registry
from server.tasks.spatial import tile_boxes
from tests.support.gate import gate_closed
from tests.support.sample_tasks import Spots

pytestmark = pytest.mark.asyncio(loop_scope="function")

WAIT_S = 30.0
MAX_PIXELS = 40_000_000
WIDTH, HEIGHT = 300, 200
# 10-px spots (tiles start at x 0, 47, 94, 142, 189, 236 and y 0, 45, 91, 136): inside one
# tile, whole in two overlapping tiles, cut by one tile's edge, at a corner of four tiles, at
# the far edges.
SPOTS = [[5, 5, 15, 15], [50, 5, 60, 15], [105, 60, 115, 70], [140, 100, 150, 110],
         [288, 188, 298, 198], [60, 150, 70, 160]]


def spots_png(spots: list[list[int]] = SPOTS, size: tuple[int, int] = (WIDTH, HEIGHT)) -> bytes:
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    for x0, y0, x1, y1 in spots:
        pixels[y0:y1, x0:x1] = 255
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "PNG")
    return out.getvalue()


class GatedSpots(Spots):
    """``spots`` whose every image or tile waits at the gate in ``preprocess``."""

    name = "gated-spots"

    def __init__(self, lock_path: str) -> None:
        self.lock_path = lock_path

    def preprocess(self, view: View, options: Any) -> Any:
        import fcntl

        with open(self.lock_path, "rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            fcntl.flock(lock, fcntl.LOCK_UN)
        return super().preprocess(view, options)


@pytest.fixture
def gate_path(tmp_path: Path) -> str:
    path = tmp_path / "gate.lock"
    path.touch()
    return str(path)


@pytest.fixture
async def pool(gate_path: str) -> AsyncIterator[WorkerPool]:
    metrics = Metrics()
    pool = WorkerPool(WorkerConfig((Spots(), GatedSpots(gate_path))), workers=1,
                      max_batch_size=4, max_wait_ms=0, max_queue=64, metrics=metrics)
    await pool.start()
    async with asyncio.timeout(WAIT_S):
        await pool.wait_ready()
    yield pool
    async with asyncio.timeout(WAIT_S):
        await pool.stop(grace_s=2)


def service_for(pool: WorkerPool, gate_path: str) -> AnalysisService:
    registry = Registry([Spots(), GatedSpots(gate_path)])
    return AnalysisService(registry, pool, LruResultCache(10), Metrics(), MAX_PIXELS)


def inline(data: bytes) -> ImageRef:
    return ImageRef(size=len(data), data=data)


async def outcome(ticket: Ticket) -> Any:
    async with asyncio.timeout(WAIT_S):
        async for event in ticket:
            if isinstance(event, (JobDone, TilesPlanned)):
                return event
    raise AssertionError("no outcome")


class Stages:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int | None, tuple[int, int] | None]] = []
        self.tiles_queued = asyncio.Event()

    def __call__(self, stage: Stage, position: int | None,
                 counts: tuple[int, int] | None = None) -> None:
        self.seen.append((stage.value, position, counts))
        if counts is not None:
            self.tiles_queued.set()


# The grid ------------------------------------------------------------------------------------


async def test_the_test_image_is_larger_than_a_tile_and_its_spots_cross_tile_edges() -> None:
    boxes = tile_boxes(WIDTH, HEIGHT, Spots.tiling.size, Spots.tiling.overlap)
    assert len(boxes) == 24

    def whole_in(spot: list[int]) -> int:
        return sum(b[0] <= spot[0] and b[1] <= spot[1] and spot[2] <= b[2] and spot[3] <= b[3]
                   for b in boxes)

    def touched_by(spot: list[int]) -> int:
        return sum(b[0] < spot[2] and spot[0] < b[2] and b[1] < spot[3] and spot[1] < b[3]
                   for b in boxes)

    assert all(whole_in(spot) >= 1 for spot in SPOTS)
    # Some spot is cut by a tile's edge, some seen whole by several tiles: duplicates to merge.
    assert any(touched_by(spot) > whole_in(spot) for spot in SPOTS)
    assert any(whole_in(spot) > 1 for spot in SPOTS)


async def test_only_spatial_tasks_with_tiles_on_and_a_large_image_are_tiled() -> None:
    spots = Spots()
    assert wants_tiles(spots, SpatialOptions())
    assert not wants_tiles(spots, SpatialOptions(tiles=False))
    assert needs_tiles(spots, (65, 10))
    assert needs_tiles(spots, (10, 65))
    assert not needs_tiles(spots, (64, 64))


# Through the service ---------------------------------------------------------------------------


async def test_a_large_image_is_analysed_in_tiles_merged_in_original_pixels(
        pool: WorkerPool, gate_path: str) -> None:
    service = service_for(pool, gate_path)
    stages = Stages()
    task, options = service.resolve("spots", {})
    async with asyncio.timeout(WAIT_S):
        payload, timings = await service.run(task, options, inline(spots_png()), None, stages)
    result = payload["result"]
    # Each spot once, exactly where it is in the original (no downscaling, no duplicates).
    assert result["spots"] == sorted([float(v) for v in spot] for spot in SPOTS)
    assert result["tiles"] == 24
    assert payload["image"]["width"] == WIDTH
    assert payload["image"]["height"] == HEIGHT
    assert timings["decode"] > 0
    assert timings["inference"] > 0
    # Every tile ran at full resolution: predict saw 64-px regions, never the whole image.
    regions = [tuple(region) for batch in result["batches"] for region in batch]
    assert set(regions) == set(tile_boxes(WIDTH, HEIGHT, 64, 16))
    assert all(len(batch) <= 4 for batch in result["batches"])
    assert any(len(batch) > 1 for batch in result["batches"])  # tiles ran batched
    # Progress: the usual stages, then inference with done/total counting up to the end.
    counts = [c for stage, _, c in stages.seen if stage == "inference"]
    assert counts == [(done, 24) for done in range(25)]
    assert [s for s, _, c in stages.seen if c is None] == ["queued", "decoding"]


async def test_an_exif_rotated_image_is_tiled_and_described_as_displayed(
        pool: WorkerPool, gate_path: str) -> None:
    """Stored 200x300 with EXIF orientation 8 (shown 300x200, as the spots are drawn): spots
    and ``image`` in the displayed frame."""
    upright = Image.open(io.BytesIO(spots_png()))
    exif = Image.Exif()
    exif[0x0112] = 8
    out = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_270).save(out, "PNG", exif=exif)
    service = service_for(pool, gate_path)
    task, options = service.resolve("spots", {})
    async with asyncio.timeout(WAIT_S):
        payload, _ = await service.run(task, options, inline(out.getvalue()), None, Stages())
    assert payload["result"]["spots"] == sorted([float(v) for v in spot] for spot in SPOTS)
    assert payload["image"] == {"width": WIDTH, "height": HEIGHT, "format": "PNG"}


class FewSpots(Spots):
    """``spots`` allowed 6 tiles an image: its 64-px grid of 24 on the test image is too many."""

    name = "few-spots"
    tiling = Tiling(size=64, overlap=16, max_tiles=6)


async def test_an_image_needing_more_tiles_than_allowed_gets_fewer_larger_ones() -> None:
    pool = WorkerPool(WorkerConfig((FewSpots(),)), workers=1, max_batch_size=4, max_wait_ms=0,
                      max_queue=64, metrics=Metrics())
    await pool.start()
    try:
        async with asyncio.timeout(WAIT_S):
            await pool.wait_ready()
        service = AnalysisService(Registry([FewSpots()]), pool, LruResultCache(10), Metrics(),
                                  MAX_PIXELS)
        stages = Stages()
        task, options = service.resolve("few-spots", {})
        async with asyncio.timeout(WAIT_S):
            payload, _ = await service.run(task, options, inline(spots_png()), None, stages)
    finally:
        async with asyncio.timeout(WAIT_S):
            await pool.stop(grace_s=2)
    result = payload["result"]
    assert result["spots"] == sorted([float(v) for v in spot] for spot in SPOTS)
    assert result["tiles"] <= 6
    counts = [c for stage, _, c in stages.seen if stage == "inference"]
    assert counts[-1] == (result["tiles"], result["tiles"])
    # Larger tiles than the task's 64 px, still read at full resolution.
    regions = {tuple(region) for batch in result["batches"] for region in batch}
    assert all(x1 - x0 > 64 for x0, _, x1, _ in regions)


class SpotsWithOverview(Spots):
    """``spots`` with one more job over the whole image, decoded as for one pass."""

    name = "overview-spots"
    tiling = Tiling(size=64, overlap=16, overview=True)


async def test_an_overview_finds_what_no_tile_holds_whole() -> None:
    """A 100-px spot on the 64-px grid lies whole in no tile: the tiles see pieces of it, the
    overview (the whole image at the one-pass decode size) sees it whole, and the merge keeps
    that copy; the overview counts as one more job in the progress."""
    big = [100, 50, 200, 150]
    pool = WorkerPool(WorkerConfig((SpotsWithOverview(),)), workers=1, max_batch_size=4,
                      max_wait_ms=0, max_queue=64, metrics=Metrics())
    await pool.start()
    try:
        async with asyncio.timeout(WAIT_S):
            await pool.wait_ready()
        service = AnalysisService(Registry([SpotsWithOverview()]), pool, LruResultCache(10),
                                  Metrics(), MAX_PIXELS)
        stages = Stages()
        task, options = service.resolve("overview-spots", {})
        async with asyncio.timeout(WAIT_S):
            payload, _ = await service.run(task, options, inline(spots_png([big])), None,
                                           stages)
    finally:
        async with asyncio.timeout(WAIT_S):
            await pool.stop(grace_s=2)
    result = payload["result"]
    assert result["tiles"] == 25  # the 24 tiles and the overview
    assert tuple(result["batches"][0][0]) == (0, 0, WIDTH, HEIGHT)  # queued first
    [found] = result["spots"]
    assert all(abs(got - want) <= 6 for got, want in zip(found, big, strict=True)), found
    counts = [c for stage, _, c in stages.seen if stage == "inference"]
    assert counts[-1] == (25, 25)


async def test_tiles_false_asks_for_one_downscaled_pass(pool: WorkerPool, gate_path: str
                                                        ) -> None:
    service = service_for(pool, gate_path)
    stages = Stages()
    task, options = service.resolve("spots", {"tiles": False})
    async with asyncio.timeout(WAIT_S):
        payload, _ = await service.run(task, options, inline(spots_png()), None, stages)
    result = payload["result"]
    assert "tiles" not in result
    assert result["batch"] == [[0, 0, WIDTH, HEIGHT]]
    seen_width, seen_height = result["seen"]
    assert seen_width < WIDTH
    assert min(seen_width, seen_height) >= 32
    # Coordinates still come back in original pixels, to within the downscaling.
    scale = WIDTH / seen_width
    assert len(result["spots"]) == len(SPOTS)
    for found, spot in zip(sorted(result["spots"]), sorted(SPOTS), strict=True):
        assert all(abs(a - b) <= scale for a, b in zip(found, spot, strict=True))
    assert all(c is None for _, _, c in stages.seen)


async def test_an_image_no_larger_than_a_tile_runs_in_one_pass(pool: WorkerPool,
                                                               gate_path: str) -> None:
    service = service_for(pool, gate_path)
    task, options = service.resolve("spots", {})
    async with asyncio.timeout(WAIT_S):
        payload, _ = await service.run(
            task, options, inline(spots_png([[5, 5, 15, 15]], (64, 40))), None)
    assert payload["result"]["spots"] == [[5.0, 5.0, 15.0, 15.0]]
    assert payload["result"]["batch"] == [[0, 0, 64, 40]]


# Through the pool --------------------------------------------------------------------------------


class Interleaved:
    """A queue that lets another client's job in right after the first tile, as if it
    arrived while the tiles were being queued."""

    tile_window = 100

    def __init__(self, pool: WorkerPool, other: bytes) -> None:
        self.pool = pool
        self.other_image = other
        self.other: Ticket | None = None

    def submit(self, task: str, options: dict[str, Any], image: ImageRef, max_pixels: int,
               *, job_id: str | None = None, tile: TileSpec | None = None) -> Ticket:
        ticket = self.pool.submit(task, options, image, max_pixels, job_id=job_id, tile=tile)
        if self.other is None:
            self.other = self.pool.submit("spots", {"tiles": True}, inline(self.other_image),
                                          MAX_PIXELS)
        return ticket

    def release_pixels(self, pixels: str) -> None:
        self.pool.release_pixels(pixels)


async def test_tiles_are_batched_with_other_clients_jobs(pool: WorkerPool) -> None:
    planned = await outcome(pool.submit("spots", {"tiles": True}, inline(spots_png()),
                                        MAX_PIXELS))
    assert isinstance(planned, TilesPlanned)
    assert planned.original == (WIDTH, HEIGHT)
    queue = Interleaved(pool, spots_png([[1, 1, 4, 4]], (40, 30)))
    async with asyncio.timeout(WAIT_S):
        result, _ = await run_tiles(queue, Spots(), planned.parent, planned)
    assert queue.other is not None
    other = await outcome(queue.other)
    assert isinstance(other, JobDone)
    assert other.result["spots"] == [[1.0, 1.0, 4.0, 4.0]]
    # The other client's image ran in one predict call with tiles of the large image.
    together = other.result["batch"]
    assert [0, 0, 40, 30] in together
    assert any(tuple(region) in planned.boxes for region in together)
    assert result["spots"] == sorted([float(v) for v in spot] for spot in SPOTS)


async def test_cancelling_a_tiled_analysis_withdraws_its_queued_tiles(
        pool: WorkerPool, gate_path: str) -> None:
    service = service_for(pool, gate_path)
    stages = Stages()
    task, options = service.resolve("gated-spots", {})
    with gate_closed(gate_path):
        analysis = asyncio.create_task(
            service.run(task, options, inline(spots_png()), None, stages))
        async with asyncio.timeout(WAIT_S):
            await stages.tiles_queued.wait()
        assert pool.depth > 0  # tiles wait behind the batch stuck at the gate
        analysis.cancel()
        with pytest.raises(asyncio.CancelledError):
            await analysis
        assert pool.depth == 0  # every queued tile withdrawn
        batches_at_cancel = pool.batches_sent
    # The worker finishes what it held; then only the next job runs: no tile of the
    # cancelled analysis is left to run.
    after = await outcome(pool.submit("spots", {"tiles": False}, inline(spots_png()),
                                      MAX_PIXELS))
    assert isinstance(after, JobDone)
    assert pool.batches_sent == batches_at_cancel + 1
    assert stages.seen[-1][2] == (0, 24)  # no tile of it was reported done


async def test_a_failing_tile_fails_the_image(pool: WorkerPool, gate_path: str) -> None:
    planned = await outcome(pool.submit("spots", {"tiles": True}, inline(spots_png()),
                                        MAX_PIXELS))
    assert isinstance(planned, TilesPlanned)
    # The decoded pixels are gone and the tiles carry no image to decode again.
    pool.release_pixels(planned.pixels)
    parent = planned.parent
    bare = type(parent)(parent.job_id, parent.task, parent.options, ImageRef(size=0),
                        parent.max_pixels)
    with pytest.raises(ProtocolError) as raised:
        async with asyncio.timeout(WAIT_S):
            await run_tiles(pool, Spots(), bare, planned)
    assert raised.value.code is ErrorCode.INTERNAL
    assert pool.depth == 0
