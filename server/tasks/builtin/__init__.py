"""The tasks a server offers without a tasks file."""

from __future__ import annotations

from server.tasks.builtin.codes import Codes
from server.tasks.builtin.colors import Colors
from server.tasks.builtin.faces import Faces
from server.tasks.builtin.moderate import Moderate
from server.tasks.builtin.ocr import Ocr
from server.tasks.contract import Task
from server.tasks.hf import ImageClassification


def builtin_tasks(classify_model: str | None = None) -> list[Task]:
    """Fresh instances of the built-in tasks, the default task (``classify``) first.
    ``classify_model``: a classifier folder replacing the bundled MobileNetV2 (``--model``)."""
    from server.models.store import is_versions_folder

    classify: Task
    if is_versions_folder(classify_model):
        from server.models.versioned import VersionedClassification

        assert classify_model is not None
        classify = VersionedClassification(classify_model, name="classify")
    else:
        classify = ImageClassification(classify_model, name="classify")
    return [classify, Colors(), Ocr(), Codes(), Faces(), Moderate()]
