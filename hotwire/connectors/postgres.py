"""PostgreSQL sink (psycopg 3): exactly once by two-phase commit, or idempotent upserts.

``stream.sink("out", PostgresSink, config={"url": ..., "table": ..., "columns": [...]})``.

Exactly-once mode (the default, ``"mode": "exactly_once"``): the rows of an
epoch (between two checkpoint barriers) go into one transaction, ended at the
barrier with ``PREPARE TRANSACTION 'hotwire/<app>/<pe>/<instance>/<txn>'``:
durable, invisible, surviving a crash of the worker and of the server. The rows
are written with ``COPY`` while the epoch runs, :data:`STREAM_ROWS` at a time, so
the barrier only writes the last ones and prepares; they also stay in memory
until the transaction is prepared, and a new connection (the old one lost)
begins the transaction again with all of them. While a transaction this sink
prepared waits for its ``COMMIT PREPARED`` nothing is written (a row could wait
on one of its locks); the rows wait for the commit or the next barrier. When the
checkpoint completes the runtime calls ``commit`` and the sink runs ``COMMIT
PREPARED``. On a recovery the handles in the restored checkpoint are committed
again (a missing one was committed already) and every other prepared transaction
of this app, PE and instance index is rolled back: its checkpoint never
completed, and the source replays its records into new transactions. The
server needs ``max_prepared_transactions > 0``; the sink checks it at start.

Upsert mode (``"mode": "upsert", "key": [...]``): each input batch is written
at once with ``INSERT ... ON CONFLICT (key) DO UPDATE``; replays after a
failure write the same rows again, so a table keyed by the result's key ends
with the right value for every key (idempotent, not transactional).

Records are dicts; ``columns`` names the keys written, in order, into the
table's columns of the same names. The table must exist.

All statements run in a thread, never on the worker's event loop. When the
server goes away (stopped, restarting, unreachable) the sink waits for it: the
runtime retries the call with backoff on a new connection, and the instance
processes nothing meanwhile, so records wait upstream under backpressure. A
``PREPARE TRANSACTION`` whose reply was lost is found by its name on the next
attempt, and ``COMMIT PREPARED`` of a transaction committed already is a no-op,
so nothing is written twice.
"""

from __future__ import annotations

import contextlib
import operator
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
# Exactly-once mode: rows of the open epoch written (COPY) into its transaction at a
# time, while the epoch runs; the rest go at the barrier.
STREAM_ROWS = 4096


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


