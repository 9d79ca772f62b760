"""The registry: every task a server offers, found in one place.

Tasks come from three sources, later ones replacing earlier ones of the same name:

1. the built-ins (:func:`server.tasks.builtin.builtin_tasks`), offered without any file;
2. the ``pixelstream.tasks`` entry-point group: an installed package adds a task by naming a
   :class:`~server.tasks.contract.Task` subclass (or instance, or factory) there; the entry
   point's name is the task's name;
3. a tasks file (``pixelstream serve --tasks FILE.toml``, ``PIXELSTREAM_TASKS``)::

       [tasks.detect]
       kind = "object-detection"        # a Hugging Face pipeline task name, or "python"
       model = "/models/my-detector"    # a local folder that from_pretrained loads offline
       max_batch_size = 4               # optional, per task; so are max_wait_ms, device, workers
       [tasks.mine]
       kind = "python"
       entry = "mypackage.tasks:MyTask" # any importable class following the contract
       args = { threshold = 0.3 }       # optional keyword arguments for the class

A file that cannot be served raises :class:`TasksFileError` with one line naming the task.
:func:`load_registry` reads and checks everything that is cheap to check (kinds, folders,
imports, the contract) without loading weights; :func:`verify_setup` then loads each task
that does not ship with pixelstream once, in a short-lived process, so that a folder that does
not load stops ``serve`` before it listens.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.tasks.contract import Task, check_contract, json_schemas
from server.tasks.hf import HFTask, ModelFolderError
from server.tasks.hf_kinds import KINDS

log = logging.getLogger("pixelstream.tasks")

ENTRY_POINT_GROUP = "pixelstream.tasks"
DEFAULT_TASK = "classify"
PYTHON_KIND = "python"
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_SERVING_KEYS = ("max_batch_size", "max_wait_ms", "device", "workers")
_TABLE_KEYS = frozenset({"kind", "model", "entry", "args", *_SERVING_KEYS})


class TasksFileError(ValueError):
    """A tasks file (or an installed task) that cannot be served; the message is one line."""


def check_device(device: str, what: str = "device") -> str:
    if not isinstance(device, str) or not DEVICE.match(device):
        raise ValueError(f"{what} must be auto, cpu, cuda or cuda:N, not {device!r}")
    return device


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` where torch sees a GPU, else ``cpu`` (call in a worker: it imports
    torch for ``auto`` and ``cuda``)."""
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {device} was asked for, but torch sees no CUDA device "
                           "(use --device auto or cpu)")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"device {device} was asked for, but torch sees "
                           f"{torch.cuda.device_count()} CUDA device(s)")
    return device


@dataclass(frozen=True)
class Serving:
    """How a task is served; None: the server's setting of the same name."""

    max_batch_size: int | None = None
    max_wait_ms: float | None = None
    device: str | None = None
    workers: int | None = None
    """Worker processes that load this task (None: every worker)."""


@dataclass(frozen=True)
class TaskEntry:
    task: Task
    serving: Serving = field(default_factory=Serving)
    origin: str = "built-in"
    """Where the task came from, for messages: built-in, an entry point, a tasks file."""


class Registry:
    """The offered tasks by name, in order; ``default`` answers messages that name none."""

    def __init__(self, entries: Iterable[TaskEntry | Task], default: str | None = None) -> None:
        self._entries: dict[str, TaskEntry] = {}
        for item in entries:
            entry = item if isinstance(item, TaskEntry) else TaskEntry(item)
            self._entries[entry.task.name] = entry
        if not self._entries:
            raise ValueError("a server needs at least one task")
        if default is None:
            default = DEFAULT_TASK if DEFAULT_TASK in self._entries else next(iter(self._entries))
        if default not in self._entries:
            raise ValueError(f"default task {default!r} is not among {sorted(self._entries)}")
        self.default = default
        self._described: list[dict[str, Any]] | None = None

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    @property
    def entries(self) -> list[TaskEntry]:
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> Task | None:
        entry = self._entries.get(name)
        return entry.task if entry is not None else None

    def entry(self, name: str) -> TaskEntry:
        return self._entries[name]

    def only(self, names: Iterable[str]) -> Registry:
        """These tasks alone (with their tasks-file settings), in this registry's order.
        Raises ValueError, one line, naming one that is not offered."""
        chosen = list(dict.fromkeys(names))
        for name in chosen:
            if name not in self._entries:
                raise ValueError(f"no task is named {name!r} (the tasks: "
                                 f"{', '.join(self._entries)})")
        entries = [entry for name, entry in self._entries.items() if name in chosen]
        default = self.default if self.default in chosen else None
        return Registry(entries, default=default)

    def describe(self) -> list[dict[str, Any]]:
        """``GET /v1/tasks``: per task its name, kind, model, revision and the JSON Schemas
        of its options and its result."""
        if self._described is not None:
            return self._described
        described = []
        for entry in self._entries.values():
            task = entry.task
            options, result = json_schemas(task)
            info = task.model
            described.append({
                "name": task.name, "kind": task.kind, "model": info.id,
                "revision": info.revision, "options": options, "result": result,
                "spatial": task.tiling is not None,
            })
        self._described = described
        return described

    def changed(self) -> None:
        """A task's model changed (a revision switched): describe it afresh."""
        self._described = None


