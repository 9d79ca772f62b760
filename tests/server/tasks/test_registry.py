"""server.tasks.registry: built-ins, entry points, tasks files, and refusing bad ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.tasks.builtin.colors import Colors
from server.tasks.hf import ImageClassification
from server.tasks.registry import (
    Registry,
    Serving,
    TaskEntry,
    TasksFileError,
    load_registry,
    read_tasks_file,
    verify_setup,
)
from tests.support.sample_tasks import MeanBrightness, Spots
from tests.support.tiny_models import tiny_vit

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_vit(tmp_path_factory.mktemp("models") / "tiny-vit", labels=["a", "b"])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tasks.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_built_ins_are_offered_without_a_file() -> None:
    registry = load_registry()
    assert registry.names == ["classify", "colors", "ocr", "codes", "faces", "moderate"]
    assert registry.default == "classify"
    assert isinstance(registry.get("classify"), ImageClassification)
    assert isinstance(registry.get("colors"), Colors)
    assert registry.get("nothing") is None


def test_a_file_adds_tasks_and_a_name_in_it_replaces_a_built_in(tmp_path: Path,
                                                                 vit_folder: Path) -> None:
    path = write(tmp_path, f"""
[tasks.classify]
kind = "image-classification"
model = "{vit_folder}"
max_batch_size = 8
max_wait_ms = 2.5
device = "cpu"
workers = 2

[tasks.mean]
kind = "python"
entry = "tests.support.sample_tasks:MeanBrightness"
args = {{ gain = 2.0 }}
""")
    registry = load_registry(path)
    assert registry.names == ["classify", "colors", "ocr", "codes", "faces", "moderate", "mean"]
    classify = registry.get("classify")
    assert isinstance(classify, ImageClassification)
    assert classify.model.id == "tiny-vit"
    assert classify.name == "classify"
    assert registry.entry("classify").serving == Serving(max_batch_size=8, max_wait_ms=2.5,
                                                         device="cpu", workers=2)
    assert registry.entry("classify").origin == "tasks file"
    mean = registry.get("mean")
    assert isinstance(mean, MeanBrightness)
    assert mean.gain == 2.0
    assert registry.entry("mean").serving == Serving()
    assert registry.default == "classify"


def test_describe_publishes_each_tasks_schemas(tmp_path: Path) -> None:
    path = write(tmp_path, """
