"""The client's commands: ``upload``, ``camera`` and ``analyze``.

Installed as ``pixelstream-client`` (:func:`main`) by the client distribution, and as
``pixelstream`` (:func:`pixelstream_main`): the server's command where the server is installed
(its :mod:`server.cli` adds these commands to its own parser and hands them here), these
commands alone where it is not. Everything the client needs (asyncio, websockets, OpenCV,
httpx) is imported when a command runs, not when the parser is built, so ``pixelstream serve``
pays nothing for it.

* ``pixelstream upload FILE_OR_DIR...``: every image (directories are walked for image
  suffixes), up to ``--concurrency`` at once on one socket. On a terminal, a live progress
  line per file (plain ANSI on stderr: bytes acknowledged, then queue position and stages);
  one line per finished file on stdout, or one JSON object per line with ``--json``. Exit
  status 1 when any file failed, with its error code in its line.
* ``pixelstream camera --source 0|clip.mp4|rtsp://...``: live results, measured fps, frames
  dropped by the server (latest frame wins) and latency percentiles; Ctrl-C or the end of a
  file stops it cleanly and prints a summary (exit 0).
* ``pixelstream analyze FILE [--http]``: one image, one JSON line.

``--url`` defaults to ``$PIXELSTREAM_URL`` or ``ws://127.0.0.1:8000/v1/ws``; ``--token`` to
``$PIXELSTREAM_TOKEN``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

import orjson

if TYPE_CHECKING:
    from chunking.client import FrameEvent, FrameStats
    from chunking.messages import Result

CLIENT_COMMANDS: Final = frozenset({"upload", "camera", "analyze"})
IMAGE_SUFFIXES: Final = frozenset({
    ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
})
"""What a directory contributes to ``upload`` (files named explicitly are always sent)."""

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130


# The parser ---------------------------------------------------------------------------------


def _options_json(text: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"top_k\": 3}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"top_k\": 3}'")
    return value


def _delays(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("must be comma-separated seconds, e.g. 0,1,3,5") from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None,
                        help="server URL (env PIXELSTREAM_URL; default ws://127.0.0.1:8000/v1/ws)")
    parser.add_argument("--token", default=None, help="API token (env PIXELSTREAM_TOKEN)")
    parser.add_argument("--base64", action="store_true",
                        help="send Base64 JSON text instead of binary frames")
    parser.add_argument("--task", default=None, help="task (default: the server's default)")
    parser.add_argument("--top-k", type=_positive_int, default=None,
                        help="labels to return (classify's top_k option)")
    parser.add_argument("--options", type=_options_json, default=None,
                        help="task options as a JSON object, e.g. '{\"colors\": 3}'")


def add_client_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``upload``, ``camera`` and ``analyze`` to the ``pixelstream`` parser."""
    upload = commands.add_parser(
        "upload", help="upload images (files or directories) and print their results",
        description="Upload images over one WebSocket, resuming after failures.")
    upload.add_argument("paths", nargs="+", metavar="FILE_OR_DIR")
    _connection_flags(upload)
    upload.add_argument("--transport", choices=("auto", "websocket", "tus"), default="auto",
                        help="websocket, tus (HTTP, where WebSockets are blocked), or auto: "
                        "the socket, and tus when it cannot be opened (default)")
    upload.add_argument("--concurrency", type=_positive_int, default=4,
                        help="uploads at once (the server's max_uploads caps it too)")
    upload.add_argument("--json", action="store_true", help="one JSON object per file")
    upload.add_argument("--no-progress", action="store_true", help="no live progress lines")
    upload.add_argument("--no-checksum", action="store_true",
                        help="skip the SHA-256 (no cache hit before sending, one read less)")
    upload.add_argument("--timeout", type=float, default=None,
                        help="seconds per file, retries included")
    upload.add_argument("--retry-delays", type=_delays, default=None,
                        help="seconds before each retry (default 0,1,3,5; '' for none)")

    camera = commands.add_parser(
        "camera", help="stream frames from a camera, video file or URL",
        description="Stream frames and print live results; Ctrl-C stops with a summary.")
    camera.add_argument("--source", required=True,
                        help="camera index (0), video file, or RTSP/HTTP URL")
    _connection_flags(camera)
    camera.add_argument("--fps", type=float, default=15.0,
                        help="frames per second to send (0: as fast as the source gives them)")
    camera.add_argument("--stream", default="cam0", help="stream name")
    camera.add_argument("--max-frames", type=_positive_int, default=None,
                        help="stop after this many frames")
    camera.add_argument("--quality", type=int, default=85, help="JPEG quality (1-100)")
    camera.add_argument("--json", action="store_true",
                        help="one JSON object per event, then a summary object")

    analyze = commands.add_parser(
        "analyze", help="analyze one image and print its result as JSON",
        description="Analyze one image: over the WebSocket, or the HTTP route with --http.")
    analyze.add_argument("file", metavar="FILE")
    _connection_flags(analyze)
    analyze.add_argument("--http", action="store_true",
                         help="POST /v1/analyze instead (--url may be http://host:port)")


