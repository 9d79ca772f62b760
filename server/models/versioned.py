"""A classifier task served from a folder of versions (``MODELS/<name>``), switchable live.

Every job carries the revision that answers it: the gateway stamps its current one into the
job's options (:meth:`VersionedClassification.resolve_options`; clients cannot set it), so
the result cache key, the queued job and the result all name the same weights. A switch is
one assignment of :attr:`VersionedClassification.active` in the gateway, made once the new
revision has answered a warm-up image (:mod:`server.models.admin`): jobs stamped before it
run on the old revision, jobs after it on the new one.

In a worker, revisions load on first use, beside the ones already loaded. After each batch a
worker unloads every revision that is neither the folder's active one nor used by that batch:
once the switch is made, the first batch of the new revision frees the old one (jobs queued
before the switch were dispatched first, and those running elsewhere hold their own copy).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

from pydantic import Field, create_model

from server.models.store import ModelVersions, VersionError
from server.pipeline.model_store import local_model_id
from server.tasks import results
from server.tasks.contract import DecodeHint, ModelInfo, OptionsError, Task, TaskOptions, View
from server.tasks.hf import ImageClassification, ModelFolderError, classification_options

log = logging.getLogger("pixelstream.models")


@functools.cache
def versioned_options(labels: int) -> type[TaskOptions]:
    """A classifier's options plus the revision that answers (set by the server)."""
    return create_model(
        "VersionedClassifyOptions",
        __base__=classification_options(labels),
        revision=(str, Field(default="", description="Set by the server: the model revision "
                                                     "that answers. Not for clients to set.")),
    )


class VersionedClassification(Task):
    """``image-classification`` over ``MODELS/<name>``: answers like ``classify`` with the
    active revision, and switches revisions without dropping a request."""

    kind = "image-classification"
    Result = results.Labels

    def __init__(self, folder: str, *, name: str = "classify", fast_preprocess: bool = True,
                 optimize: bool = True) -> None:
        self.name = name
        self.versions = ModelVersions(folder)
        self.model_path = str(self.versions.folder)
        self._classifier_args = {"fast_preprocess": fast_preprocess, "optimize": optimize}
        active = self.versions.active()
        if active is None:
            raise ModelFolderError(f"models folder {folder} has no active revision")
        try:
            self.active = self.versions.resolve(active)
        except VersionError as exc:
            raise ModelFolderError(str(exc)) from None
        """The revision new jobs get (the gateway's; workers follow the jobs' options)."""
        self._info: ModelInfo | None = None
        self._tasks: dict[str, ImageClassification] = {}
        self._loaded: set[str] = set()
        self.device = "cpu"
        self.decode: DecodeHint = self._classifier(self.active).decode

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tasks"], state["_loaded"] = {}, set()  # workers load their own
        return state

    def _classifier(self, revision: str) -> ImageClassification:
        task = self._tasks.get(revision)
        if task is None:
            task = ImageClassification(str(self.versions.folder / revision), name=self.name,
                                       **self._classifier_args)
            self._tasks[revision] = task
        return task

    # Gateway side -------------------------------------------------------------------------------

    @property
    def model(self) -> ModelInfo:
        """The active revision's id and revision (read once per revision: every request's
        cache key asks)."""
        info = self._info
        if info is None or info.revision != self.active:
            info = ModelInfo(id=local_model_id(self.versions.folder / self.active),
                             revision=self.active)
            self._info = info
        return info

    def options_model(self) -> type[TaskOptions]:
        return versioned_options(self._classifier(self.active).label_count())

    def check_folder(self) -> None:
        self._classifier(self.active).check_folder()

    def resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Called by the gateway on a client's validated options: stamp the current
        revision. Raises OptionsError if the client set one."""
        if options.get("revision"):
            raise OptionsError(f"option 'revision' of task {self.name!r} is set by the server")
        return {**options, "revision": self.active}

    def switch(self, revision: str) -> None:
        """Make ``revision`` answer every job stamped from now on (call once it answered a
        warm-up image: see :func:`server.models.admin.roll_out`)."""
        self.active = self.versions.resolve(revision)
        self.decode = self._classifier(self.active).decode

    # Worker side --------------------------------------------------------------------------------

    def setup(self, device: str) -> None:
        self.device = device
        current = self.versions.active() or self.active
        self._load(self.versions.resolve(current))

    def _load(self, revision: str) -> ImageClassification:
        task = self._classifier(revision)
        if revision not in self._loaded:
            task.setup(self.device)
            self._loaded.add(revision)
            log.info("model %s revision %s loaded", self.versions.name, revision)
        return task

    def _unload(self, revision: str) -> None:
        task = self._tasks.get(revision)
        if task is not None and revision in self._loaded:
            task.net = task.processor = None
            task._fast = None
            self._loaded.discard(revision)
            log.info("model %s revision %s unloaded", self.versions.name, revision)

    @property
    def loaded(self) -> set[str]:
        """The revisions this process holds in memory."""
        return set(self._loaded)

    def _revision_of(self, options: Any) -> str:
        return str(getattr(options, "revision", "") or self.active)

    def preprocess(self, view: View, options: Any) -> Any:
        revision = self._revision_of(options)
        return revision, self._load(revision).preprocess(view, options)

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        """Each revision's items through its own network, outputs in the batch's order."""
        outputs: list[Any] = [None] * len(batch)
        groups: dict[str, list[int]] = {}
        for index, (revision, _) in enumerate(batch):
            groups.setdefault(revision, []).append(index)
        for revision, indexes in groups.items():
            probs = self._load(revision).predict([batch[i][1] for i in indexes])
            for index, output in zip(indexes, probs, strict=True):
                outputs[index] = (revision, output)
        self._release(set(groups))
        return outputs

    def _release(self, used: set[str]) -> None:
        """Unload what neither this batch nor the folder's active revision needs."""
        try:
            active = self.versions.active()
        except OSError:
            return
        keep = used | ({active} if active else set())
        for revision in self._loaded - keep:
            self._unload(revision)

    def encode(self, output: Any, view: View, options: Any) -> dict[str, Any]:
        revision, probs = output
        return self._classifier(revision).encode(probs, view, options)