# Building tasks -----------------------------------------------------------------------------


def _import_entry(entry: str) -> Any:
    module_name, sep, attribute = entry.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"entry {entry!r} is not 'module:Class'")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except Exception as exc:
        raise ValueError(f"entry {entry!r} does not import: {type(exc).__name__}: {exc}") \
            from None
    return target


def _instantiate(target: Any, name: str, args: Mapping[str, Any], what: str) -> Task:
    """A class or factory → an instance (with ``args``); an instance is taken as it is."""
    if isinstance(target, type) or (callable(target) and not hasattr(target, "predict")):
        try:
            task = target(**args)
        except Exception as exc:
            raise ValueError(f"{what} could not be created: {type(exc).__name__}: {exc}") \
                from None
    elif args:
        raise ValueError(f"{what} is an instance: it takes no args")
    else:
        task = target
    try:
        task.name = name
    except AttributeError:
        raise ValueError(f"{what} does not let its name be set") from None
    problems = check_contract(task)
    if problems:
        raise ValueError(f"{what} does not follow the task contract: {'; '.join(problems)}")
    return task  # type: ignore[no-any-return]


def _serving(table: Mapping[str, Any]) -> Serving:
    values: dict[str, Any] = {}
    for key in ("max_batch_size", "workers"):
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an integer of at least 1, not {value!r}")
            values[key] = value
    if "max_wait_ms" in table:
        value = table["max_wait_ms"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ValueError(f"max_wait_ms must be a number of at least 0, not {value!r}")
        values["max_wait_ms"] = float(value)
    if "device" in table:
        values["device"] = check_device(table["device"])
    return Serving(**values)


def task_from_table(name: str, table: Mapping[str, Any]) -> TaskEntry:
    """One ``[tasks.NAME]`` table → its entry. Raises ValueError (the caller names the task)."""
    if not TASK_NAME.match(name):
        raise ValueError("a task name is 1-64 of A-Z a-z 0-9 . _ -, starting with a letter "
                         "or digit")
    unknown = sorted(set(table) - _TABLE_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(_TABLE_KEYS))}")
    kind = table.get("kind")
    if not isinstance(kind, str):
        raise ValueError(f"needs kind = one of {PYTHON_KIND}, {', '.join(KINDS)}")
    serving = _serving(table)
    args = table.get("args", {})
    if not isinstance(args, Mapping):
        raise ValueError("args must be a table")
    if kind == PYTHON_KIND:
        entry = table.get("entry")
        if not isinstance(entry, str):
            raise ValueError('kind "python" needs entry = "module:Class"')
        if "model" in table:
            raise ValueError('kind "python" takes no model (pass it in args)')
        task = _instantiate(_import_entry(entry), name, args, f"entry {entry!r}")
    elif kind in KINDS:
        model = table.get("model")
        if not isinstance(model, str) or not model:
            raise ValueError(f'kind "{kind}" needs model = "<a local model folder>"')
        if "entry" in table:
            raise ValueError(f'kind "{kind}" takes no entry')
        try:
            task = _hf_task(kind, model, name, args)
        except ModelFolderError as exc:
            raise ValueError(str(exc)) from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"args do not fit kind {kind!r}: {exc}") from None
    else:
        raise ValueError(f"unknown kind {kind!r}; known: {PYTHON_KIND}, {', '.join(KINDS)}")
    return TaskEntry(task, serving, origin="tasks file")


