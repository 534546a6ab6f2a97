"""Connectors end to end: Redis Streams -> keyed count -> PostgreSQL, exactly once.

    python bench/connectors.py [--records N] [--rate R] [--checkpoint-interval S]
                               [--runs K] [--latency-seconds D] [--quick] [--out FILE]

Starts its own redis-server and PostgreSQL (``track_commit_timestamp=on``) and a
local cluster (master and 2 workers as processes). The app::

    src  = RedisStreamSource(stream, batch)                      parallelism 1
    cnt  = src.key_by(entry's key).process("count", Count)       parallelism 2
    cnt.forward().sink("out", PostgresSink, exactly_once)        parallelism 2

``Count`` parses the entry (``seq``, ``k``, ``t``), counts per key and emits the
row ``(seq, key, n, t_emit)``. Measured, alternating, ``--runs`` times:

* ``plain``: one Python process doing the same work with the same clients:
  ``XREAD`` of ``batch`` entries, the same parse and count, the batch's rows
  written with ``COPY`` (as the sink does) in one transaction per batch;
* ``two_pc``: the app on a stream pre-loaded with N entries (pipelined XADD);
  records/s = N / (time of the last commit of a row - the submit's reply);
* ``plain_insert``: the same app whose sink is PostgresSink with ``PREPARE
  TRANSACTION`` and ``COMMIT PREPARED`` replaced by one ordinary transaction at
  each barrier (the rows visible at the barrier): the cost of 2PC;
* ``no_rows``: the same app whose sink writes no rows, only each epoch's number
  of records at its barrier: what the app costs without the database's work.

Then the latency: a feeder XADDs at ``--rate`` (default half the median
``two_pc`` rate) for ``--latency-seconds``, each entry stamped with its wall time;
latency = the commit time of the row's transaction (``pg_xact_commit_timestamp``)
- the stamp. Every run checks that each of the N rows is in the table once and
that each key's counts run 1..K. Prints one JSON document (also to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hotwire.testing.cluster import LocalCluster, poll_for, write_app
from hotwire.testing.servers import postgres_server, redis_server

try:
    from redis.utils import HIREDIS_AVAILABLE as HIREDIS
except ImportError:  # pragma: no cover - redis is needed anyway
    HIREDIS = False

KEYS = 1000

APP = """
from hotwire import Topology
from hotwire.connectors.postgres import PostgresSink
from hotwire.connectors.redis_streams import RedisStreamSource
from hotwire.sdk import ProcessPE


def parse(e):
    f = e["fields"]
    return int(f["seq"]), f["k"], float(f["t"])


class Count(ProcessPE):
    def setup(self, ctx):
        self.n = {{}}

    def process(self, e):
        seq, key, t = parse(e)
        n = self.n.get(key, 0) + 1
        self.n[key] = n
        yield {{"seq": seq, "key": key, "n": n, "t_emit": t}}

    def snapshot(self):
        return self.n

    def restore(self, state):
        self.n.update(state)


class PlainInsert(PostgresSink):
    # The same rows written the same way (COPY while the epoch runs, the rest at the
    # barrier), each epoch ended by COMMIT instead of PREPARE TRANSACTION.
    def pre_commit(self):
        if not self._rows:
            return None
        conn = self._opened()
        if self._sent < len(self._rows):
            with conn.cursor() as cur:
                self._write_rows(cur, self._rows[self._sent:])
        conn.execute("COMMIT")
        self._open, self._rows, self._sent = None, [], 0
        return None


class CountOnly(PostgresSink):
    # No rows written: one row per epoch with its number of records, committed at the
    # barrier (the app without the database's work for the rows).
    def flush_due(self):
        return False

    def pre_commit(self):
        n, self._rows = len(self._rows), []
        if n:
            self.conn.execute("INSERT INTO {table}_n (n) VALUES (%s)", (n,))
        return None


app = Topology({name!r})
src = app.source("src", RedisStreamSource(url={redis!r}, stream={stream!r}, batch={batch}),
                 parallelism={src_p})
cnt = src.key_by(lambda e: e["fields"]["k"]).process("count", Count, parallelism=2)
cnt.forward().sink("out", {sink}, parallelism=2, config={{
    "url": {pg!r}, "table": {table!r}, "columns": ["seq", "key", "n", "t_emit"]}})
