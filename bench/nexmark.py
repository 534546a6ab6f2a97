"""Nexmark on hotwire and on Bytewax: events/s, CPU, window latency and result equality.

    python bench/nexmark.py [--events N] [--queries q0,q5,...] [--runs R] [--upgrade]
        [--workers W] [--parallelism P] [--bytewax-procs 1,2] [--out FILE]

Each query runs alone, as its own app on a fresh local cluster (a master and W
workers, default 2, processes on loopback) whose source is the Nexmark generator
(``examples/nexmark``) inside the app, in P instances (default W), instance i
making part i of the events (chunks of 100 events, chunk c in part c % P), each
with its own timestamp assigner and filters on forward streams, so instance i of
each runs on one worker; Q5's windows also run P instances, Q7's one (one key).
Every result is checked against the plain-Python reference over the same events
(the exact multiset, normalised).

* **events/s** = events / (time of the last result at the sink - time of the
  submit call): deployment, the source's generation and every PE included. The
  sink stamps each result with ``time.time()`` as it writes it; the driver polls
  the result file until it holds as many results as the reference. We also give
  ``events_per_s_from_first_event`` (from the source's first event instead of
  the submit).
* **CPU**: ``cpu_s``, the CPU seconds (user + system, /proc) the master and
  workers used from the submit to the last result, and ``events_per_cpu_s``; on
  a machine other work shares, this is steadier than events/s.
* **latency** (windowed queries q5, q7): per window result, its sink time minus
  the wall time at which every part of the source had yielded an event at or
  past the window's end (the first moment the window could be complete; the
  final windows, closed by the end of the input, count from the last part's last
  event). Sources run unthrottled, so this is latency at full load, queueing
  included.
* **Bytewax** (0.21.1) runs q0, q1, q2, q5 and q7 with the same generator, the
  same functions and the same sink function, in each configuration of
  ``--bytewax-procs`` (default 1 and W): 1 is ``bytewax.testing.run_main`` in
  this process, one worker, one partition; k > 1 is k processes of one worker
  each (``bytewax.testing.cluster_main`` on loopback) and the source in k
  partitions, partition i making part i of k of the events. Input batches of
  1024; Q5 and Q7 with ``bytewax.operators.windowing`` (``SlidingWindower`` /
  ``TumblingWindower``, an ``EventClock``). Its clock is per key and moves with
  the items it sees, not with the least of the partitions, so with one
  partition ``wait_for_system_duration`` is 10 s (the events are in order),
  and with more the wait spans the whole run (else the bids of the partition
  that runs behind are dropped as late); windows then close at the end of the
  input. events/s: events / the time from the call of ``run_main`` (or the
  earliest process's ``cluster_main``) to its (the latest one's) return;
  ``events_per_s_from_first_event`` from the first batch a partition made; the
  same latency measure; CPU: the process time of its process(es).

Rounds alternate hotwire and each Bytewax configuration per query; the ratios
are per round, reported as median, min and max: ``ratio_hotwire_to_bytewax_K``
(events/s over events/s) and ``ratio_hotwire_to_best_bytewax``: hotwire's
events/s from the submit over the events/s from its first event of the best
Bytewax configuration of that round whose result equalled the reference. The
load average (1 min) before and after each round is recorded.

``--upgrade``: one app of q5 and q7 with a paced source; in the middle of the
run an online upgrade swaps q5's aggregation code (count_v1 -> count_v2) and a
second one rescales q7's window PE from 1 to 2 instances; the results must still
equal the reference, and the results fired after each switch carry its version.

``--profile QUERY``: one hotwire run of QUERY while py-spy samples each worker.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# This file's own directory would shadow the nexmark package of examples/.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT / "examples"))

from nexmark import queries as Q  # noqa: E402
from nexmark.generator import events  # noqa: E402
from nexmark.reference import normalise, reference  # noqa: E402

from hotwire.testing import count_lines, read_jsonl  # noqa: E402
from hotwire.testing.cluster import LocalCluster, poll_for, write_app  # noqa: E402

INCLUDE = str(ROOT / "examples" / "nexmark")
BYTEWAX_QUERIES = ("q0", "q1", "q2", "q5", "q5b", "q7")
WINDOWED = ("q5", "q5b", "q7")

APP = """
from nexmark.queries import build, count_v1, count_v2

