"""The base of the built-in tasks over engines: built lazily in a worker, never pickled."""

from __future__ import annotations

import pickle

import pytest

from server.tasks.builtin.codes import Codes
from server.tasks.builtin.engine_task import EngineTask
from server.vision import package_version


class Counting(EngineTask[list[str]]):
    name = "counting"
    model_id = "tests/counting"
    distribution = "pytest"
    built = 0

    def make_engine(self) -> list[str]:
        type(self).built += 1
        return ["engine"]


def test_the_engine_is_built_on_first_use_once_and_not_before_setup() -> None:
    task = Counting()
    with pytest.raises(RuntimeError, match="setup"):
        task.engine()
    task.setup("cpu")
    assert Counting.built == 0  # setup only prepares: a worker may never run this task
    first = task.engine()
    assert task.engine() is first
    assert Counting.built == 1


def test_the_model_names_the_package_and_its_version_as_revision() -> None:
    model = Counting().model
    assert model.id == "tests/counting"
    assert model.revision == package_version("pytest") != ""


def test_a_set_up_task_pickles_without_its_engine() -> None:
    """Workers load their own engines: a task set up in one process travels without it."""
    task = Codes()
    task.setup("cpu")
    copy = pickle.loads(pickle.dumps(task))
    assert copy._engine is None
    assert task._engine is not None
