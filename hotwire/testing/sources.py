"""Controllable sources and file sinks for test apps and benchmarks.

``counter`` makes a source that counts, can be paced, paused and told to crash at
a record; ``file_sink`` appends JSON lines that a test reads back with
``read_jsonl``. Both work in worker processes that load the app from a bundle.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TextIO

__all__ = ["count_lines", "counter", "file_sink", "read_jsonl"]

_YIELD_EVERY = 256  # unpaced sources let other tasks run this often
_PAUSE_POLL = 0.01


def counter(
    n: int | None = None,
    rate: float | None = None,
    keys: int = 16,
    payload: int = 0,
    crash_at: int | None = None,
    pause_at: int | None = None,
    pause_file: str | os.PathLike[str] | None = None,
) -> Callable[[Any], AsyncIterator[dict[str, Any]]]:
    """An async generator function ``source(ctx)`` yielding ``{"seq", "key", "src"}`` records.

    ``seq`` runs from ``ctx.position`` up to ``n`` (forever when None), ``key`` is
    ``f"k{seq % keys}"`` and ``src`` the instance index. ``rate`` paces each
    instance to that many records per second. ``payload`` adds a ``"pad"`` string
    of that many bytes. ``crash_at=K`` raises RuntimeError at seq K, once per
    process. While ``pause_file`` exists the source emits nothing; with
    ``pause_at=K`` the source creates ``pause_file`` itself at seq K (once), so it
    waits there until the test deletes the file.
    """
    if pause_at is not None and pause_file is None:
        raise ValueError("counter(pause_at=...) needs pause_file=... to resume from")
    state = {"crashed": False, "paused": False}
    pad = "x" * payload

    async def source(ctx: Any) -> AsyncIterator[dict[str, Any]]:
        start = int(getattr(ctx, "position", 0) or 0)
        instance = getattr(ctx, "instance", 0)
        chunk = max(1, int(rate / 50)) if rate else _YIELD_EVERY
        t0 = time.monotonic()
        seq = start
        while n is None or seq < n:
            if pause_file is not None:
                if pause_at is not None and seq == pause_at and not state["paused"]:
                    state["paused"] = True
                    Path(pause_file).touch()
                while os.path.exists(pause_file):
                    await asyncio.sleep(_PAUSE_POLL)
            if crash_at is not None and seq == crash_at and not state["crashed"]:
                state["crashed"] = True
                raise RuntimeError(f"counter source crashed at seq {seq} as told (crash_at)")
            record: dict[str, Any] = {"seq": seq, "key": f"k{seq % keys}", "src": instance}
            if payload:
                record["pad"] = pad
            yield record
            seq += 1
            if (seq - start) % chunk == 0:
                if rate:
                    ahead = (seq - start) / rate - (time.monotonic() - t0)
                    await asyncio.sleep(ahead if ahead > 0 else 0)
                else:
                    await asyncio.sleep(0)

    source.__qualname__ = source.__name__ = "counter"
    return source


_files: dict[str, TextIO] = {}
_files_lock = threading.Lock()


@atexit.register
def _close_files() -> None:
    """Close the sinks' files when the process exits (they are kept open until then)."""
    with _files_lock:
        for f in _files.values():
            f.close()
        _files.clear()


def file_sink(path: str | os.PathLike[str]) -> Callable[[Any], None]:
    """A sink ``fn(record)`` appending one JSON line per record to ``path``.

    The file is opened once per process, on the first record, and flushed after
    every line. Tuples become JSON lists and bytes are decoded as latin-1.
    """
    target = os.path.abspath(path)

    def sink(record: Any) -> None:
        line = json.dumps(record, default=_json_default) + "\n"
        with _files_lock:
            f = _files.get(target)
            if f is None or f.closed:
                f = _files[target] = open(target, "a", buffering=1, encoding="utf-8")
            f.write(line)
            f.flush()

    sink.__qualname__ = sink.__name__ = "file_sink"
    return sink


def _json_default(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("latin-1")
    if isinstance(v, (set, frozenset)):
        return sorted(v, key=repr)
    raise TypeError(f"file_sink cannot write a {type(v).__name__} as JSON")


def count_lines(path: str | os.PathLike[str]) -> int:
    """How many lines a sink has written so far; 0 if the file does not exist yet."""
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def read_jsonl(path: str | os.PathLike[str]) -> list[Any]:
    """The records in a JSON-lines file; [] if it does not exist. A torn last line is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # being written right now
                break
            raise
    return out
