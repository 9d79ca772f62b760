"""Shared fixtures: a real uvicorn server on a free loopback port, and a protocol test client."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import os
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvicorn
import websockets
from PIL import Image

from chunking.codec import encode_client_binary
from chunking.messages import Chunk, Frame
from server.app import create_app
from server.cli import uvicorn_config
from server.settings import Settings
from server.state import AppState
from server.tasks.builtin.colors import Colors
from server.tasks.contract import Task
from server.tasks.registry import Registry

# Spawned worker processes inherit sys.path: make ``tests.support`` importable in them.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# Everything offline, always: the hub is unreachable here, and tests must not try.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WAIT_S = 30.0
"""Upper bound on waiting for any one expected message; tests wait on messages, not time."""
READY_S = 180.0
"""Upper bound on a test server's workers loading their models (a bound, not a wait: on a
busy 2-core machine two workers loading transformers took over 90 s)."""


class _Server(uvicorn.Server):
    """uvicorn's server, with an event for "started" (uvicorn itself only sets a flag)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


@dataclass
class RunningServer:
    settings: Settings
    server: _Server
    thread: threading.Thread
    loop: asyncio.AbstractEventLoop

    @property
    def port(self) -> int:
        return self.settings.port

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    @property
    def state(self) -> AppState:
        app = self.server.config.loaded_app
        while hasattr(app, "app"):  # unwrap uvicorn's middleware
            app = app.app
        state: AppState = app.state.pixelstream
        return state

    def call(self, coroutine: Any, timeout: float = WAIT_S) -> Any:
        """Run a coroutine on the server's own loop (to inspect or poke its state)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def start_server(settings: Settings, tasks: Registry | Sequence[Task] | None = None,
                 port: int = 0) -> RunningServer:
    """uvicorn in a thread, configured as ``pixelstream serve`` configures it; returns once
    every worker has loaded its model. ``port``: a given one (a restarted server's), else a
    free one."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))  # bound here, so no other process can take the port
    settings = settings.with_overrides(port=listener.getsockname()[1], host="127.0.0.1")
    config = uvicorn.Config(create_app(settings, tasks=tasks), **uvicorn_config(settings))
    config.log_level = "warning"
    server = _Server(config)
    loop = asyncio.new_event_loop()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.serve(sockets=[listener]))
        finally:
            server.ready.set()  # wake the starter even if startup failed
            loop.close()

    thread = threading.Thread(target=run, name=f"uvicorn-{settings.port}", daemon=True)
    running = RunningServer(settings, server, thread, loop)
    thread.start()
    if not server.ready.wait(120) or not server.started:
        raise RuntimeError("the test server failed to start")
    if settings.workers:
        running.call(running.state.service.pool.wait_ready(), timeout=READY_S)
    return running


def fast_settings(**overrides: Any) -> Settings:
    """Settings for protocol tests: small limits so edge cases are cheap to reach."""
    base = {
        "max_image_bytes": 8 * 1024 * 1024,
        "max_chunk_bytes": 256 * 1024,
        "max_pixels": 40_000_000,
        "max_uploads": 4,
        "window_bytes": 1024 * 1024,
        "max_wait_ms": 2.0,
        "workers": 1,
    }
    base.update(overrides)
    return Settings(**base)


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A models directory for this test run, as PIXELSTREAM_MODEL_DIR (the bundled model is
    built there once and shared by the model tests)."""
    root = tmp_path_factory.getbasetemp() / "pixelstream-models"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIXELSTREAM_MODEL_DIR", str(root))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield root


@dataclass
class Gate:
    """Holds the test server's worker inside a ``gate`` job: see tests/support/gate.py."""

    lock_path: str

    def closed(self) -> Any:
        from tests.support.gate import gate_closed

        return gate_closed(self.lock_path)


@pytest.fixture(scope="session")
def gate() -> Iterator[Gate]:
    with tempfile.NamedTemporaryFile(prefix="pixelstream-gate-") as lock:
        yield Gate(lock.name)


@pytest.fixture(scope="session")
def colors_server(gate: Gate) -> Iterator[RunningServer]:
    """A server with the fast ``colors`` task (the default) and the test ``gate`` task."""
    from tests.support.gate import GateTask

    running = start_server(fast_settings(), tasks=(Colors(), GateTask(gate.lock_path)))
    yield running
    running.stop()


