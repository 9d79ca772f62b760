"""Logging: JSON lines with ids from context, and API tokens scrubbed from every record, in
this process (a live server's records, captured) and from the real ``pixelstream serve``."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server.logs import (
    ContextFilter,
    JsonFormatter,
    Redactor,
    bind_log_context,
    log_context,
    make_handler,
)
from tests.conftest import connect, unique_image

PIXELSTREAM = Path(sys.executable).with_name("pixelstream")
PLAIN = "plain-secret-7c1e"
HASHED = "hashed-secret-93ab"
WRONG = "wrong-secret-5d20"
CLIENT_LOGGERS = ("httpx", "httpcore", "websockets.client")


@contextlib.contextmanager
def json_lines(level: int = logging.DEBUG) -> Iterator[io.StringIO]:
    """The JSON handler on the root logger for the block; yields what it wrote."""
    stream = io.StringIO()
    handler = make_handler("json", stream)
    root = logging.getLogger()
    saved = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(saved)


def records(stream: io.StringIO, logger: str | None = None) -> list[dict[str, Any]]:
    entries = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    return [e for e in entries if logger is None or e["logger"] == logger]


# The formatter and the context --------------------------------------------------------------


def test_a_record_is_one_json_object_with_time_level_logger_message_and_extras() -> None:
    with json_lines() as stream:
        logging.getLogger("pixelstream.test").warning("held %d bytes\nand more", 5,
                                                      extra={"ref": "abc"})
    (entry,) = records(stream, "pixelstream.test")
    assert entry["level"] == "warning"
    assert entry["logger"] == "pixelstream.test"
    assert entry["message"] == "held 5 bytes\nand more"  # one line still: JSON escapes it
    assert entry["ref"] == "abc"
    assert entry["time"].endswith("Z")
    assert "T" in entry["time"]


def test_ids_in_context_reach_records_even_from_tasks_started_inside() -> None:
    async def main() -> None:
        with log_context(session="s1"):
            bind_log_context(upload="u1")

            async def child() -> None:
                logging.getLogger("pixelstream.test").info("in a task")

            await asyncio.create_task(child())
        logging.getLogger("pixelstream.test").info("outside")

    with json_lines() as stream:
        asyncio.run(main())
    inside, outside = records(stream, "pixelstream.test")
    assert (inside["session_id"], inside["upload_id"]) == ("s1", "u1")
    assert "session_id" not in outside


def test_exceptions_are_kept_in_one_record() -> None:
    with json_lines() as stream:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("pixelstream.test").exception("failed")
    (entry,) = records(stream, "pixelstream.test")
    assert entry["message"] == "failed"
    assert "RuntimeError: boom" in entry["exception"]


def test_the_text_format_names_the_ids_too() -> None:
    stream = io.StringIO()
    handler = make_handler("text", stream)
    record = logging.LogRecord("pixelstream.x", logging.INFO, __file__, 1, "hello", None, None)
    with log_context(session="s9"):
        assert handler.filter(record)
    handler.emit(record)
    assert stream.getvalue().rstrip().endswith("hello [session=s9]")
    assert isinstance(handler.filters[0], ContextFilter)
    assert isinstance(handler.formatter, logging.Formatter)
    assert not isinstance(handler.formatter, JsonFormatter)


# Redaction ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ('127.0.0.1:5 - "WebSocket /v1/ws?token=abc123" [accepted]', "abc123"),
        ('"POST /api/analyze?x=1&token=abc123&y=2 HTTP/1.1" 200', "abc123"),
        ("> GET /v1/ws?TOKEN=abc123 HTTP/1.1", "abc123"),
        ("< Authorization: Bearer abc123", "abc123"),
        ("headers: {'authorization': 'Bearer abc123'}", "abc123"),
        ("(b'authorization', b'Bearer abc123')", "abc123"),
        ("sent bearer abc123 along", "abc123"),
        ("the configured token configured-token-value itself", "configured-token-value"),
    ],
)
def test_the_redactor_scrubs_tokens(text: str, secret: str) -> None:
    redactor = Redactor(["configured-token-value"])
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "%s", (text,), None)
    assert redactor.filter(record)
    assert secret not in record.getMessage()
    assert "[redacted]" in record.getMessage()


def test_the_redactor_leaves_other_messages_alone() -> None:
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "%s %d",
                               ("GET /healthz?tokens_left=3", 200), None)
    Redactor().filter(record)
    assert record.getMessage() == "GET /healthz?tokens_left=3 200"
    assert record.args == ("GET /healthz?tokens_left=3", 200)


# A live server's records ----------------------------------------------------------------------


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# one hashed token\n{hashlib.sha256(HASHED.encode()).hexdigest()}\n")
    return path


async def exercise_with_tokens(http_url: str, ws_url: str) -> None:
    """Handshakes and requests that carry tokens every way a client can."""
    async with connect(f"{ws_url}?token={PLAIN}") as ws:
        assert orjson.loads(await ws.recv())["type"] == "welcome"
    async with connect(ws_url, additional_headers={"Authorization": f"Bearer {HASHED}"}) as ws:
        assert orjson.loads(await ws.recv())["type"] == "welcome"
    with pytest.raises(InvalidStatus):
        async with connect(f"{ws_url}?token={WRONG}"):
            pass
    image = unique_image(32, 32)
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(f"{http_url}/v1/analyze?token={PLAIN}",
                                   files={"file": ("a.png", image, "image/png")})
        assert response.status_code == 200, response.text
        response = await http.post(f"{http_url}/v1/analyze",
                                   headers={"Authorization": f"Bearer {WRONG}"},
                                   files={"file": ("a.png", image, "image/png")})
        assert response.status_code == 401


async def test_tokens_never_reach_a_log_record(server_factory, tokens_file: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    server = server_factory(api_tokens=(PLAIN,), api_tokens_file=tokens_file)
    caplog.set_level(logging.DEBUG)
    for name in ("uvicorn.error", "uvicorn.access"):  # websockets logs its handshake here
        caplog.set_level(logging.DEBUG, logger=name)
    with json_lines() as stream:
        await exercise_with_tokens(server.http_url, server.ws_url)
    # The server's records: the test's own clients (httpx, websockets.client) log the URLs
    # they were given, tokens and all, as any client would.
    server_records = [r for r in caplog.records if not r.name.startswith(CLIENT_LOGGERS)]
    lines = [e for e in records(stream) if not e["logger"].startswith(CLIENT_LOGGERS)]
    text = "\n".join(logging.Formatter().format(r) for r in server_records)
    text += "\n".join(orjson.dumps(e).decode() for e in lines)
    for secret in (PLAIN, HASHED, WRONG):
        assert secret not in text
    # The lines that would have carried them were logged, scrubbed (else this proves nothing).
    assert "/v1/ws?token=[redacted]" in text
    assert "Authorization: [redacted]" in text or "authorization: [redacted]" in text.lower()
    accepted = [e for e in lines if "[accepted]" in e["message"]]
    assert accepted
    assert all(e.get("session_id") for e in accepted)
    access = [e for e in lines if e["logger"] == "uvicorn.access" and "/v1/analyze" in e["message"]]
    assert access
    assert all(e.get("request_id") for e in access)


# The real command -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@contextlib.asynccontextmanager
async def serve(*args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, list[str], int]]:
    """``pixelstream serve ARGS`` on a free port; yields once ``/readyz`` answers 200."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PIXELSTREAM_MODEL_DIR", None)
    process = await asyncio.create_subprocess_exec(
        str(PIXELSTREAM), "serve", "--host", "127.0.0.1", "--port", str(port), *args,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    lines: list[str] = []

    async def drain() -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            lines.append(raw.decode(errors="replace").rstrip("\n"))

    reader = asyncio.create_task(drain())
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            for _ in range(1200):  # a subprocess: bounded polling of its readiness route
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                        break
                assert process.returncode is None, "\n".join(lines)
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the server never became ready:\n" + "\n".join(lines))
        yield process, lines, port
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await reader


@pytest.mark.timeout(240)
async def test_serve_logs_json_lines_without_tokens_and_closes_sockets_1012_on_sigterm(
    tokens_file: Path,
) -> None:
    async with serve("--workers", "1", "--log-format", "json", "--log-level", "debug",
                     "--api-tokens", PLAIN, "--api-tokens-file", str(tokens_file),
                     "--shutdown-grace-s", "3") as (process, lines, port):
        await exercise_with_tokens(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/ws")
        async with connect(f"ws://127.0.0.1:{port}/v1/ws?token={PLAIN}") as ws:
            assert orjson.loads(await ws.recv())["type"] == "welcome"
            process.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(10):
                    await ws.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1012
        async with asyncio.timeout(20):  # grace 3 s for requests, 3 s for jobs, then out
            # uvicorn shuts down gracefully, then re-raises the signal: killed by SIGTERM.
            assert await process.wait() in (0, -signal.SIGTERM)
    output = "\n".join(lines)
    for secret in (PLAIN, HASHED, WRONG):
        assert secret not in output
    entries = []
    for line in lines:
        try:  # every line, the workers' included, is one JSON object
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert {"time", "level", "logger", "message"} <= set(entry), line
        entries.append(entry)
    messages = [e["message"] for e in entries]
    assert any("token=[redacted]" in m for m in messages)
    assert any(m.startswith("Application shutdown complete") for m in messages)
    assert any(e.get("session_id") for e in entries)
    assert any(e.get("request_id") for e in entries)
