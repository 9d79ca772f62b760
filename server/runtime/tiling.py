"""Spatial tasks at full resolution: an image larger than the task's tile is cut into
overlapping full-resolution tiles, each ONE job through the same batcher as every other job.

The flow, for a task with ``tiling`` and option ``tiles`` true:

1. The upload's job reaches a worker, which reads the image's header. Small enough for one
   tile: it runs as usual. Larger: the worker decodes the image once into a file the other
   workers read tiles from (:mod:`server.runtime.pixels`) and answers
   :class:`~server.pipeline.jobs.TilesPlanned` with the tile grid (:func:`plan`), instead
   of a result.
2. The gateway (:func:`run_tiles`) queues the tiles as jobs, a window at a time so other
   clients' jobs interleave with them, and reports ``inference`` progress with
   ``done``/``total`` as they finish.
3. Each tile job reads its box from the shared pixels (:func:`tile_view`) and goes through
   ``preprocess``/``predict``/``encode`` batched with whatever else is queued for the task;
   ``encode`` reports coordinates in original pixels.
4. The gateway merges the tiles' results with ``task.merge`` (off the event loop).

Cancelling :func:`run_tiles` (the upload was cancelled) withdraws the tiles still queued.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

from chunking.errors import ErrorCode, ProtocolError
from server.pipeline.jobs import Job, JobDone, JobFailed, Ticket, TileSpec, TilesPlanned
from server.pipeline.pixel_source import PixelSource
from server.runtime.pixels import PixelCache
from server.storage.base import ImageRef
from server.tasks.contract import Task, View, parse_options
from server.tasks.spatial import fit_tiling, tile_boxes

TILE_WINDOW = 16
"""Tiles of one image queued at once when the queue does not say (``tile_window``)."""

CountsCallback = Callable[[int, int], None]
"""Called with ``(done, total)`` tiles: first ``(0, total)``, then as each tile finishes."""


# In the worker ----------------------------------------------------------------------------------


def wants_tiles(task: Task, options: Any) -> bool:
    """Whether a job of ``task`` with these (parsed) options may be tiled."""
    return task.tiling is not None and bool(getattr(options, "tiles", True))


def needs_tiles(task: Task, size: tuple[int, int]) -> bool:
    """Whether an image of ``size`` (displayed) is larger than the task's tile."""
    return task.tiling is not None and max(size) > task.tiling.size


def plan(job: Job, task: Task, source: PixelSource, cache: PixelCache,
         started: float) -> TilesPlanned:
    """Decode the image once and share it with the workers that will run its tiles (the
    cache owns ``source`` from here on); the tile grid. ``started``: when the job's decoding
    began (``time.perf_counter``)."""
    assert task.tiling is not None
    try:
        handle = cache.share(source)
    except BaseException:
        source.close()
        raise
    decode_ms = (time.perf_counter() - started) * 1000
    width, height = source.original
    size, overlap = fit_tiling(width, height, task.tiling.size, task.tiling.overlap,
                               task.tiling.max_tiles)
    boxes = tile_boxes(width, height, size, overlap)
    if task.tiling.overview:
        boxes.insert(0, (0, 0, width, height))  # no tile is the whole image: see tile_view
    parent = Job(job.job_id, job.task, job.options, _without_data(job.image), job.max_pixels)
    return TilesPlanned(job.job_id, handle, boxes, source.original,
                        source.info.described(source.original), decode_ms, parent)


def tile_view(job: Job, task: Task, cache: PixelCache) -> tuple[View, dict[str, Any]]:
    """A tile job's pixels (full resolution; the overview, the box of the whole image, at the
    task's one-pass decode size) and the image's description."""
    tile = job.tile
    assert tile is not None
    source = job.image.path if job.image.path is not None else job.image.data
    pixels = cache.get(tile.pixels, source, max_pixels=job.max_pixels)
    described = pixels.info.described(tile.original)
    if tile.box == (0, 0, *tile.original):  # only an overview: tiles are smaller than that
        return View.whole(pixels.whole(task.decode.min_short_side), tile.original), described
    return View(pixels.region(tile.box), tile.original, tile.box), described


def _without_data(image: ImageRef) -> ImageRef:
    return ImageRef(size=image.size, path=image.path, key=image.key)


# In the gateway ----------------------------------------------------------------------------------


class TileQueue(Protocol):
    def submit(self, task: str, options: dict[str, Any], image: ImageRef, max_pixels: int,
               *, job_id: str | None = None, tile: TileSpec | None = None) -> Ticket: ...


async def _outcome(ticket: Ticket) -> dict[str, Any]:
    event = await ticket.outcome()  # a tile's stages are not reported: one wakeup a tile
    if isinstance(event, JobDone):
        return event.result
    if isinstance(event, JobFailed):
        raise ProtocolError(event.code, event.message)
    raise ProtocolError(ErrorCode.INTERNAL, "a tile ended without a result")


async def run_tiles(queue: TileQueue, task: Task, parent: Job, planned: TilesPlanned,
                    on_counts: CountsCallback | None = None) -> tuple[dict[str, Any], float]:
    """Run the planned tiles as jobs and merge their results: ``(result, inference_ms)``.

    A failed tile fails the image (its error is raised, the other tiles withdrawn).
    Cancelling this call withdraws every tile still queued; tiles a worker is running finish
    there, unreported."""
    started = time.perf_counter()
    total = len(planned.boxes)
    window = max(1, int(getattr(queue, "tile_window", TILE_WINDOW)))
    parts: list[dict[str, Any] | None] = [None] * total
    running: dict[asyncio.Task[dict[str, Any]], tuple[int, Ticket]] = {}
    next_index = 0
    done = 0

    def submit_more() -> None:
        nonlocal next_index
        while next_index < total and len(running) < window:
            tile = TileSpec(planned.pixels, planned.boxes[next_index], planned.original,
                            next_index)
            ticket = queue.submit(parent.task, parent.options, parent.image, parent.max_pixels,
                                  job_id=f"{parent.job_id}/t{next_index}", tile=tile)
            follower = asyncio.ensure_future(_outcome(ticket))
            running[follower] = (next_index, ticket)
            next_index += 1

    if on_counts is not None:
        on_counts(0, total)
    try:
        submit_more()
        while running:
            finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for follower in finished:
                index, _ = running.pop(follower)
                parts[index] = follower.result()  # a failed tile raises here
                done += 1
                if on_counts is not None:
                    on_counts(done, total)
            submit_more()
    finally:
        for follower, (_, ticket) in running.items():
            ticket.cancel()
            follower.cancel()
        release = getattr(queue, "release_pixels", None)
        if callable(release):
            release(planned.pixels)
    options = parse_options(task, parent.options)
    merged = await asyncio.to_thread(task.merge, [p for p in parts if p is not None],
                                     planned.original, options)
    return merged, (time.perf_counter() - started) * 1000
