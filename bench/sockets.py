"""Many sockets: the gateway's memory per idle socket and per active upload, at 100 and 1,000
sockets, against the bare uvicorn WebSocket endpoint of :mod:`bench.servers` (the stack's own
cost of an idle socket).

Idle: N sockets opened (pixelstream's ``welcome`` read). Active: on each of those sockets an
upload of 8 MiB is accepted and its first 64 KiB chunk acknowledged, then the client waits
(uploads that are in progress); the bare endpoint's sockets each get the same 64 KiB, which
it keeps. Memory: the server tree's RSS less shared memory, plus its
spool files on tmpfs; per socket = (with the sockets - before) / N. File descriptors: the
benchmark raises its soft ``RLIMIT_NOFILE`` to the hard limit, inherited by the servers.

    python -m bench.sockets [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import tempfile
import time
from typing import Any

import orjson
import websockets

from bench.common import (
    VENV_BIN,
    PeakSampler,
    free_port,
    machine,
    median,
    pixelstream_argv,
    server_process,
)
from bench.inference import OPEN_LIMITS
from bench.report import Section
from chunking.codec import encode_client_binary
from chunking.messages import Chunk

COUNTS = (100, 1000)
WARM_UP = 20
UPLOAD_SIZE = 8 << 20
BUDGET = str(40 << 30)
"""``--memory-budget-bytes``: room for every declared upload, all from one client (a quarter
of the budget may be one client's; the default would say busy)."""
FIRST_CHUNK = 64 << 10
KB = 1024


def raise_fd_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        raise RuntimeError(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} needed")
    return target


async def open_sockets(url: str, count: int, welcome: bool) -> list[Any]:
    gate = asyncio.Semaphore(100)

    async def one() -> Any:
        async with gate:
            ws = await websockets.connect(url, compression=None, max_size=None,
                                          open_timeout=60, ping_interval=None)
            if welcome:
                await ws.recv()
            return ws

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def start_uploads(sockets: list[Any]) -> None:
    chunk = os.urandom(FIRST_CHUNK)

    async def one(index: int, ws: Any) -> None:
        upload_id = f"a{index}"
        await ws.send(orjson.dumps({"type": "upload", "id": upload_id,
                                    "size": UPLOAD_SIZE}).decode())
        await ws.send(encode_client_binary(Chunk(upload_id, 0, chunk)))
        while True:
            message = orjson.loads(await ws.recv())
            if message["type"] == "error":
                raise RuntimeError(message)
            if message["type"] == "progress" and message.get("received") == FIRST_CHUNK:
                return

    await asyncio.gather(*(one(i, ws) for i, ws in enumerate(sockets)))


async def cancel_uploads(sockets: list[Any]) -> None:
    """Cancel them: a closed socket's uploads would otherwise wait for a resume, held."""
    async def one(index: int, ws: Any) -> None:
        await ws.send(orjson.dumps({"type": "cancel", "id": f"a{index}"}).decode())
        while orjson.loads(await ws.recv())["type"] != "cancelled":
            pass

    await asyncio.gather(*(one(i, ws) for i, ws in enumerate(sockets)))


async def send_bytes(sockets: list[Any]) -> None:
    """The bare endpoint's "active" sockets: each appends the same 64 KiB (no answer)."""
    chunk = os.urandom(FIRST_CHUNK)
    await asyncio.gather(*(ws.send(chunk) for ws in sockets))


def held(pid: int, directories: list[str]) -> int:
    time.sleep(0.5)  # let the server settle
    return PeakSampler(pid, directories).measure()["held"]


def measure(pid: int, port: int, path: str, count: int, directories: list[str],
            pixelstream: bool) -> tuple[float, float]:
    """(bytes per idle socket, bytes per active socket beyond the idle one)."""
    async def scenario() -> tuple[float, float]:
        before = held(pid, directories)
        sockets = await open_sockets(f"ws://127.0.0.1:{port}{path}", count, pixelstream)
        idle = held(pid, directories)
        await (start_uploads(sockets) if pixelstream else send_bytes(sockets))
        active = held(pid, directories)
        if pixelstream:
            await cancel_uploads(sockets)
        await asyncio.gather(*(ws.close() for ws in sockets))
        return (idle - before) / count, (active - idle) / count

    return asyncio.run(scenario())


def run(rounds: int = 3) -> Section:
    limit = raise_fd_limit(3 * max(COUNTS) + 256)
    spool = tempfile.mkdtemp(prefix="bench-sockets-",
                             dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    figures: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        # A fresh server for every figure: memory a server freed is kept by its allocator and
        # reused, so a second measurement on the same process would read low.
        for _ in range(rounds):
            for count in COUNTS:
                ps_port = free_port()
                ps_argv = pixelstream_argv(ps_port, *OPEN_LIMITS, "--spool-dir", spool,
                                           "--memory-budget-bytes", BUDGET)
                with server_process(ps_argv, ps_port, ready_path="/readyz") as ps:
                    measure(ps.pid, ps_port, "/v1/ws", WARM_UP, [spool], True)
                    figures.setdefault(("ps", count), []).append(
                        measure(ps.pid, ps_port, "/v1/ws", count, [spool], True))
                bare_port = free_port()
                bare_argv = [str(VENV_BIN / "python"), "-m", "bench.servers", "bare",
                             str(bare_port)]
                with server_process(bare_argv, bare_port) as bare:
                    measure(bare.pid, bare_port, "/ws", WARM_UP, [], False)
                    figures.setdefault(("bare", count), []).append(
                        measure(bare.pid, bare_port, "/ws", count, [], False))
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    rows = []
    for count in COUNTS:
        ps_idle = median([f[0] for f in figures[("ps", count)]])
        ps_active = median([f[1] for f in figures[("ps", count)]])
        bare_idle = median([f[0] for f in figures[("bare", count)]])
        bare_active = median([f[1] for f in figures[("bare", count)]])
        rows.append([str(count), f"{ps_idle / KB:.0f}", f"{bare_idle / KB:.0f}",
                     f"{ps_active / KB:.0f}", f"{bare_active / KB:.0f}"])
    return Section(
        key="sockets",
        title="5. Many sockets",
        intro=(f"Medians of {rounds} rounds, each figure from a fresh server (after 20 sockets "
               "to warm it up); KiB per socket of the server's memory (RSS less shared "
               "memory, plus spool files on tmpfs). An active upload: 8 MiB declared, "
               "the first 64 KiB received and acknowledged (the bare endpoint: 64 KiB received "
               f"and kept). Per active socket: beyond its idle cost. RLIMIT_NOFILE raised to "
               f"{limit}."),
        header=["sockets", "pixelstream KiB per idle socket", "bare endpoint KiB per idle socket",
                "pixelstream KiB per active upload (64 KiB received)",
                "bare endpoint KiB per socket holding 64 KiB"],
        rows=rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    section = run(args.rounds)
    print(f"Machine: {machine()}\n")
    print(section.markdown())


if __name__ == "__main__":
    main()
