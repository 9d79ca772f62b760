"""A test task whose analyzer fails to load: the worker exits before it is ready."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from server.pipeline.analyzers.colors import ColorsAnalyzer

LOAD_ERROR = "the broken test analyzer refuses to load"


@dataclass(frozen=True)
class BrokenSpec:
    task: str = "broken"

    @property
    def model_id(self) -> str:
        return "test/broken"

    @property
    def model_revision(self) -> str:
        return ""

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def create_analyzer(self) -> BrokenAnalyzer:
        return BrokenAnalyzer()


class BrokenAnalyzer(ColorsAnalyzer):
    task = "broken"
    model_id = "test/broken"

    def load(self) -> None:
        raise RuntimeError(LOAD_ERROR)
