"""The contract every task follows, built-in or a user's (LitServe's LitAPI is the model).

A task is ONE object. The gateway reads its description (``name``, ``Options``, ``Result``,
``model``, ``decode``, ``tiling``), which must be cheap: importing a task's module and building
the object must not import torch or load weights. The object is then pickled to worker
processes, which call the hooks in this order::

    task.setup(device)                            # once per worker: load weights here
    items = [task.preprocess(view, options) ...]  # per image or tile; a failure fails that job
    outputs = task.predict(items)                 # once per batch, one output per item, in order
    result = task.encode(output, view, options)   # per image: the JSON ``result`` object

``view`` is a :class:`View`: the decoded pixels with the ORIGINAL image's size and the region
and scale they were decoded at, so that ``encode`` reports coordinates in original pixels
(:meth:`View.box_to_original`). ``options`` is an instance of the task's ``Options`` model.

A spatial task (``tiling`` set) sees a large image as overlapping full-resolution tiles, one
job each; :meth:`Task.merge` combines the tiles' results (already in original pixels) into
one. Users subclass :class:`Task` (or follow it by duck typing; :func:`check_contract` says
what is missing) and name their class in a tasks file (``kind = "python"``) or in the
``pixelstream.tasks`` entry-point group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "Box",
    "DecodeHint",
    "ModelInfo",
    "OptionsError",
    "SpatialOptions",
    "Task",
    "TaskOptions",
    "Tiling",
    "View",
    "check_contract",
    "validate_options",
]

Box = list[float]
"""``[x0, y0, x1, y1]`` in pixels."""


class OptionsError(ValueError):
    """The client's ``options`` do not fit the task; answered as ``bad_message``."""