[tasks.mean]
kind = "python"
entry = "tests.support.sample_tasks:MeanBrightness"
""")
    described = {d["name"]: d for d in load_registry(path).describe()}
    mean = described["mean"]
    assert mean["kind"] == "python"
    assert mean["model"] == "tests/mean-brightness"
    assert mean["revision"] == "gain-1.0"
    assert mean["options"]["properties"]["digits"]["maximum"] == 6
    assert mean["options"]["additionalProperties"] is False
    assert mean["result"] == {"type": "object"}
    classify = described["classify"]
    assert classify["kind"] == "image-classification"
    assert classify["options"]["properties"]["top_k"]["default"] == 5
    assert classify["result"]["properties"]["labels"]["type"] == "array"
    colors = described["colors"]
    assert colors["options"]["properties"]["colors"]["maximum"] == 16
    assert not colors["spatial"]


BAD_FILES = [
    ('[tasks.x]\nkind = "segmentation"\nmodel = "/m"', "x", "unknown kind 'segmentation'"),
    ("[tasks.x]\nmodel = \"/m\"", "x", "needs kind"),
    ('[tasks.x]\nkind = "image-classification"\nmodel = "/no/such/folder"', "x",
     "does not exist"),
    ('[tasks.x]\nkind = "image-classification"', "x", "needs model"),
    ('[tasks.x]\nkind = "image-classification"\nmodel = "{empty}"', "x", "no readable config.json"),
    ('[tasks.x]\nkind = "python"\nentry = "no_such_module:Task"', "x", "does not import"),
    ('[tasks.x]\nkind = "python"\nentry = "tests.support.sample_tasks:Missing"', "x",
     "does not import"),
    ('[tasks.x]\nkind = "python"\nentry = "tests.support.sample_tasks"', "x", "not 'module:Class'"),
    ('[tasks.x]\nkind = "python"\nentry = "tests.support.sample_tasks:NoPredict"', "x",
     "does not follow the task contract: no predict() method"),
    ('[tasks.x]\nkind = "python"\nentry = "tests.support.sample_tasks:MeanBrightness"\n'
     'args = { speed = 3 }', "x", "could not be created"),
    ('[tasks.x]\nkind = "python"\nentry = "tests.support.sample_tasks:MeanBrightness"\n'
     'max_batch_size = 0', "x", "max_batch_size must be an integer of at least 1"),
    ('[tasks.x]\nkind = "python"\nentry = "tests.support.sample_tasks:MeanBrightness"\n'
     'device = "tpu"', "x", "device must be auto, cpu, cuda or cuda:N"),
    ('[tasks.x]\nkind = "python"\nentry = "tests.support.sample_tasks:MeanBrightness"\n'
     'max_wait_ms = -1', "x", "max_wait_ms"),
    ('[tasks.x]\nkind = "python"\nentry = "tests.support.sample_tasks:MeanBrightness"\n'
     'colour = "red"', "x", "unknown key(s) colour"),
    ('[tasks."bad name"]\nkind = "python"', "bad name", "a task name is"),
    ("[tasks.x]\nkind = ", None, "not valid TOML"),
    ("[models.x]\nkind = \"python\"", None, "unknown table(s) models"),
    ("", None, "no [tasks.NAME] table"),
]


@pytest.mark.parametrize(("text", "task", "message"), BAD_FILES)
def test_a_bad_file_is_one_line_naming_the_task(tmp_path: Path, text: str, task: str | None,
                                                message: str) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    path = write(tmp_path, text.replace("{empty}", str(empty)))
    with pytest.raises(TasksFileError) as caught:
        read_tasks_file(path)
    line = str(caught.value)
    assert "\n" not in line
    assert message in line
    assert str(path) in line
    if task is not None:
        assert f"task {task!r}" in line


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TasksFileError, match="cannot be read"):
        read_tasks_file(tmp_path / "nope.toml")


def test_a_folder_that_does_not_load_is_found_before_serving(tmp_path: Path,
                                                            vit_folder: Path) -> None:
    broken = tmp_path / "broken-vit"
    broken.mkdir()
    for item in vit_folder.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)  # truncated weights
    path = write(tmp_path, f'[tasks.pets]\nkind = "image-classification"\nmodel = "{broken}"')
    registry = load_registry(path)  # cheap checks pass: the folder and its config are there
    with pytest.raises(TasksFileError) as caught:
        verify_setup(registry, "cpu")
    line = str(caught.value)
    assert line.startswith("task 'pets': model folder ")
    assert "does not load" in line
    assert "\n" not in line


def test_verify_setup_reports_a_python_task_whose_setup_fails(tmp_path: Path) -> None:
    path = write(tmp_path, '[tasks.m]\nkind = "python"\n'
                           'entry = "tests.support.sample_tasks:FailsSetup"')
    with pytest.raises(TasksFileError, match=r"task 'm': setup\(\) failed: OSError: weights"):
        verify_setup(load_registry(path), "cpu")


def test_verify_setup_passes_good_tasks(tmp_path: Path, vit_folder: Path) -> None:
    path = write(tmp_path, f'[tasks.pets]\nkind = "image-classification"\nmodel = "{vit_folder}"'
                           '\n[tasks.m]\nkind = "python"\n'
                           'entry = "tests.support.sample_tasks:MeanBrightness"')
    verify_setup(load_registry(path), "cpu")


def test_entry_points_add_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed package's ``pixelstream.tasks`` entry point, found through its metadata."""
    dist = tmp_path / "pixelstream_mean-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pixelstream-mean\n"
                                   "Version: 1.0\n", encoding="utf-8")
    (dist / "entry_points.txt").write_text(
        "[pixelstream.tasks]\nbrightness = tests.support.sample_tasks:MeanBrightness\n",
        encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = load_registry()
    assert "brightness" in registry
    task = registry.get("brightness")
    assert isinstance(task, MeanBrightness)
    assert task.name == "brightness"
    assert registry.entry("brightness").origin == "entry point of pixelstream-mean"


def test_an_entry_point_that_does_not_import_is_refused(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "pixelstream_bad-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pixelstream-bad\n"
                                   "Version: 1.0\n", encoding="utf-8")
    (dist / "entry_points.txt").write_text("[pixelstream.tasks]\nbad = nowhere.at_all:Task\n",
                                           encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TasksFileError, match=r"task 'bad': entry point 'bad'.*does not import"):
        load_registry()


def test_a_registry_needs_tasks_and_a_known_default() -> None:
    with pytest.raises(ValueError, match="at least one task"):
        Registry([])
    assert Registry([Colors(), MeanBrightness()]).default == "colors"  # no classify: the first
    with pytest.raises(ValueError, match="default task"):
        Registry([Colors()], default="mean")


def test_only_keeps_the_named_tasks_with_their_serving_in_order() -> None:
    registry = Registry([TaskEntry(Colors(), Serving(workers=1)), MeanBrightness(),
                         TaskEntry(Spots(), Serving(device="cpu"))], default="mean")
    chosen = registry.only(["spots", "colors", "spots"])
    assert chosen.names == ["colors", "spots"]
    assert chosen.entry("colors").serving.workers == 1
    assert chosen.entry("spots").serving.device == "cpu"
    assert chosen.default == "colors"  # the default is not among them: the first
    assert registry.only(["mean"]).default == "mean"
    with pytest.raises(ValueError, match=r"^no task is named 'nope' \(the tasks: colors, mean, "
                                         r"spots\)$"):
        registry.only(["mean", "nope"])


def test_serve_stops_before_listening_on_a_bad_tasks_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[tasks.detect]\nkind = "image-classification"\nmodel = "/no/such/x"')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--tasks", str(path), "--port", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "task 'detect'" in lines[0]
    assert "/no/such/x does not exist" in lines[0]
    assert "Uvicorn running" not in result.stderr + result.stdout


def test_a_cuda_device_that_is_not_there_is_refused_before_serving() -> None:
    """Whichever task asks for it, built-in or not: one line naming the task, not a worker's
    traceback after the server listens."""
    registry = load_registry(builtins=[Colors()])
    with pytest.raises(TasksFileError) as caught:
        verify_setup(registry, "cuda:99")
    line = str(caught.value)
    assert line.startswith("task 'colors': device cuda:99 was asked for, but torch sees ")
    assert "\n" not in line


def test_a_tasks_device_that_is_not_there_names_the_device(tmp_path: Path) -> None:
    path = write(tmp_path, '[tasks.m]\nkind = "python"\ndevice = "cuda:99"\n'
                           'entry = "tests.support.sample_tasks:MeanBrightness"')
    with pytest.raises(TasksFileError, match=r"^task 'm': device cuda:99 was asked for"):
        verify_setup(load_registry(path, builtins=[Colors()]), "cpu")


def test_a_folder_of_another_kind_is_one_line_and_nothing_else(
        tmp_path: Path, vit_folder: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Loading a classifier's folder as a CLIP makes transformers print a load report; the
    check's process keeps it to itself, so that ``serve`` says one line."""
    path = write(tmp_path, f'[tasks.z]\nkind = "zero-shot-image-classification"\n'
                           f'model = "{vit_folder}"')
    with pytest.raises(TasksFileError, match=r"^task 'z': model folder .* does not load"):
        verify_setup(load_registry(path, builtins=[Colors()]), "cpu")
    printed = capfd.readouterr()
    assert printed.out == ""
    assert printed.err == ""
