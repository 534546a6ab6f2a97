"""Log output of the master and the workers: plain text for people (the default) or
one JSON object per line (``--log-format json``) for a log pipeline.

A JSON line has ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``
and ``message``, then whichever of ``app``, ``pe``, ``instance``, ``transition``
and ``worker`` apply, and ``exception`` with the traceback when there is one.
Those fields come, in this order of precedence, from:

* ``extra={...}`` given to the log call;
* the log context of the running asyncio task (:func:`log_context`): an
  instance's task carries its app, PE and instance; a worker's instruction batch
  and the master's transitions carry the app and the transition (its epoch);
* the process's fields (:func:`set_process_fields`): a worker's name on every line
  it writes;
* the message itself, for the master's and workers' ``"app %r: ..."`` convention:
  a message whose format starts with ``app %r`` gives ``app`` its first argument.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

__all__ = [
    "FIELDS",
    "JsonFormatter",
    "announce",
    "log_context",
    "set_process_fields",
    "setup_logging",
]

FIELDS = ("app", "pe", "instance", "transition", "worker")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_NONE: dict[str, Any] = {}  # never changed: a task's context is replaced whole
_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("hotwire_log_context")
_process: dict[str, Any] = {}
_format = "text"


def set_process_fields(**fields: Any) -> None:
    """Fields every line of this process carries (a worker's name)."""
    _process.update({k: v for k, v in fields.items() if v not in (None, "")})


def context_with(**fields: Any) -> dict[str, Any]:
    """The current task's log context with ``fields`` added (None drops a field)."""
    out = {**_context.get(_NONE), **fields}
    return {k: v for k, v in out.items() if v is not None}


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Lines logged inside (by this task, and tasks it creates) carry ``fields``."""
    token = _context.set(context_with(**fields))
    try:
        yield
    finally:
        _context.reset(token)


@contextlib.contextmanager
def as_task(ctx: contextvars.Context) -> Iterator[None]:
    """Lines logged inside carry the log context of ``ctx`` (a :func:`task_context`)
    instead of this task's: for work one task does on behalf of another's."""
    token = _context.set(ctx.get(_context, _NONE))
    try:
        yield
    finally:
        _context.reset(token)


def task_context(**fields: Any) -> contextvars.Context:
    """A copy of the current context whose log context is exactly ``fields``: give it
    to ``loop.create_task(..., context=)`` so a long-lived task logs with them."""
    ctx = contextvars.copy_context()
    ctx.run(_context.set, {k: v for k, v in fields.items() if v is not None})
    return ctx


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of ``record`` (see the module's docstring)."""
    out: dict[str, Any] = dict(_process)
    if isinstance(record.msg, str) and record.msg.startswith("app %r"):
        args = record.args
        if isinstance(args, tuple) and args and isinstance(args[0], str):
            out["app"] = args[0]
    out.update(_context.get(_NONE))
    for name in FIELDS:
        value = record.__dict__.get(name)
        if value is not None:
            out[name] = value
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        doc: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = fields_of(record)
        for name in FIELDS:
            if name in fields:
                doc[name] = fields[name]
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr at ``level`` in ``fmt`` ("text" or "json")."""
    global _format
    _format = fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def announce(message: str, level: int = logging.INFO, **fields: Any) -> None:
    """A line a person or a script waits for (``master listening on ...``): printed
    as it is in text format, as a JSON line in JSON format, whatever the log level."""
    if _format != "json":
        print(message, file=sys.stderr, flush=True)
        return
    record = logging.LogRecord("hotwire.cli", level, "", 0, message, None, None)
    record.__dict__.update(fields)
    print(JsonFormatter().format(record), file=sys.stderr, flush=True)