def build_parser(prog: str = "pixelstream-client") -> argparse.ArgumentParser:
    """The client's own command line: ``upload``, ``camera`` and ``analyze``."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Upload images to a pixelstream server and stream camera frames.")
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``pixelstream-client``."""
    return run_client_command(build_parser().parse_args(argv))


SERVER_ENTRY_POINTS: Final = "pixelstream.cli"
"""The entry-point group where the server distribution names its command's ``main``."""
SERVER_COMMANDS: Final = frozenset({"serve", "worker", "model"})


def pixelstream_main(argv: Sequence[str] | None = None) -> int:
    """``pixelstream``: the server's command where the server is installed; else the client's
    commands, and a pointer to the server for the server's."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=SERVER_ENTRY_POINTS, name="main"):
        server_main: Any = entry.load()
        status: int = server_main(argv)
        return status
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SERVER_COMMANDS:
        print(f"pixelstream {args[0]}: the pixelstream server is not installed here, only its "
              "client (pip install pixelstream installs the server)", file=sys.stderr)
        return EXIT_USAGE
    return run_client_command(build_parser("pixelstream").parse_args(args))


def run_client_command(args: argparse.Namespace, out: TextIO | None = None,
                       err: TextIO | None = None) -> int:
    """Run a parsed client command; returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        if args.command == "upload":
            return _run(_upload(args, out, err))
        if args.command == "camera":
            return _run(_camera(args, out, err))
        if args.command == "analyze":
            return _analyze(args, out, err)
    except KeyboardInterrupt:
        print("interrupted", file=err)
        return EXIT_INTERRUPTED
    return EXIT_USAGE


def _run(coroutine: Any) -> int:
    import asyncio

    status: int = asyncio.run(coroutine)
    return status


def _url(args: argparse.Namespace) -> str:
    from chunking.client import DEFAULT_URL

    url: str = args.url or os.environ.get("PIXELSTREAM_URL") or DEFAULT_URL
    return url


def _token(args: argparse.Namespace) -> str | None:
    token: str | None = args.token or os.environ.get("PIXELSTREAM_TOKEN") or None
    return token


def _task_options(args: argparse.Namespace) -> dict[str, Any]:
    options = dict(args.options or {})
    if args.top_k is not None:
        options["top_k"] = args.top_k
    return options


# Output -------------------------------------------------------------------------------------


def _json_line(obj: dict[str, Any]) -> str:
    return orjson.dumps(obj).decode()


