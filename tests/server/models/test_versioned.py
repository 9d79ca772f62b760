from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from PIL import Image

from server.models.store import ModelVersions
from server.models.versioned import VersionedClassification
from server.tasks.contract import OptionsError, View, parse_options, validate_options


def ask(task: VersionedClassification, revisions: list[str]) -> list[dict[str, object]]:
    """One batch, one image per revision given, through the worker hooks."""
    image = Image.new("RGB", (80, 80), "orange")
    view = View.whole(image, image.size)
    parsed = [parse_options(task, {**validate_options(task, {}), "revision": r})
              for r in revisions]
    items = [task.preprocess(view, options) for options in parsed]
    outputs = task.predict(items)
    return [task.encode(o, view, p) for o, p in zip(outputs, parsed, strict=True)]


def test_the_gateway_stamps_its_revision_and_clients_cannot(
        versions: tuple[ModelVersions, str, str]) -> None:
    store, first, second = versions
    task = VersionedClassification(str(store.folder), name="shapes")
    assert task.model.revision == first
    assert task.model.id == "shapes"  # recorded when added: the model's name in the folder
    assert task.resolve_options(validate_options(task, {})) == {"top_k": 2, "revision": first}
    with pytest.raises(OptionsError, match="is set by the server"):
        task.resolve_options(validate_options(task, {"revision": second}))
    task.switch(second[:10])
    assert task.model.revision == second
    assert task.resolve_options(validate_options(task, {}))["revision"] == second


def test_a_worker_answers_each_job_with_its_revision_and_frees_the_old_one(
        versions: tuple[ModelVersions, str, str]) -> None:
    store, first, second = versions
    gateway = VersionedClassification(str(store.folder), name="shapes")
    worker: VersionedClassification = pickle.loads(pickle.dumps(gateway))
    worker.setup("cpu")
    assert worker.loaded == {first}
    # during a switch a batch may hold both; each answers with its own labels
    mixed = ask(worker, [first, second])
    assert {x["label"] for x in mixed[0]["labels"]} == {"a1", "a2"}
    assert {x["label"] for x in mixed[1]["labels"]} == {"b1", "b2"}
    assert worker.loaded == {first, second}  # the folder still says first: both kept
    ask(worker, [second])
    assert worker.loaded == {first, second}
    store.activate(second)  # the switch is made
    ask(worker, [second])
    assert worker.loaded == {second}  # the old one is unloaded after a batch of the new
    late = ask(worker, [first])  # a retried old job still gets its answer
    assert {x["label"] for x in late[0]["labels"]} == {"a1", "a2"}
    ask(worker, [second])
    assert worker.loaded == {second}


def test_a_tasks_file_or_model_flag_naming_a_versions_folder_follows_it(
        versions: tuple[ModelVersions, str, str], tmp_path: Path) -> None:
    from server.tasks.builtin import builtin_tasks
    from server.tasks.registry import TasksFileError, read_tasks_file

    store, first, second = versions
    tasks = tmp_path / "tasks.toml"
    tasks.write_text(f'[tasks.shapes]\nkind = "image-classification"\nmodel = "{store.folder}"\n')
    (entry,) = read_tasks_file(tasks)
    assert isinstance(entry.task, VersionedClassification)
    assert entry.task.model.revision == first
    classify = builtin_tasks(str(store.folder))[0]
    assert isinstance(classify, VersionedClassification)
    assert classify.name == "classify"
    # a revision folder itself is an ordinary model folder: pinned
    pinned = builtin_tasks(str(store.folder / second))[0]
    assert not isinstance(pinned, VersionedClassification)
    assert pinned.model.revision == second  # recorded in its marker when it was added
    assert pinned.model.id == "shapes"
    (store.folder / "ACTIVE").write_text("0123456789abcdef\n")
    with pytest.raises(TasksFileError, match="has no revision 0123456789abcdef"):
        read_tasks_file(tasks)
