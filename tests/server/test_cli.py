"""The ``pixelstream`` command: its flags, the uvicorn settings it uses, and the real command
run end to end in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import glob
import io
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from server.cli import build_parser, main, uvicorn_config, worker_tasks
from server.settings import Settings
from tests.support.setting_cases import SETTING_CASES

PIXELSTREAM = Path(sys.executable).with_name("pixelstream")
"""The installed console script, beside this interpreter in the virtualenv."""

FLAG_CASES = SETTING_CASES


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# The parser ---------------------------------------------------------------------------------


def test_the_cases_cover_every_setting() -> None:
    assert set(FLAG_CASES) == {f.name for f in dataclasses.fields(Settings)}


@pytest.mark.parametrize("name", sorted(FLAG_CASES))
def test_serve_has_a_flag_per_setting(name: str) -> None:
    text, expected = FLAG_CASES[name]
    args = build_parser().parse_args(["serve", flag(name), text])
    assert getattr(args, name) == expected
    assert type(getattr(args, name)) is type(expected)


def test_unset_flags_are_none_so_the_environment_and_defaults_apply() -> None:
    args = build_parser().parse_args(["serve"])
    assert all(getattr(args, f.name) is None for f in dataclasses.fields(Settings))


def test_flags_become_settings_and_win_over_the_environment() -> None:
    argv = ["serve"] + [part for name, (text, _) in FLAG_CASES.items()
                        for part in (flag(name), text)]
    args = build_parser().parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)}
    settings = Settings.from_env({"PIXELSTREAM_PORT": "1234", "PIXELSTREAM_WORKERS": "9"},
                                 **overrides)
    assert {name: getattr(settings, name) for name in FLAG_CASES} == {
        name: expected for name, (_, expected) in FLAG_CASES.items()
    }


def test_a_flag_that_does_not_parse_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--port", "eighty"])
    assert exited.value.code == 2
    assert "--port" in capsys.readouterr().err


def test_a_bad_variable_is_reported_without_starting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PIXELSTREAM_MAX_CHUNK_BYTES", "4MB")
    assert main(["serve"]) == 2
    assert "PIXELSTREAM_MAX_CHUNK_BYTES" in capsys.readouterr().err


def test_a_setting_out_of_range_is_reported_without_starting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "--workers", "0"]) == 2
    assert "workers" in capsys.readouterr().err


def test_worker_stops_on_an_unknown_task_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    redis = ["--redis-url", "redis://127.0.0.1:1/0"]  # never reached: the check comes first
    assert main(["worker", *redis, "--task", "colors", "--task", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: --task: no task is named 'nope' (the tasks: ")
    monkeypatch.setenv("PIXELSTREAM_WORKER_TASKS", "colors, gone")
    assert main(["worker", *redis]) == 2
    assert "no task is named 'gone'" in capsys.readouterr().err


def test_worker_tasks_come_from_the_flags_else_the_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def chosen(*argv: str) -> list[str]:
        return worker_tasks(build_parser().parse_args(["worker", *argv]))

    assert chosen() == []  # every task
    monkeypatch.setenv("PIXELSTREAM_WORKER_TASKS", "colors, classify,")
    assert chosen() == ["colors", "classify"]
    assert chosen("--task", "spots", "--task", "mean") == ["spots", "mean"]


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2


# uvicorn's settings -------------------------------------------------------------------------


@pytest.mark.parametrize("max_chunk_bytes", [65536, 4 * 1024 * 1024, 1000])
def test_uvicorn_config_for_large_uploads(max_chunk_bytes: int) -> None:
    settings = Settings(host="127.0.0.1", port=8123, max_chunk_bytes=max_chunk_bytes,
                        log_level="warning")
    config = uvicorn_config(settings)
    assert config["ws_per_message_deflate"] is False
    assert config["ws"] == "websockets-sansio"
    assert config["ws_max_size"] == settings.limits.max_message_bytes
    assert config["ws_max_size"] > settings.limits.max_base64_chunk_chars  # a chunk fits
    assert (config["host"], config["port"], config["log_level"]) == ("127.0.0.1", 8123,
                                                                      "warning")


def test_uvicorn_accepts_the_config() -> None:
    """Every key is a real ``uvicorn.Config`` argument, with the intended effect."""
    settings = Settings()
    config = uvicorn.Config("server.app:create_app", **uvicorn_config(settings))
    assert config.ws_per_message_deflate is False
    assert config.ws == "websockets-sansio"
    assert config.ws_max_size == settings.limits.max_message_bytes
    assert config.lifespan == "on"


def test_uvicorn_config_guards_against_slow_and_greedy_peers() -> None:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    settings = Settings(ws_ping_interval_s=7.5, http_header_timeout_s=4, shutdown_grace_s=3)
    config = uvicorn_config(settings)
    assert issubclass(config["http"], H11Protocol)  # h11 bounds a request head; httptools not
    assert config["http"].head_timeout_s == 4
    assert config["h11_max_incomplete_event_size"] == 64 * 1024
    assert config["timeout_keep_alive"] == 5
    assert (config["ws_ping_interval"], config["ws_ping_timeout"]) == (7.5, 7.5)
    assert config["timeout_graceful_shutdown"] == 3
    assert config["log_config"] is None  # the app's logging (server/logs.py), not uvicorn's
    loaded = uvicorn.Config("server.app:create_app", **config)
    assert loaded.h11_max_incomplete_event_size == 64 * 1024


def test_serve_tunes_the_gateways_malloc_before_it_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import server.tuning

    calls: list[str] = []
    monkeypatch.setattr(server.tuning, "tune_gateway_malloc", lambda: calls.append("tune"))
    monkeypatch.setattr(uvicorn, "run", lambda app, **config: calls.append("run"))
    assert main(["serve", "--workers", "1", "--port", str(free_port())]) == 0
    assert calls == ["tune", "run"]


# The real command ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def child_pids(pid: int) -> set[int]:
    pids: set[int] = set()
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError), open(path) as fh:
            pids.update(int(p) for p in fh.read().split())
    return pids


def is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"spawn_main" in fh.read()
    except OSError:
        return False


def is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def coffee_jpeg() -> bytes:
    from PIL import Image
    from skimage import data

    out = io.BytesIO()
    Image.fromarray(data.coffee()).save(out, "JPEG", quality=90)
    return out.getvalue()


@contextlib.asynccontextmanager
async def pixelstream_serve(port: int, *args: str) -> AsyncIterator[tuple[Any, list[str]]]:
    """``pixelstream serve`` in a subprocess; yields (process, its stderr lines so far) once
    uvicorn reports that startup is complete. The process is always gone afterwards."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PIXELSTREAM_MODEL_DIR", None)  # the default model folder, prepared already
    process = await asyncio.create_subprocess_exec(
        str(PIXELSTREAM), "serve", "--host", "127.0.0.1", "--port", str(port), *args,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )
    lines: list[str] = []
    started = asyncio.Event()

    async def drain() -> None:  # keep reading, so the pipe never fills and blocks the server
        assert process.stderr is not None
        async for raw in process.stderr:
            lines.append(raw.decode(errors="replace").rstrip())
            if "Application startup complete" in lines[-1]:
                started.set()

    reader = asyncio.create_task(drain())
    try:
        waiter = asyncio.create_task(started.wait())
        try:
            async with asyncio.timeout(120):
                await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        assert started.is_set(), "the server exited before startup:\n" + "\n".join(lines)
        yield process, lines
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(10):
                await reader


