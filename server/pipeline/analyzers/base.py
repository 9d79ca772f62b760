"""The contract every task follows: a light spec for the gateway, a heavy analyzer for workers.

The gateway imports only :class:`TaskSpec` objects (no torch): it needs a task's name, its
option validation and its model id to answer ``welcome``, reject bad options before an upload
starts, and build cache keys. Worker processes build the :class:`Analyzer` and call its hooks
in this order, once per batch::

    analyzer.load()                                   # once, at worker start
    prepared = [analyzer.preprocess(image, opts) ...] # per job; a failure fails that job only
    outputs = analyzer.predict(prepared)              # one call per batch, one output per item
    payload = analyzer.encode(output, opts)           # per job: the JSON ``result`` object
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from PIL import Image


class OptionsError(ValueError):
    """The client's ``options`` do not fit the task; answered as ``bad_message``."""


@dataclass(frozen=True)
class DecodeHint:
    """How large a decoded image the analyzer needs.

    ``min_short_side``: the decoder may shrink the image (JPEG DCT scaling, thumbnailing) as long
    as its shorter side stays at least this long. ``None`` asks for full resolution.
    """

    min_short_side: int | None


class Analyzer(Protocol):
    """Worker-side hooks of one task. Instances live in worker processes only."""

    task: str
    model_id: str
    decode_hint: DecodeHint

    def load(self) -> None:
        """Load weights and processors. Called once per worker before any other hook."""

    def preprocess(self, image: Image.Image, options: Mapping[str, Any]) -> Any:
        """Turn one decoded RGB image into the model's input for one item."""

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        """Run the model on a batch of preprocessed items; one output per item, in order."""

    def encode(self, output: Any, options: Mapping[str, Any]) -> dict[str, Any]:
        """Turn one output into the JSON-ready ``result`` object of the protocol."""


class TaskSpec(Protocol):
    """Gateway-side description of a task: importable without torch. Must be picklable: it
    travels to worker processes, which call :meth:`create_analyzer`."""

    @property
    def task(self) -> str:
        """The task's name in messages (``"classify"``)."""

    @property
    def model_id(self) -> str:
        """Names the model in results and cache keys."""

    @property
    def model_revision(self) -> str:
        """Changes whenever the model's weights do (empty for weights pinned by a release):
        part of cache keys, so results of replaced weights are never served."""

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Return the options with defaults filled in, or raise :class:`OptionsError`."""

    def create_analyzer(self) -> Analyzer:
        """Build the worker-side analyzer (not yet loaded). Called in worker processes."""