"""


# -- servers' data -------------------------------------------------------------
def _sql(url: str, q: str, args: Any = None) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(q, args)
        return cur.fetchall() if cur.description else []


def _table(pg: str, name: str) -> str:
    _sql(pg, f"CREATE TABLE {name} (seq bigint, key text, n bigint, t_emit double precision)")
    return name


def _preload(r: Any, stream: str, n: int, chunk: int = 10_000) -> None:
    """XADD seq=0..n-1 (pipelined, ``chunk`` per round trip)."""
    t = time.time()
    for start in range(0, n, chunk):
        with r.pipeline(transaction=False) as p:
            for s in range(start, min(n, start + chunk)):
                p.xadd(stream, {"seq": s, "k": f"k{s % KEYS}", "t": t})
            p.execute()


def _feed(r: Any, stream: str, n: int, rate: float) -> threading.Thread:
    """XADD seq=0..n-1 at ``rate`` per second in 5 ms steps, each stamped with its time."""

    def run() -> None:
        t0 = time.monotonic()
        sent = 0
        while sent < n:
            due = min(n, int((time.monotonic() - t0) * rate) + 1)
            if due > sent:
                with r.pipeline(transaction=False) as p:
                    for s in range(sent, due):
                        p.xadd(stream, {"seq": s, "k": f"k{s % KEYS}", "t": time.time()})
                    p.execute()
                sent = due
            time.sleep(0.005)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def _check(pg: str, table: str, n: int) -> dict[str, Any]:
    """Every seq 0..n-1 once, and each key's counts 1..K: the problems found (0 = exact)."""
    ((rows, distinct),) = _sql(pg, f"SELECT count(*), count(DISTINCT seq) FROM {table}")
    out_of_range = _sql(pg, f"SELECT count(*) FROM {table} WHERE seq < 0 OR seq >= %s", (n,))[0][0]
    bad_keys = _sql(
        pg,
        f"SELECT count(*) FROM (SELECT key FROM {table} GROUP BY key "
        "HAVING count(*) <> max(n) OR count(DISTINCT n) <> count(*) OR min(n) <> 1) b",
    )[0][0]
    return {
        "rows": rows,
        "lost": n - distinct + out_of_range,
        "duplicated": rows - distinct,
        "out_of_range": out_of_range,
        "keys_with_wrong_counts": bad_keys,
    }


def _wait_rows(pg: str, table: str, n: int, c: LocalCluster, timeout: float) -> None:
    """Until ``n`` rows are committed in ``table``. Polls the server's count of inserted
    rows (``pg_stat_user_tables``, cheap) and counts the table (a scan of up to N
    rows, which would take CPU from the run if done at every poll) only once that
    says they may all be there, or every 5 s."""
    last = [time.monotonic()]

    def done() -> bool:
        ins = _sql(pg, "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = %s", (table,))
        if (ins and ins[0][0] >= n) or time.monotonic() - last[0] > 5:
            last[0] = time.monotonic()
            return bool(_sql(pg, f"SELECT count(*) FROM {table}")[0][0] >= n)
        return False

    try:
        poll_for(done, timeout, interval=0.2, what=f"{n} rows committed in {table}")
    except TimeoutError:
        print(c.logs()[-6000:], file=sys.stderr)
        raise


