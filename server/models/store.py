"""A folder of model versions: ``MODELS/<name>/<revision>/``, one of them active.

::

    MODELS/
      textiles/
        3f9a0c1e2b4d5a6f/      a model folder (config.json, weights, processor, marker)
        8be21d07c4a9f310/
        ACTIVE                 the active revision, one line (replaced atomically)
        HISTORY                every activation, oldest first, one revision a line

A revision is a model folder's content hash (:func:`server.finetune.model.content_revision`,
recorded by ``pixelstream finetune``), so the same weights always get the same name. A server
given ``--model MODELS/textiles`` (or a tasks file naming it) serves the active revision and
follows a switch (:mod:`server.models.versioned`). The folder may be shared by many machines
(a network volume); every change is a rename, never a partial write.

Importing this module is cheap: no torch, no transformers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.pipeline.model_store import MARKER_NAME, folder_revision, read_marker

ACTIVE = "ACTIVE"
HISTORY = "HISTORY"
REVISION = re.compile(r"^[0-9a-f]{6,64}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class VersionError(ValueError):
    """A name, revision or folder that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Version:
    revision: str
    folder: Path
    active: bool
    model_id: str
    accuracy: float | None
    created: float
    """The folder's modification time (seconds since the epoch)."""


def is_versions_folder(path: str | Path | None) -> bool:
    """True for ``MODELS/<name>``: a folder with an ``ACTIVE`` file and no ``config.json``."""
    if path is None:
        return False
    folder = Path(path).expanduser()
    return (folder / ACTIVE).is_file() and not (folder / "config.json").exists()


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class ModelVersions:
    """The versions of one model: ``MODELS/<name>``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser().absolute()
        self.name = self.folder.name

    @classmethod
    def under(cls, root: str | Path, name: str) -> ModelVersions:
        if not NAME.match(name):
            raise VersionError(f"model name {name!r} is not 1-64 of A-Z a-z 0-9 . _ -")
        return cls(Path(root) / name)

    def revisions(self) -> list[str]:
        """Every revision folder, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir()
                 if p.is_dir() and REVISION.match(p.name) and (p / "config.json").is_file()]
        return [p.name for p in sorted(found, key=lambda p: (p.stat().st_mtime, p.name))]

    def active(self) -> str | None:
        """The active revision (None: none yet)."""
        try:
            text = (self.folder / ACTIVE).read_text(encoding="utf-8").strip()
        except OSError:
            return None
        return text or None

    def history(self) -> list[str]:
        try:
            lines = (self.folder / HISTORY).read_text(encoding="utf-8").split()
        except OSError:
            return []
        return [line for line in lines if REVISION.match(line)]

    def path(self, revision: str) -> Path:
        """The folder of ``revision`` (a unique prefix of at least 6 digits is enough)."""
        return self.folder / self.resolve(revision)

    def resolve(self, revision: str) -> str:
        if not REVISION.match(revision):
            raise VersionError(f"revision {revision!r} is not 6-64 hex digits")
        matches = [r for r in self.revisions() if r.startswith(revision)]
        if not matches:
            raise VersionError(f"model {self.name!r} has no revision {revision}")
        if len(matches) > 1:
            raise VersionError(f"revision {revision} of {self.name!r} is ambiguous: "
                               f"{', '.join(matches)}")
        return matches[0]

    def versions(self) -> list[Version]:
        active = self.active()
        versions = []
        for revision in self.revisions():
            folder = self.folder / revision
            marker = read_marker(folder) or {}
            try:
                metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                metrics = {}
            accuracy = metrics.get("accuracy") if isinstance(metrics, dict) else None
            versions.append(Version(
                revision=revision, folder=folder, active=revision == active,
                model_id=str(marker.get("model_id") or self.name),
                accuracy=accuracy if isinstance(accuracy, int | float) else None,
                created=folder.stat().st_mtime))
        return versions

    def activate(self, revision: str) -> str:
        """Make ``revision`` the active one (and record it); returns its full name."""
        full = self.resolve(revision)
        if self.active() != full:
            _write_atomically(self.folder / ACTIVE, full + "\n")
            history = [*self.history(), full]
            _write_atomically(self.folder / HISTORY, "\n".join(history[-100:]) + "\n")
        return full

    def _stack(self) -> list[str]:
        """The history without the revisions whose folders are gone."""
        available = set(self.revisions())
        return [revision for revision in self.history() if revision in available]

    def previous(self) -> str:
        """The revision :meth:`rollback` would activate: the one activated before the
        current one."""
        stack = self._stack()
        active = self.active()
        while stack and stack[-1] == active:
            stack.pop()
        if not stack:
            raise VersionError(f"model {self.name!r} has no earlier revision to roll back to")
        return stack[-1]

    def rollback(self) -> str:
        """Activate the previous revision; returns it. The history is a stack: activating
        pushes, rolling back pops, so rolling back twice goes back two activations."""
        revision = self.previous()
        stack = self._stack()
        while stack and stack[-1] != revision:
            stack.pop()
        _write_atomically(self.folder / ACTIVE, revision + "\n")
        _write_atomically(self.folder / HISTORY, "\n".join(stack) + "\n")
        return revision

    def add(self, source: str | Path, *, activate: bool = False) -> str:
        """Copy a model folder in as ``<name>/<its revision>/``; returns the revision. The
        first version added becomes the active one."""
        source = Path(source).expanduser()
        if not (source / "config.json").is_file():
            raise VersionError(f"{source} is not a model folder (no config.json)")
        revision, hashed = _content_revision(source)
        target = self.folder / revision
        self.folder.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{revision}.tmp-", dir=self.folder))
            try:
                for item in source.iterdir():
                    if item.name == "checkpoints" or item.name.startswith("."):
                        continue  # training state, not the model
                    if item.is_dir():
                        shutil.copytree(item, tmp / item.name, copy_function=shutil.copy2)
                    else:
                        shutil.copy2(item, tmp / item.name)
                _record_revision(tmp, revision, hashed, self.name)
                tmp.chmod(0o755)
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        if activate or self.active() is None:
            self.activate(revision)
        return revision

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "active": self.active(), "revisions": [
            {"revision": v.revision, "active": v.active, "model": v.model_id,
             "accuracy": v.accuracy, "created": time.strftime(
                 "%Y-%m-%dT%H:%M:%SZ", time.gmtime(v.created))}
            for v in self.versions()]}