app = build(
    {name!r}, {out!r}, {n}, queries={queries!r}, rate={rate!r}, ticks={ticks!r},
    q5_count={q5}, q7_parallelism={p7}, parallelism={par},
)
"""


def app_file(
    directory: Path,
    file: str,
    name: str,
    out: Path,
    n: int,
    queries: list[str],
    rate: float | None = None,
    ticks: Path | None = None,
    q5: str = "count_v1",
    p7: int = 1,
    par: int = 1,
) -> str:
    body = APP.format(
        name=name,
        out=str(out),
        n=n,
        queries=queries,
        rate=rate,
        ticks=str(ticks) if ticks else None,
        q5=q5,
        p7=p7,
        par=par,
    )
    return write_app(directory, file, body)


def percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def spread(xs: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(xs), 3),
        "min": round(min(xs), 3),
        "max": round(max(xs), 3),
        "n": len(xs),
    }


def window_latencies(
    results: list[tuple[float, dict[str, Any]]], ticks: list[Any], parts: int = 1
) -> list[float]:
    """Seconds from the moment each window result could be known to its sink time.

    ``ticks``: ``[ms, wall]`` lines of every part of the source (each logs a tick
    once) and one ``["end", wall]`` per part; a window ending at ``ms`` could be
    known once every part passed ``ms`` (or ended), at the latest of their times."""
    seen: dict[Any, list[float]] = {}
    for ms, wall in ticks:
        seen.setdefault(ms, []).append(wall)
    ends = seen.pop("end", [])
    end = max(ends) if len(ends) == parts else None
    at = {ms: max(walls) for ms, walls in seen.items() if len(walls) == parts}
    out = []
    for t_sink, r in results:
        ready = at.get(r["end"], end)
        if ready is not None:
            out.append(t_sink - ready)
    return out


# -- hotwire ---------------------------------------------------------------------
def run_hotwire(
    query: str, n: int, expected: list[str], work: Path, workers: int = 2, par: int = 1
) -> dict[str, Any]:
    run = Path(tempfile.mkdtemp(prefix=f"hw-{query}-", dir=work))
    ticks = run / "ticks.jsonl"
    app = app_file(run, "app.py", f"nexmark-{query}", run, n, [query], ticks=ticks, par=par)
    out = run / f"{query}.jsonl"
    with LocalCluster(workers=workers, data_dir=run / "cluster") as c:
        pids = [p.proc.pid for p in [c.master, *c.workers] if p is not None]
        cpu0 = sum(_cpu_s(p) for p in pids)
        t0 = time.time()
        c.client.submit(app, include=INCLUDE)
        poll_for(
            lambda: count_lines(out) >= len(expected),
            600,
            interval=0.05,
            what=f"{query}: {len(expected)} results",
        )
        cpu = sum(_cpu_s(p) for p in pids) - cpu0
        time.sleep(0.2)  # anything beyond the expected count would be a wrong result
        rows = read_jsonl(out)
    t_last = max(t for t, _ in rows)
    tick_rows = read_jsonl(ticks)
    first = min(wall for _, wall in tick_rows)
    got = normalise(r for _, r in rows)
    res: dict[str, Any] = {
        "events_per_s": round(n / (t_last - t0), 1),
        "events_per_s_from_first_event": round(n / (t_last - first), 1),
        "seconds": round(t_last - t0, 3),
        "cpu_s": round(cpu, 3),
        "events_per_cpu_s": round(n / cpu, 1),
        "results": len(rows),
        "result_equal": got == expected,
    }
    if query in WINDOWED:
        lat = window_latencies(rows, tick_rows, par)
        res["latency_p50_ms"] = round(percentile(lat, 50) * 1000, 1)
        res["latency_p99_ms"] = round(percentile(lat, 99) * 1000, 1)
    return res


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- Bytewax ---------------------------------------------------------------------
def _dt(ms: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)


ORIGIN = datetime(1970, 1, 1, tzinfo=UTC)


def bytewax_flow(query: str, n: int, parts: int, out_path: Path, ticks_path: Path) -> Any:
    """The Bytewax dataflow of ``query``: a source of ``parts`` partitions, partition
    ``i`` yielding part ``i`` of the events (as hotwire's source instance ``i``) in
    batches of 1024 and logging its ticks to ``ticks_path``; the sink appends to
    ``out_path`` with the function hotwire's app uses."""
    from bytewax import operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
    from bytewax.operators import windowing as win
    from bytewax.outputs import DynamicSink, StatelessSinkPartition

    write = Q.result_sink(str(out_path))  # the sink function hotwire's app uses

    class Part(StatefulSourcePartition):
        def __init__(self, part: int) -> None:
            self.it = events(n, part=part, parts=parts)
            self.next_tick = 0
            self.ticks = open(ticks_path, "a", buffering=1)

        def log(self, ms: Any, now: float) -> None:
            self.ticks.write(json.dumps([ms, now]) + "\n")

        def next_batch(self) -> list[Any]:
            b = list(islice(self.it, 1024))
            now = time.time()
            if not b:
                self.log("end", now)
                self.ticks.close()
                raise StopIteration
            for e in b:  # the wall time a window ending at a tick could be complete
                if e["date_time"] >= self.next_tick:
                    top = e["date_time"] // Q.TICK_MS * Q.TICK_MS
                    for ms in range(self.next_tick, top + 1, Q.TICK_MS):
                        self.log(ms, now)
                    self.next_tick = top + Q.TICK_MS
            return b

        def snapshot(self) -> None:
            return None

    class Source(FixedPartitionedSource):
        def list_parts(self) -> list[str]:
            return [str(i) for i in range(parts)]

        def build_part(self, step_id: str, for_part: str, resume_state: Any) -> Part:
            return Part(int(for_part))

    class SinkPart(StatelessSinkPartition):
        def write_batch(self, items: list[Any]) -> None:
            for r in items:
                write(r)

    class Sink(DynamicSink):
        def build(self, step_id: str, worker_index: int, worker_count: int) -> SinkPart:
            return SinkPart()

    flow = Dataflow(f"nexmark_{query}")
    ev = op.input("events", flow, Source())
    # One partition's events come in order: 10 s covers it. Partitions run apart
    # (another process, another speed) and this clock is per key, not the least of
    # the partitions', so with more than one the wait must cover the whole run or
    # the lagging partition's bids are dropped as late; windows then close at the end.
    wait = timedelta(seconds=10) if parts == 1 else timedelta(days=1)
    clock = win.EventClock(lambda e: _dt(e["date_time"]), wait_for_system_duration=wait)
    if query == "q0":
        out = op.map("q0", ev, Q.passthrough)
    elif query == "q1":
        out = op.map("q1", op.filter("bids", ev, Q.is_bid), Q.to_euro)
    elif query == "q2":
        bids = op.filter("bids", ev, Q.is_bid)
        out = op.map("q2_project", op.filter("q2", bids, Q.q2_selected), Q.q2_project)
    elif query in ("q5", "q5b"):
        # Bytewax's EventClock keeps a watermark per key that moves with that key's
        # items (and wall time): per-auction windows of an auction that gets no more
        # bids would close only after wait_for_system_duration of wall time. So the
        # bids are counted per auction inside one key's sliding windows, which close
        # as the stream's event time passes them.
        size, slide = int(Q.Q5_WINDOW.size), int(Q.Q5_WINDOW.slide)
        bids = op.key_on("all", op.filter("bids", ev, Q.is_bid), lambda b: "all")

        sliding = win.SlidingWindower(
            timedelta(milliseconds=size), timedelta(milliseconds=slide), ORIGIN
        )
        counts = win.fold_window(
            "q5_count", bids, clock, sliding, dict, Q.count_per_auction, lambda a, b: {**a, **b}
        )

        def hottest(kv: Any) -> list[dict[str, Any]]:
            _k, (wid, per) = kv
            start = wid * slide
            r = {"start": start, "end": start + size, "value": per, "version": 0}
            return Q.hottest_of_all(r)

        out = op.flat_map("q5", counts.down, hottest)
    elif query == "q7":
        size = int(Q.Q7_WINDOW.size)
        bids = op.key_on("all", op.filter("bids", ev, Q.is_bid), lambda b: "all")
        top = win.fold_window(
            "q7",
            bids,
            clock,
            win.TumblingWindower(timedelta(milliseconds=size), ORIGIN),
            lambda: None,
            Q.highest,
            lambda a, b: Q.highest(a, b),
        )

        def as_result(kv: Any) -> dict[str, Any]:
            _k, (wid, b) = kv
            return Q.q7_result(
                {"start": wid * size, "end": wid * size + size, "value": b, "version": 0}
            )

        out = op.map("q7_result", top.down, as_result)
    else:
        raise ValueError(f"Bytewax runs {BYTEWAX_QUERIES}, not {query}")
    op.output("out", out, Sink())
    return flow


def run_bytewax(
    query: str, n: int, expected: list[str], work: Path, procs: int = 1
) -> dict[str, Any]:
    """``procs`` 1: ``run_main`` in this process, one partition. Otherwise ``procs``
    processes of one worker each (``cluster_main`` on loopback), the source in
    ``procs`` partitions; the time runs from the earliest process's call of
    ``cluster_main`` (imports and the flow built) to the latest one's return."""
    run = Path(tempfile.mkdtemp(prefix=f"bw-{query}-", dir=work))
    out_path, ticks_path = run / f"{query}.jsonl", run / "ticks.jsonl"
    if procs == 1:
        from bytewax.testing import run_main

        flow = bytewax_flow(query, n, 1, out_path, ticks_path)
        c0 = time.process_time()  # this process's threads; the driver's waits here
        t0 = time.time()
        run_main(flow)
        t1 = time.time()
        cpu = time.process_time() - c0
    else:
        t0, t1, cpu = _bytewax_cluster(query, n, procs, out_path, ticks_path, run)
    rows = read_jsonl(out_path)
    tick_rows = read_jsonl(ticks_path)
    first = min(wall for _, wall in tick_rows)  # after a partition's first batch
    res: dict[str, Any] = {
        "events_per_s": round(n / (t1 - t0), 1),
        "events_per_s_from_first_event": round(n / (t1 - first), 1),
        "seconds": round(t1 - t0, 3),
        "cpu_s": round(cpu, 3),
        "events_per_cpu_s": round(n / cpu, 1),
        "results": len(rows),
        "result_equal": normalise(r for _, r in rows) == expected,
    }
    if query in WINDOWED:
        lat = window_latencies(rows, tick_rows, procs)
        res["latency_p50_ms"] = round(percentile(lat, 50) * 1000, 1)
        res["latency_p99_ms"] = round(percentile(lat, 99) * 1000, 1)
    return res


def _free_ports(k: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(k)]
    try:
        for so in socks:
            so.bind(("127.0.0.1", 0))
        return [so.getsockname()[1] for so in socks]
    finally:
        for so in socks:
            so.close()


def _bytewax_cluster(
    query: str, n: int, procs: int, out_path: Path, ticks_path: Path, run: Path
) -> tuple[float, float, float]:
    import subprocess

    addresses = ",".join(f"127.0.0.1:{p}" for p in _free_ports(procs))
    cmds = [
        [sys.executable, __file__, "--bytewax-process", query, "--events", str(n),
         "--bytewax-addresses", addresses, "--bytewax-id", str(i),
         "--bytewax-out", str(out_path), "--bytewax-ticks", str(ticks_path),
         "--bytewax-times", str(run / f"times-{i}.json")]
        for i in range(procs)
    ]  # fmt: skip
    ps = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in cmds]
    errs = []
    for p in ps:
        try:
            _, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode:
            errs.append(err.decode(errors="replace")[-2000:])
    if errs:
        raise RuntimeError(f"a Bytewax process of {query} failed: {errs[0]}")
    times = [json.loads((run / f"times-{i}.json").read_text()) for i in range(procs)]
    return min(t[0] for t in times), max(t[1] for t in times), sum(t[2] for t in times)