class TaskOptions(BaseModel):
    """Base of every task's options: unknown options are refused, values are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SpatialOptions(TaskOptions):
    """Options every spatial task accepts."""

    tiles: bool = Field(
        default=True,
        description="Look at every pixel: cut an image larger than the model's input into "
                    "overlapping full-resolution tiles. false: one downscaled pass.",
    )


@dataclass(frozen=True)
class ModelInfo:
    """Names the weights in results, in ``GET /v1/tasks`` and in cache keys.

    ``revision`` changes whenever the weights do (for weights pinned by a release, that
    release's version; empty for no weights at all), so results of replaced weights are never
    served from the cache.
    """

    id: str
    revision: str = ""


@dataclass(frozen=True)
class DecodeHint:
    """How large a decoded image the task needs for one pass over the whole image.

    ``min_short_side``: the decoder may shrink the image (JPEG DCT scaling, box reduction) as
    long as its shorter side stays at least this long. ``None`` asks for full resolution.
    """

    min_short_side: int | None


MAX_TILES = 512
"""Tiles of one image at most, by default: a model with a small input (a 64-px detector)
would otherwise cut a 100-megapixel image into tens of thousands of tiles, hours of work for
one upload."""


@dataclass(frozen=True)
class Tiling:
    """How a spatial task cuts a large image: squares of ``size`` pixels at full resolution,
    neighbours overlapping by ``overlap`` pixels (an object cut by one tile's edge lies whole
    in its neighbour when it is smaller than the overlap). An image that would need more than
    ``max_tiles`` tiles gets fewer, larger ones (see :func:`server.tasks.spatial.fit_tiling`),
    which the task sees downscaled. ``overview``: one more job sees the whole image, decoded
    as for one pass (:attr:`Task.decode`), for what is larger than the overlap and so may lie
    whole in no tile (a barcode across a poster); :meth:`Task.merge` gets its result among
    the tiles'."""

    size: int
    overlap: int
    max_tiles: int = MAX_TILES
    overview: bool = False

    def __post_init__(self) -> None:
        if self.size < 16 or not 0 <= self.overlap < self.size // 2:
            raise ValueError("a tile must be at least 16 px and overlap less than half of it")
        if self.max_tiles < 1:
            raise ValueError("max_tiles must be at least 1")


@dataclass(frozen=True)
class View:
    """Decoded pixels and where they lie in the original image.

    ``image``: RGB. ``original``: the original image's ``(width, height)``, as displayed
    (EXIF orientation applied). ``region``: the box of the original that ``image`` shows,
    ``(x0, y0, x1, y1)``; ``image`` may be smaller than the region (a downscaled decode) but
    never rotated against it.
    """

    image: Image.Image
    original: tuple[int, int]
    region: tuple[int, int, int, int]

    @classmethod
    def whole(cls, image: Image.Image, original: tuple[int, int]) -> View:
        """``image`` shows the whole original (possibly downscaled)."""
        return cls(image, original, (0, 0, original[0], original[1]))

    @property
    def scale(self) -> tuple[float, float]:
        """Decoded pixels per original pixel, horizontally and vertically (1.0: full size)."""
        x0, y0, x1, y1 = self.region
        return self.image.width / max(1, x1 - x0), self.image.height / max(1, y1 - y0)

    def point_to_original(self, x: float, y: float) -> tuple[float, float]:
        sx, sy = self.scale
        return self.region[0] + x / sx, self.region[1] + y / sy

    def box_to_original(self, box: Sequence[float]) -> Box | None:
        """A box in ``image`` pixels → the same box in original pixels, clipped to the image
        and rounded to 0.1 px; None when nothing of it is left inside."""
        x0, y0 = self.point_to_original(box[0], box[1])
        x1, y1 = self.point_to_original(box[2], box[3])
        width, height = self.original
        x0, x1 = sorted((min(max(x0, 0.0), width), min(max(x1, 0.0), width)))
        y0, y1 = sorted((min(max(y0, 0.0), height), min(max(y1, 0.0), height)))
        clipped = [round(x0, 1), round(y0, 1), round(x1, 1), round(y1, 1)]
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            return None
        return clipped


class Task:
    """Base class of tasks. Override what your task needs; see the module's docstring.

    Class attributes are the defaults; ``name`` and ``device`` may be set per instance (a
    tasks file names the task and picks its device).
    """

    name: str = ""
    """The task's name in messages (``"classify"``); a tasks file's table name replaces it."""
    kind: str = "python"
    """What made the task: ``"builtin"``, ``"python"``, or a Hugging Face pipeline task."""
    Options: ClassVar[type[TaskOptions]] = TaskOptions
    """The options a client may send (pydantic; its JSON Schema is published)."""
    Result: ClassVar[type[BaseModel] | None] = None
    """The shape of ``result`` (pydantic, for its JSON Schema only; None: any object)."""
    decode: DecodeHint = DecodeHint(min_short_side=None)
    """The decode size one pass over the whole image needs."""
    tiling: Tiling | None = None
    """Set for spatial tasks: tiles at full resolution; see :meth:`merge`."""

    @property
    def model(self) -> ModelInfo:
        """The model's id and revision. Must not load anything heavy."""
        return ModelInfo(id=f"python/{type(self).__module__}.{type(self).__qualname__}")

    def options_model(self) -> type[TaskOptions]:
        """The options model for this instance (``Options`` unless it depends on the model,
        e.g. ``top_k`` bounded by the label count)."""
        return self.Options

    def prepare(self) -> None:
        """Once per server start, before any worker, in a short-lived process: build what
        every worker's :meth:`setup` will read (e.g. convert weights a package ships), so
        that workers do not race to build it."""

    def setup(self, device: str) -> None:
        """Load weights onto ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``). Once per worker."""

    def preprocess(self, view: View, options: Any) -> Any:
        """One decoded image (or tile) → one item of the model's input."""
        return view.image

    def predict(self, batch: Sequence[Any]) -> list[Any]:
        """Run the model on a batch of items; one output per item, in order."""
        raise NotImplementedError

    def encode(self, output: Any, view: View, options: Any) -> dict[str, Any]:
        """One output → the JSON ``result`` object, coordinates in ORIGINAL pixels."""
        raise NotImplementedError

    def merge(self, parts: Sequence[dict[str, Any]], original: tuple[int, int],
              options: Any) -> dict[str, Any]:
        """Spatial tasks: combine the tiles' results (each from :meth:`encode`, so already in
        original pixels) into the image's result, removing duplicates across tile edges."""
        raise NotImplementedError(f"task {self.name!r} is not spatial")


_REQUIRED_METHODS = ("setup", "preprocess", "predict", "encode")


def check_contract(task: Any) -> list[str]:
    """What ``task`` lacks to follow the contract (empty: it follows it). Cheap: reads
    attributes and builds the options' JSON Schema, loads nothing."""
    problems: list[str] = []
    name = getattr(task, "name", None)
    if not isinstance(name, str) or not name:
        problems.append("no name")
    for method in _REQUIRED_METHODS:
        if not callable(getattr(task, method, None)):
            problems.append(f"no {method}() method")
    if getattr(task, "tiling", None) is not None and not callable(getattr(task, "merge", None)):
        problems.append("a spatial task needs merge()")
    try:
        options = options_model_of(task)
        options.model_json_schema()
    except Exception as exc:
        problems.append(f"its options are not a pydantic model ({exc})")
    model = getattr(task, "model", None)
    if not isinstance(getattr(model, "id", None), str):
        problems.append("model is not a ModelInfo")
    if not isinstance(getattr(task, "decode", None), DecodeHint):
        problems.append("decode is not a DecodeHint")
    return problems


def options_model_of(task: Any) -> type[TaskOptions]:
    getter = getattr(task, "options_model", None)
    model = getter() if callable(getter) else getattr(task, "Options", None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError("Options must be a pydantic BaseModel subclass")
    return model  # type: ignore[return-value]


def _describe_error(error: Mapping[str, Any]) -> str:
    where = ".".join(str(part) for part in error.get("loc", ()))
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return f"unknown option {where!r}"
    if kind == "missing":
        return f"option {where!r} is required"
    message = str(error.get("msg", "is not valid"))
    return f"option {where!r}: {message[0].lower() + message[1:] if message else message}"


def validate_options(task: Any, options: Any) -> dict[str, Any]:
    """``options`` checked against the task's schema, defaults filled in, as plain JSON data.
    Raises :class:`OptionsError` with one line a client can act on."""
    if not isinstance(options, Mapping):
        raise OptionsError(f"options for task {task.name!r} must be an object")
    model = options_model_of(task)
    try:
        parsed = model.model_validate(dict(options))
    except ValidationError as exc:
        details = "; ".join(_describe_error(error) for error in exc.errors()[:3])
        raise OptionsError(f"bad options for task {task.name!r}: {details}") from None
    return parsed.model_dump(mode="json")


def parse_options(task: Any, options: Mapping[str, Any]) -> Any:
    """Options already validated by :func:`validate_options` → the task's options object
    (in the worker, for the hooks)."""
    return options_model_of(task).model_validate(dict(options))


def json_schemas(task: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON Schemas of the task's options and of its result."""
    options = options_model_of(task).model_json_schema()
    result_model = getattr(task, "Result", None)
    result: dict[str, Any] = (
        result_model.model_json_schema()
        if isinstance(result_model, type) and issubclass(result_model, BaseModel)
        else {"type": "object"}
    )
    return options, result
