"""The master's durable state: apps, every version's logical model and placement, bundles.

SQLite under ``--data-dir``; every write is one transaction, so a restarted
master reads back exactly what it had committed.

SQLite never runs on the master's event loop: one dedicated thread owns the
connection and runs every statement, in the order they were asked for. A write
returns at once with a future of its completion; the master awaits it where it
must be durable before going on (before it acts on a transition, before it
replies), and since the thread runs everything in order, a completed write means
every earlier one completed too. Reads are awaited with :meth:`Store.read`; the
latest checkpoint of each app is kept in memory and read without SQLite.

A version's model is stored whole, or as what changed since an earlier version
of the app (``{"delta_of": version, ...}``, see :mod:`hotwire.model_delta`): an
upgrade that changes one PE of a large app writes that PE, not the app. Every
read rebuilds the whole model, walking back to the nearest whole one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hotwire.model import LogicalModel
from hotwire.model_delta import apply_delta
from hotwire.plan import Placement, placement_from_dict, placement_to_dict

log = logging.getLogger(__name__)

T = TypeVar("T")
CanaryRow = tuple[str, float, dict[str, Any]]  # app, start time, the canary's record

SCHEMA = """
CREATE TABLE IF NOT EXISTS bundles (
    hash TEXT PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    app TEXT NOT NULL,
    version INTEGER NOT NULL,
    created REAL NOT NULL,
    action TEXT NOT NULL,
    model_json TEXT NOT NULL,
    bundle_hash TEXT NOT NULL,
    placement_json TEXT NOT NULL,
    changes_json TEXT NOT NULL,
    latency_ms REAL NOT NULL DEFAULT 0,
    rolled_back_to INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (app, version)
);
CREATE TABLE IF NOT EXISTS apps (
    app TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    epoch INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS checkpoints (
    app TEXT PRIMARY KEY,
    id INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    created REAL NOT NULL,
    states BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    name TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    role TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    revoked REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    token TEXT NOT NULL,
    role TEXT NOT NULL,
    peer TEXT NOT NULL,
    command TEXT NOT NULL,
    app TEXT NOT NULL,
    from_version INTEGER NOT NULL,
    to_version INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS canaries (
    app TEXT NOT NULL,
    started REAL NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (app, started)
);
CREATE TABLE IF NOT EXISTS inflight (
    app TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    phase TEXT NOT NULL,
    plan BLOB NOT NULL
);
"""


@dataclass(frozen=True)
class VersionRecord:
    app: str
    version: int
    created: float
    action: str
    model: LogicalModel
    bundle_hash: str
    placement: Placement
    changes: dict[str, Any]
    latency_ms: float
    rolled_back_to: int


class Store:
    """The master's SQLite database, used from one thread of its own (see the module doc)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hotwire-store")
        self._thread_id = self._pool.submit(threading.get_ident).result()
        self.db: sqlite3.Connection = self._pool.submit(self._open).result()
        # app -> (id, epoch, states) of its latest checkpoint; the table holds one per app.
        self._checkpoints: dict[str, tuple[int, int, bytes]] = self._wait(self._load_checkpoints)

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        return db

    def close(self) -> None:
        """Run every write asked for so far, then close the database and stop the thread."""
        try:
            self._wait(self.db.close)
        finally:
            self._pool.shutdown(wait=True)

    # -- the store's thread ----------------------------------------------
    def _wait(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the store's thread and block until it is done."""
        if threading.get_ident() == self._thread_id:
            return fn(*args)
        return self._pool.submit(fn, *args).result()

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Await ``fn(*args)`` (a reading method of this store) run on the store's thread."""
        return await asyncio.wrap_future(self._pool.submit(fn, *args))

    def _write(self, fn: Callable[..., None], *args: Any) -> Future[None]:
        """Queue a write on the store's thread; a failure nobody awaits is logged."""
        fut = self._pool.submit(fn, *args)
        fut.add_done_callback(_log_failure)
        return fut

    async def flush(self) -> None:
        """Wait until every write asked for so far is done (whether it failed or not)."""
        await asyncio.wrap_future(self._pool.submit(_nothing))

    # -- bundles ---------------------------------------------------------
    def put_bundle(self, h: str, data: bytes) -> Future[None]:
        return self._write(
            self._execute, "INSERT OR IGNORE INTO bundles (hash, data) VALUES (?, ?)", (h, data)
        )

    def bundle(self, h: str) -> bytes | None:
        """Blocks until the store's thread read it: ``await store.read(store.bundle, h)``."""
        return self._wait(self._bundle, h)

    def _bundle(self, h: str) -> bytes | None:
        row = self.db.execute("SELECT data FROM bundles WHERE hash = ?", (h,)).fetchone()
        return None if row is None else bytes(row[0])

    # -- versions --------------------------------------------------------
    def commit_version(
        self,
        app: str,
        version: int,
        action: str,
        model: LogicalModel | str,
        bundle_hash: str,
        placement: Placement,
        changes: dict[str, Any],
        latency_ms: float,
        epoch: int,
        state: str = "running",
        rolled_back_to: int = 0,
        canary: CanaryRow | None = None,
        placement_dict: dict[str, Any] | None = None,
    ) -> Future[None]:
        """Record a new version of ``app`` (and, in the same transaction, ``canary``);
        ``model`` may be given as text: its :meth:`LogicalModel.to_json`, or a
        delta on an earlier version (see the module doc). ``placement_dict``, if
        given, is ``placement_to_dict(placement)`` already made.

        ``placement_dict`` and ``changes`` turn into JSON on the store's thread:
        nothing may change them after the call."""
        row = (
            app,
            version,
            time.time(),
            action,
            model if isinstance(model, str) else model.to_json(),
            bundle_hash,
            placement_to_dict(placement) if placement_dict is None else placement_dict,
            changes,
            latency_ms,
            rolled_back_to,
        )
        return self._write(self._commit_version, row, (app, version, state, epoch), canary)

    def _commit_version(
        self, row: tuple[Any, ...], app_row: tuple[Any, ...], canary: CanaryRow | None
    ) -> None:
        row = (*row[:6], json.dumps(row[6]), json.dumps(row[7]), *row[8:])
        with self.db:
            self.db.execute("BEGIN")
            self._put_canary(canary)
            self.db.execute(
                "INSERT OR REPLACE INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row
            )
            self.db.execute(
                "INSERT OR REPLACE INTO apps (app, version, state, epoch) VALUES (?, ?, ?, ?)",
                app_row,
            )
            self.db.execute("DELETE FROM inflight WHERE app = ?", (app_row[0],))

    def update_placement(
        self,
        app: str,
        version: int,
        placement: Placement,
        epoch: int,
        canary: CanaryRow | None = None,
    ) -> Future[None]:
        """A migration, recovery or canary moved instances: same version, new placement
        (and, in the same transaction, ``canary``)."""
        return self._write(
            self._update_placement,
            app,
            version,
            json.dumps(placement_to_dict(placement)),
            epoch,
            canary,
        )

    def _update_placement(
        self, app: str, version: int, placement_json: str, epoch: int, canary: CanaryRow | None
    ) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self._put_canary(canary)
            self.db.execute(
                "UPDATE versions SET placement_json = ? WHERE app = ? AND version = ?",
                (placement_json, app, version),
            )
            self.db.execute("UPDATE apps SET epoch = ? WHERE app = ?", (epoch, app))
            self.db.execute("DELETE FROM inflight WHERE app = ?", (app,))

    # -- canaries (hotwire.master.canary.CanaryRun.to_record) -------------------
    def put_canary(self, canary: CanaryRow) -> Future[None]:
        """Record a canary as it is now (one row per app and start time)."""
        return self._write(self._put_canary, canary)

    def _put_canary(self, canary: CanaryRow | None) -> None:
        if canary is not None:
            app, started, record = canary
            self.db.execute(
                "INSERT OR REPLACE INTO canaries (app, started, record) VALUES (?, ?, ?)",
                (app, started, json.dumps(record)),
            )

    def canaries(self) -> list[dict[str, Any]]:
        """Every canary's record, oldest first: ``await store.read(store.canaries)``."""
        return self._wait(self._canaries)

    def _canaries(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT record FROM canaries ORDER BY started, app")
        return [json.loads(r[0]) for r in rows]

    # -- transitions in flight (finished or undone by a restarted master) ----
    def begin_transition(self, app: str, epoch: int, phase: str, plan: bytes) -> Future[None]:
        return self._write(
            self._execute,
            "INSERT OR REPLACE INTO inflight VALUES (?, ?, ?, ?)",
            (app, epoch, phase, plan),
        )

    def end_transition(self, app: str) -> Future[None]:
        return self._write(self._execute, "DELETE FROM inflight WHERE app = ?", (app,))

    def inflight(self) -> list[tuple[str, int, str, bytes]]:
        """Blocks until the store's thread read it: ``await store.read(store.inflight)``."""
        return self._wait(self._inflight)

    def _inflight(self) -> list[tuple[str, int, str, bytes]]:
        return [
            (a, int(e), p, bytes(b))
            for a, e, p, b in self.db.execute("SELECT app, epoch, phase, plan FROM inflight")
        ]

    # -- checkpoints -----------------------------------------------------
    def put_checkpoint(self, app: str, cid: int, epoch: int, states: bytes) -> Future[None]:
        self._checkpoints[app] = (cid, epoch, states)
        return self._write(
            self._execute,
            "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?)",
            (app, cid, epoch, time.time(), states),
        )

    def checkpoint(self, app: str) -> tuple[int, int, bytes] | None:
        """The app's latest checkpoint, from memory (no SQLite)."""
        return self._checkpoints.get(app)

    def _load_checkpoints(self) -> dict[str, tuple[int, int, bytes]]:
        rows = self.db.execute("SELECT app, id, epoch, states FROM checkpoints")
        return {str(a): (int(i), int(e), bytes(s)) for a, i, e, s in rows}

    # -- worker sessions (fencing epochs) --------------------------------
    def put_worker_epoch(self, name: str, epoch: int) -> Future[None]:
        """The epoch of worker ``name``'s latest session (it only grows)."""
        return self._write(
            self._execute,
            "INSERT INTO workers (name, epoch) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET epoch = MAX(epoch, excluded.epoch)",
            (name, epoch),
        )

    def worker_epochs(self) -> dict[str, int]:
        """Blocks until the store's thread read it: ``await store.read(store.worker_epochs)``."""
        return self._wait(self._worker_epochs)

    def _worker_epochs(self) -> dict[str, int]:
        return {str(n): int(e) for n, e in self.db.execute("SELECT name, epoch FROM workers")}

    def set_state(self, app: str, state: str) -> Future[None]:
        return self._write(self._execute, "UPDATE apps SET state = ? WHERE app = ?", (state, app))

    # -- reads for ``await store.read(...)`` (they block when called directly) ----
    def apps(self) -> list[tuple[str, int, str, int]]:
        return self._wait(self._apps)

    def _apps(self) -> list[tuple[str, int, str, int]]:
        rows = self.db.execute("SELECT app, version, state, epoch FROM apps ORDER BY app")
        return [(str(a), int(v), str(s), int(e)) for a, v, s, e in rows]

    def version(self, app: str, version: int) -> VersionRecord | None:
        return self._wait(self._version, app, version)

    def _version(self, app: str, version: int) -> VersionRecord | None:
        row = self.db.execute(
            "SELECT * FROM versions WHERE app = ? AND version = ?", (app, version)
        ).fetchone()
        return None if row is None else _record(row, self._model(app, version, row[4]))

    def model_of(self, app: str, version: int, text: str) -> LogicalModel:
        """The whole model of ``app`` at ``version`` from its stored ``text`` (whole or a
        delta); blocks until the store's thread read the versions it builds on."""
        return self._wait(self._model, app, version, text)

    def versions(self, app: str) -> list[VersionRecord]:
        return self._wait(self._versions, app)

    def _versions(self, app: str) -> list[VersionRecord]:
        rows = self.db.execute(
            "SELECT * FROM versions WHERE app = ? ORDER BY version", (app,)
        ).fetchall()
        models: dict[int, LogicalModel] = {}  # each delta's base comes before it
        out = []
        for r in rows:
            models[int(r[1])] = model = self._model(app, int(r[1]), r[4], models)
            out.append(_record(r, model))
        return out

    def _model(
        self, app: str, version: int, text: str, known: dict[int, LogicalModel] | None = None
    ) -> LogicalModel:
        """The whole model of ``app`` at ``version`` from its stored ``text``: deltas
        applied to the nearest whole model before it (or one in ``known``)."""
        chain: list[dict[str, Any]] = []
        d = json.loads(text)
        at = version
        while "delta_of" in d:
            chain.append(d)
            base = int(d["delta_of"])
            if base >= at:
                raise ValueError(f"app {app!r} version {at}: a delta on version {base}")
            at = base
            if known is not None and base in known:
                model = known[base]
                break
            row = self.db.execute(
                "SELECT model_json FROM versions WHERE app = ? AND version = ?", (app, base)
            ).fetchone()
            if row is None:
                raise LookupError(
                    f"app {app!r} version {version}: its model is a delta on version "
                    f"{base}, which the store lacks"
                )
            d = json.loads(row[0])
        else:
            model = LogicalModel.from_dict(d)
        for delta in reversed(chain):
            model = apply_delta(model, delta)
        return model

    # -- tokens and the audit log (hotwire.master.access) ---------------------
    def put_token(self, tid: str, digest: str, role: str, label: str) -> Future[None]:
        return self._write(
            self._execute,
            "INSERT INTO tokens (id, digest, role, label, created) VALUES (?, ?, ?, ?, ?)",
            (tid, digest, role, label, time.time()),
        )

    def revoke_token(self, tid: str) -> Future[None]:
        return self._write(
            self._execute,
            "UPDATE tokens SET revoked = ? WHERE id = ? AND revoked = 0",
            (time.time(), tid),
        )

    def tokens(self) -> list[tuple[str, str, str, str, float, float]]:
        """(id, digest, role, label, created, revoked) of every token ever made."""
        return self._wait(self._tokens)

    def _tokens(self) -> list[tuple[str, str, str, str, float, float]]:
        q = "SELECT id, digest, role, label, created, revoked FROM tokens ORDER BY created"
        return [tuple(r) for r in self.db.execute(q)]  # type: ignore[misc]

    def put_audit(self, row: tuple[Any, ...]) -> Future[None]:
        """(at, token, role, peer, command, app, from_version, to_version, outcome, detail)"""
        return self._write(
            self._execute,
            "INSERT INTO audit (at, token, role, peer, command, app, from_version, to_version,"
            " outcome, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            row,
        )

    def audit(self, app: str, limit: int) -> list[tuple[Any, ...]]:
        """The newest ``limit`` audit entries (of ``app`` if given), oldest first."""
        return self._wait(self._audit, app, limit)

    def _audit(self, app: str, limit: int) -> list[tuple[Any, ...]]:
        where, params = ("WHERE app = ?", (app,)) if app else ("", ())
        rows = self.db.execute(
            "SELECT seq, at, token, role, peer, command, app, from_version, to_version, outcome,"
            f" detail FROM audit {where} ORDER BY seq DESC LIMIT ?",
            (*params, limit),
        ).fetchall()
        return [tuple(r) for r in reversed(rows)]

    def _execute(self, sql: str, params: tuple[Any, ...]) -> None:
        self.db.execute(sql, params)


def _nothing() -> None:
    return None


def _log_failure(fut: Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("a write to the master's store failed", exc_info=fut.exception())


def _record(row: Any, model: LogicalModel) -> VersionRecord:
    return VersionRecord(
        app=row[0],
        version=int(row[1]),
        created=float(row[2]),
        action=row[3],
        model=model,
        bundle_hash=row[5],
        placement=placement_from_dict(json.loads(row[6])),
        changes=json.loads(row[7]),
        latency_ms=float(row[8]),
        rolled_back_to=int(row[9]),
    )
