"""PostgreSQL sink (psycopg 3): exactly once by two-phase commit, or idempotent upserts.

``stream.sink("out", PostgresSink, config={"url": ..., "table": ..., "columns": [...]})``.

Exactly-once mode (the default, ``"mode": "exactly_once"``): the rows of an
epoch (between two checkpoint barriers) are buffered in memory; at the barrier
the sink writes them in one transaction and ends it with ``PREPARE TRANSACTION
'hotwire/<app>/<pe>/<instance>/<txn>'``: durable, invisible, surviving a crash
of the worker and of the server. When the checkpoint completes the runtime
calls ``commit`` and the sink runs ``COMMIT PREPARED``. On a recovery the
handles in the restored checkpoint are committed again (a missing one was
committed already) and every other prepared transaction of this app, PE and
instance index is rolled back: its checkpoint never completed, and the source
replays its records into new transactions. The server needs
``max_prepared_transactions > 0``; the sink checks it at start.

Upsert mode (``"mode": "upsert", "key": [...]``): each input batch is written
at once with ``INSERT ... ON CONFLICT (key) DO UPDATE``; replays after a
failure write the same rows again, so a table keyed by the result's key ends
with the right value for every key (idempotent, not transactional).

Records are dicts; ``columns`` names the keys written, in order, into the
table's columns of the same names. The table must exist.
"""

from __future__ import annotations

import contextlib
from typing import Any

from hotwire.sinks import TransactionalSink

__all__ = ["PostgresSink"]

OPTIONS = {
    "url": "libpq URL or conninfo, e.g. postgresql://user@host:5432/db (required)",
    "table": "target table, optionally schema-qualified (required)",
    "columns": "record keys written into the columns of the same names (required)",
    "mode": "'exactly_once' (two-phase commit, the default) or 'upsert'",
    "key": "conflict columns for mode 'upsert' (a unique index must cover them)",
    "on_error": "the runtime's error policy for the PE",
}
MODES = ("exactly_once", "upsert")
GID_PREFIX = "hotwire"


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as e:  # pragma: no cover - the extra is installed in tests
        msg = "PostgresSink needs psycopg 3: pip install 'hotwire[connectors]'"
        raise ImportError(msg) from e
    return psycopg


def _names(v: Any) -> list[str] | None:
    if isinstance(v, str):
        v = [v]
    if isinstance(v, list | tuple) and v and all(isinstance(c, str) and c for c in v):
        return list(v)
    return None


