"""The README's task examples run as written: the five-line tasks file serves a model folder,
and the Python task it shows follows the contract and answers."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import re
import shlex
import sys
from pathlib import Path

import pytest
from PIL import Image

from server.cli import build_parser
from server.tasks.builtin.colors import Colors
from server.tasks.contract import View, parse_options, validate_options
from server.tasks.hf_detect import ObjectDetection
from server.tasks.registry import load_registry, read_tasks_file, verify_setup
from tests.support.tiny_models import tiny_detr

ROOT = Path(__file__).resolve().parents[1]


def section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n### {title}\n")
    ends = [text.find(mark, start + 1) for mark in ("\n## ", "\n### ")]
    return text[start:min([end for end in ends if end != -1] or [len(text)])]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def test_serve_your_own_model_in_five_lines(tmp_path: Path) -> None:
    text = section("Serve your own model in five lines")
    [toml] = blocks(text, "toml")
    [shell] = blocks(text, "sh")
    serve = [line for line in shell.splitlines() if line.startswith("pixelstream serve")]
    assert len(toml.strip().splitlines()) + len(serve) == 5
    folder = tiny_detr(tmp_path / "my-detector", labels=["screw", "bolt"])
    path = tmp_path / "tasks.toml"
    path.write_text(toml.replace('"/models/my-detector"', f'"{folder}"'), encoding="utf-8")
    assert str(folder) in path.read_text(encoding="utf-8")
    [entry] = read_tasks_file(path)
    assert isinstance(entry.task, ObjectDetection)
    assert entry.task.name == "detect"
    verify_setup(load_registry(path, builtins=[Colors()]), "cpu")
    for line in shell.splitlines():  # every command is one the CLI accepts
        args = build_parser().parse_args(shlex.split(line)[1:])
        if args.command == "serve":
            assert Path(args.tasks).name == "tasks.toml"


def test_the_python_task_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = section("The tasks file")
    [code] = blocks(text, "python")
    assert code.startswith("# mytasks.py\n")
    (tmp_path / "mytasks.py").write_text(code, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mytasks", raising=False)
    tables = [block for block in blocks(text, "toml") if "mytasks:" in block]
    assert len(tables) == 1
    path = tmp_path / "tasks.toml"
    path.write_text(tables[0], encoding="utf-8")
    [entry] = read_tasks_file(path)
    task = entry.task
    assert task.name == "brightness"
    task.setup("cpu")
    options = parse_options(task, validate_options(task, {}))
    images = [Image.new("RGB", (80, 60), "white"), Image.new("RGB", (80, 60), (51, 51, 51))]
    views = [View.whole(image, image.size) for image in images]
    outputs = task.predict([task.preprocess(view, options) for view in views])
    assert [task.encode(output, view, options) for output, view in zip(outputs, views,
                                                                       strict=True)] == [
        {"brightness": 1.0}, {"brightness": 0.2}]