class Unreachable(ValueError):
    """``setup`` could not connect (the server is unreachable): a submit or an upgrade
    is refused with it; a start no user waits for retries it (``is_transient``)."""


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
        self.url = config["url"]
        try:
            self.conn = self._connect()
        except psycopg.Error as e:
            msg = f"{where}: PostgresSink cannot connect: {_one_line(e)}"
            if self.is_transient(e):  # a start no user waits for waits for the server
                raise Unreachable(msg) from None
            raise ValueError(msg) from None
        try:
            self._check_server(config["table"])
        except Exception:
            self.conn.close()
            raise
        self._insert = self._statement(config["table"])
        cols = self.columns
        # A record's row when it has every column: itemgetter builds the tuple in C.
        self._pick: Any = (
            operator.itemgetter(*cols) if len(cols) > 1 else (lambda r, c=cols[0]: (r[c],))
        )
        self._copy = self._copy_statement(config["table"])
        self._rows: list[tuple[Any, ...]] = []
        self._upserts: list[tuple[Any, tuple[Any, ...]]] = []  # (record, row) of a batch
        self._txn = ""
        self._tried = ""  # the gid of a PREPARE TRANSACTION that may have succeeded
        # Exactly-once: the connection the open epoch's transaction runs on (None: no
        # transaction open), how many of its rows were written into it, and the
        # transactions prepared and not committed yet (no rows are streamed meanwhile).
        self._open: Any = None
        self._sent = 0
        self._uncommitted: set[str] = set()
        self._stream = True  # False after a write failed: the barrier writes them all

    def _connect(self) -> Any:
        return _psycopg().connect(self.url, autocommit=True, connect_timeout=5)

    def _live(self) -> Any:
        """The connection, made anew when the last one was lost."""
        if self.conn.closed or self.conn.broken:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = self._connect()
        return self.conn

    def server(self) -> str:
        try:
            d = _psycopg().conninfo.conninfo_to_dict(self.url)
        except Exception:
            return "the PostgreSQL server"
        host = d.get("host") or d.get("hostaddr") or "localhost"
        port = d.get("port") or "5432"
        return f"postgresql://{host}:{port}/{d.get('dbname', '')}"

    def is_transient(self, exc: BaseException) -> bool:
        psycopg = _psycopg()
        return isinstance(exc, Unreachable | psycopg.OperationalError | psycopg.InterfaceError)

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

    def _copy_statement(self, table: str) -> Any:
        sql = self._sql
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in self.columns)
        return sql.SQL("COPY {} ({}) FROM STDIN").format(sql.Identifier(*table.split(".")), cols)

    def _write_rows(self, cur: Any, rows: list[tuple[Any, ...]]) -> None:
        """Insert an epoch's rows with one COPY: for 50,000 rows of four columns
        about 0.06 s and 0.03 s of client CPU, against 0.7 s and 0.45 s for
        ``executemany`` of an INSERT."""
        with cur.copy(self._copy) as copy:
            for row in rows:
                copy.write_row(row)

    def _row(self, record: Any) -> tuple[Any, ...]:
        if not isinstance(record, dict):
            msg = f"PostgresSink writes dict records, got {type(record).__name__}"
            raise TypeError(msg)
        return tuple(record.get(c) for c in self.columns)

    # -- transactions ----------------------------------------------------------
    def begin(self, txn: str) -> None:
        self._txn, self._rows = txn, []
        self._sent, self._stream = 0, True

    def write(self, record: Any) -> None:
        if self.mode == "upsert":
            self._upserts.append((record, self._row(record)))  # written by flush()
            return
        if type(record) is dict:  # the common case, in C; a missing column: _row
            try:
                self._rows.append(self._pick(record))
                return
            except KeyError:
                pass
        self._rows.append(self._row(record))

    def flush_due(self) -> bool:
        if self.mode == "upsert":
            return bool(self._upserts)
        return (
            self._stream and not self._uncommitted and len(self._rows) - self._sent >= STREAM_ROWS
        )

    def flush(self) -> list[tuple[Any, BaseException]]:
        """Upsert mode: write the batch's rows in one transaction; when a row is
        refused, write them one by one and return the refused ones. Exactly-once
        mode: write the epoch's rows not written yet into its open transaction."""
        if self.mode != "upsert":
            self._write_open()
            return []
        todo = self._upserts
        if not todo:
            return []
        psycopg = _psycopg()
        conn = self._live()
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(self._insert, [row for _r, row in todo])
        except psycopg.Error as e:
            if self.is_transient(e):
                raise  # retried with the same rows: upserts are idempotent
            failed: list[tuple[Any, BaseException]] = []
            for record, row in todo:
                try:
                    with conn.transaction(), conn.cursor() as cur:
                        cur.execute(self._insert, row)
                except psycopg.Error as e1:
                    if self.is_transient(e1):
                        raise
                    failed.append((record, e1))
            self._upserts = []
            return failed
        self._upserts = []
        return []

    def pre_commit(self) -> Any:
        """Write the epoch's rows and prepare the transaction. The rows stay until it
        is prepared, so a call that failed with the server gone can be made again."""
        rows = self._rows
        if self.mode == "upsert" or not rows:
            self._rows = []
            return None
        gid = self.prefix + self._txn
        conn = self._live()
        if self._tried == gid and self._prepared(gid):
            self._rows, self._tried, self._open = [], "", None
            self._uncommitted.add(gid)
            return gid  # the last attempt prepared it; its reply was lost
        self._tried = gid
        try:
            conn = self._opened()
            with conn.cursor() as cur:
                if self._sent < len(rows):
                    self._write_rows(cur, rows[self._sent :] if self._sent else rows)
                self._open = None  # PREPARE ends the transaction, prepared or not
                cur.execute(self._sql.SQL("PREPARE TRANSACTION {}").format(self._sql.Literal(gid)))
        except BaseException:
            self._rollback(conn)
            raise
        self._rows, self._tried, self._sent = [], "", 0
        self._uncommitted.add(gid)
        return gid

    def _opened(self) -> Any:
        """The connection with the epoch's transaction open on it: begun anew, with
        none of the rows written, when the connection changed (the last one lost)."""
        conn = self._live()
        if self._open is not conn:
            self._open, self._sent = None, 0
            if conn.info.transaction_status != _psycopg().pq.TransactionStatus.IDLE:
                conn.execute("ROLLBACK")  # an aborted epoch's
            conn.execute("BEGIN")
            self._open = conn
        return conn

    def _write_open(self) -> None:
        """Write the open epoch's rows not written yet into its transaction. A row
        the server refuses rolls the transaction back and stops the writes of this
        epoch: the barrier writes every row and fails as it would have."""
        psycopg = _psycopg()
        rows = self._rows
        conn = self._live()
        try:
            conn = self._opened()
            with conn.cursor() as cur:
                self._write_rows(cur, rows[self._sent :] if self._sent else rows)
        except psycopg.Error as e:
            self._rollback(conn)
            if self.is_transient(e):
                raise  # retried on a new connection, which writes every row again
            self._stream = False
            return
        self._sent = len(rows)

    def _rollback(self, conn: Any) -> None:
        """End the epoch's open transaction on ``conn`` (none open afterwards)."""
        self._open, self._sent = None, 0
        with contextlib.suppress(Exception):
            conn.execute("ROLLBACK")

    def _prepared(self, gid: str) -> bool:
        row = self.conn.execute("SELECT 1 FROM pg_prepared_xacts WHERE gid = %s", (gid,))
        return row.fetchone() is not None

    def commit(self, handle: Any) -> None:
        self._finish("COMMIT PREPARED", str(handle))
        self._uncommitted.discard(str(handle))

    def _finish(self, verb: str, gid: str) -> None:
        psycopg = _psycopg()
        stmt = self._sql.SQL(verb + " {}").format(self._sql.Literal(gid))
        conn = self._live()
        if self._open is conn:
            # A transaction this sink did not prepare (handed over by a predecessor)
            # commits while rows are written: they are written again later.
            self._rollback(conn)
        try:
            conn.execute(stmt)
        except psycopg.errors.UndefinedObject:
            pass  # finished already: commit is idempotent

    def recover(self, committed: list[Any]) -> None:
        """Roll back this instance's prepared transactions that no complete checkpoint holds."""
        if self.mode == "upsert":
            return
        keep = {str(h) for h in committed}
        conn = self._live()
        rows = conn.execute(
            "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE %s AND database = current_database()",
            (self.prefix.replace("_", r"\_").replace("%", r"\%") + "%",),
        ).fetchall()
        for (gid,) in rows:
            if gid in keep:
                self._finish("COMMIT PREPARED", gid)
            else:
                self._finish("ROLLBACK PREPARED", gid)

    def abort(self) -> None:
        # Runs on the event loop: an open transaction is rolled back before the next
        # one begins (_opened), or by the server when teardown closes the connection.
        self._rows, self._upserts, self._open, self._sent = [], [], None, 0

    def teardown(self) -> None:
        conn = getattr(self, "conn", None)
        if conn is not None:
            conn.close()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