class PostgresSink(TransactionalSink):
    """Rows into a PostgreSQL table; see the module docstring for the two modes."""

    @classmethod
    def check_config(cls, config: dict[str, Any]) -> list[str]:
        """Problems with ``config`` (empty when fine); ``Topology.model()`` calls this."""
        problems: list[str] = []
        unknown = sorted(set(config) - set(OPTIONS))
        if unknown:
            problems.append(
                f"config has unknown option(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(OPTIONS)}"
            )
        url = config.get("url")
        if not isinstance(url, str) or not url:
            problems.append("config needs 'url': a PostgreSQL URL (postgresql://host:port/db)")
        else:
            try:
                _psycopg().conninfo.conninfo_to_dict(url)
            except Exception as e:
                problems.append(f"config 'url' is not a PostgreSQL URL or conninfo: {e}".strip())
        table = config.get("table")
        if not isinstance(table, str) or not table:
            problems.append("config needs 'table': the name of an existing table")
        if _names(config.get("columns")) is None:
            problems.append("config needs 'columns': a non-empty list of column names")
        mode = config.get("mode", "exactly_once")
        if mode not in MODES:
            problems.append(f"config 'mode' is {mode!r}; use 'exactly_once' or 'upsert'")
        if mode == "upsert":
            key = _names(config.get("key"))
            cols = _names(config.get("columns")) or []
            if key is None:
                problems.append("config mode 'upsert' needs 'key': the conflict column(s)")
            elif not set(key) <= set(cols):
                problems.append(f"config 'key' {key} must be among 'columns' {cols}")
        elif "key" in config:
            problems.append("config 'key' is only for mode 'upsert'")
        return problems

    # -- lifecycle -------------------------------------------------------------
    def setup(self, ctx: Any) -> None:
        config = dict(getattr(ctx, "config", None) or {})
        where = f"PE {getattr(ctx, 'pe', '?')!r} of app {getattr(ctx, 'app', '?')!r}"
        problems = self.check_config(config)
        if problems:
            raise ValueError(f"{where}: PostgresSink {problems[0]}")
        psycopg = _psycopg()
        self._sql = psycopg.sql
        self.where = where
        self.mode = config.get("mode", "exactly_once")
        self.columns = _names(config["columns"]) or []
        self.key = _names(config.get("key")) or []
        self.prefix = f"{GID_PREFIX}/{ctx.app}/{ctx.pe}/{ctx.instance}/"
        try:
            self.conn = psycopg.connect(config["url"], autocommit=True, connect_timeout=10)
        except psycopg.Error as e:
            msg = f"{where}: PostgresSink cannot connect: {_one_line(e)}"
            raise ValueError(msg) from None
        try:
            self._check_server(config["table"])
        except Exception:
            self.conn.close()
            raise
        self._insert = self._statement(config["table"])
        self._rows: list[tuple[Any, ...]] = []
        self._txn = ""

    def _check_server(self, table: str) -> None:
        psycopg = _psycopg()
        try:
            found = self.conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()
        except psycopg.Error as e:
            raise ValueError(f"{self.where}: PostgresSink: {_one_line(e)}") from None
        if not found or found[0] is None:
            msg = f"{self.where}: PostgresSink table {table!r} does not exist; create it first"
            raise ValueError(msg)
        if self.mode == "exactly_once":
            row = self.conn.execute("SHOW max_prepared_transactions").fetchone()
            if not row or int(row[0]) <= 0:
                msg = (
                    f"{self.where}: PostgresSink mode 'exactly_once' needs the server's "
                    "max_prepared_transactions > 0 (it is 0); set it in postgresql.conf "
                    "and restart the server, or use mode 'upsert'"
                )
                raise ValueError(msg)

    def _statement(self, table: str) -> Any:
        sql = self._sql
        ident = sql.Identifier(*table.split("."))
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in self.columns)
        values = sql.SQL(", ").join(sql.Placeholder() for _ in self.columns)
        stmt = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(ident, cols, values)
        if self.mode == "upsert":
            rest = [c for c in self.columns if c not in self.key]
            conflict = sql.SQL(", ").join(sql.Identifier(c) for c in self.key)
            if rest:
                sets = sql.SQL(", ").join(
                    sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(c), sql.Identifier(c))
                    for c in rest
                )
                stmt = sql.SQL("{} ON CONFLICT ({}) DO UPDATE SET {}").format(stmt, conflict, sets)
            else:
                stmt = sql.SQL("{} ON CONFLICT ({}) DO NOTHING").format(stmt, conflict)
        return stmt

    def _row(self, record: Any) -> tuple[Any, ...]:
        if not isinstance(record, dict):
            msg = f"PostgresSink writes dict records, got {type(record).__name__}"
            raise TypeError(msg)
        return tuple(record.get(c) for c in self.columns)

    # -- transactions ----------------------------------------------------------
    def begin(self, txn: str) -> None:
        self._txn, self._rows = txn, []

    def write(self, record: Any) -> None:
        if self.mode == "upsert":
            with self.conn.transaction(), self.conn.cursor() as cur:
                cur.execute(self._insert, self._row(record))
            return
        self._rows.append(self._row(record))

    def pre_commit(self) -> Any:
        rows, self._rows = self._rows, []
        if self.mode == "upsert" or not rows:
            return None
        gid = self.prefix + self._txn
        with self.conn.cursor() as cur:
            cur.execute("BEGIN")
            try:
                cur.executemany(self._insert, rows)
                cur.execute(self._sql.SQL("PREPARE TRANSACTION {}").format(self._sql.Literal(gid)))
            except BaseException:
                with contextlib.suppress(Exception):
                    self.conn.execute("ROLLBACK")
                raise
        return gid

    def commit(self, handle: Any) -> None:
        self._finish("COMMIT PREPARED", str(handle))

    def _finish(self, verb: str, gid: str) -> None:
        psycopg = _psycopg()
        stmt = self._sql.SQL(verb + " {}").format(self._sql.Literal(gid))
        try:
            self.conn.execute(stmt)
        except psycopg.errors.UndefinedObject:
            pass  # finished already: commit is idempotent

    def recover(self, committed: list[Any]) -> None:
        """Roll back this instance's prepared transactions that no complete checkpoint holds."""
        if self.mode == "upsert":
            return
        keep = {str(h) for h in committed}
        rows = self.conn.execute(
            "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE %s AND database = current_database()",
            (self.prefix.replace("_", r"\_").replace("%", r"\%") + "%",),
        ).fetchall()
        for (gid,) in rows:
            if gid in keep:
                self._finish("COMMIT PREPARED", gid)
            else:
                self._finish("ROLLBACK PREPARED", gid)

    def abort(self) -> None:
        self._rows = []

    def teardown(self) -> None:
        conn = getattr(self, "conn", None)
        if conn is not None:
            conn.close()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