async def wait_ready(base_url: str, attempts: int = 600) -> dict[str, Any]:
    """Poll ``/readyz`` (bounded: the workers load their models after startup)."""
    async with httpx.AsyncClient(timeout=5) as http:
        for _ in range(attempts):
            with contextlib.suppress(httpx.TransportError):
                response = await http.get(base_url + "/readyz")
                if response.status_code == 200:
                    body: dict[str, Any] = response.json()
                    return body
            await asyncio.sleep(0.1)
    raise AssertionError(f"{base_url}/readyz never answered 200")


@pytest.mark.timeout(240)
async def test_serve_end_to_end_classifies_and_stops_on_sigint(open_client) -> None:
    port = free_port()
    async with pixelstream_serve(port, "--workers", "1") as (process, lines):
        ready = await wait_ready(f"http://127.0.0.1:{port}")
        assert ready["ready"] is True
        assert ready["workers_ready"] == 1
        assert ready["models"]["classify"] == "pixelstream/mobilenet_v2-imagenet"
        workers = {pid for pid in child_pids(process.pid) if is_worker(pid)}
        assert len(workers) == 1
        # The inference plan is said at start-up, with what the machine chose.
        assert any("inference: 1 worker(s) x" in line
                   and "torch_threads, max_batch_size chosen for" in line for line in lines)

        image = coffee_jpeg()
        async with open_client(f"ws://127.0.0.1:{port}/v1/ws") as client:
            assert client.welcome["default_task"] == "classify"
            assert client.welcome["limits"] == Settings().limits.to_dict()
            await client.send_upload("coffee", image, task="classify", options={"top_k": 3})
            result = await client.outcome("coffee")
        assert result["type"] == "result", result
        assert result["image"] == {"width": 600, "height": 400, "format": "JPEG"}
        labels = result["result"]["labels"]
        assert len(labels) == 3
        assert labels[0]["label"] == "espresso"
        assert labels[0]["score"] > 0.3
        assert [entry["score"] for entry in labels] == sorted(
            (entry["score"] for entry in labels), reverse=True
        )

        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            code = await process.wait()
        output = "\n".join(lines)
        assert code == 0, output
        assert "Application shutdown complete" in output
        assert "Traceback" not in output
        assert not [pid for pid in workers if is_running(pid)], "a worker outlived the server"


def test_model_prepare_prints_the_folder_and_creates_the_model(tmp_path: Path) -> None:
    target = tmp_path / "models" / "default"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for attempt in range(2):  # the second run finds the folder current and keeps it
        done = subprocess.run(
            [str(PIXELSTREAM), "model", "prepare", "--dir", str(target)],
            capture_output=True, text=True, env=env, timeout=300, check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(target), attempt
    config = json.loads((target / "config.json").read_text())
    assert len(config["id2label"]) == 1000
    assert (target / "model.safetensors").stat().st_size > 1_000_000
    assert (target / "preprocessor_config.json").is_file()
    assert (target / "pixelstream-model.json").is_file()


def test_model_prepare_refuses_a_target_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "not-a-folder"
    target.write_text("keep me")
    assert main(["model", "prepare", "--dir", str(target)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ")
    assert str(target) in captured.err
    assert captured.out == ""
    assert target.read_text() == "keep me"