def _content_revision(folder: Path) -> tuple[str, list[str] | None]:
    """A model folder's content hash, and the files hashed (None: the marker
    ``pixelstream finetune`` wrote already records it, for unchanged files)."""
    marker = read_marker(folder)
    if marker is not None and isinstance(marker.get("revision"), str):
        recorded = folder_revision(folder)
        if recorded == marker["revision"]:
            return recorded, None
    from server.finetune.model import MODEL_FILES, content_revision

    names = [name for name in MODEL_FILES if (folder / name).is_file()]
    names += sorted(p.name for p in folder.iterdir()
                    if p.is_file() and p.suffix in (".safetensors", ".bin")
                    and p.name not in names and p.name != MARKER_NAME)
    return content_revision(folder, names), names


def _record_revision(folder: Path, revision: str, hashed: list[str] | None, name: str) -> None:
    """Write the revision into a copied folder's marker (keeping what the marker said), so
    that the folder reports it when served pinned (``--model MODELS/<name>/<revision>``)."""
    if hashed is None:
        return  # its marker records it already
    marker = read_marker(folder) or {}
    marker.setdefault("model_id", name)
    marker["revision"] = revision
    files = {}
    for file_name in hashed:
        stat = (folder / file_name).stat()
        files[file_name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    marker["files"] = files
    (folder / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def list_models(root: str | Path) -> list[ModelVersions]:
    """Every model under ``root`` (folders with at least one revision)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise VersionError(f"models folder {root} does not exist")
    return [ModelVersions(p) for p in sorted(root.iterdir())
            if p.is_dir() and NAME.match(p.name) and ModelVersions(p).revisions()]
