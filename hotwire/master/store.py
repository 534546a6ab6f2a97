"""The master's durable state: apps, every version's logical model and placement, bundles.

SQLite under ``--data-dir``; every write is one transaction, so a restarted
master reads back exactly what it had committed.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotwire.model import LogicalModel
from hotwire.plan import Placement, placement_from_dict, placement_to_dict

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
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- bundles ---------------------------------------------------------
    def put_bundle(self, h: str, data: bytes) -> None:
        self.db.execute("INSERT OR IGNORE INTO bundles (hash, data) VALUES (?, ?)", (h, data))

    def bundle(self, h: str) -> bytes | None:
        row = self.db.execute("SELECT data FROM bundles WHERE hash = ?", (h,)).fetchone()
        return None if row is None else bytes(row[0])

    # -- versions --------------------------------------------------------
    def commit_version(
        self,
        app: str,
        version: int,
        action: str,
        model: LogicalModel,
        bundle_hash: str,
        placement: Placement,
        changes: dict[str, Any],
        latency_ms: float,
        epoch: int,
        state: str = "running",
        rolled_back_to: int = 0,
    ) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                "INSERT OR REPLACE INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    app,
                    version,
                    time.time(),
                    action,
                    model.to_json(),
                    bundle_hash,
                    json.dumps(placement_to_dict(placement)),
                    json.dumps(changes),
                    latency_ms,
                    rolled_back_to,
                ),
            )
            self.db.execute(
                "INSERT OR REPLACE INTO apps (app, version, state, epoch) VALUES (?, ?, ?, ?)",
                (app, version, state, epoch),
            )
            self.db.execute("DELETE FROM inflight WHERE app = ?", (app,))

    def update_placement(self, app: str, version: int, placement: Placement, epoch: int) -> None:
        """A migration or recovery moved instances: same version, new placement."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute(
                "UPDATE versions SET placement_json = ? WHERE app = ? AND version = ?",
                (json.dumps(placement_to_dict(placement)), app, version),
            )
            self.db.execute("UPDATE apps SET epoch = ? WHERE app = ?", (epoch, app))
            self.db.execute("DELETE FROM inflight WHERE app = ?", (app,))

    # -- transitions in flight (finished or undone by a restarted master) ----
    def begin_transition(self, app: str, epoch: int, phase: str, plan: bytes) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO inflight VALUES (?, ?, ?, ?)", (app, epoch, phase, plan)
        )

    def end_transition(self, app: str) -> None:
        self.db.execute("DELETE FROM inflight WHERE app = ?", (app,))

    def inflight(self) -> list[tuple[str, int, str, bytes]]:
        return [
            (a, int(e), p, bytes(b))
            for a, e, p, b in self.db.execute("SELECT app, epoch, phase, plan FROM inflight")
        ]

    # -- checkpoints -----------------------------------------------------
    def put_checkpoint(self, app: str, cid: int, epoch: int, states: bytes) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?)",
            (app, cid, epoch, time.time(), states),
        )

    def checkpoint(self, app: str) -> tuple[int, int, bytes] | None:
        row = self.db.execute(
            "SELECT id, epoch, states FROM checkpoints WHERE app = ?", (app,)
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]), bytes(row[2]))

    def set_state(self, app: str, state: str) -> None:
        self.db.execute("UPDATE apps SET state = ? WHERE app = ?", (state, app))

    def apps(self) -> list[tuple[str, int, str, int]]:
        rows = self.db.execute("SELECT app, version, state, epoch FROM apps ORDER BY app")
        return [(str(a), int(v), str(s), int(e)) for a, v, s, e in rows]

    def version(self, app: str, version: int) -> VersionRecord | None:
        row = self.db.execute(
            "SELECT * FROM versions WHERE app = ? AND version = ?", (app, version)
        ).fetchone()
        return None if row is None else _record(row)

    def versions(self, app: str) -> list[VersionRecord]:
        rows = self.db.execute(
            "SELECT * FROM versions WHERE app = ? ORDER BY version", (app,)
        ).fetchall()
        return [_record(r) for r in rows]


def _record(row: Any) -> VersionRecord:
    return VersionRecord(
        app=row[0],
        version=int(row[1]),
        created=float(row[2]),
        action=row[3],
        model=LogicalModel.from_json(row[4]),
        bundle_hash=row[5],
        placement=placement_from_dict(json.loads(row[6])),
        changes=json.loads(row[7]),
        latency_ms=float(row[8]),
        rolled_back_to=int(row[9]),
    )
