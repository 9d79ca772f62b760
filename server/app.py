"""``create_app``: wires settings, backends and routes into a FastAPI app.

Embedded defaults: in-process worker pool, memory upload store and LRU cache, the bundled
model. Everything heavy starts in the lifespan, so importing this module is cheap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from server import docs, exposure, openapi
from server.analysis import AnalysisService
from server.auth import HostPolicy, TokenAuth
from server.limits import ClientLimits, KeyedBuckets, MemoryBudget, shared_client_share
from server.logs import install_redaction
from server.metrics import Metrics
from server.pipeline.pool import WorkerPool
from server.pipeline.redis_queue import RedisJobQueue
from server.pipeline.spool import Spool
from server.pipeline.stream_worker import LocalStreamWorkers, StreamWorkerConfig
from server.pipeline.worker import WorkerConfig
from server.runtime.batching import BatchLimits
from server.settings import Settings
from server.state import AppState
from server.storage.base import JobQueue, RateLimiter, ResultCache, UploadStore
from server.storage.locks import RedisLocker
from server.storage.memory import LruResultCache, MemoryRateLimiter, MemoryUploadStore
from server.storage.redis import (
    RedisRateLimiter,
    RedisResultCache,
    RedisUploadStore,
    TieredResultCache,
)
from server.storage.redis import connect as connect_redis
from server.tasks import routes as task_routes
from server.tasks.contract import Task
from server.tasks.registry import Registry, load_registry
from server.transports import http, tus, ws
from server.tuning import threads_for, usable_cores

log = logging.getLogger("pixelstream")

HTTP_REQUESTS_PER_SECOND = 20.0
HTTP_BURST = 40


def registry_for(settings: Settings) -> Registry:
    """The tasks ``settings`` offer: the built-ins, installed tasks and the tasks file."""
    return load_registry(settings.tasks, classify_model=settings.model)


def torch_threads(settings: Settings) -> int:
    """Threads per worker: as set, else :func:`server.tuning.threads_for` this machine."""
    if settings.torch_threads > 0:
        return settings.torch_threads
    return threads_for(usable_cores(), settings.workers)


def _needs_prepare(tasks: Sequence[Task]) -> list[Task]:
    return [task for task in tasks if type(task).prepare is not Task.prepare]


def prepare_tasks(tasks: Sequence[Task]) -> None:
    """Run each task's :meth:`~server.tasks.contract.Task.prepare` (here, in this process)."""
    for task in tasks:
        task.prepare()


async def _prepare_tasks(tasks: Sequence[Task]) -> None:
    """Each task's ``prepare`` once, before the workers start, rather than racing in every
    worker. In a short-lived process: preparing may import torch, which the gateway never
    needs."""
    preparing = _needs_prepare(tasks)
    if not preparing:
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as executor:
        await asyncio.get_running_loop().run_in_executor(executor, prepare_tasks, preparing)
    log.info("tasks prepared: %s", ", ".join(task.name for task in preparing))


def worker_devices(registry: Registry) -> dict[str, str]:
    """Tasks whose device differs from the server's ``--device`` (tasks file)."""
    return {entry.task.name: entry.serving.device for entry in registry.entries
            if entry.serving.device is not None}


def worker_placement(registry: Registry) -> dict[str, int]:
    """Tasks a tasks file places on fewer than every worker: how many load each."""
    return {entry.task.name: entry.serving.workers for entry in registry.entries
            if entry.serving.workers is not None}


Backends = tuple[UploadStore, ResultCache, JobQueue, RateLimiter]


def _embedded_backends(settings: Settings, registry: Registry, metrics: Metrics,
                       stack: contextlib.AsyncExitStack) -> Backends:
    """Everything in this process: spool files, an LRU cache, worker processes."""
    spool = Spool(settings.spool_dir, min_free_bytes=4 * settings.max_image_bytes)
    stack.callback(spool.close)
    store = MemoryUploadStore(spool)
    stack.push_async_callback(store.close)
    pool = WorkerPool(
        WorkerConfig(tasks=tuple(e.task for e in registry.entries),
                     torch_threads=torch_threads(settings), device=settings.device,
                     devices=worker_devices(registry), placement=worker_placement(registry)),
        workers=settings.workers,
        max_batch_size=settings.max_batch_size,
        max_wait_ms=settings.max_wait_ms,
        max_queue=settings.max_queue,
        metrics=metrics,
        job_timeout_s=settings.job_timeout_s or None,
        per_task=batch_limits(settings, registry),
    )
    return store, LruResultCache(settings.cache_entries), pool, MemoryRateLimiter()


