"""``pixelstream finetune`` as a command: one-line errors, and a folder the server serves."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest

from server.app import registry_for
from server.cli import main
from server.settings import Settings
from server.tasks.registry import Registry
from tests.conftest import start_server
from tests.server.finetune.conftest import COLOURS, calibrated_mobilenet, noisy, write_set


@pytest.mark.parametrize(("layout", "problem"), [
    ({}, "is empty"),
    ({"red": 5}, "has a single class (red)"),
    ({"red": 5, "blue": 1}, "class 'blue' has 1 images"),
])
def test_data_that_cannot_train_stops_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: dict[str, int],
        problem: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_set(data, layout)
    assert main(["finetune", str(data), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert problem in err
    assert err.count("\n") == 1
    assert not (tmp_path / "out" / "config.json").exists()


def test_too_many_unreadable_files_stop_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_set(tmp_path / "data", {"red": 4, "blue": 4})
    for i in range(4):
        (data / "blue" / f"bad{i}.png").write_text("not an image")
    base = calibrated_mobilenet(tmp_path / "base", ["x", "y"])
    code = main(["finetune", str(data), "--out", str(tmp_path / "out"), "--base", str(base),
                 "--no-progress"])
    assert code == 2
    lines = capsys.readouterr().err.splitlines()
    assert sum(line.startswith("warning: skipped ") for line in lines) == 3  # the limit is 2
    assert lines[-1].startswith("error: 3 of 12 files")


def test_a_finetuned_folder_is_served_with_its_labels_and_revision(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_set(tmp_path / "data", {"red": 6, "green": 6, "blue": 6})
    (data / "red" / "readme.txt").write_text("skipped, named, counted")
    base = calibrated_mobilenet(tmp_path / "base", ["x", "y", "z"])
    out = tmp_path / "colours"
    code = main(["finetune", str(data), "--out", str(out), "--base", str(base), "--epochs",
                 "3", "--lr", "0.01", "--batch-size", "8", "--seed", "1", "--no-progress"])
    assert code == 0
    err = capsys.readouterr().err
    assert f"warning: skipped {data / 'red' / 'readme.txt'}" in err
    assert "skipped 1 unreadable file(s)" in err
    revision = err.strip().splitlines()[-1].split(" revision ")[1].split(" ")[0]

    tasks = tmp_path / "tasks.toml"
    tasks.write_text(f'[tasks.colours]\nkind = "image-classification"\nmodel = "{out}"\n')
    settings = Settings(port=0, workers=1, model=str(out), tasks=tasks, max_wait_ms=1.0)
    # What `serve` offers for these settings, less the other built-ins (they load slowly).
    offered = registry_for(settings)
    server = start_server(settings, tasks=Registry(
        [offered.entry("classify"), offered.entry("colours")]))
    try:
        image = io.BytesIO()
        noisy(COLOURS["green"], np.random.default_rng(3)).save(image, "PNG")
        described = httpx.get(server.http_url + "/v1/tasks", timeout=30).json()["tasks"]
        for name in ("classify", "colours"):
            entry = next(t for t in described if t["name"] == name)
            assert (entry["model"], entry["revision"]) == ("colours", revision)
            answer = httpx.post(server.http_url + "/v1/analyze", timeout=60,
                                data={"task": name},
                                files={"file": ("x.png", image.getvalue(), "image/png")})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["model"] == "colours"
            labels = [item["label"] for item in body["result"]["labels"]]
            assert sorted(labels) == ["blue", "green", "red"]
    finally:
        server.stop()
