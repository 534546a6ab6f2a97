"""bench/chaos.py --connectors: the app reads a Redis stream and commits into PostgreSQL.

A durable redis-server (``appendonly yes``, ``appendfsync always``) and a
PostgreSQL server of the run's own; a producer thread adds ``{seq, key, t}``
entries to the stream ``in`` at the run's rate; the app is
``RedisStreamSource -> parse -> key_by(key) -> Count -> PostgresSink`` (two-phase
commit, exactly once) into the table ``counts``. A ledger thread polls the table
for the rows committed. The faults of this mode: ``redis_kill`` (SIGKILL of
redis-server, started again on the same port and data) and ``postgres_kill`` (an
immediate shutdown, SIGQUIT: every backend ends at once with no checkpoint, crash
recovery at the next start; started again on the same port and data).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotwire.testing.servers import Restartable, durable_redis, restartable_postgres

KINDS = ("redis_kill", "postgres_kill")
STREAM = "in"
TABLE = "counts"

# The counting PE of both apps of bench/chaos.py (a format string: {code} is its
# version's constant, written into every row).
COUNT_PE = """\
class Count(ProcessPE):
    def setup(self, ctx):
        self.n = {{}}

    def process(self, r):
        k = r["key"]
        n = self.n.get(k, 0) + 1
        self.n[k] = n
        yield {{"seq": r["seq"], "key": k, "n": n, "code": {code}, "t": r["t"]}}

    def snapshot(self):
        return self.n

    def restore(self, state):
        self.n.update(state)
"""

TEMPLATE = (
    '''\
"""bench/chaos.py --connectors's app: Redis stream -> count per key -> PostgreSQL, once."""

from hotwire import Topology
from hotwire.connectors import postgres
from hotwire.connectors.postgres import PostgresSink
from hotwire.connectors.redis_streams import RedisStreamSource
from hotwire.sdk import ProcessPE

# Rows an exactly-once sink writes (COPY) into its open transaction at a time while
# the epoch runs: lowered so that epochs at the run's rate take that path.
postgres.STREAM_ROWS = {stream_rows}


def parse(e):
    f = e["fields"]
    return {{"seq": int(f["seq"]), "key": f["key"], "t": float(f["t"])}}


