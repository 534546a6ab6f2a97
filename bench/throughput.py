"""Record-path throughput: hotwire against a plain Python loop doing the same work.

    python bench/throughput.py [--records N] [--runs K] [--out FILE]
    python bench/throughput.py --table FILE   # the README's table rows from a result

Two workloads, each measured on a real local cluster (master and workers as
processes) and as a plain loop in this process, in K rounds. The plain loop calls
the app's own functions, its key function and its counting sink (``Done``), and
runs alone: each round runs it first, with no cluster process alive, then starts
the round's clusters, measures them and stops them before the next round.

* ``pipeline``: source -> map -> filter -> sink on one worker;
* ``keyed_count``: source -> key_by -> reduce (parallelism 2) -> sink across two workers.

When bytewax is importable, the same functions also run as a Bytewax dataflow in this
process (``bytewax.testing.run_main``, one worker, input batches of 1024; see
``peer_bytewax.py``), in the same rounds, also with no cluster process alive.

With ``--metrics``, the cost of Prometheus metrics is measured in pairs after the
rounds above, per workload: a plaintext cluster and one of the same shape with
metrics on (``LocalCluster(metrics=True)``, its master and workers scraped every
second by a thread of this process, as Prometheus would) both start once and stay
up; then ``--metrics-rounds`` rounds each run the app once on both, in ABBA order
(plaintext first in even rounds), ``--metrics-records`` records a run. A round gives
two ratios, metrics over plaintext: records/s, and the master's and workers' CPU
seconds per record. ``metrics_paired`` has their per-round values and, as the
cost, 1 - the median ratio of records/s (``rps_cost``) and the median ratio of CPU
per record - 1 (``cpu_cost``), each with a 95% bootstrap confidence interval of the
median (2000 resamples of the rounds, seeded); ``goal_met`` says whether the
interval's upper end of each is at most 5%. Pairing within a round cancels the
load that other work puts on the machine over minutes, and CPU seconds do not count
the time the processes waited for a core.

With ``--tls`` (the default), a second cluster of the same shape runs with mTLS under
a cluster CA (``LocalCluster(secure=True)``: the data plane between workers and every
gRPC channel encrypted) in the same alternation, and ``tls_cost`` is
1 - (mTLS median / plaintext median).

Prints one JSON document: records/s per run, medians, and the ratios of medians
(hotwire / plain loop, hotwire / bytewax); for every figure and ratio its spread
(``*_spread``: median, min, max, quartiles; ratios also per round), and CPU seconds
per million records (``*_cpu_s_per_m``: the master's and workers' user + system
time from the submit to the sink's last record, read from /proc; this process's
for the plain loop and Bytewax). The machine is shared and noisy: compare ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import peer_bytewax

from hotwire.testing.cluster import LocalCluster, poll_for, write_app

APP = """
import os, time
from hotwire import Topology

N = {n}
DONE = {done!r}
KEYS = 1000


def numbers(ctx):
    with open(DONE + ".start", "w") as f:
        f.write(repr(time.time()))
    for i in range(N):
        yield {{"i": i, "k": i % KEYS, "v": 1.5}}


def scale(r):
    return {{"i": r["i"], "k": r["k"], "v": r["v"] * 2.0}}


def keep(r):
    return r["i"] % 10 != 0


def add(acc, r):
    return (acc or 0.0) + r["v"]


def key(r):
    return r["k"]


class Done:
    def __init__(self, expect):
        self.expect = expect
        self.seen = 0

    def __call__(self, r):
        self.seen += 1
        if self.seen == self.expect:
            with open(DONE, "w") as f:
                f.write(repr(time.time()))


app = Topology("tp")
src = app.source("src", numbers)
"""

PIPELINE = (
    APP
    + """
