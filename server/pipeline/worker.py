"""The inference worker: a separate process that decodes images and runs the models.

:func:`worker_main` is the process entry point; :func:`run_batch` is the per-batch logic, a
plain generator of events so tests can drive it in-process. A failure is confined to its job:
a bad image fails at decode, and a batch whose ``predict`` raises is retried one item at a
time so only the culprit fails.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

from chunking.errors import ErrorCode, ProtocolError
from chunking.messages import Stage
from server.logs import configure_from_environment
from server.pipeline.decode import DecodedImage, decode
from server.pipeline.jobs import (
    Batch,
    Job,
    JobDone,
    JobFailed,
    ReleasePixels,
    Shutdown,
    StageReached,
    TilesPlanned,
    WorkerEvent,
    WorkerReady,
)
from server.pipeline.pixel_source import open_pixels
from server.runtime import tiling
from server.runtime.pixels import PixelCache
from server.runtime.supervisor import ignore_stop_signals
from server.tasks.contract import Task, View, parse_options
from server.tasks.registry import resolve_device
from server.tuning import tune_worker_malloc

log = logging.getLogger("pixelstream.worker")


@dataclass(frozen=True)
class WorkerConfig:
    tasks: tuple[Task, ...]
    torch_threads: int = 1
    device: str = "auto"
    devices: dict[str, str] | None = None
    """Per task name, a device other than ``device``."""
    placement: dict[str, int] | None = None
    """Per task name, how many workers load it (a tasks file's ``workers``; others: all)."""

    def for_slot(self, slot: int) -> WorkerConfig:
        """The configuration of the worker in ``slot`` (0, 1, ...): the tasks it serves, the
        first ``workers`` slots serving a task that sets it."""
        placement = self.placement or {}
        tasks = tuple(t for t in self.tasks if slot < placement.get(t.name, slot + 1))
        return replace(self, tasks=tasks)


def load_tasks(config: WorkerConfig) -> dict[str, Task]:
    """Set every task up on its device; by name."""
    loaded: dict[str, Task] = {}
    for task in config.tasks:
        device = (config.devices or {}).get(task.name, config.device)
        task.setup(resolve_device(device))
        loaded[task.name] = task
    return loaded


def displayed_size(decoded: DecodedImage) -> tuple[int, int]:
    """The original image's size as displayed: the header's, turned when the EXIF
    orientation turned the decoded pixels a quarter (the pixels' aspect says which)."""
    width, height = decoded.info.width, decoded.info.height
    w, h = decoded.image.size
    kept = abs(w / width - h / height)
    turned = abs(w / height - h / width)
    return (height, width) if turned < kept else (width, height)


def worker_main(conn: Connection, config: WorkerConfig) -> None:
    """Process entry point: load the models, announce readiness, then serve batches until
    the pool sends ``Shutdown`` (or its pipe closes)."""
    # Ctrl-C and a service manager's SIGTERM go to the whole process group; the gateway
    # decides when workers stop, after their current batch.
    ignore_stop_signals()
    configure_from_environment("worker")  # the gateway's --log-format (text or JSON lines)
    tune_worker_malloc()  # before the models load: see server.tuning
    # Read by torch (and numpy's BLAS) when first imported, which happens in load().
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(max(1, config.torch_threads))
    from PIL import Image

    # decode() checks every header against the job's max_pixels before decoding; Pillow's
    # own default limit (about 179 MP) would otherwise cap a larger configured max_pixels.
    Image.MAX_IMAGE_PIXELS = None
    analyzers = load_tasks(config)
    pixels = PixelCache()
    conn.send([WorkerReady(pid=os.getpid(), models={t: a.model.id for t, a in analyzers.items()})])
    try:
        serve(conn, analyzers, pixels)
    finally:
        pixels.close()


def serve(conn: Connection, analyzers: Mapping[str, Task], pixels: PixelCache) -> None:
    """The worker's loop: batches, until told to stop or the gateway goes.

    Events go to the gateway in lists, a few per batch: each message wakes a thread and the
    event loop there, so a batch's outcomes travel together. A list is sent as soon as it
    holds a stage reached or a tile plan (work starts on it now, here or in the gateway),
    and at the end of the batch.
    """
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the gateway is gone
        if isinstance(message, Shutdown):
            return
        if isinstance(message, Batch):
            events: list[WorkerEvent] = []
            for event in run_batch(analyzers, message, pixels):
                events.append(event)
                if isinstance(event, (StageReached, TilesPlanned)):
                    conn.send(events)
                    events = []
            if events:
                conn.send(events)
        elif isinstance(message, ReleasePixels):
            pixels.release(message.pixels)


@dataclass
class _Prepared:
    job: Job
    image: dict[str, Any]
    view: View
    options: Any
    item: Any
    decode_ms: float


def _fault(job: Job, what: str) -> JobFailed:
    log.exception("job %s: %s", job.job_id, what)
    return JobFailed(job.job_id, ErrorCode.INTERNAL, f"{what} failed on the server")


def _prepare(analyzer: Task, job: Job, pixels: PixelCache, started: float
             ) -> tuple[TilesPlanned | None, _Prepared | None]:
    """One job's decoded pixels and model input; or, for a spatial task's large image, the
    tiles to run instead (:mod:`server.runtime.tiling`)."""
    options = parse_options(analyzer, job.options)
    if job.tile is not None:
        view, image = tiling.tile_view(job, analyzer, pixels)
    else:
        source = job.image.path if job.image.path is not None else job.image.data
        assert source is not None
        if tiling.wants_tiles(analyzer, options):
            opened = open_pixels(source, max_pixels=job.max_pixels)  # reads the header only
            if tiling.needs_tiles(analyzer, opened.original):
                return tiling.plan(job, analyzer, opened, pixels, started), None
            opened.close()
        decoded = decode(source, max_pixels=job.max_pixels, hint=analyzer.decode)
        original = displayed_size(decoded)
        view = View.whole(decoded.image, original)
        image = decoded.info.described(original)
    item = analyzer.preprocess(view, options)
    decode_ms = (time.perf_counter() - started) * 1000
    return None, _Prepared(job, image, view, options, item, decode_ms)


def run_batch(analyzers: Mapping[str, Task], batch: Batch,
              pixels: PixelCache | None = None) -> Iterator[WorkerEvent]:
    """Decode, preprocess, predict and encode one batch; yields stage events and outcomes.
    A spatial task's large image yields ``TilesPlanned`` (its tiles come back as jobs, read from
    ``pixels``: the worker's open images)."""
    prepared: list[_Prepared] = []
    own_pixels = pixels is None
    pixels = PixelCache() if pixels is None else pixels
    for job in batch.jobs:
        if job.task not in analyzers:
            yield JobFailed(job.job_id, ErrorCode.UNKNOWN_TASK,
                            f"no worker model for {job.task!r}")
    # One stage for the batch: its jobs are decoded one after another, a few ms each.
    decoding = [job.job_id for job in batch.jobs if job.task in analyzers]
    if decoding:
        yield StageReached(decoding, Stage.DECODING)
    try:
        for job in batch.jobs:
            analyzer = analyzers.get(job.task)
            if analyzer is None:
                continue
            started = time.perf_counter()
            try:
                planned, ready = _prepare(analyzer, job, pixels, started)
            except ProtocolError as exc:
                yield JobFailed(job.job_id, exc.code, exc.message)
                continue
            except FileNotFoundError:
                # The upload was cancelled and its spool file freed while queued.
                yield JobFailed(job.job_id, ErrorCode.INTERNAL, "the image was released")
                continue
            except Exception:
                yield _fault(job, "decoding")
                continue
            if planned is not None:
                yield planned
            elif ready is not None:
                prepared.append(ready)
    finally:
        if own_pixels:
            pixels.close()
    if not prepared:
        return
    analyzer = analyzers[prepared[0].job.task]
    yield StageReached([p.job.job_id for p in prepared], Stage.INFERENCE)
    started = time.perf_counter()
    outputs: list[Any] | None
    try:
        outputs = analyzer.predict([p.item for p in prepared])
        if len(outputs) != len(prepared):
            raise RuntimeError(f"predict returned {len(outputs)} outputs for {len(prepared)}")
    except Exception:
        log.exception("batch of %d failed; retrying one by one", len(prepared))
        outputs = None
    inference_ms = (time.perf_counter() - started) * 1000
    for index, p in enumerate(prepared):
        try:
            if outputs is None:
                started = time.perf_counter()
                alone = analyzer.predict([p.item])
                inference_ms = (time.perf_counter() - started) * 1000
                if len(alone) != 1:  # the same check as for the batch
                    raise RuntimeError(f"predict returned {len(alone)} outputs for 1")
                output = alone[0]
            else:
                output = outputs[index]
            result = analyzer.encode(output, p.view, p.options)
        except Exception:
            yield _fault(p.job, "inference")
            continue
        timings = {"decode": round(p.decode_ms, 3), "inference": round(inference_ms, 3)}
        yield JobDone(p.job.job_id, result=result, image=p.image, timings_ms=timings)
