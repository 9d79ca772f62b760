"""The ``pixelstream`` command.

``pixelstream serve`` runs the service on embedded defaults; every setting is a flag
(``--max-chunk-bytes``) and a variable (``PIXELSTREAM_MAX_CHUNK_BYTES``), flags winning.
``pixelstream model prepare`` builds the bundled model's folder ahead of time.
``pixelstream finetune DATA_DIR --out MODEL_DIR`` trains a classifier on labelled images;
``pixelstream models`` manages a folder of model versions (or a running server's).
``pixelstream upload``, ``camera`` and ``analyze`` are the client's (:mod:`chunking.cli`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

from chunking.cli import CLIENT_COMMANDS, add_client_commands, run_client_command
from server.logs import configure_logging
from server.settings import ENV_PREFIX, Settings

if TYPE_CHECKING:
    from server.tasks.registry import Registry


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    hints = get_type_hints(Settings)
    for f in fields(Settings):
        kind = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = "from the machine" if f.default is MISSING else repr(f.default)
        help_text = f"(env {ENV_PREFIX}{f.name.upper()}; default {default})"
        if kind in (int, float, str):
            parser.add_argument(flag, type=kind, default=None, help=help_text)
        elif kind == str | None:
            parser.add_argument(flag, type=str, default=None, help=help_text)
        elif kind == Path | None:
            parser.add_argument(flag, type=Path, default=None, help=help_text)
        elif kind == tuple[str, ...]:
            parser.add_argument(
                flag, default=None, help=f"comma-separated {help_text}",
                type=lambda text: tuple(p.strip() for p in text.split(",") if p.strip()),
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pixelstream", description="AI image understanding over WebSockets."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the service")
    _settings_flags(serve)
    worker = commands.add_parser(
        "worker", help="run inference workers for gateways that share a Redis (--redis-url)"
    )
    _settings_flags(worker)
    worker.add_argument(
        "--task", action="append", dest="worker_tasks", default=None, metavar="NAME",
        help=f"a task these workers serve; repeat for several (env {WORKER_TASKS_VARIABLE}, "
             "comma-separated; default: every task)")
    model = commands.add_parser("model", help="manage the bundled model")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    prepare = model_commands.add_parser("prepare", help="build the default model folder")
    prepare.add_argument("--dir", type=Path, default=None, help="target folder")
    prepare.add_argument("--force", action="store_true", help="rebuild even if present")
    _finetune_parser(commands)
    _models_parser(commands)
    add_client_commands(commands)
    return parser


def _models_parser(commands: Any) -> None:
    models = commands.add_parser(
        "models", help="a folder of model versions: list, add, activate, roll back",
        description="Manage MODELS/<name>/<revision>/ folders. With --server (and --token), "
                    "activate, rollback and list act on a running server's admin routes.")
    actions = models.add_subparsers(dest="models_command", required=True)

    def common(parser: argparse.ArgumentParser, *, remote: bool = True) -> None:
        parser.add_argument("--root", type=Path, default=None,
                            help="the models folder (env PIXELSTREAM_MODELS_ROOT)")
        if remote:
            parser.add_argument("--server", default=None, metavar="URL",
                                help="act on this running server instead of the folder")
            parser.add_argument("--token", default=None,
                                help="its admin token (env PIXELSTREAM_ADMIN_TOKEN)")

    common(actions.add_parser("list", help="every model and revision (* marks the active)"))
    add = actions.add_parser("add", help="copy a model folder in as NAME/<its revision>")
    add.add_argument("name")
    add.add_argument("folder", type=Path)
    add.add_argument("--activate", action="store_true", help="and make it the active one")
    common(add, remote=False)
    activate = actions.add_parser("activate", help="make REV the active revision of NAME")
    activate.add_argument("name")
    activate.add_argument("revision")
    common(activate)
    rollback = actions.add_parser("rollback", help="back to the revision active before")
    rollback.add_argument("name")
    common(rollback)


def _finetune_parser(commands: Any) -> None:
    from server.finetune.train import DEFAULT_MODE, MODE_DEFAULTS, MODES

    finetune = commands.add_parser(
        "finetune", help="train an image classifier on a folder of labelled images",
        description="Fine-tune an image classifier on DATA_DIR/<label>/*.jpg|png and save a "
                    "model folder that `pixelstream serve --model OUT` serves.")
    finetune.add_argument("data_dir", type=Path, metavar="DATA_DIR",
                          help="one sub-folder of images per class")
    finetune.add_argument("--out", type=Path, required=True, metavar="MODEL_DIR",
                          help="where the model (and checkpoints, metrics.json) go")
    finetune.add_argument("--base", default="default", metavar="default|FOLDER",
                          help="the model to start from: the bundled one, or an "
                               "image-classification folder (default: default)")
    finetune.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                          help="head: train a new head on cached backbone features; full: "
                               f"train every weight (default: {DEFAULT_MODE})")
    defaults = ", ".join(f"{mode} {d.epochs}" for mode, d in MODE_DEFAULTS.items())
    finetune.add_argument("--epochs", type=int, default=None, help=f"default: {defaults}")
    finetune.add_argument("--val-split", type=float, default=0.2,
                          help="share of each class held out for validation (default: 0.2)")
    defaults = ", ".join(f"{mode} {d.learning_rate:g}" for mode, d in MODE_DEFAULTS.items())
    finetune.add_argument("--lr", type=float, default=None, help=f"default: {defaults}")
    defaults = ", ".join(f"{mode} {d.batch_size}" for mode, d in MODE_DEFAULTS.items())
    finetune.add_argument("--batch-size", type=int, default=None, help=f"default: {defaults}")
    finetune.add_argument("--seed", type=int, default=0, help="default: 0")
    finetune.add_argument("--resume", action="store_true",
                          help="continue from the last checkpoint in MODEL_DIR/checkpoints")
    finetune.add_argument("--name", default=None,
                          help="the model id results report (default: MODEL_DIR's name)")
    finetune.add_argument("--no-progress", action="store_true", help="no progress bars")


H11_MAX_HEAD_BYTES = 64 * 1024
"""The largest request head (request line and headers) the server buffers: 431/400 beyond."""
KEEP_ALIVE_S = 5


def uvicorn_config(settings: Settings) -> dict[str, Any]:
    """uvicorn settings for large uploads: no compression (it makes ingest 20-60x slower),
    a message limit derived from max_chunk_bytes, the sans-I/O websockets implementation;
    and for hostile peers: h11 with a bounded head that must arrive in time, WebSocket pings
    that drop peers which stop answering, a bounded graceful shutdown. Logging is the
    app's (:mod:`server.logs`), not uvicorn's own configuration."""
    from server.guards import guarded_h11

    return {
        "host": settings.host,
        "port": settings.port,
        "http": guarded_h11(settings.http_header_timeout_s),
        "h11_max_incomplete_event_size": H11_MAX_HEAD_BYTES,
        "timeout_keep_alive": KEEP_ALIVE_S,
        "ws": "websockets-sansio",
        "ws_per_message_deflate": False,
        "ws_max_size": settings.limits.max_message_bytes,
        "ws_ping_interval": settings.ws_ping_interval_s,
        "ws_ping_timeout": settings.ws_ping_interval_s,
        "log_level": settings.log_level,
        "log_config": None,
        "proxy_headers": True,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
        "lifespan": "on",
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
    }


def checked_registry(settings: Settings, only: Sequence[str] | None = None) -> Registry:
    """The tasks to serve (``only`` these, if given), each tried once (see
    :func:`server.tasks.registry.verify_setup`). Raises TasksFileError with one line naming
    the task that cannot be served, ValueError naming one in ``only`` that is not offered."""
    from server.app import registry_for
    from server.tasks.registry import verify_setup

    registry = registry_for(settings)
    if only:
        try:
            registry = registry.only(only)
        except ValueError as exc:
            raise ValueError(f"--task: {exc}") from None
    verify_setup(registry, settings.device)
    return registry


WORKER_TASKS_VARIABLE = ENV_PREFIX + "WORKER_TASKS"


def worker_tasks(args: argparse.Namespace,
                 environ: Mapping[str, str] | None = None) -> list[str]:
    """The tasks ``pixelstream worker`` serves: its ``--task`` flags, else the variable (in
    ``environ``, default this process's); an empty list means every task."""
    if args.worker_tasks:
        return [name.strip() for name in args.worker_tasks]
    raw = (os.environ if environ is None else environ).get(WORKER_TASKS_VARIABLE, "")
    return [name.strip() for name in raw.split(",") if name.strip()]


def explicit_settings(args: argparse.Namespace) -> set[str]:
    """The settings given by a flag or a ``PIXELSTREAM_*`` variable (the rest are defaults)."""
    return {f.name for f in fields(Settings)
            if getattr(args, f.name, None) is not None or ENV_PREFIX + f.name.upper() in os.environ}


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.tuning import inference_summary, tune_gateway_malloc

    overrides = {f.name: getattr(args, f.name, None) for f in fields(Settings)}
    settings = Settings.from_env(**overrides)
    configure_logging(settings.log_level, settings.log_format, settings.api_tokens)
    registry = checked_registry(settings)  # before listening: a bad task stops here, alone
    if settings.workers:
        logging.getLogger("pixelstream").info(
            "%s", inference_summary(settings, explicit_settings(args)))
    tune_gateway_malloc()  # chunk messages reuse heap pages: see server.tuning
    uvicorn.run(create_app(settings, tasks=registry), **uvicorn_config(settings))
    return 0


def run_workers(args: argparse.Namespace) -> int:
    """``pixelstream worker``: stream workers on this machine, for gateways anywhere. They
    serve the tasks ``serve`` does (the same --tasks file), or those named by ``--task``; a
    tasks file's ``workers`` places a task on that many of them."""
    from server.app import _needs_prepare, prepare_tasks, stream_worker_config
    from server.pipeline.stream_worker import supervise
    from server.tuning import inference_summary

    overrides = {f.name: getattr(args, f.name, None) for f in fields(Settings)}
    settings = Settings.from_env(**overrides)
    if not settings.redis_url:
        print("error: pixelstream worker needs --redis-url (or PIXELSTREAM_REDIS_URL)",
              file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    # A bad tasks file or an unknown --task is one line, with nothing before.
    registry = checked_registry(settings, worker_tasks(args))
    logger = logging.getLogger("pixelstream")
    logger.info("serving tasks: %s", ", ".join(registry.names))
    logger.info("%s", inference_summary(settings, explicit_settings(args)))
    prepare_tasks(_needs_prepare([entry.task for entry in registry.entries]))
    return supervise(stream_worker_config(settings, registry), max(1, settings.workers))


def prepare_model(args: argparse.Namespace) -> int:
    from server.pipeline.model_store import ModelUnavailable, prepare_default_model

    try:
        path = prepare_default_model(args.dir, force=args.force)
    except ModelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    from server.finetune.data import DataError
    from server.finetune.model import ModelError
    from server.finetune.train import FinetuneConfig, FinetuneError, finetune

    config = FinetuneConfig(
        data_dir=args.data_dir, out=args.out, base=args.base, mode=args.mode,
        epochs=args.epochs, val_split=args.val_split, learning_rate=args.lr,
        batch_size=args.batch_size, seed=args.seed, resume=args.resume, name=args.name,
        progress=not args.no_progress)
    try:
        finetune(config)
    except (DataError, ModelError, FinetuneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def run_models(args: argparse.Namespace) -> int:
    """``pixelstream models``: on the folder, or through a server's admin routes."""
    from server.models.store import ModelVersions, VersionError, list_models

    server = getattr(args, "server", None)
    if server:
        return _models_on_server(args, server)
    root = args.root or os.environ.get("PIXELSTREAM_MODELS_ROOT")
    if not root:
        print("error: pixelstream models needs --root MODELS (or PIXELSTREAM_MODELS_ROOT)",
              file=sys.stderr)
        return 2
    try:
        if args.models_command == "list":
            for model in list_models(root):
                print(model.name)
                for version in model.versions():
                    accuracy = ("" if version.accuracy is None
                                else f"  accuracy {version.accuracy:.4f}")
                    print(f"  {'*' if version.active else ' '} {version.revision}  "
                          f"{version.model_id}{accuracy}")
            return 0
        versions = ModelVersions.under(root, args.name)
        if args.models_command == "add":
            revision = versions.add(args.folder, activate=args.activate)
            print(f"{args.name} {revision}{' (active)' if versions.active() == revision else ''}")
        elif args.models_command == "activate":
            print(f"{args.name} {versions.activate(args.revision)} is active")
        else:
            print(f"{args.name} {versions.rollback()} is active")
    except VersionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _models_on_server(args: argparse.Namespace, server: str) -> int:
    import httpx

    token = args.token or os.environ.get("PIXELSTREAM_ADMIN_TOKEN")
    if not token:
        print("error: --server needs --token (or PIXELSTREAM_ADMIN_TOKEN)", file=sys.stderr)
        return 2
    base = server.rstrip("/") + "/v1/admin/models"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        if args.models_command == "list":
            response = httpx.get(base, headers=headers, timeout=30)
        elif args.models_command == "activate":
            response = httpx.post(f"{base}/{args.name}/activate", headers=headers,
                                  json={"revision": args.revision}, timeout=180)
        elif args.models_command == "rollback":
            response = httpx.post(f"{base}/{args.name}/rollback", headers=headers, timeout=180)
        else:
            print("error: add works on the folder (--root), not on a server", file=sys.stderr)
            return 2
    except httpx.HTTPError as exc:
        print(f"error: {server}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        try:
            message = response.json().get("message") or response.text
        except ValueError:
            message = response.text
        print(f"error: {response.status_code}: {message}", file=sys.stderr)
        return 1
    body = response.json()
    if args.models_command == "list":
        for model in body["models"]:
            print(model["name"])
            for version in model["revisions"]:
                mark = "*" if version["revision"] == model["serving"] else " "
                print(f"  {mark} {version['revision']}  {version['model']}")
    else:
        print(f"{body['name']} {body['revision']} is active (was {body['previous']})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "model":
            return prepare_model(args)
        if args.command in CLIENT_COMMANDS:
            return run_client_command(args)
        if args.command == "worker":
            return run_workers(args)
        if args.command == "finetune":
            return run_finetune(args)
        if args.command == "models":
            return run_models(args)
    except ValueError as exc:  # a setting that does not parse or fit, a bad tasks file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
