"""Logging: text or one JSON object per line, ids from context, and no secrets, ever.

* :func:`log_context` binds ids (``session``, ``upload``, ``request``) for the current task and
  the tasks it starts (``contextvars``), so a record logged anywhere below carries them.
* :class:`Redactor` scrubs API tokens from every record of the loggers that see request
  lines and headers (uvicorn's, and websockets' handshake debug lines, which uvicorn routes
  through ``uvicorn.error``): ``?token=...``, ``Authorization: ...``, ``Bearer ...`` and the
  configured tokens themselves. :func:`install_redaction` puts it on those loggers, so it holds
  for any handler, test capture included.
* :func:`configure_logging` sets up the process's handler (``--log-format text|json``).
  Worker processes call :func:`configure_from_environment`: the format travels to them in
  ``PIXELSTREAM_LOG_FORMAT``.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import logging
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import orjson

LOG_FORMAT_ENV = "PIXELSTREAM_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s%(context)s"

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar(
    "pixelstream_log_context", default={}  # noqa: B039 -- never mutated, always replaced
)

CONTEXT_FIELDS = ("request", "session", "upload", "stream")
"""Ids a record may carry, as JSON keys ``request_id``, ``session_id``, ``upload_id``, ..."""

REDACTED_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "websockets",
                    "websockets.server", "websockets.protocol")

_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "context",
}


def current_context() -> dict[str, str]:
    return _context.get()


@contextlib.contextmanager
def log_context(**ids: str | None) -> Iterator[None]:
    """Add ids to every record logged in this block (and in tasks started from it)."""
    token = _context.set({**_context.get(), **{k: v for k, v in ids.items() if v}})
    try:
        yield
    finally:
        _context.reset(token)


def bind_log_context(**ids: str | None) -> None:
    """Add ids for the rest of the current task (a task's context is its own copy)."""
    _context.set({**_context.get(), **{k: v for k, v in ids.items() if v}})


class Redactor(logging.Filter):
    """Rewrites a record's message with tokens replaced by ``[redacted]``."""

    _PATTERNS = (
        re.compile(r"(?i)([?&;]token=)[^&\s\"'#]*"),
        re.compile(r"(?i)(authorization\s*[:=]\s*['\"]?)(?:bearer\s+|basic\s+)?[^\s'\",]+"),
        re.compile(r"(?i)(\bbearer\s+)[^\s'\",]+"),
    )

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for pattern in self._PATTERNS:
            text = pattern.sub(r"\1[redacted]", text)
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format: leave it to the handler to report
            return True
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


_installed: dict[str, Redactor] = {}


def install_redaction(secrets: Iterable[str] = ()) -> Redactor:
    """Put one :class:`Redactor` on every logger that sees request lines or headers; later
    calls add their secrets to it (several apps in one process, as in tests)."""
    secrets = list(secrets)
    for name in REDACTED_LOGGERS:
        redactor = _installed.get(name)
        if redactor is None:
            redactor = _installed[name] = Redactor(secrets)
            logging.getLogger(name).addFilter(redactor)
        else:
            redactor.secrets = sorted(set(redactor.secrets) | set(secrets), key=len, reverse=True)
    return _installed[REDACTED_LOGGERS[0]]


class ContextFilter(logging.Filter):
    """Copies the bound ids onto each record (a handler filter: it sees propagated records)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            name = f"{key}_id"
            if not hasattr(record, name):
                setattr(record, name, value)
        ids = [f"{key}={getattr(record, f'{key}_id')}" for key in CONTEXT_FIELDS
               if getattr(record, f"{key}_id", None)]
        record.context = f" [{' '.join(ids)}]" if ids else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    the ids in context (``request_id``, ``session_id``, ``upload_id``, ``stream_id``), any
    ``extra=`` fields, and ``exception`` (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


def make_handler(log_format: str, stream: Any = None) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    return handler


def configure_logging(level: str, log_format: str, secrets: Iterable[str] = ()) -> None:
    """The process's logging: one stderr handler on the root logger (uvicorn's loggers
    propagate to it), the format handed on to worker processes through the environment."""
    if log_format not in ("text", "json"):
        raise ValueError("log_format must be 'text' or 'json'")
    os.environ[LOG_FORMAT_ENV] = log_format
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = make_handler(log_format)
    handler.addFilter(install_redaction(secrets))  # records from any logger, scrubbed too
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings are records too, in the same format
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def configure_from_environment(process: str) -> None:
    """For worker processes: the gateway's format (``PIXELSTREAM_LOG_FORMAT``), level INFO."""
    log_format = os.environ.get(LOG_FORMAT_ENV, "text")
    if log_format not in ("text", "json"):
        log_format = "text"
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = make_handler(log_format)
    handler.addFilter(install_redaction())
    if log_format == "text":
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s {process} %(levelname)s %(message)s%(context)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