def _redis_cpu_s(redis_url: str) -> float:
    """User + system CPU seconds of the redis-server so far (INFO cpu)."""
    import redis

    r = redis.Redis.from_url(redis_url)
    try:
        info = r.info("cpu")
    finally:
        r.close()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _cpu_s(c: LocalCluster) -> float:
    """User + system CPU seconds of the cluster's processes so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in [c.master, *c.workers]:
        if p is None:
            continue
        with open(f"/proc/{p.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


# -- the runs ------------------------------------------------------------------
def plain_run(redis_url: str, pg: str, n: int, batch: int, tag: str) -> dict[str, Any]:
    """The same work in one Python process: read a batch, parse, count, insert it."""
    import psycopg
    import redis

    r: Any = redis.Redis.from_url(redis_url, decode_responses=True)
    stream, table = f"in-{tag}", _table(pg, f"t_{tag}")
    _preload(r, stream, n)
    stmt = f"COPY {table} (seq, key, n, t_emit) FROM STDIN"
    counts: dict[str, int] = {}
    last = "0"
    done = 0
    cpu0, rcpu0 = time.process_time(), _redis_cpu_s(redis_url)
    t0 = time.time()
    with psycopg.connect(pg, autocommit=True) as conn:
        while done < n:
            got = r.xread({stream: last}, count=batch)
            if not got:
                continue
            entries = got[0][1]
            last = entries[-1][0]
            rows = []
            for _id, f in entries:
                seq, key, t = int(f["seq"]), f["k"], float(f["t"])
                c = counts.get(key, 0) + 1
                counts[key] = c
                rows.append((seq, key, c, t))
            with conn.transaction(), conn.cursor() as cur, cur.copy(stmt) as copy:
                for row in rows:
                    copy.write_row(row)
            done += len(rows)
    wall = time.time() - t0
    r.close()
    return {
        "rps": n / wall,
        "cpu_s": time.process_time() - cpu0,
        "redis_cpu_s": _redis_cpu_s(redis_url) - rcpu0,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        **_check(pg, table, n),
    }


def hotwire_run(
    c: LocalCluster,
    tmp: Path,
    redis_url: str,
    pg: str,
    n: int,
    opts: dict[str, int],
    sink: str,
    tag: str,
) -> dict[str, Any]:
    """The app on a stream pre-loaded with ``n`` entries, until every row is committed."""
    import redis

    r: Any = redis.Redis.from_url(redis_url, decode_responses=True)
    stream, table, name = f"in-{tag}", _table(pg, f"t_{tag}"), f"cx_{tag}"
    _preload(r, stream, n)
    r.close()
    counted = f"{table}_n"  # CountOnly's table: records per epoch
    _sql(pg, f"CREATE TABLE {counted} (n bigint)")
    app = write_app(
        tmp,
        f"{name}.py",
        APP.format(
            name=name, redis=redis_url, stream=stream, pg=pg, table=table, sink=sink, **opts
        ),
    )
    cpu0, rcpu0 = _cpu_s(c), _redis_cpu_s(redis_url)
    t_submit = time.time()
    c.client.submit(app)
    t0 = time.time()
    if sink == "CountOnly":
        total = lambda: int(_sql(pg, f"SELECT coalesce(sum(n), 0) FROM {counted}")[0][0])  # noqa: E731
        poll_for(lambda: total() >= n, 60 + n / 2000, interval=0.2, what="every record counted")
    else:
        _wait_rows(pg, table, n, c, timeout=60 + n / 2000)
    cpu, rcpu = _cpu_s(c) - cpu0, _redis_cpu_s(redis_url) - rcpu0
    c.client.kill(name)
    # The commit time of the last row's transaction (COMMIT PREPARED, or the plain COMMIT).
    last = counted if sink == "CountOnly" else table
    t_end = _sql(pg, f"SELECT extract(epoch FROM max(pg_xact_commit_timestamp(xmin))) FROM {last}")[
        0
    ][0]
    if sink == "CountOnly":
        got = total()
        checks = {"rows": got, "lost": max(0, n - got), "duplicated": max(0, got - n)}
        checks |= {"out_of_range": 0, "keys_with_wrong_counts": 0}  # not seen: no rows
    else:
        checks = _check(pg, table, n)
    return {
        "rps": n / (float(t_end) - t0),
        "submit_s": t0 - t_submit,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cluster_cpu_s": cpu,
        "redis_cpu_s": rcpu,
        **checks,
    }


def latency_run(
    c: LocalCluster,
    tmp: Path,
    redis_url: str,
    pg: str,
    rate: float,
    seconds: float,
    opts: dict[str, int],
) -> dict[str, Any]:
    """The app fed at ``rate`` for ``seconds``: commit time - stamp of every row."""
    import redis

    n = max(1, int(rate * seconds))
    stream, table, name = "in-lat", _table(pg, "t_lat"), "cx_lat"
    app = write_app(
        tmp,
        f"{name}.py",
        APP.format(
            name=name,
            redis=redis_url,
            stream=stream,
            pg=pg,
            table=table,
            sink="PostgresSink",
            **opts,
        ),
    )
    c.client.submit(app)
    r: Any = redis.Redis.from_url(redis_url, decode_responses=True)
    feeder = _feed(r, stream, n, rate)
    feeder.join()
    _wait_rows(pg, table, n, c, timeout=60 + seconds * 3)
    c.client.kill(name)
    r.close()
    lat = sorted(
        float(x) * 1000
        for (x,) in _sql(
            pg, f"SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin)) - t_emit FROM {table}"
        )
    )
    return {
        "rate": round(rate, 1),
        "records": n,
        "seconds": seconds,
        "latency_ms": {
            "p50": round(_pct(lat, 50), 1),
            "p99": round(_pct(lat, 99), 1),
            "max": round(lat[-1], 1),
        },
        **_check(pg, table, n),
    }


def _pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(len(xs) * q / 100))]


def _summary(xs: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(xs), 1),
        "min": round(min(xs), 1),
        "max": round(max(xs), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="feeder rate for the latency; default: half the median two_pc records/s",
    )
    ap.add_argument("--checkpoint-interval", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--latency-seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=500, help="entries per XREAD(GROUP)")
    ap.add_argument("--source-parallelism", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="200,000 records, 1 run, 4 s latency")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.quick:
        args.records, args.runs, args.latency_seconds = 200_000, 1, 4.0
    for name in ("records", "runs", "batch", "source_parallelism"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.checkpoint_interval <= 0 or args.latency_seconds <= 0 or args.rate < 0:
        ap.error("--checkpoint-interval and --latency-seconds must be > 0, --rate >= 0")
    n, ci = args.records, args.checkpoint_interval
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg": list(os.getloadavg()),
        },
        "config": {
            "records": n,
            "runs": args.runs,
            "checkpoint_interval_s": ci,
            "batch": args.batch,
            "keys": KEYS,
            "workers": 2,
            "source_parallelism": args.source_parallelism,
            "app": f"RedisStreamSource({args.source_parallelism}) -> key_by -> Count(2) -> "
            "forward -> PostgresSink(2, exactly_once)",
            "redis_parser": "hiredis" if HIREDIS else "python",
        },
    }
    opts = {"batch": args.batch, "src_p": args.source_parallelism}
    runs: dict[str, list[dict[str, Any]]] = {
        "plain": [],
        "two_pc": [],
        "plain_insert": [],
        "no_rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="hotwire-cx-") as d:
        tmp = Path(d)
        with (
            redis_server(tmp) as redis_url,
            postgres_server(
                tmp, {"track_commit_timestamp": "on", "max_prepared_transactions": "20"}
            ) as pg,
            LocalCluster(
                workers=2, data_dir=tmp / "cluster", log_level="warning", checkpoint_interval=ci
            ) as c,
        ):
            for run in range(args.runs):
                print(f"run {run + 1}/{args.runs}", file=sys.stderr)
                runs["plain"].append(plain_run(redis_url, pg, n, args.batch, f"plain{run}"))
                runs["two_pc"].append(
                    hotwire_run(c, tmp, redis_url, pg, n, opts, "PostgresSink", f"tpc{run}")
                )
                runs["plain_insert"].append(
                    hotwire_run(c, tmp, redis_url, pg, n, opts, "PlainInsert", f"pi{run}")
                )
                runs["no_rows"].append(
                    hotwire_run(c, tmp, redis_url, pg, n, opts, "CountOnly", f"nr{run}")
                )
                for k, v in runs.items():
                    print(f"  {k}: {v[-1]['rps']:.0f} records/s", file=sys.stderr)
            tpc = statistics.median(x["rps"] for x in runs["two_pc"])
            rate = args.rate or tpc / 2
            print(f"latency at {rate:.0f} records/s", file=sys.stderr)
            lat = latency_run(c, tmp, redis_url, pg, rate, args.latency_seconds, opts)
    for k, v in runs.items():
        entry: dict[str, Any] = {
            "rps": [round(x["rps"], 1) for x in v],
            "rps_summary": _summary([x["rps"] for x in v]),
            "runs": v,
        }
        result[k] = entry
    med = {k: statistics.median(x["rps"] for x in v) for k, v in runs.items()}
    result["ratio_vs_plain"] = round(med["two_pc"] / med["plain"], 3)
    result["two_pc_cost"] = round(1 - med["two_pc"] / med["plain_insert"], 3)
    result["two_pc_vs_no_rows"] = round(med["two_pc"] / med["no_rows"], 3)
    lat["p99_over_checkpoint_interval"] = round(lat["latency_ms"]["p99"] / 1000 / ci, 3)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["latency"] = lat
    exact = all(
        x["lost"] == x["duplicated"] == x["out_of_range"] == x["keys_with_wrong_counts"] == 0
        and x["rows"] == n
        for v in runs.values()
        for x in v
    )
    result["exact"] = exact and lat["lost"] == lat["duplicated"] == 0
    result["goals"] = {
        "records_per_s_ge_100k": {
            "measured": round(med["two_pc"], 1),
            "met": med["two_pc"] >= 100_000,
        },
        "p99_le_1.5x_checkpoint_interval": {
            "measured": lat["p99_over_checkpoint_interval"],
            "met": lat["p99_over_checkpoint_interval"] <= 1.5,
        },
    }
    doc = json.dumps(result, indent=2)
    print(doc)
    if args.out:
        Path(args.out).write_text(doc + "\n")


if __name__ == "__main__":
    main()