'''
    + COUNT_PE
    + """

app = Topology({app!r})
src = app.source(
    "src",
    RedisStreamSource(url={redis!r}, stream={stream!r}, batch={batch}),
    parallelism={src_p},
)
recs = src.map("parse", parse, parallelism={src_p})
count = recs.key_by(lambda r: r["key"]).process("count", Count, parallelism={count_p})
count.sink(
    "out",
    PostgresSink,
    parallelism={sink_p},
    config={{"url": {pg!r}, "table": {table!r}, "columns": ["seq", "key", "n", "code", "t"]}},
)
"""
)


def app_source(
    app: str, redis: str, pg: str, code: int, src_p: int, count_p: int, sink_p: int, **kw: int
) -> str:
    return TEMPLATE.format(
        app=app,
        redis=redis,
        pg=pg,
        stream=STREAM,
        table=TABLE,
        code=code,
        src_p=src_p,
        count_p=count_p,
        sink_p=sink_p,
        batch=kw.get("batch", 32),
        stream_rows=kw.get("stream_rows", 64),
    )


def _sql(url: str, q: str, args: Any = None) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
        cur = conn.execute(q, args)
        return cur.fetchall() if cur.description else []


# -- the producer -----------------------------------------------------------------
class Producer(threading.Thread):
    """Adds ``{seq, key, t}`` entries to the stream at ``rate``, ``rate / 50`` per
    pipeline. When redis-server goes away it reconnects and goes on after the last
    entry the stream holds, so every seq is in the stream once whatever the server
    lost or kept of a pipeline whose reply never came."""

    def __init__(self, url: str, rate: float, keys: int):
        super().__init__(name="chaos-producer", daemon=True)
        self.url, self.rate, self.keys = url, rate, keys
        self.seq = 0  # the next seq to add
        self.end: int | None = None
        self.reconnects = 0
        self.errors: list[str] = []
        self._halt = threading.Event()

    def stop_at(self, n: int) -> None:
        self.end = n

    def halt(self) -> None:
        self._halt.set()
        self.join(10)

    def run(self) -> None:
        import redis

        r: Any = None
        tick = max(1, int(self.rate / 50))
        t0, s0 = time.monotonic(), 0
        while not self._halt.is_set():
            end = self.end
            if end is not None and self.seq >= end:
                return
            try:
                if r is None:
                    r = redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=5)
                    last = r.xrevrange(STREAM, count=1)
                    self.seq = int(last[0][1]["seq"]) + 1 if last else 0
                    t0, s0 = time.monotonic(), self.seq  # pace from here, no burst
                    if end is not None and self.seq >= end:
                        return
                k = tick if end is None else min(tick, end - self.seq)
                now = repr(time.time())
                with r.pipeline(transaction=False) as p:
                    for s in range(self.seq, self.seq + k):
                        p.xadd(STREAM, {"seq": s, "key": f"k{s % self.keys}", "t": now})
                    p.execute()
                self.seq += k
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as e:
                if r is not None:
                    with contextlib.suppress(Exception):
                        r.close()
                r = None
                self.reconnects += 1
                if len(self.errors) < 3:
                    self.errors.append(f"{type(e).__name__}: {e}")
                self._halt.wait(0.1)
                continue
            ahead = (self.seq - s0) / self.rate - (time.monotonic() - t0)
            if ahead > 0:
                self._halt.wait(ahead)


# -- the ledger -------------------------------------------------------------------
class PgLedger(threading.Thread):
    """Polls the table for committed rows (those of seqs from the lowest not yet
    seen on, by an index on seq): when each seq was first seen, and its emit time.
    The same questions as bench/chaos.py's Ledger answers of a sink directory."""

    def __init__(self, url: str, interval: float = 0.1):
        super().__init__(name="chaos-pg-ledger", daemon=True)
        self.url, self.interval = url, interval
        self.seen: dict[int, tuple[float, float]] = {}  # seq -> (emitted t, seen t)
        self.polls: list[tuple[float, float]] = []  # (seen t, latest emit t among new rows)
        self.low = 0  # every seq below is seen
        self.errors: list[str] = []
        self.unreachable_polls = 0
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def run(self) -> None:
        import psycopg

        conn: Any = None
        while not self._halt.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(self.url, autocommit=True, connect_timeout=2)
                self.poll(conn)
            except psycopg.OperationalError:  # the server is down: try again
                self.unreachable_polls += 1
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = None
            except Exception as e:  # reported, never fatal to the run
                if len(self.errors) < 5:
                    self.errors.append(f"{type(e).__name__}: {e}")
            self._halt.wait(self.interval)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def poll(self, conn: Any) -> None:
        rows = conn.execute(f"SELECT seq, t FROM {TABLE} WHERE seq >= %s", (self.low,)).fetchall()
        now = time.time()
        with self._lock:
            new = [(int(s), float(t)) for s, t in rows if int(s) not in self.seen]
            for s, t in new:
                self.seen[s] = (t, now)
            if new:
                self.polls.append((now, max(t for _s, t in new)))
            while self.low in self.seen:
                self.low += 1

    def first_seen_after(self, t: float) -> float | None:
        with self._lock:
            for seen, max_t in self.polls:
                if max_t > t:
                    return seen
        return None

    def max_seq(self) -> int:
        with self._lock:
            return max(self.seen, default=-1)

    def committed_below(self, n: int) -> int:
        with self._lock:
            return self.low if self.low >= n else sum(1 for s in self.seen if s < n)

    def latencies(self, windows: Sequence[tuple[float, float]]) -> list[float]:
        with self._lock:
            return [
                seen - t for t, seen in self.seen.values() if any(a <= t < b for a, b in windows)
            ]


# -- the servers ------------------------------------------------------------------
@dataclass
class Servers:
    """The run's redis-server and PostgreSQL, each killed and started again by a fault."""

    redis_url: str
    redis: Restartable
    pg_url: str
    pg: Restartable

    def kill(self, kind: str, down_s: float) -> dict[str, Any]:
        """SIGKILL redis-server, or stop PostgreSQL at once (SIGQUIT, immediate mode);
        ``down_s`` later start it again on the same port and data."""
        server = self.redis if kind == "redis_kill" else self.pg
        t = time.time()
        server.stop(signal.SIGKILL if kind == "redis_kill" else signal.SIGQUIT)
        time.sleep(down_s)
        server.start()
        if kind == "postgres_kill":
            deadline = time.monotonic() + 30  # crash recovery, then connections again
            while True:
                try:
                    _sql(self.pg_url, "SELECT 1")
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        return {"down_s": round(down_s, 3), "restarted_s": round(time.time() - t, 3)}


@contextlib.contextmanager
def servers(d: Path) -> Iterator[Servers]:
    """A durable redis-server and a PostgreSQL with the table ``counts``, under ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    with durable_redis(d) as (rurl, rs), restartable_postgres(d) as (pg, ps):
        _sql(pg, f"CREATE TABLE {TABLE} (seq bigint, key text, n bigint, code int, t float8)")
        _sql(pg, f"CREATE INDEX ON {TABLE} (seq)")
        yield Servers(rurl, rs, pg, ps)


# -- the end checks ---------------------------------------------------------------
def rows(pg: str) -> list[dict[str, Any]]:
    return [
        {"seq": s, "key": k, "n": n, "code": c, "t": t}
        for s, k, n, c, t in _sql(pg, f"SELECT seq, key, n, code, t FROM {TABLE}")
    ]


def leftovers(s: Servers, app: str, timeout: float) -> dict[str, Any]:
    """Prepared transactions left in PostgreSQL and entries pending in the Redis
    consumer group, waited for (up to ``timeout``) to reach 0."""
    import redis

    from hotwire.connectors.redis_streams import group_name

    r = redis.Redis.from_url(s.redis_url, decode_responses=True)
    deadline = time.monotonic() + timeout
    while True:
        prepared = [g for (g,) in _sql(s.pg_url, "SELECT gid FROM pg_prepared_xacts")]
        pending = int(r.xpending(STREAM, group_name(app, "src"))["pending"])
        if (not prepared and not pending) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    info = r.xinfo_groups(STREAM)
    in_stream: Counter[int] = Counter()  # the producer's own check: each seq added once
    last = "-"
    while batch := r.xrange(STREAM, min=last, count=10000):
        in_stream.update(int(f["seq"]) for _id, f in batch)
        last = "(" + batch[-1][0]
    r.close()
    return {
        "pg_prepared_xacts": len(prepared),
        "pg_prepared_sample": prepared[:5],
        "redis_pending": pending,
        "redis_stream_entries": sum(in_stream.values()),
        "redis_stream_seqs_twice": sum(1 for k in in_stream.values() if k > 1),
        "redis_groups": [
            {k: g.get(k) for k in ("name", "consumers", "pending", "last-delivered-id")}
            for g in info
        ],
    }
