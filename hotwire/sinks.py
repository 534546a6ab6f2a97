"""Transactional sinks: output that is exactly once, even across worker failures.

A plain sink function writes each record at once; after a worker failure the app
restarts from its last checkpoint and the sources replay, so the sink sees some
records again (at-least-once). A :class:`TransactionalSink` writes into a
transaction instead, and its output becomes visible only when the checkpoint
that covers it is complete, the two-phase commit of Flink's sinks:

1. ``begin(txn)`` opens a transaction (``txn`` is unique to this instance);
   ``write(record)`` adds records to it;
2. at a checkpoint barrier the runtime calls ``pre_commit()``: flush and make the
   transaction durable but not visible; the handle it returns is kept in the
   checkpoint's state, and a new transaction begins;
3. once the master has stored that checkpoint, the runtime calls
   ``commit(handle)``: make it visible. ``commit`` must be idempotent: after a
   failure, the handles in the restored checkpoint are committed again;
4. what was written after the last complete checkpoint belongs to transactions
   that are never committed: the runtime calls ``abort()`` for the open one of a
   stopping instance, and a crashed instance leaves its transactions in doubt
   (the file sink leaves hidden ``.tmp`` files that readers ignore).

Records replayed after a failure go into new transactions, so every record is
committed exactly once. Output appears at checkpoint pace (``--checkpoint-interval``).

``setup``, ``pre_commit``, ``commit``, ``recover``, ``flush`` and ``teardown`` run in
a thread (one call at a time per instance), so a slow server never pauses the
worker's event loop; ``write`` runs on the loop and should only buffer. When one of
them raises an error :meth:`TransactionalSink.is_transient` accepts (the server is
unreachable), the runtime calls it again with backoff until it succeeds, and the
instance waits meanwhile (``hotwire.connectors.outage``): so ``pre_commit`` and
``commit`` must keep their transaction when they fail, and may be called again.

Use one with ``stream.sink("out", JsonlSink, config={"dir": "/data/out"})``: the
runtime makes one object per sink instance.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TextIO

from hotwire.names import confined

__all__ = ["JsonlSink", "TransactionalSink", "read_committed"]


class TransactionalSink:
    """Base class of two-phase-commit sinks; see the module docstring for when the
    runtime calls each method and on which thread."""

    def server(self) -> str:
        """The server this sink writes to, as status shows it while it is unreachable."""
        return "the sink's server"

    def is_transient(self, exc: BaseException) -> bool:
        """True when ``exc`` means the server is unreachable for now: the runtime then
        retries the call with backoff instead of failing the instance."""
        return False

    def flush(self) -> list[tuple[Any, BaseException]]:
        """Called after each input batch's writes (in a thread): write what ``write``
        buffered when the sink writes per batch rather than per transaction. Returns
        the records that failed, with their errors, for the PE's error policy."""
        return []

    def flush_due(self) -> bool:
        """Called on the event loop after each input batch's writes, when the class
        defines :meth:`flush`: whether to call it now (default: always). Cheap, no
        I/O: it spares a thread hand-off per batch when there is nothing to write."""
        return True

    def setup(self, ctx: Any) -> None:
        """Called once per instance before anything else; ``ctx.config`` is the PE's config."""

    def begin(self, txn: str) -> None:
        """Open transaction ``txn`` (unique across instances and generations)."""
        raise NotImplementedError

    def write(self, record: Any) -> None:
        """Add ``record`` to the open transaction."""
        raise NotImplementedError

    def pre_commit(self) -> Any:
        """Make the open transaction durable, not visible; return its handle (a
        msgpack value), or None when it holds nothing."""
        raise NotImplementedError

    def commit(self, handle: Any) -> None:
        """Make a pre-committed transaction visible. Idempotent."""
        raise NotImplementedError

    def abort(self) -> None:
        """Drop the open transaction."""

    def recover(self, committed: list[Any]) -> None:
        """Resolve in-doubt transactions after a recovery (or when an upgrade removes
        the sink): ``committed`` are the handles the restored checkpoint held, just
        committed; any other pre-committed transaction of this instance belongs to a
        checkpoint that never completed and should be rolled back. Called after
        :meth:`setup`, before new records; not called on a fresh start or on an
        upgrade's handover (the predecessor's pending handles then commit as usual)."""

    def teardown(self) -> None:
        """Called when the instance stops, after :meth:`abort`."""


class JsonlSink(TransactionalSink):
    """Exactly-once JSON lines in a directory (``config={"dir": ...}``).

    Each transaction is written to a hidden ``.<txn>.jsonl.tmp`` file, fsynced at
    pre-commit and renamed to ``<txn>.jsonl`` at commit (rename is atomic). Read
    the committed output with :func:`read_committed`.
    """

    def setup(self, ctx: Any) -> None:
        config = getattr(ctx, "config", None) or {}
        directory = config.get("dir") if isinstance(config, dict) else None
        if not directory:
            raise ValueError(
                f"PE {getattr(ctx, 'pe', '?')!r}: JsonlSink needs config={{'dir': DIRECTORY}}"
            )
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._file: TextIO | None = None
        self._txn = ""
        self._n = 0

    def _tmp(self, txn: str) -> Path:
        return confined(self.dir, f".{txn}.jsonl.tmp")

    def begin(self, txn: str) -> None:
        self._txn, self._n, self._file = txn, 0, None

    def write(self, record: Any) -> None:
        if self._file is None:
            self._file = open(self._tmp(self._txn), "w", encoding="utf-8")
        self._file.write(json.dumps(record, default=_json_default) + "\n")
        self._n += 1

    def pre_commit(self) -> Any:
        f, self._file = self._file, None
        if f is None:
            return None  # nothing written: no file, nothing to commit
        f.flush()
        os.fsync(f.fileno())
        f.close()
        return self._txn

    def commit(self, handle: Any) -> None:
        tmp, final = self._tmp(str(handle)), confined(self.dir, f"{handle}.jsonl")
        if tmp.exists():
            os.replace(tmp, final)
            _fsync_dir(self.dir)
        elif not final.exists():
            raise FileNotFoundError(f"transaction {handle!r}: neither {tmp} nor {final} exists")

    def abort(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            f.close()
            self._tmp(self._txn).unlink(missing_ok=True)


def read_committed(directory: str | os.PathLike[str]) -> list[Any]:
    """Every record a :class:`JsonlSink` committed in ``directory``."""
    out: list[Any] = []
    for p in sorted(Path(directory).glob("[!.]*.jsonl")):
        with open(p, encoding="utf-8") as f:
            out.extend(json.loads(line) for line in f if line.strip())
    return out


def _json_default(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("latin-1")
    if isinstance(v, tuple | set):
        return list(v)
    return repr(v)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