async def _shared_backends(settings: Settings, registry: Registry, metrics: Metrics,
                           stack: contextlib.AsyncExitStack) -> Backends:
    """Redis for uploads, results, jobs and budgets: gateways and workers on many machines."""
    assert settings.redis_url is not None
    redis = connect_redis(settings.redis_url)
    stack.push_async_callback(redis.aclose)
    total = settings.redis_upload_bytes or settings.memory_budget_bytes
    store = RedisUploadStore(redis, idle_s=settings.upload_idle_timeout_s, total_bytes=total,
                             client_bytes=shared_client_share(total, settings.max_image_bytes))
    cache = TieredResultCache(LruResultCache(settings.cache_entries),
                              RedisResultCache(redis, ttl_s=settings.result_ttl_s))
    queue = RedisJobQueue(redis, max_queue=settings.max_queue, metrics=metrics,
                          tasks=[entry.task.name for entry in registry.entries])
    workers = LocalStreamWorkers(stream_worker_config(settings, registry), settings.workers)
    await workers.start()
    stack.push_async_callback(workers.stop)
    return store, cache, queue, RedisRateLimiter(redis)


def stream_worker_config(settings: Settings, registry: Registry) -> StreamWorkerConfig:
    assert settings.redis_url is not None
    return StreamWorkerConfig(
        redis_url=settings.redis_url, tasks=tuple(e.task for e in registry.entries),
        torch_threads=torch_threads(settings), device=settings.device,
        devices=worker_devices(registry),
        max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
        claim_idle_ms=settings.claim_idle_ms, per_task=batch_limits(settings, registry),
        placement=worker_placement(registry),
    )


def batch_limits(settings: Settings, registry: Registry) -> dict[str, BatchLimits]:
    """The batch limits of tasks whose tasks-file entry sets its own."""
    limits: dict[str, BatchLimits] = {}
    for entry in registry.entries:
        serving = entry.serving
        if serving.max_batch_size is None and serving.max_wait_ms is None:
            continue
        wait_ms = settings.max_wait_ms if serving.max_wait_ms is None else serving.max_wait_ms
        limits[entry.task.name] = BatchLimits(serving.max_batch_size or settings.max_batch_size,
                                              wait_ms / 1000)
    return limits


async def _sweep(state: AppState) -> None:
    interval = min(30.0, max(0.05, state.settings.upload_idle_timeout_s / 4))
    while True:
        await asyncio.sleep(interval)
        try:
            await state.uploads.expire_idle()
        except Exception:
            log.exception("expiring idle uploads failed")


async def _cancel_all(*tasks: asyncio.Task[None] | set[asyncio.Task[None]]) -> None:
    flat = [t for item in tasks for t in (item if isinstance(item, set) else {item})]
    for task in flat:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*flat, return_exceptions=True)


async def _follow_model_switches(app: FastAPI, settings: Settings, service: AnalysisService,
                                 stack: contextlib.AsyncExitStack) -> None:
    """With Redis and a versioned model: announce this gateway's switches, follow others'."""
    from server.models import admin

    if not settings.redis_url or not admin.versioned_tasks(service):
        return
    redis = connect_redis(settings.redis_url)
    stack.push_async_callback(redis.aclose)
    app.state.publish_switch = admin.publisher(redis)
    follower = asyncio.create_task(admin.follow_switches(redis, service),
                                   name="follow-model-switches")

    async def stop() -> None:
        await _cancel_all(follower)

    stack.push_async_callback(stop)