def _hf_task(kind: str, model: str, name: str, args: Mapping[str, Any]) -> Task:
    """A Hugging Face kind's task; a classifier over a folder of versions
    (``MODELS/<name>``, see :mod:`server.models.store`) follows its active revision."""
    from server.models.store import is_versions_folder

    if kind == "image-classification" and is_versions_folder(model):
        from server.models.versioned import VersionedClassification

        versioned = VersionedClassification(model, name=name, **args)
        versioned.check_folder()
        return versioned
    hf_task = KINDS[kind](model, name=name, **args)
    hf_task.check_folder()
    return hf_task


def read_tasks_file(path: Path) -> list[TaskEntry]:
    """Every task of a tasks file, checked (see the module's docstring)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise TasksFileError(f"tasks file {path}: cannot be read ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TasksFileError(f"tasks file {path}: not valid TOML ({exc})") from None
    extra = sorted(set(data) - {"tasks"})
    if extra:
        raise TasksFileError(f"tasks file {path}: unknown table(s) {', '.join(extra)}; "
                             "tasks go in [tasks.NAME] tables")
    tables = data.get("tasks", {})
    if not isinstance(tables, Mapping) or not tables:
        raise TasksFileError(f"tasks file {path}: no [tasks.NAME] table")
    entries = []
    for name, table in tables.items():
        if not isinstance(table, Mapping):
            raise TasksFileError(f"tasks file {path}: task {name!r}: must be a table")
        try:
            entries.append(task_from_table(name, table))
        except ValueError as exc:
            raise TasksFileError(f"tasks file {path}: task {name!r}: {exc}") from None
    return entries


def entry_point_tasks() -> list[TaskEntry]:
    """Tasks installed packages add through the ``pixelstream.tasks`` entry-point group."""
    entries = []
    for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        what = f"entry point {point.name!r} ({point.value})"
        try:
            target = point.load()
        except Exception as exc:
            raise TasksFileError(f"task {point.name!r}: {what} does not import: "
                                 f"{type(exc).__name__}: {exc}") from None
        try:
            task = _instantiate(target, point.name, {}, what)
        except ValueError as exc:
            raise TasksFileError(f"task {point.name!r}: {exc}") from None
        package = point.dist.name if point.dist is not None else "?"
        entries.append(TaskEntry(task, origin=f"entry point of {package}"))
    return entries


def load_registry(tasks_file: Path | None = None, *, classify_model: str | None = None,
                  builtins: Sequence[Task] | None = None) -> Registry:
    """Built-ins, then installed tasks, then the tasks file. Cheap: loads no weights."""
    from server.tasks.builtin import builtin_tasks

    found = [TaskEntry(task) for task in (builtins if builtins is not None
                                            else builtin_tasks(classify_model))]
    found += entry_point_tasks()
    if tasks_file is not None:
        found += read_tasks_file(tasks_file)
    return Registry(found)


# Trying the tasks once before serving ----------------------------------------------------------


def _try_setup(entries: Sequence[TaskEntry], device: str) -> str | None:
    """In a short-lived process: check every task's device, then set up each task that does
    not ship with pixelstream; the first failure as one line, and nothing else printed
    (libraries print warnings and load reports while they load a model)."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
    return _first_setup_problem(entries, device)


def _first_setup_problem(entries: Sequence[TaskEntry], device: str) -> str | None:
    devices: dict[str, str] = {}
    for entry in entries:
        try:
            devices[entry.task.name] = resolve_device(entry.serving.device or device)
        except RuntimeError as exc:
            return f"task {entry.task.name!r}: {exc}"
    for entry in entries:
        if entry.origin == "built-in":
            continue
        try:
            entry.task.setup(devices[entry.task.name])
        except Exception as exc:
            what = (f"model folder {entry.task.model_path} does not load"
                    if isinstance(entry.task, HFTask) else "setup() failed")
            detail = " ".join(str(exc).split())[:300]
            return f"task {entry.task.name!r}: {what}: {type(exc).__name__}: {detail}"
    return None


def _is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def verify_setup(registry: Registry, device: str) -> None:
    """Load every task that does not ship with pixelstream once, in a spawned process (the
    gateway never imports torch), so that a bad model stops ``serve`` before it listens; a
    CUDA device that is not there stops it too, whichever task asks for it.
    Raises :class:`TasksFileError`."""
    entries = [entry for entry in registry.entries
               if entry.origin != "built-in" or _is_cuda(entry.serving.device or device)]
    if not entries:
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as executor:
        problem = executor.submit(_try_setup, entries, device).result()
    if problem is not None:
        raise TasksFileError(problem)