def bytewax_process(args: argparse.Namespace) -> int:
    """One process of a multi-process Bytewax run (one worker)."""
    from bytewax.testing import cluster_main

    addresses = args.bytewax_addresses.split(",")
    flow = bytewax_flow(
        args.bytewax_process,
        args.events,
        len(addresses),
        Path(args.bytewax_out),
        Path(args.bytewax_ticks),
    )
    c0 = time.process_time()
    t0 = time.time()
    cluster_main(flow, addresses, args.bytewax_id)
    t1 = time.time()
    Path(args.bytewax_times).write_text(json.dumps([t0, t1, time.process_time() - c0]))
    return 0


# -- profile --------------------------------------------------------------------
def profile_hotwire(
    query: str, n: int, work: Path, rate: int = 200, workers: int = 2, par: int = 1
) -> dict[str, Any]:
    """Run ``query`` once while py-spy samples each worker (``rate`` per second, idle
    threads left out); per worker, the share of its samples in each function (self)."""
    import collections
    import shutil
    import subprocess

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    run = Path(tempfile.mkdtemp(prefix=f"prof-{query}-", dir=work))
    app = app_file(run, "app.py", f"nexmark-{query}", run, n, [query], par=par)
    expected = len(reference(query, list(events(n))))
    out: dict[str, Any] = {
        "query": query,
        "events": n,
        "rate": rate,
        "parallelism": par,
        "workers": {},
    }
    with LocalCluster(workers=workers, data_dir=run / "cluster") as c:
        spies = {
            w.label: subprocess.Popen(
                [spy, "record", "-p", str(w.proc.pid), "-r", str(rate), "-f", "raw",
                 "-o", str(run / f"{w.label}.txt"), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for w in c.workers
        }  # fmt: skip
        time.sleep(1.0)  # py-spy attached
        t0 = time.time()
        c.client.submit(app, include=INCLUDE)
        poll_for(lambda: count_lines(run / f"{query}.jsonl") >= expected, 600, interval=0.05)
        out["seconds"] = round(time.time() - t0, 3)
        for p in spies.values():
            p.send_signal(2)  # py-spy writes its file on SIGINT
            p.wait(30)
    for label in spies:
        self_samples: collections.Counter[str] = collections.Counter()
        total = 0
        for line in (run / f"{label}.txt").read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            total += int(count)
            self_samples[stack.split(";")[-1].split(" (")[0]] += int(count)
        out["workers"][label] = {
            "samples": total,
            "top_self": [[f, round(k / total, 3)] for f, k in self_samples.most_common(15)],
        }
    return out


# -- the online upgrade ------------------------------------------------------------
def run_upgrade(n: int, rate: float, work: Path) -> dict[str, Any]:
    """q5 and q7 in one app, paced; q5's code changes (v2) and q7 rescales 1 -> 2 (v3)."""
    run = Path(tempfile.mkdtemp(prefix="hw-upgrade-", dir=work))
    qs = ["q5", "q7"]
    ev = list(events(n))
    expected = {q: reference(q, ev) for q in qs}
    out = {q: run / f"{q}.jsonl" for q in qs}

    def app(file: str, q5: str, p7: int) -> str:
        return app_file(run, file, "nexmark-upgrade", run, n, qs, rate=rate, q5=q5, p7=p7)

    res: dict[str, Any] = {"events": n, "rate": rate}
    with LocalCluster(workers=2, data_dir=run / "cluster") as c:
        c.client.submit(app("v1.py", "count_v1", 1), include=INCLUDE)
        poll_for(
            lambda: count_lines(out["q5"]) >= len(expected["q5"]) // 4,
            120,
            what="q5 results before the upgrade",
        )
        t = time.time()
        r = c.client.upgrade(app("v2.py", "count_v2", 1), include=INCLUDE)
        res["code_change"] = {
            "applied": r.applied,
            "to_version": r.to_version,
            "seconds": round(time.time() - t, 3),
            "q5_results_before": count_lines(out["q5"]),
        }
        poll_for(
            lambda: count_lines(out["q7"]) >= len(expected["q7"]) // 2,
            120,
            what="q7 results before the rescale",
        )
        t = time.time()
        r = c.client.upgrade(app("v3.py", "count_v2", 2), include=INCLUDE)
        res["rescale"] = {
            "applied": r.applied,
            "to_version": r.to_version,
            "seconds": round(time.time() - t, 3),
            "q7_results_before": count_lines(out["q7"]),
        }
        for q in qs:
            poll_for(
                lambda q=q: count_lines(out[q]) >= len(expected[q]), 300, what=f"every {q} result"
            )
        time.sleep(0.2)
        rows = {q: [r for _, r in read_jsonl(out[q])] for q in qs}
    for q in qs:
        versions = [r["version"] for r in rows[q]]
        res[q] = {
            "results": len(rows[q]),
            "expected": len(expected[q]),
            "result_equal": normalise(rows[q]) == expected[q],
            "versions": {str(v): versions.count(v) for v in sorted(set(versions))},
            "versions_in_order": versions == sorted(versions),
        }
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--queries", default=",".join(Q.QUERIES))
    ap.add_argument("--runs", type=int, default=3, help="rounds per query")
    ap.add_argument("--upgrade", action="store_true", help="run the online upgrade case too")
    ap.add_argument("--upgrade-events", type=int, default=30_000)
    ap.add_argument("--upgrade-rate", type=float, default=5_000.0)
    ap.add_argument("--no-bytewax", action="store_true")
    ap.add_argument(
        "--workers",
        type=int,
        default=2,
        help="hotwire workers for the query runs (1: every PE in one process, as Bytewax runs)",
    )
    ap.add_argument(
        "--parallelism",
        type=int,
        help="instances of hotwire's source (each making its part of the events), its "
        "assigners and filters, and Q5's windows (default: --workers)",
    )
    ap.add_argument(
        "--bytewax-procs",
        help="Bytewax configurations, comma-separated process counts, one worker each and "
        "the source in as many partitions (default: 1 and --workers)",
    )
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--profile", metavar="QUERY", help="only profile one hotwire run (py-spy)")
    for hidden in ("--bytewax-process", "--bytewax-addresses", "--bytewax-out",
                   "--bytewax-ticks", "--bytewax-times"):  # fmt: skip
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    ap.add_argument("--bytewax-id", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bytewax_process:
        return bytewax_process(args)
    queries = [q.strip() for q in args.queries.split(",") if q.strip()]
    unknown = sorted(set(queries) - set(Q.QUERIES) - set(Q.VARIANTS))
    if unknown:
        ap.error(f"unknown queries {unknown}; choose among {Q.QUERIES + list(Q.VARIANTS)}")
    n = args.events
    par = args.workers if args.parallelism is None else args.parallelism
    try:
        procs = sorted({int(x) for x in (args.bytewax_procs or f"1,{args.workers}").split(",")})
    except ValueError:
        ap.error(f"--bytewax-procs takes process counts such as 1,2, not {args.bytewax_procs!r}")
    if args.workers < 1 or par < 1 or min(procs) < 1:
        ap.error("--workers, --parallelism and --bytewax-procs must be at least 1")
    if args.profile:
        with tempfile.TemporaryDirectory(prefix="nexmark-") as tmp:
            prof = profile_hotwire(args.profile, n, Path(tmp), workers=args.workers, par=par)
            print(json.dumps(prof, indent=2))
        return 0
    ev = list(events(n))
    expected = {q: reference(q, ev) for q in queries}
    del ev
    doc: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "config": {
            "events": n,
            "runs": args.runs,
            "workers": args.workers,
            "parallelism": par,
            "bytewax_procs": procs,
            "events_per_s": "events / (last result's sink time - submit time)",
            "ratio_to_best": "per round, hotwire (from submit) / the best Bytewax "
            "configuration of that round with a correct result (from its first event)",
        },
        "queries": {},
    }
    with tempfile.TemporaryDirectory(prefix="nexmark-") as tmp:
        work = Path(tmp)
        for q in queries:
            bw_on = q in BYTEWAX_QUERIES and not args.no_bytewax
            entry: dict[str, Any] = {"expected_results": len(expected[q]), "hotwire": []}
            bw: dict[int, list[dict[str, Any]]] = {k: [] for k in procs} if bw_on else {}
            loads = []
            for _ in range(args.runs):
                load0 = os.getloadavg()[0]
                entry["hotwire"].append(run_hotwire(q, n, expected[q], work, args.workers, par))
                for k in bw:
                    bw[k].append(run_bytewax(q, n, expected[q], work, k))
                loads.append([round(load0, 2), round(os.getloadavg()[0], 2)])
                last = {"hotwire": entry["hotwire"][-1]}
                last.update({f"bytewax_{k}": v[-1] for k, v in bw.items()})
                print(json.dumps({q: last, "load_1min": loads[-1]}), file=sys.stderr)
            entry["load_1min_before_after_each_round"] = loads
            hw = [r["events_per_s"] for r in entry["hotwire"]]
            entry["hotwire_events_per_s"] = spread(hw)
            entry["hotwire_events_per_cpu_s"] = spread(
                [r["events_per_cpu_s"] for r in entry["hotwire"]]
            )
            entry["result_equal"] = all(r["result_equal"] for r in entry["hotwire"])
            if bw:
                for k, rs in bw.items():
                    xs = [r["events_per_s"] for r in rs]
                    entry[f"bytewax_{k}"] = rs
                    entry[f"bytewax_{k}_events_per_s"] = spread(xs)
                    entry[f"bytewax_{k}_events_per_cpu_s"] = spread(
                        [r["events_per_cpu_s"] for r in rs]
                    )
                    entry[f"bytewax_{k}_result_equal"] = all(r["result_equal"] for r in rs)
                    entry[f"ratio_hotwire_to_bytewax_{k}"] = spread(
                        [h / b for h, b in zip(hw, xs, strict=True)]
                    )
                # Per round, Bytewax's best configuration with a correct result, timed
                # from its first event (its processes' start-up left out); hotwire's
                # from the submit (deployment included) and from its first event.
                best = [
                    max(
                        (
                            bw[k][i]["events_per_s_from_first_event"]
                            for k in bw
                            if bw[k][i]["result_equal"]
                        ),
                        default=None,
                    )
                    for i in range(args.runs)
                ]
                entry["best_bytewax_events_per_s_from_first_event"] = best
                ok = [i for i, b in enumerate(best) if b]
                if ok:
                    first = [r["events_per_s_from_first_event"] for r in entry["hotwire"]]
                    entry["ratio_hotwire_to_best_bytewax"] = spread([hw[i] / best[i] for i in ok])
                    entry["ratio_hotwire_to_best_bytewax_from_first_events"] = spread(
                        [first[i] / best[i] for i in ok]
                    )
            doc["queries"][q] = entry
        if args.upgrade:
            doc["upgrade"] = run_upgrade(args.upgrade_events, args.upgrade_rate, work)
    doc["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