def client_share(settings: Settings) -> int:
    """The most of the memory budget one client's uploads may hold: a quarter, or one largest
    upload if that is more."""
    return max(settings.memory_budget_bytes // 4, settings.max_image_bytes)


def create_app(
    settings: Settings | None = None,
    *,
    tasks: Registry | Sequence[Task] | None = None,
) -> FastAPI:
    """Build the app. ``tasks`` overrides the offered tasks (a sequence: the first one is the
    default task); without it, the built-ins, installed tasks and ``settings.tasks``."""
    settings = settings or Settings.from_env()
    if tasks is None:
        registry = registry_for(settings)
    elif isinstance(tasks, Registry):
        registry = tasks
    else:
        tasks = list(tasks)
        registry = Registry(tasks, default=tasks[0].name if tasks else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = Metrics()
        await _prepare_tasks([entry.task for entry in registry.entries])
        async with contextlib.AsyncExitStack() as stack:
            if settings.redis_url:
                backends = await _shared_backends(settings, registry, metrics, stack)
            else:
                backends = _embedded_backends(settings, registry, metrics, stack)
            store, cache, queue, limiter = backends
            service = AnalysisService(
                registry, queue, cache, metrics,
                max_pixels=settings.max_pixels,
            )
            state = AppState(
                settings=settings, limits=settings.limits, metrics=metrics, store=store,
                service=service,
                http_buckets=KeyedBuckets(HTTP_REQUESTS_PER_SECOND, HTTP_BURST),
                client_limits=ClientLimits(
                    limiter,
                    max_connections=settings.max_connections_per_client,
                    uploads_per_minute=settings.uploads_per_minute,
                    bytes_per_minute=settings.bytes_per_minute,
                ),
                budget=MemoryBudget(settings.memory_budget_bytes, share=client_share(settings)),
                uploads_in_memory=not settings.redis_url,
            )
            if settings.redis_url:
                lock_redis = connect_redis(settings.redis_url)
                stack.push_async_callback(lock_redis.aclose)
                state.upload_locker = RedisLocker(lock_redis)
            metrics.watch_memory(state.budget)
            app.state.pixelstream = state
            stopped = False

            async def stop_queue() -> None:
                nonlocal stopped
                if not stopped:
                    stopped = True
                    await queue.stop(grace_s=settings.shutdown_grace_s)

            await queue.start()
            stack.push_async_callback(stop_queue)
            await _follow_model_switches(app, settings, service, stack)
            sweeper = asyncio.create_task(_sweep(state), name="expire-idle-uploads")
            try:
                yield
            finally:
                # uvicorn has stopped accepting, closed every socket with 1012 and given HTTP
                # requests shutdown_grace_s. Now the jobs.
                # * Shared queue (Redis): jobs and their images stay in Redis for other workers
                #   and for the gateway the clients resume on; this one stops following them
                #   (``stopping`` tells the analyses not to free their images).
                # * In-process: running jobs finish within the grace (workers end their batch),
                #   queued ones fail ``busy``; then the analyses waiting on them end.
                sweeper.cancel()
                state.stopping = True
                if settings.redis_url:
                    service.handing_back = True
                    await _cancel_all(sweeper, state.background)
                await stop_queue()
                await _cancel_all(sweeper, state.background)

    auth = TokenAuth.from_settings(settings.api_tokens, settings.api_tokens_file)
    install_redaction(settings.api_tokens)  # request lines and headers are logged scrubbed
    app = FastAPI(
        title="pixelstream",
        summary="AI image understanding over WebSockets",
        lifespan=lifespan,
        docs_url=None,  # served by server.docs, from local files rather than a CDN
        redoc_url=None,
    )
    app.state.auth = auth
    app.state.settings = settings
    app.add_middleware(http.RequestIds)
    if settings.allowed_origins:
        # CORS for the HTTP routes from the socket's allow-list. Without a list only the
        # server's own origin may use them (no CORS headers needed, none sent).
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.allowed_origins),
            allow_methods=["GET", "POST", "HEAD", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=[h.strip() for h in tus.TUS_REQUEST_HEADERS.split(",")],
            expose_headers=[h.strip() for h in tus.TUS_EXPOSED_HEADERS.split(",")],
            allow_credentials=False,
            max_age=600,
        )
    # Outermost: a request from a name or origin the server does not serve goes no further.
    app.add_middleware(exposure.ExposureGuard,
                       hosts=HostPolicy(settings.host, settings.allowed_hosts),
                       allowed_origins=settings.allowed_origins)
    exposure.quiet_refusals()
    app.include_router(docs.router)
    app.include_router(ws.router)
    app.include_router(http.router)
    app.include_router(tus.router)
    app.include_router(task_routes.router)
    from server.models import admin as model_admin

    app.include_router(model_admin.router)
    openapi.install(app, [entry.task.name for entry in registry.entries], tokens=auth.required)
    # The demo page's assets; static/client links to client_js/src, so the page loads the
    # very files of the browser library (symlinks inside the folder are followed).
    from pathlib import Path

    from starlette.staticfiles import StaticFiles

    app.mount("/static", StaticFiles(directory=Path(__file__).with_name("static"),
                                     follow_symlink=True), name="static")
    return app