src.map("scale", scale).filter("keep", keep).sink("out", Done(N - N // 10))
"""
)

KEYED = (
    APP
    + """
src.key_by(key).reduce("sum", add, parallelism=2).sink("out", Done(N))
"""
)


# A measurement: records/s and CPU seconds per million records.
Measured = tuple[float, float]


def _app_ns(n: int, tmp: Path, tag: str) -> dict[str, Any]:
    """The app's own callables (its source, map, filter, reduce, key and sink class),
    run in this process; its done files go to ``tmp``."""
    ns: dict[str, Any] = {}
    exec(APP.format(n=n, done=str(tmp / f"done-{tag}")), ns)
    return ns


def plain_pipeline(n: int, tmp: Path) -> Measured:
    """The same functions in one Python loop, into the app's own counting sink
    (``Done``): records/s and CPU s per million records of this process."""
    ns = _app_ns(n, tmp, "plain-pipeline")
    numbers, scale, keep = ns["numbers"], ns["scale"], ns["keep"]
    sink = ns["Done"](n - n // 10)
    c0, t0 = time.process_time(), time.perf_counter()
    for r in numbers(None):
        r2 = scale(r)
        if keep(r2):
            sink(r2)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    if sink.seen != n - n // 10:
        raise RuntimeError(f"the plain loop's sink counted {sink.seen} records")
    return n / dt, cpu / n * 1e6


def plain_keyed(n: int, tmp: Path) -> Measured:
    """The reduce step as hotwire's runs it (``key``, ``add``, a dict of state, the
    ``(key, acc)`` pair out) into the app's own counting sink."""
    ns = _app_ns(n, tmp, "plain-keyed")
    numbers, add, key = ns["numbers"], ns["add"], ns["key"]
    sink = ns["Done"](n)
    state: dict[object, float] = {}
    c0, t0 = time.process_time(), time.perf_counter()
    for r in numbers(None):
        k = key(r)
        acc = add(state.get(k), r)
        state[k] = acc
        sink((k, acc))
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    if sink.seen != n:
        raise RuntimeError(f"the plain loop's sink counted {sink.seen} records")
    return n / dt, cpu / n * 1e6


def bytewax_pipeline(n: int, tmp: Path) -> Measured:
    """The same functions as a Bytewax dataflow (one worker, in-process): records/s
    and CPU s per million records of this process."""
    ns = _app_ns(n, tmp, "bytewax-pipeline")
    c0 = time.process_time()
    rps = peer_bytewax.pipeline_rps(n, ns["numbers"], ns["scale"], ns["keep"])
    return rps, (time.process_time() - c0) / n * 1e6


def bytewax_keyed(n: int, tmp: Path) -> Measured:
    ns = _app_ns(n, tmp, "bytewax-keyed")
    c0 = time.process_time()
    rps = peer_bytewax.keyed_rps(n, ns["numbers"], ns["add"])
    return rps, (time.process_time() - c0) / n * 1e6


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds the processes ``pids`` have used (from /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


def cluster_pids(cluster: LocalCluster) -> list[int]:
    procs = [cluster.master, *cluster.workers]
    return [p.proc.pid for p in procs if p is not None]


def hotwire_run(cluster: LocalCluster, body: str, n: int, tmp: Path, tag: str) -> Measured:
    """Records/s from the source's first record to the sink's last, and CPU s per
    million records of the master and workers from the submit to the sink's last."""
    done = tmp / f"done-{tag}"
    path = write_app(tmp, f"app-{tag}.py", body.format(n=n, done=str(done)))
    pids = cluster_pids(cluster)
    c0 = _cpu_s(pids)
    cluster.client.submit(path)
    # The sink writes the file then its time: wait for the time, not only the file.
    try:
        poll_for(
            lambda: done.exists() and done.read_text().strip() != "",
            300,
            interval=0.05,
            what="the sink to see every record",
        )
    except TimeoutError:
        print(cluster.logs()[-6000:], file=sys.stderr)
        raise
    cpu = _cpu_s(pids) - c0
    t_end = float(done.read_text())
    t_start = float(Path(str(done) + ".start").read_text())
    cluster.client.kill("tp")
    return n / (t_end - t_start), cpu / n * 1e6


class Scraper:
    """Scrape every metrics endpoint of a cluster each ``interval`` seconds on a thread
    (as a Prometheus server would) and keep how long each scrape took."""

    def __init__(self, cluster: LocalCluster, interval: float = 1.0):
        self.urls = [f"http://{a}/metrics" for a in cluster.metrics_addresses.values()]
        self.interval = interval
        self.ms: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for url in self.urls:
                t0 = time.perf_counter()
                with urllib.request.urlopen(url, timeout=10) as r:
                    r.read()
                self.ms.append((time.perf_counter() - t0) * 1000)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def _med(xs: list[float]) -> float:
    return round(statistics.median(xs), 1)


def _spread(xs: list[float], digits: int = 1) -> dict[str, float]:
    """Median, min and max, and the quartiles (``statistics.quantiles``, inclusive)."""
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else xs * 3
    return {
        k: round(v, digits)
        for k, v in (
            ("median", statistics.median(xs)),
            ("min", min(xs)),
            ("max", max(xs)),
            ("q1", q1),
            ("q3", q3),
        )
    }


def _ratios(a: list[float], b: list[float]) -> list[float]:
    """``a[i] / b[i]``: each run's figure over the other one of the same round."""
    return [round(x / y, 3) for x, y in zip(a, b, strict=True)]


def _cpu_entry(ms: list[Measured]) -> dict[str, object]:
    cpu = [x[1] for x in ms]
    return {"runs": [round(x, 3) for x in cpu], **_spread(cpu, 3)}


def _cpu_ratio(a: list[Measured], b: list[Measured]) -> dict[str, object]:
    """CPU seconds per record of ``a`` over ``b``: the ratio of medians, per round."""
    ca, cb = [x[1] for x in a], [x[1] for x in b]
    per_run = _ratios(ca, cb)
    return {
        "of_medians": round(statistics.median(ca) / statistics.median(cb), 3),
        "per_run": per_run,
        **_spread(per_run, 3),
    }


def _boot_ci(xs: list[float], resamples: int = 2000, seed: int = 1) -> list[float]:
    """95% bootstrap confidence interval of the median of ``xs``."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    return [round(meds[int(0.025 * resamples)], 4), round(meds[int(0.975 * resamples) - 1], 4)]


def metrics_paired(body: str, workers: int, n: int, rounds: int, tmp: Path) -> dict[str, object]:
    """The cost of metrics in ``rounds`` paired rounds on two clusters that stay up:
    plaintext and metrics on (scraped every second), ABBA order; see the docstring."""
    tmp.mkdir(parents=True, exist_ok=True)
    plain: list[Measured] = []
    met: list[Measured] = []
    load: list[float] = []
    with contextlib.ExitStack() as stack:
        c = stack.enter_context(
            LocalCluster(workers=workers, data_dir=tmp / "plain", log_level="warning")
        )
        cm = stack.enter_context(
            LocalCluster(
                workers=workers, data_dir=tmp / "metrics", log_level="warning", metrics=True
            )
        )
        scraper = stack.enter_context(Scraper(cm))
        for r in range(rounds):
            load.append(os.getloadavg()[0])
            pair = [(c, plain, "plain"), (cm, met, "metrics")]
            for cluster, out, tag in pair if r % 2 == 0 else pair[::-1]:
                out.append(hotwire_run(cluster, body, n, tmp, f"{tag}-{r}"))
    rps = [m[0] / p[0] for m, p in zip(met, plain, strict=True)]
    cpu = [m[1] / p[1] for m, p in zip(met, plain, strict=True)]
    rps_cost = [1 - x for x in rps]
    cpu_cost = [x - 1 for x in cpu]
    ms = sorted(scraper.ms)
    doc: dict[str, object] = {
        "rounds": rounds,
        "records_per_run": n,
        "load_average": _spread(load, 2),
        "plain_rps": _spread([x[0] for x in plain]),
        "metrics_rps": _spread([x[0] for x in met]),
        "plain_cpu_s_per_m": _spread([x[1] for x in plain], 3),
        "metrics_cpu_s_per_m": _spread([x[1] for x in met], 3),
        "rps_cost_per_round": [round(x, 4) for x in rps_cost],
        "cpu_cost_per_round": [round(x, 4) for x in cpu_cost],
        "rps_cost": round(statistics.median(rps_cost), 4),
        "rps_cost_ci95": _boot_ci(rps_cost),
        "rps_cost_spread": _spread(rps_cost, 4),
        "cpu_cost": round(statistics.median(cpu_cost), 4),
        "cpu_cost_ci95": _boot_ci(cpu_cost),
        "cpu_cost_spread": _spread(cpu_cost, 4),
        "scrape_ms": {
            "count": len(ms),
            "median": round(statistics.median(ms), 2) if ms else None,
            "max": round(ms[-1], 2) if ms else None,
        },
    }
    doc["goal_met"] = {
        "rps": _boot_ci(rps_cost)[1] <= 0.05,
        "cpu": _boot_ci(cpu_cost)[1] <= 0.05,
    }
    return doc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


DASH, TIMES = "\u2013", "\u00d7"  # as the README writes ranges and ratios
ROWS = {
    "pipeline": "source → map → filter → sink, one worker",
    "keyed_count": "keyed count (`key_by` → `reduce`, parallelism 2), two workers",
}


def table_rows(result: dict[str, Any]) -> list[str]:
    """The README's throughput rows (markdown) from one result of this benchmark."""

    def rps(s: dict[str, float]) -> str:
        return f"{s['median'] / 1e3:.0f}k ({s['min'] / 1e3:.0f}k{DASH}{s['max'] / 1e3:.0f}k)"

    def cpu(c: dict[str, Any]) -> str:
        return f"{c['median']:.2f} ({c['min']:.2f}{DASH}{c['max']:.2f})"

    def ratio(median: float, s: dict[str, float]) -> str:
        return f"**{median:.2f}{TIMES}** ({s['min']:.2f}{DASH}{s['max']:.2f})"

    rows = []
    for name, label in ROWS.items():
        x = result.get(name)
        if not isinstance(x, dict):
            continue
        cr = x["cpu_ratio"]
        cells = [
            label,
            f"{rps(x['hotwire_rps_spread'])}, {cpu(x['hotwire_cpu_s_per_m'])}",
            f"{rps(x['plain_loop_rps_spread'])}, {cpu(x['plain_loop_cpu_s_per_m'])}",
            f"{ratio(x['ratio'], x['ratio_spread'])}; CPU {cr['of_medians']:.1f}{TIMES} "
            f"({cr['min']:.1f}{DASH}{cr['max']:.1f})",
        ]
        if "bytewax_rps_spread" in x:
            cells += [
                f"{rps(x['bytewax_rps_spread'])}, {cpu(x['bytewax_cpu_s_per_m'])}",
                ratio(x["ratio_vs_bytewax"], x["ratio_vs_bytewax_spread"]),
            ]
        else:
            cells += ["(Bytewax not installed)", ""]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--table",
        metavar="JSON",
        help="only print the README's table rows from a result file of this benchmark",
    )
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="")
    ap.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure a cluster with mTLS (default: on)",
    )
    ap.add_argument(
        "--metrics",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also measure the cost of metrics on (scraped every second) in paired rounds",
    )
    ap.add_argument("--metrics-rounds", type=int, default=20)
    ap.add_argument("--metrics-records", type=int, default=0, help="default: --records")
    args = ap.parse_args()
    if args.table:
        print("\n".join(table_rows(json.loads(Path(args.table).read_text()))))
        return
    n = args.records
    result: dict[str, object] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "config": {
            "records": n,
            "runs": args.runs,
            "tls": args.tls,
            "metrics": args.metrics,
            "metrics_rounds": args.metrics_rounds if args.metrics else 0,
            "baseline": "the app's functions and counting sink in one loop, run first in "
            "each round with no cluster process alive (Bytewax too); the round's "
            "clusters start after it and stop before the next round",
        },
    }
    bw_version = peer_bytewax.version()
    result["bytewax"] = (
        {
            "available": True,
            "version": bw_version,
            "how": "bytewax.testing.run_main (1 worker, in-process), FixedPartitionedSource "
            "of 1 partition with batches of 1024; keys are str(k)",
        }
        if bw_version
        else {
            "available": False,
            "reason": f"bytewax is not importable: {peer_bytewax.BYTEWAX_ERROR}",
        }
    )
    with tempfile.TemporaryDirectory(prefix="hotwire-tp-") as d:
        tmp = Path(d)
        for name, body, plain, peer, workers in (
            ("pipeline", PIPELINE, plain_pipeline, bytewax_pipeline, 1),
            ("keyed_count", KEYED, plain_keyed, bytewax_keyed, 2),
        ):
            hw: list[Measured] = []
            base: list[Measured] = []
            bw: list[Measured] = []
            tls: list[Measured] = []
            gone: list[int] = []  # the processes of the last round's clusters
            for run in range(args.runs):
                # The baselines run alone: every cluster process of the round before
                # has exited, and this round's clusters start after them.
                alive = [pid for pid in gone if _alive(pid)]
                if alive:
                    raise RuntimeError(f"cluster processes {alive} still run")
                base.append(plain(n, tmp))
                if bw_version:
                    bw.append(peer(n, tmp))
                with contextlib.ExitStack() as stack:
                    c = stack.enter_context(
                        LocalCluster(
                            workers=workers, data_dir=tmp / f"{name}-{run}", log_level="warning"
                        )
                    )
                    clusters = [c]
                    ct = None
                    if args.tls:
                        ct = stack.enter_context(
                            LocalCluster(
                                workers=workers,
                                data_dir=tmp / f"{name}-tls-{run}",
                                log_level="warning",
                                secure=True,
                            )
                        )
                        clusters.append(ct)
                    gone = [pid for cl in clusters for pid in cluster_pids(cl)]
                    hw.append(hotwire_run(c, body, n, tmp, f"{name}-{run}"))
                    if ct is not None:
                        tls.append(hotwire_run(ct, body, n, tmp, f"{name}-tls-{run}"))
            hw_rps, base_rps = [x[0] for x in hw], [x[0] for x in base]
            entry: dict[str, object] = {
                "workers": workers,
                "hotwire_rps": [round(x, 1) for x in hw_rps],
                "plain_loop_rps": [round(x, 1) for x in base_rps],
                "hotwire_rps_median": _med(hw_rps),
                "plain_loop_rps_median": _med(base_rps),
                "ratio": round(statistics.median(hw_rps) / statistics.median(base_rps), 3),
                "hotwire_rps_spread": _spread(hw_rps),
                "plain_loop_rps_spread": _spread(base_rps),
                # each run's hotwire figure over the same round's plain loop
                "ratio_per_run": _ratios(hw_rps, base_rps),
                "ratio_spread": _spread(_ratios(hw_rps, base_rps), 3),
                "hotwire_cpu_s_per_m": _cpu_entry(hw),
                "plain_loop_cpu_s_per_m": _cpu_entry(base),
                "cpu_ratio": _cpu_ratio(hw, base),
            }
            if tls:
                tls_rps = [x[0] for x in tls]
                entry["hotwire_tls_rps"] = [round(x, 1) for x in tls_rps]
                entry["hotwire_tls_rps_median"] = _med(tls_rps)
                entry["hotwire_tls_rps_spread"] = _spread(tls_rps)
                entry["hotwire_tls_cpu_s_per_m"] = _cpu_entry(tls)
                entry["tls_cost"] = round(
                    1 - statistics.median(tls_rps) / statistics.median(hw_rps), 3
                )
                entry["tls_cost_spread"] = _spread([1 - r for r in _ratios(tls_rps, hw_rps)], 3)
            if args.metrics:
                entry["metrics_paired"] = metrics_paired(
                    body,
                    workers,
                    args.metrics_records or n,
                    args.metrics_rounds,
                    tmp / f"{name}-paired",
                )
            if bw:
                bw_rps = [x[0] for x in bw]
                entry["bytewax_workers"] = 1
                entry["bytewax_rps"] = [round(x, 1) for x in bw_rps]
                entry["bytewax_rps_median"] = _med(bw_rps)
                entry["bytewax_rps_spread"] = _spread(bw_rps)
                entry["bytewax_cpu_s_per_m"] = _cpu_entry(bw)
                entry["ratio_vs_bytewax"] = round(
                    statistics.median(hw_rps) / statistics.median(bw_rps), 3
                )
                entry["ratio_vs_bytewax_spread"] = _spread(_ratios(hw_rps, bw_rps), 3)
            result[name] = entry
    doc = json.dumps(result, indent=2)
    print(doc)
    if args.out:
        Path(args.out).write_text(doc + "\n")


if __name__ == "__main__":
    main()