SUMMARY_WIDTH = 100
"""Characters a result's summary may take on its line."""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _clip(text: str, width: int = SUMMARY_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _counted(items: list[Any], one: str, many: str) -> str:
    return f"{len(items)} {one if len(items) == 1 else many}"


def _score(item: Any) -> str:
    score = item.get("score") if isinstance(item, dict) else None
    return f" {score:.2f}" if isinstance(score, int | float) else ""


def summarize(result: dict[str, Any]) -> str:
    """A short human summary of a task's result, for every shape the protocol names: labels,
    colours, objects, faces, codes, OCR text, captions, embeddings and moderation scores."""
    labels = result.get("labels")
    if isinstance(labels, list):
        return _clip(", ".join(f"{item.get('label')}{_score(item)}" for item in labels[:3]))
    colors = result.get("colors")
    if isinstance(colors, list):
        return " ".join(f"{item.get('hex')} {item.get('fraction', 0):.0%}" for item in colors[:3])
    objects = result.get("objects")
    if isinstance(objects, list):
        named = ", ".join(f"{item.get('label')}{_score(item)}" for item in objects[:4])
        return _clip(_counted(objects, "object", "objects") + (f": {named}" if named else ""))
    faces = result.get("faces")
    if isinstance(faces, list):
        scores = ", ".join(_score(item).strip() for item in faces[:6])
        return _clip(_counted(faces, "face", "faces") + (f" ({scores})" if scores else ""))
    codes = result.get("codes")
    if isinstance(codes, list):
        found = ", ".join(f"{item.get('format')} {item.get('text')!r}" for item in codes[:3])
        return _clip(_counted(codes, "code", "codes") + (f": {found}" if found else ""))
    lines = result.get("lines")
    if isinstance(lines, list) and isinstance(result.get("text"), str):
        text = _one_line(result["text"])  # whatever line breaks the model found
        return _clip(_counted(lines, "line", "lines") + (f": {text!r}" if text else ""))
    if isinstance(result.get("caption"), str):
        return _clip(repr(_one_line(result["caption"])))
    embedding = result.get("embedding")
    if isinstance(embedding, list):
        return f"embedding of {len(embedding)} values"
    if isinstance(result.get("nsfw"), int | float):
        return f"nsfw {result['nsfw']:.2f}"
    return _clip(_json_line(result), 80)


def _ok_outcome(name: str, result: Result, elapsed: float) -> dict[str, Any]:
    return {
        "file": name, "ok": True, "task": result.task, "result": result.result,
        "image": result.image, "cached": result.cached, "model": result.model,
        "timings_ms": result.timings_ms, "elapsed_s": round(elapsed, 3),
    }


def _failed_outcome(name: str, error: BaseException, elapsed: float) -> dict[str, Any]:
    from chunking.client import error_code
    from chunking.errors import ProtocolError

    message = error.message if isinstance(error, ProtocolError) else str(error)
    outcome: dict[str, Any] = {"file": name, "ok": False, "code": error_code(error),
                               "message": message or type(error).__name__,
                               "elapsed_s": round(elapsed, 3)}
    if isinstance(error, ProtocolError) and error.retry_after_ms is not None:
        outcome["retry_after_ms"] = error.retry_after_ms
    return outcome


def _human(outcome: dict[str, Any]) -> str:
    if outcome["ok"]:
        cached = ", cached" if outcome.get("cached") else ""
        return (f"ok    {outcome['file']}  {summarize(outcome['result'])}"
                f"  ({outcome['elapsed_s']:.2f} s{cached})")
    return f"FAIL  {outcome['file']}  {outcome['code']}: {outcome['message']}"


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


class ProgressBoard:
    """Live progress lines on a terminal, one per active file, redrawn in place with ANSI
    cursor movement (no dependency: tqdm or rich would add nothing this needs). Finished
    files' lines are printed above the board and stay."""

    BAR = 24

    def __init__(self, stream: TextIO, *, interval: float = 0.1) -> None:
        self.stream = stream
        self.interval = interval
        self.rows: dict[str, dict[str, Any]] = {}
        self._drawn = 0
        self._last = 0.0

    def add(self, key: str, total: int) -> None:
        self.rows[key] = {"total": total, "sent": 0, "acked": 0, "stage": "upload",
                          "detail": {}, "start": time.perf_counter()}
        self.draw(force=True)

    def progress(self, key: str, sent: int, acked: int, total: int) -> None:
        row = self.rows.get(key)
        if row is not None:
            row.update(sent=sent, acked=acked, total=total)
            self.draw()

    def stage(self, key: str, stage: str, detail: dict[str, Any]) -> None:
        row = self.rows.get(key)
        if row is not None:
            row.update(stage=stage, detail=detail)
            self.draw(force=stage != "upload")

    def finish(self, key: str, line: str | None, out: TextIO) -> None:
        """Remove ``key``'s row; print ``line`` (to ``out``) above the board."""
        self.rows.pop(key, None)
        self._erase()
        if line is not None:
            out.write(line + "\n")
            out.flush()
        self.draw(force=True)

    def close(self) -> None:
        self.rows.clear()
        self._erase()

    def render(self, key: str) -> str:
        row = self.rows[key]
        total = max(1, row["total"])
        acked_cells = self.BAR * row["acked"] // total
        sent_cells = max(acked_cells, self.BAR * row["sent"] // total)
        bar = "#" * acked_cells + "-" * (sent_cells - acked_cells) + "." * (self.BAR - sent_cells)
        name = key if len(key) <= 32 else "..." + key[-29:]
        stage, detail = row["stage"], row["detail"]
        if stage == "upload":
            elapsed = max(1e-6, time.perf_counter() - row["start"])
            state = (f"{row['acked'] / total:4.0%}  {_size(row['acked'])}/{_size(row['total'])}"
                     f"  {_size(row['acked'] / elapsed)}/s")
        elif stage == "queued":
            state = f"queued #{detail.get('position', '?')}"
        elif stage == "inference" and detail.get("total"):
            state = f"inference {detail.get('done', 0)}/{detail['total']} tiles"
        elif stage == "retrying":
            state = f"retrying in {detail.get('delay', 0):g} s ({detail.get('code')})"
        else:
            state = stage
        return f"{name:<32} [{bar}] {state}"

    def draw(self, *, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        text = self._erase_text() + "".join(self.render(key) + "\n" for key in self.rows)
        self._drawn = len(self.rows)
        self.stream.write(text)
        self.stream.flush()

    def _erase_text(self) -> str:
        # Up to the board's first line, then clear to the end of the screen.
        return (f"\x1b[{self._drawn}F" if self._drawn else "") + "\x1b[J"

    def _erase(self) -> None:
        self.stream.write(self._erase_text())
        self.stream.flush()
        self._drawn = 0


# upload -------------------------------------------------------------------------------------


def collect_files(paths: Sequence[str]) -> tuple[list[Path], list[str]]:
    """The files to upload (directories walked for image suffixes, sorted, hidden skipped),
    and the paths that do not exist."""
    files: list[Path] = []
    missing: list[str] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            missing.append(text)
    return files, missing


async def _upload(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import asyncio

    from chunking.client import DEFAULT_RETRY_DELAYS, Client

    files, missing = collect_files(args.paths)
    outcomes: list[dict[str, Any]] = []
    board = ProgressBoard(err) if err.isatty() and not args.no_progress else None

    def report(outcome: dict[str, Any]) -> None:
        outcomes.append(outcome)
        line = _json_line(outcome) if args.json else _human(outcome)
        if board is not None:
            board.finish(outcome["file"], line, out)
        else:
            out.write(line + "\n")
            out.flush()

    for text in missing:
        report({"file": text, "ok": False, "code": "not_found",
                "message": "no such file or directory", "elapsed_s": 0.0})
    if not files and not missing:
        print("error: no images found in the given directories", file=err)
        return EXIT_USAGE

    client = Client(
        _url(args), token=_token(args), base64=args.base64, checksum=not args.no_checksum,
        timeout=args.timeout,
        retry_delays=DEFAULT_RETRY_DELAYS if args.retry_delays is None else args.retry_delays,
        transport=args.transport,
    )
    options = _task_options(args)
    slots = asyncio.Semaphore(args.concurrency)

    async def one(path: Path) -> None:
        name = str(path)
        async with slots:
            start = time.perf_counter()
            callbacks: dict[str, Any] = {}
            if board is not None:
                board.add(name, 0)  # the total comes with the first progress
                callbacks = {
                    "on_progress": lambda s, a, t: board.progress(name, s, a, t),
                    "on_stage": lambda stage, detail: board.stage(name, stage, detail),
                }
            try:
                result = await client.analyze(path, task=args.task, options=options,
                                              **callbacks)
            except Exception as exc:  # one file's failure is its line, never the others'
                report(_failed_outcome(name, exc, time.perf_counter() - start))
            else:
                report(_ok_outcome(name, result, time.perf_counter() - start))

    try:
        await asyncio.gather(*(one(path) for path in files))
    finally:
        if board is not None:
            board.close()
        await client.close()
    failed = [o for o in outcomes if not o["ok"]]
    codes: dict[str, int] = {}
    for outcome in failed:
        codes[outcome["code"]] = codes.get(outcome["code"], 0) + 1
    detail = ", ".join(f"{code}: {count}" for code, count in sorted(codes.items()))
    print(f"{len(outcomes)} files: {len(outcomes) - len(failed)} ok, {len(failed)} failed"
          + (f" ({detail})" if detail else ""), file=err)
    return EXIT_FAILED if failed else EXIT_OK


# camera -------------------------------------------------------------------------------------


def _frame_line(event: FrameEvent, stats: FrameStats) -> dict[str, Any]:
    if event.type == "result":
        return {"type": "result", "stream": event.stream, "seq": event.seq,
                "latency_ms": round(event.latency_s * 1000, 1), "result": event.result.result,
                "cached": event.result.cached, "timings_ms": event.result.timings_ms}
    if event.type == "dropped":
        return {"type": "dropped", "stream": event.stream, "seq": event.seq,
                "reason": event.reason}
    return {"type": "error", "stream": event.stream, "seq": event.seq,
            "code": event.error.code.value, "message": event.error.message}


def _status(event: FrameEvent, stats: FrameStats) -> str:
    latency = stats.latency_percentiles((0.5, 0.95))
    timing = (f"p50 {latency['p50'] * 1000:.0f} ms  p95 {latency['p95'] * 1000:.0f} ms"
              if latency else "no results yet")
    if event.type == "result":
        what = f"seq {event.seq}  {summarize(event.result.result)}"
    elif event.type == "dropped":
        what = f"seq {event.seq}  dropped ({event.reason})"
    else:
        what = f"seq {event.seq}  {event.error.code.value}: {event.error.message}"
    return (f"{what}  |  {stats.result_fps:.1f} fps  dropped {stats.dropped}  {timing}")


def _summary_text(stats: FrameStats) -> str:
    data = stats.to_dict()
    latency = data["latency_ms"]
    lines = [
        f"frames sent {data['frames_sent']}, results {data['results']}, dropped "
        f"{data['dropped']}, lost {data['lost']}, errors {data['errors']}",
        f"{data['fps']:.1f} results/s over {data['elapsed_s']:.1f} s "
        f"(sent {data['send_fps']:.1f} frames/s)",
    ]
    if latency:
        lines.append("latency ms: " + "  ".join(f"{k} {v:.1f}" for k, v in latency.items()))
    return "\n".join(lines)


async def _camera(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import asyncio
    import contextlib
    import signal

    from chunking.client import Client, FrameStream, error_code

    source: Any = int(args.source) if args.source.isdigit() else args.source
    live = err.isatty() and not args.json
    client = Client(_url(args), token=_token(args), base64=args.base64)
    stream: FrameStream | None = None
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    interrupts = 0

    def on_interrupt() -> None:
        nonlocal interrupts
        interrupts += 1
        if stream is not None and interrupts == 1:
            stream.stop()  # a clean stop: the frames in flight are answered, then the summary
        elif main is not None:
            main.cancel()

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGINT, on_interrupt)
    status = EXIT_OK
    last_draw = 0.0
    try:
        stream = client.stream_frames(
            source, stream=args.stream, fps=args.fps or None, task=args.task,
            options=_task_options(args), jpeg_quality=args.quality, max_frames=args.max_frames,
        )
        async with stream:
            async for event in stream:
                if args.json:
                    out.write(_json_line(_frame_line(event, stream.stats)) + "\n")
                    out.flush()
                elif live:
                    now = time.perf_counter()
                    if now - last_draw >= 0.1:
                        last_draw = now
                        err.write("\r\x1b[K" + _status(event, stream.stats))
                        err.flush()
                elif event.type != "dropped":
                    out.write(_status(event, stream.stats) + "\n")
                    out.flush()
    except asyncio.CancelledError:
        status = EXIT_INTERRUPTED
    except Exception as exc:
        status = EXIT_FAILED
        message = exc.message if hasattr(exc, "message") else str(exc)
        if args.json:
            out.write(_json_line({"type": "error", "code": error_code(exc),
                                  "message": message}) + "\n")
        else:
            print(f"error: {error_code(exc)}: {message}", file=err)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGINT)
        await client.close()
    if live:
        err.write("\r\x1b[K")
        err.flush()
    if stream is not None:
        stats = stream.stats
        if args.json:
            out.write(_json_line({"type": "summary", **stats.to_dict()}) + "\n")
        else:
            out.write(_summary_text(stats) + "\n")
        out.flush()
        if status == EXIT_OK and stats.sent and not stats.results:
            status = EXIT_FAILED  # frames went out and nothing came back
    return status


# analyze ------------------------------------------------------------------------------------


def _analyze(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from chunking.client import analyze_http, analyze_sync

    path = Path(args.file)
    start = time.perf_counter()
    try:
        if args.http:
            result = analyze_http(path, url=args.url or os.environ.get("PIXELSTREAM_URL")
                                  or "http://127.0.0.1:8000", token=_token(args),
                                  task=args.task, options=_task_options(args))
        else:
            result = analyze_sync(path, url=_url(args), token=_token(args), task=args.task,
                                  options=_task_options(args), base64=args.base64)
    except Exception as exc:
        out.write(_json_line(_failed_outcome(str(path), exc, time.perf_counter() - start))
                  + "\n")
        return EXIT_FAILED
    out.write(_json_line(_ok_outcome(str(path), result, time.perf_counter() - start)) + "\n")
    return EXIT_OK
