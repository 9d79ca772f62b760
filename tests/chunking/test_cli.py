"""The client commands of ``pixelstream`` (chunking.cli): run in-process through
``server.cli.main`` against real servers, and once each as the installed command."""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from chunking.cli import (
    ProgressBoard,
    collect_files,
    pixelstream_main,
    run_client_command,
    summarize,
)
from chunking.cli import main as client_main
from server.cli import build_parser, main
from tests.conftest import WAIT_S
from tests.support.pyclient_media import distinct_colors, hex_of, solid_png, write_video

PIXELSTREAM = Path(sys.executable).with_name("pixelstream")
_SEEDS = itertools.count(1000)


def image_dir(root: Path, count: int, pad: int = 150_000) -> dict[str, str]:
    """``count`` solid images (never sent before) in ``root``; maps each path to its colour."""
    root.mkdir(parents=True, exist_ok=True)
    expected = {}
    for index, color in enumerate(distinct_colors(count)):
        path = root / f"img{index:02d}.png"
        path.write_bytes(solid_png(color, pad=pad, seed=next(_SEEDS)))
        expected[str(path)] = hex_of(color)
    return expected


def json_lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_importing_the_cli_loads_no_client_io() -> None:
    probe = ("import sys, chunking.cli, server.cli; print(','.join(m for m in ('websockets', "
             "'cv2', 'httpx', 'chunking.client') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == ""


def test_directories_are_walked_for_images(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for name in ("a/1.jpg", "a/b/2.PNG", "a/notes.txt", ".hidden/3.png", "a/.4.png"):
        (tmp_path / name).write_bytes(b"x")
    explicit = tmp_path / "a" / "notes.txt"
    files, missing = collect_files([str(tmp_path), str(explicit), str(tmp_path / "nope.jpg")])
    assert files == [tmp_path / "a/1.jpg", tmp_path / "a/b/2.PNG", explicit]
    assert missing == [str(tmp_path / "nope.jpg")]


# upload -------------------------------------------------------------------------------------


def test_upload_a_directory_prints_one_json_line_per_file(colors_server, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    expected = image_dir(tmp_path / "imgs", 6)
    (tmp_path / "imgs" / "README.txt").write_text("not an image, not uploaded")
    code = main(["upload", str(tmp_path / "imgs"), "--url", colors_server.ws_url, "--json",
                 "--concurrency", "3"])
    captured = capsys.readouterr()
    assert code == 0, captured
    lines = json_lines(captured.out)
    assert {line["file"] for line in lines} == set(expected)
    for line in lines:
        assert line["ok"] is True
        assert line["result"]["colors"][0] == {"hex": expected[line["file"]], "fraction": 1.0}
        assert line["task"] == "colors"
        assert line["elapsed_s"] > 0
    assert "6 files: 6 ok, 0 failed" in captured.err


def test_upload_failures_exit_1_with_their_codes(colors_server, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    good = next(iter(image_dir(tmp_path / "ok", 1)))
    bad = tmp_path / "broken.png"
    bad.write_bytes(np.random.default_rng(1).bytes(5000))
    code = main(["upload", good, str(bad), str(tmp_path / "missing.png"), "--json",
                 "--url", colors_server.ws_url])
    captured = capsys.readouterr()
    assert code == 1
    by_file = {line["file"]: line for line in json_lines(captured.out)}
    assert by_file[good]["ok"] is True
    assert (by_file[str(bad)]["ok"], by_file[str(bad)]["code"]) == (False, "invalid_image")
    assert by_file[str(tmp_path / "missing.png")]["code"] == "not_found"
    assert "3 files: 1 ok, 2 failed (invalid_image: 1, not_found: 1)" in captured.err


def test_upload_human_output_options_and_a_refused_option(colors_server, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    path, color = next(iter(image_dir(tmp_path, 1).items()))
    assert main(["upload", path, "--url", colors_server.ws_url, "--task", "colors",
                 "--options", '{"colors": 2}', "--base64"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok    {path}  {color} 100%")
    # --top-k is classify's option: the colors task refuses it, and the line says why.
    assert main(["upload", path, "--url", colors_server.ws_url, "--top-k", "3"]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"FAIL  {path}  bad_message: ")
    assert "top_k" in out


def test_a_bad_options_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["upload", "x.png", "--options", "[1, 2]"])
    assert exited.value.code == 2
    assert "JSON object" in capsys.readouterr().err


def test_upload_with_a_token(server_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    server = server_factory(api_tokens=("s3cret",))
    path = next(iter(image_dir(tmp_path, 1)))
    assert main(["upload", path, "--url", server.ws_url, "--json"]) == 1
    assert json_lines(capsys.readouterr().out)[0]["code"] == "unauthorized"
    assert main(["upload", path, "--url", server.ws_url, "--token", "s3cret", "--json"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("PIXELSTREAM_TOKEN", "s3cret")
    monkeypatch.setenv("PIXELSTREAM_URL", server.ws_url)
    assert main(["upload", path, "--json"]) == 0
    assert json_lines(capsys.readouterr().out)[0]["cached"] is True


def test_on_a_terminal_each_file_gets_a_live_progress_line(colors_server, tmp_path: Path
                                                           ) -> None:
    expected = image_dir(tmp_path, 2, pad=700_000)
    args = build_parser().parse_args(["upload", str(tmp_path), "--url", colors_server.ws_url])
    out, err = io.StringIO(), Terminal()
    assert run_client_command(args, out=out, err=err) == 0
    drawn = err.getvalue()
    assert "\x1b[J" in drawn  # the board redraws in place
    assert "\x1b[2F" in drawn or "\x1b[1F" in drawn
    for path in expected:
        assert Path(path).name in drawn  # (long paths are shortened from the left)
    assert f"[{'#' * ProgressBoard.BAR}]" in drawn  # a full bar: every byte acknowledged
    assert "queued #1" in drawn or "decoding" in drawn or "inference" in drawn
    assert sorted(line.split()[1] for line in out.getvalue().splitlines()) == sorted(expected)
    assert "\x1b" not in out.getvalue()  # results stay clean


def test_the_progress_board_renders_sent_acknowledged_and_stages() -> None:
    board = ProgressBoard(Terminal())
    board.add("a.jpg", 0)
    board.progress("a.jpg", sent=600, acked=300, total=1200)
    line = board.render("a.jpg")
    assert "[" + "#" * 6 + "-" * 6 + "." * 12 + "]" in line
    assert " 25%" in line
    board.stage("a.jpg", "queued", {"position": 3})
    assert board.render("a.jpg").endswith("queued #3")
    board.stage("a.jpg", "retrying", {"delay": 1.0, "code": "stalled"})
    assert board.render("a.jpg").endswith("retrying in 1 s (stalled)")
    board.stage("a.jpg", "inference", {"done": 12, "total": 48})
    assert board.render("a.jpg").endswith("inference 12/48 tiles")


def test_summaries_of_each_task() -> None:
    assert summarize({"labels": [{"label": "cat", "score": 0.912}, {"label": "dog",
                                                                    "score": 0.05}]}) == (
        "cat 0.91, dog 0.05")
    assert summarize({"colors": [{"hex": "#ff0000", "fraction": 0.75}]}) == "#ff0000 75%"
    assert summarize({"other": "x" * 200}).endswith("...")
    box = [1.0, 2.0, 30.0, 40.0]
    assert summarize({"objects": [{"label": "car", "score": 0.9, "box": box},
                                  {"label": "person", "score": 0.714, "box": box}]}) == (
        "2 objects: car 0.90, person 0.71")
    assert summarize({"objects": []}) == "0 objects"
    assert summarize({"faces": [{"score": 0.98, "box": box}]}) == "1 face (0.98)"
    assert summarize({"codes": [{"format": "QR_CODE", "text": "https://example.com/a",
                                 "box": box}]}) == "1 code: QR_CODE 'https://example.com/a'"
    assert summarize({"text": "PART 4711\nlot 7", "lines": [
        {"text": "PART 4711", "score": 0.99, "box": box},
        {"text": "lot 7", "score": 0.97, "box": box}]}) == "2 lines: 'PART 4711 lot 7'"
    assert summarize({"caption": "a cat\non a mat"}) == "'a cat on a mat'"
    assert summarize({"embedding": [0.1] * 512}) == "embedding of 512 values"
    assert summarize({"nsfw": 0.0213}) == "nsfw 0.02"
    long = summarize({"text": "word " * 100, "lines": [{"text": "word", "box": box}] * 100})
    assert len(long) == 100
    assert long.startswith("100 lines: 'word word")


# analyze ------------------------------------------------------------------------------------


@pytest.mark.parametrize("http", [False, True], ids=["websocket", "http"])
def test_analyze_prints_one_json_line(colors_server, tmp_path: Path, http: bool,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path, color = next(iter(image_dir(tmp_path, 1).items()))
    url = colors_server.http_url if http else colors_server.ws_url
    extra = ["--http"] if http else []
    assert main(["analyze", path, "--url", url, *extra]) == 0
    (line,) = json_lines(capsys.readouterr().out)
    assert line["ok"] is True
    assert line["result"]["colors"][0]["hex"] == color
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope" * 100)
    assert main(["analyze", str(bad), "--url", url, *extra]) == 1
    (line,) = json_lines(capsys.readouterr().out)
    assert (line["ok"], line["code"]) == (False, "invalid_image")


# camera -------------------------------------------------------------------------------------


def test_camera_streams_a_video_file_as_json_then_a_summary(colors_server, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    colors = distinct_colors(20)
    video = write_video(tmp_path / "clip.avi", colors)
    code = main(["camera", "--source", str(video), "--fps", "0", "--json",
                 "--url", colors_server.ws_url])
    captured = capsys.readouterr()
    assert code == 0, captured
    lines = json_lines(captured.out)
    summary = lines[-1]
    events = lines[:-1]
    assert summary["type"] == "summary"
    assert summary["frames_sent"] == len(colors) == len(events)
    assert sorted(e["seq"] for e in events) == list(range(len(colors)))
    results = [e for e in events if e["type"] == "result"]
    dropped = [e for e in events if e["type"] == "dropped"]
    assert (summary["results"], summary["dropped"]) == (len(results), len(dropped))
    assert summary["results"] + summary["dropped"] == len(colors)
    assert results[-1]["seq"] == len(colors) - 1  # the latest frame is always analysed
    assert all(e["latency_ms"] > 0 for e in results)
    assert set(summary["latency_ms"]) == {"p50", "p90", "p99", "max"}


def test_camera_human_output_and_max_frames(colors_server, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    video = write_video(tmp_path / "clip.avi", distinct_colors(10))
    code = main(["camera", "--source", str(video), "--fps", "100", "--max-frames", "3",
                 "--url", colors_server.ws_url])
    out = capsys.readouterr().out
    assert code == 0
    assert "frames sent 3," in out
    assert "latency ms: p50" in out
    assert "fps" in out.splitlines()[0]


def test_camera_with_a_source_that_cannot_open(colors_server, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["camera", "--source", str(tmp_path / "none.avi"), "--url",
                 colors_server.ws_url])
    captured = capsys.readouterr()
    assert code == 1
    assert "error: os_error: cannot open video source" in captured.err


def test_camera_with_an_unknown_task_fails_with_its_code(colors_server, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    video = write_video(tmp_path / "clip.avi", distinct_colors(3))
    code = main(["camera", "--source", str(video), "--task", "nope", "--json",
                 "--url", colors_server.ws_url])
    lines = json_lines(capsys.readouterr().out)
    assert code == 1
    assert {"type": "error", "code": "unknown_task"}.items() <= lines[-2].items()
    assert lines[-1]["type"] == "summary"


# The installed command ------------------------------------------------------------------------


def test_the_installed_upload_command(colors_server, tmp_path: Path) -> None:
    expected = image_dir(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 3000)
    done = subprocess.run(
        [str(PIXELSTREAM), "upload", str(tmp_path / "imgs"), "--json",
         "--url", colors_server.ws_url],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 1, done.stderr
    by_file = {line["file"]: line for line in json_lines(done.stdout)}
    assert len(by_file) == 4
    for path, color in expected.items():
        assert by_file[path]["result"]["colors"][0]["hex"] == color
    assert by_file[str(tmp_path / "imgs" / "corrupt.jpg")]["code"] == "invalid_image"
    assert "4 files: 3 ok, 1 failed (invalid_image: 1)" in done.stderr


async def test_the_installed_camera_command_stops_cleanly_on_ctrl_c(colors_server, tmp_path: Path
                                                                    ) -> None:
    video = write_video(tmp_path / "long.avi", distinct_colors(40) * 5)
    process = await asyncio.create_subprocess_exec(
        str(PIXELSTREAM), "camera", "--source", str(video), "--fps", "10", "--json",
        "--url", colors_server.ws_url,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(WAIT_S * 2):
            first = orjson.loads(await process.stdout.readline())
            while first["type"] != "result":
                first = orjson.loads(await process.stdout.readline())
            process.send_signal(signal.SIGINT)
            rest, errors = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, errors
    summary = json_lines(rest.decode())[-1]
    assert summary["type"] == "summary"
    assert summary["results"] >= 1
    assert summary["frames_sent"] < 200
    assert b"Traceback" not in errors


def test_the_client_command_has_the_client_commands_only(
    capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        client_main(["--help"])
    assert exited.value.code == 0
    usage = capsys.readouterr().out
    assert usage.startswith("usage: pixelstream-client")
    assert "{upload,camera,analyze}" in usage
    with pytest.raises(SystemExit):
        client_main(["serve"])


def test_the_clients_pixelstream_runs_the_servers_command_where_it_is_installed(
    capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        pixelstream_main(["serve", "--help"])
    assert exited.value.code == 0
    assert "--max-chunk-bytes" in capsys.readouterr().out  # the server's own flags
