"""Ingest of a 64 MiB payload over loopback, every server in its own process.

pixelstream (binary chunks, and Base64 chunks) against a bare uvicorn WebSocket endpoint that
only appends the bytes (the ceiling of this stack), a FastAPI ``UploadFile`` multipart route,
the naive one-JSON-POST ``{"image": "<base64>"}`` parsed by a Pydantic model, and a tus upload
(tuspy client, tuspyserver). See :mod:`bench.servers`.

The payload is random bytes, not an image: pixelstream's clock stops at the ``progress`` that
acknowledges the last byte (every byte received, placed at its offset, hashed, the SHA-256
checked), before analysis starts (it then fails ``invalid_image``, outside the measurement).
Every message is built before the clock starts, and WebSocket frames are written by a lean
blocking client (:class:`bench.clients.RawWebSocket`): client and server share the machine's
two cores, and the figures should be the server's. Rounds go round-robin over the
contenders, so a noisy neighbour hurts them alike.

Figures: MB/s (MiB of payload per second), server CPU seconds (the server's whole process
tree, user + system), and the peak of the memory the server holds above its idle level: RSS
less shared memory, plus the bytes of its files on tmpfs (pixelstream's spool file and tus's
upload file both live in /dev/shm here: RAM that no RSS shows when it is written with
``write()``).

    python -m bench.ingest [--rounds 5] [--size-mib 64]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from bench.clients import CHUNK, raw_bare_upload, raw_pixelstream_upload
from bench.common import (
    MB,
    VENV_BIN,
    PeakSampler,
    cpu_seconds,
    free_port,
    machine,
    median,
    paused,
    pixelstream_argv,
    server_process,
    tree_pids,
)
from bench.report import Check, Section

PYTHON = str(VENV_BIN / "python")
BIG_CHUNK = 4 * MB


@dataclass
class Server:
    argv: list[str]
    port: int
    ready_path: str = "/healthz"
    directories: list[str] = field(default_factory=list)
    pid: int = 0
    idle: int = 0


@dataclass
class Contender:
    key: str
    name: str
    server: Server
    send: Callable[[bytes], float]
    """Sends the payload; returns seconds from the first byte to the acknowledgement."""
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    held: list[int] = field(default_factory=list)
    files: list[int] = field(default_factory=list)

    def rate(self, size: int) -> float:
        return size / MB / median(self.seconds)


# Clients of the HTTP contenders ------------------------------------------------------------


def http_send(url: str, content_type: str, build: Callable[[bytes], bytes]
              ) -> Callable[[bytes], float]:
    def send(data: bytes) -> float:
        body = build(data)  # outside the clock
        with httpx.Client(timeout=300) as client:
            started = time.perf_counter()
            answer = client.post(url, content=body, headers={"content-type": content_type})
            elapsed = time.perf_counter() - started
        answer.raise_for_status()
        assert answer.json()["bytes"] == len(data)
        return elapsed

    return send


BOUNDARY = "benchboundary" + "7" * 20


def multipart_body(data: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"payload.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            ).encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def naive_body(data: bytes) -> bytes:
    return orjson.dumps({"image": base64.b64encode(data).decode()})


def tus_send(port: int, chunk_size: int | None) -> Callable[[bytes], float]:
    from tusclient.client import TusClient

    def send(data: bytes) -> float:
        client = TusClient(f"http://127.0.0.1:{port}/files/")
        options: dict[str, Any] = {} if chunk_size is None else {"chunk_size": chunk_size}
        started = time.perf_counter()
        uploader = client.uploader(file_stream=io.BytesIO(data), retries=0,
                                   metadata={"filename": "payload.bin"}, **options)
        uploader.upload()
        elapsed = time.perf_counter() - started
        assert uploader.offset == len(data), (uploader.offset, len(data))
        return elapsed

    return send


# The run ------------------------------------------------------------------------------------


def contenders(work: str) -> list[Contender]:
    spool_dir = os.path.join(work, "spool")
    tus_dir = os.path.join(work, "tus")
    os.makedirs(spool_dir)
    os.makedirs(tus_dir)
    module = [PYTHON, "-m", "bench.servers"]
    ps_port = free_port()
    ps = Server(pixelstream_argv(ps_port, "--spool-dir", spool_dir), ps_port, "/readyz",
                [spool_dir])
    bare = Server([*module, "bare", str(port := free_port())], port)
    bare_sha = Server([*module, "bare-sha256", str(port := free_port())], port)
    multipart = Server([*module, "multipart", str(port := free_port())], port)
    naive = Server([*module, "naive", str(port := free_port())], port)
    tus = Server([*module, "tus", str(port := free_port()), "--files-dir", tus_dir], port,
                 directories=[tus_dir])

    def ps_send(base64_chunks: bool, chunk: int) -> Callable[[bytes], float]:
        return lambda data: raw_pixelstream_upload(
            ps.port, data, "i" + secrets.token_hex(6), base64=base64_chunks, chunk=chunk)

    mib = CHUNK // MB
    return [
        Contender("binary", f"pixelstream, binary chunks of {mib} MiB", ps,
                  ps_send(False, CHUNK)),
        Contender("base64", f"pixelstream, Base64 chunks of {mib} MiB", ps, ps_send(True, CHUNK)),
        Contender("binary4", f"pixelstream, binary chunks of {BIG_CHUNK // MB} MiB", ps,
                  ps_send(False, BIG_CHUNK)),
        Contender("bare", f"bare uvicorn WebSocket, {mib} MiB messages (ceiling)", bare,
                  lambda data: raw_bare_upload(bare.port, data)),
        Contender("bare4", f"bare uvicorn WebSocket, {BIG_CHUNK // MB} MiB messages", bare,
                  lambda data: raw_bare_upload(bare.port, data, chunk=BIG_CHUNK)),
        Contender("bare_sha", f"bare WebSocket + SHA-256 in a thread, {mib} MiB (reference)",
                  bare_sha, lambda data: raw_bare_upload(bare_sha.port, data)),
        Contender("multipart", "FastAPI UploadFile multipart", multipart,
                  http_send(f"http://127.0.0.1:{multipart.port}/upload",
                            f"multipart/form-data; boundary={BOUNDARY}", multipart_body)),
        Contender("naive", "naive JSON POST {\"image\": base64} + Pydantic", naive,
                  http_send(f"http://127.0.0.1:{naive.port}/ingest", "application/json",
                            naive_body)),
        Contender("tus", "tus: tuspyserver + tuspy client, one PATCH (its default)", tus,
                  tus_send(tus.port, None)),
        Contender("tus1", f"tus: tuspyserver + tuspy client, {mib} MiB PATCHes", tus,
                  tus_send(tus.port, CHUNK)),
    ]


def _round(c: Contender, data: bytes, others: list[int]) -> None:
    server = c.server
    cpu_before = cpu_seconds(tree_pids(server.pid))
    with paused(others), PeakSampler(server.pid, server.directories) as sampler:
        seconds = c.send(data)
    c.cpu.append(cpu_seconds(tree_pids(server.pid)) - cpu_before)
    c.seconds.append(seconds)
    c.held.append(sampler.peak - server.idle)
    c.files.append(sampler.at_peak.get("files", 0))


def run(rounds: int = 5, size_mib: int = 64) -> Section:
    data = os.urandom(size_mib * MB)
    work = tempfile.mkdtemp(prefix="bench-ingest-",
                            dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    all_ = contenders(work)
    try:
        with ExitStack() as stack:
            servers = list({id(c.server): c.server for c in all_}.values())
            for server in servers:
                process = stack.enter_context(server_process(server.argv, server.port,
                                                             ready_path=server.ready_path))
                server.pid = process.pid
            for c in all_:  # a warm-up round each, not counted
                c.send(data)
            _clear(os.path.join(work, "tus"))
            time.sleep(0.5)
            for server in servers:
                server.idle = PeakSampler(server.pid, server.directories).measure()["held"]
            for _ in range(rounds):
                for c in all_:
                    _round(c, data, [s.pid for s in servers if s is not c.server])
                    _clear(os.path.join(work, "tus"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _section({c.key: c for c in all_}, rounds, size_mib, len(data))


def _clear(directory: str) -> None:
    for name in os.listdir(directory):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, name))


def _section(by_key: dict[str, Contender], rounds: int, size_mib: int, size: int) -> Section:
    binary, b64 = by_key["binary"], by_key["base64"]
    rows = []
    for c in by_key.values():
        rows.append([
            c.name, f"{c.rate(size):.0f}", f"{median(c.cpu):.2f}",
            f"{median(c.held) / MB:.1f} ({median(c.held) / size:.2f}x)",
            f"{median(c.files) / MB:.1f}",
            f"{binary.rate(size) / c.rate(size):.2f}x", f"{b64.rate(size) / c.rate(size):.2f}x",
        ])

    def ratio(a: str, b: str) -> float:
        return by_key[a].rate(size) / by_key[b].rate(size)

    def best(*keys: str) -> float:
        return max(by_key[k].rate(size) for k in keys)

    best_binary = best("binary", "binary4")
    checks = [
        Check("binary ingest vs bare endpoint, both in 1 MiB messages", ratio("binary", "bare"),
              0.85),
        Check("binary ingest vs bare endpoint, each at its best message size (1 or 4 MiB)",
              best_binary / best("bare", "bare4"), 0.85),
        Check("binary ingest vs the bare endpoint that also computes SHA-256 as bytes arrive "
              "(what the protocol requires), both in 1 MiB messages",
              ratio("binary", "bare_sha"), 0.9),
        Check("binary ingest vs multipart", ratio("binary", "multipart"), 2.0),
        Check("binary ingest vs tus, in 1 MiB chunks vs one PATCH", ratio("binary", "tus"), 2.0),
        Check("binary ingest vs tus, each at its best (pixelstream 1 or 4 MiB chunks, tus one "
              "PATCH or 1 MiB PATCHes)", best_binary / best("tus", "tus1"), 2.0),
        Check("Base64 ingest vs naive JSON POST", ratio("base64", "naive"), 3.5),
        Check("server memory growth / payload (binary upload)", median(binary.held) / size, 1.2,
              higher_is_better=False),
    ]
    return Section(
        key="ingest",
        title=f"1. Ingest of a {size_mib} MiB payload over loopback",
        intro=(f"Medians of {rounds} rounds, round-robin over the contenders; each server in "
               "its own process. pixelstream's clock stops at the `progress` acknowledging the "
               "last byte (received, placed at its offset, SHA-256 computed and checked); the "
               "payload is random bytes, so the analysis that follows fails fast, unmeasured. "
               "Messages are built before the clock starts and sent by a lean client. Memory: "
               "peak above idle of the server tree's RSS (less shared memory) plus its files "
               "on tmpfs (pixelstream's spool file, tus's upload file: both in /dev/shm)."),
        header=["server", "MB/s", "server CPU s", "memory growth MB (x payload)",
                "of which tmpfs files MB", "binary vs this", "Base64 vs this"],
        rows=rows,
        checks=checks,
        notes=[f"4 MiB chunks: pixelstream binary {ratio('binary4', 'bare4'):.2f}x the bare "
               f"endpoint at 4 MiB messages, {ratio('binary4', 'bare'):.2f}x its best "
               "(1 MiB) figure.",
               f"The bare endpoint plus SHA-256 (which the protocol requires) reaches "
               f"{ratio('bare_sha', 'bare'):.2f}x the bare endpoint: pixelstream's binary "
               f"ingest is {ratio('binary', 'bare_sha'):.2f}x that."],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size-mib", type=int, default=64)
    args = parser.parse_args()
    section = run(args.rounds, args.size_mib)
    print(f"Machine: {machine()}\n")
    print(section.markdown())


if __name__ == "__main__":
    main()