@pytest.fixture
def server_factory(gate: Gate) -> Iterator[Callable[..., RunningServer]]:
    """Start servers with particular settings; all are stopped after the test."""
    from tests.support.gate import GateTask

    started: list[RunningServer] = []

    def factory(settings: Settings | None = None, tasks: Sequence[Task] | None = None,
                **overrides: Any) -> RunningServer:
        tasks = tasks if tasks is not None else (Colors(), GateTask(gate.lock_path))
        running = start_server(settings or fast_settings(**overrides), tasks=tasks)
        started.append(running)
        return running

    yield factory
    for running in started:
        running.stop()


# Images -------------------------------------------------------------------------------------


def make_image(width: int = 64, height: int = 48, fmt: str = "PNG", seed: int = 0,
               **save: Any) -> bytes:
    """A small, deterministic, non-uniform image in the given format."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * 255 // max(1, width - 1)), (y * 255 // max(1, height - 1)),
                       rng.integers(0, 256, size=(height, width))], axis=-1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, fmt, **save)
    return out.getvalue()


_SEEDS = itertools.count(10_000)


def unique_image(width: int = 96, height: int = 64, fmt: str = "PNG") -> bytes:
    """An image no earlier test sent: servers cache results by content."""
    return make_image(width, height, fmt, seed=next(_SEEDS))


# Protocol client ----------------------------------------------------------------------------


class ProtocolClient:
    """A thin test client: sends raw protocol messages, waits for the ones it expects."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.welcome: dict[str, Any] = {}
        self.inbox: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(orjson.dumps(message).decode())

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def upload(self, upload_id: str, size: int, **fields: Any) -> None:
        await self.send({"type": "upload", "id": upload_id, "size": size, **fields})

    async def chunk(self, upload_id: str, offset: int, data: bytes, *, binary: bool = True) -> None:
        if binary:
            await self.ws.send(encode_client_binary(Chunk(upload_id, offset, data)))
        else:
            await self.send({"type": "chunk", "id": upload_id, "offset": offset,
                             "data": base64.b64encode(data).decode()})

    async def frame(self, stream: str, seq: int, data: bytes, *, binary: bool = True,
                    **fields: Any) -> None:
        if binary:
            await self.ws.send(encode_client_binary(Frame(stream, seq, data, **fields)))
        else:
            await self.send({"type": "frame", "stream": stream, "seq": seq,
                             "data": base64.b64encode(data).decode(), **fields})

    async def next(self) -> dict[str, Any]:
        if self.inbox:
            return self.inbox.pop(0)
        async with asyncio.timeout(WAIT_S):
            message: dict[str, Any] = orjson.loads(await self.ws.recv())
        return message

    async def expect(self, predicate: Callable[[dict[str, Any]], bool] | str,
                     **fields: Any) -> dict[str, Any]:
        """The next message that matches; others received meanwhile are kept in the inbox."""
        if isinstance(predicate, str):
            kind = predicate

            def predicate(m: dict[str, Any]) -> bool:
                return m.get("type") == kind and all(m.get(k) == v for k, v in fields.items())

        for index, message in enumerate(self.inbox):
            if predicate(message):
                return self.inbox.pop(index)
        async with asyncio.timeout(WAIT_S):
            while True:
                message = orjson.loads(await self.ws.recv())
                if predicate(message):
                    return message
                self.inbox.append(message)

    async def messages_until(self, predicate: Callable[[dict[str, Any]], bool]
                             ) -> list[dict[str, Any]]:
        """Every message up to and including the first that matches, in order."""
        seen: list[dict[str, Any]] = []
        while True:
            message = await self.next()
            seen.append(message)
            if predicate(message):
                return seen

    async def send_upload(self, upload_id: str, data: bytes, *, chunk_size: int = 64 * 1024,
                          binary: bool = True, **fields: Any) -> dict[str, Any]:
        """Announce, send every chunk in order, and return the ``accepted`` message."""
        await self.upload(upload_id, len(data), **fields)
        accepted = await self.expect("accepted", id=upload_id)
        for offset in range(accepted["offset"], len(data), chunk_size):
            await self.chunk(upload_id, offset, data[offset : offset + chunk_size], binary=binary)
        return accepted

    async def outcome(self, upload_id: str) -> dict[str, Any]:
        return await self.expect(
            lambda m: m.get("id") == upload_id and m.get("type") in ("result", "error", "cancelled")
        )


def connect(url: str, **kwargs: Any) -> Any:
    return websockets.connect(url, compression=None, max_size=None, **kwargs)


@pytest.fixture
def open_client() -> Iterator[Callable[..., Any]]:
    """``async with open_client(url) as client`` → a ProtocolClient past its welcome."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def opener(url: str, **kwargs: Any) -> Any:
        async with connect(url, **kwargs) as ws:
            client = ProtocolClient(ws)
            client.welcome = await client.next()
            assert client.welcome["type"] == "welcome"
            yield client

    return opener
