"""Record-path throughput: hotwire against a plain Python loop doing the same work.

    python bench/throughput.py [--records N] [--runs K] [--out FILE]

Two workloads, each measured on a real local cluster (master and workers as
processes) and as a plain loop in this process, alternating, K times:

* ``pipeline``: source -> map -> filter -> sink on one worker;
* ``keyed_count``: source -> key_by -> reduce (parallelism 2) -> sink across two workers.

When bytewax is importable, the same functions also run as a Bytewax dataflow in this
process (``bytewax.testing.run_main``, one worker, input batches of 1024; see
``peer_bytewax.py``), in the same alternation.

With ``--metrics``, another cluster of the same shape runs with Prometheus metrics on
(``LocalCluster(metrics=True)``) while a thread of this process scrapes its master and
workers every second, as Prometheus would, in the same alternation (before the
plaintext cluster in odd runs, after it in even ones); ``metrics_cost``
is 1 - (metrics median / plaintext median), and ``scrape_ms`` gives the scrapes' times.

With ``--tls`` (the default), a second cluster of the same shape runs with mTLS under
a cluster CA (``LocalCluster(secure=True)``: the data plane between workers and every
gRPC channel encrypted) in the same alternation, and ``tls_cost`` is
1 - (mTLS median / plaintext median).

Prints one JSON document: records/s per run, medians, and the ratios of medians
(hotwire / plain loop, hotwire / bytewax). The machine is shared and noisy: compare ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

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
src.key_by(lambda r: r["k"]).reduce("sum", add, parallelism=2).sink("out", Done(N))
"""
)


def plain_pipeline(n: int) -> float:
    """The same functions in one Python loop: records/s."""
    ns: dict[str, object] = {}
    exec(APP.format(n=n, done=os.devnull), ns)  # same callables as the app
    numbers, scale, keep = ns["numbers"], ns["scale"], ns["keep"]
    out: list[object] = []
    sink = out.append
    t0 = time.perf_counter()
    for r in numbers(None):  # type: ignore[operator]
        r2 = scale(r)  # type: ignore[operator]
        if keep(r2):  # type: ignore[operator]
            sink(r2)
    return n / (time.perf_counter() - t0)


def plain_keyed(n: int) -> float:
    ns: dict[str, object] = {}
    exec(APP.format(n=n, done=os.devnull), ns)
    numbers, add = ns["numbers"], ns["add"]
    state: dict[object, float] = {}
    out: list[object] = []
    t0 = time.perf_counter()
    for r in numbers(None):  # type: ignore[operator]
        k = r["k"]
        acc = add(state.get(k), r)  # type: ignore[operator]
        state[k] = acc
        out.append((k, acc))
    return n / (time.perf_counter() - t0)


def bytewax_pipeline(n: int) -> float:
    """The same functions as a Bytewax dataflow (one worker, in-process): records/s."""
    ns: dict[str, object] = {}
    exec(APP.format(n=n, done=os.devnull), ns)
    return peer_bytewax.pipeline_rps(n, ns["numbers"], ns["scale"], ns["keep"])  # type: ignore[arg-type]


def bytewax_keyed(n: int) -> float:
    ns: dict[str, object] = {}
    exec(APP.format(n=n, done=os.devnull), ns)
    return peer_bytewax.keyed_rps(n, ns["numbers"], ns["add"])  # type: ignore[arg-type]


def hotwire_run(cluster: LocalCluster, body: str, n: int, tmp: Path, tag: str) -> float:
    done = tmp / f"done-{tag}"
    path = write_app(tmp, f"app-{tag}.py", body.format(n=n, done=str(done)))
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
    t_end = float(done.read_text())
    t_start = float(Path(str(done) + ".start").read_text())
    cluster.client.kill("tp")
    return n / (t_end - t_start)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default="")
    ap.add_argument(
        "--tls", action=argparse.BooleanOptionalAction, default=True,
        help="also measure a cluster with mTLS (default: on)",
    )
    ap.add_argument(
        "--metrics", action=argparse.BooleanOptionalAction, default=False,
        help="also measure a cluster with Prometheus metrics on, scraped every second",
    )
    args = ap.parse_args()
    n = args.records
    result: dict[str, object] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "config": {"records": n, "runs": args.runs, "tls": args.tls, "metrics": args.metrics},
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
            hw, base, bw, tls, met = [], [], [], [], []
            with contextlib.ExitStack() as stack:
                c = stack.enter_context(
                    LocalCluster(workers=workers, data_dir=tmp / name, log_level="warning")
                )
                ct = None
                if args.tls:
                    ct = stack.enter_context(
                        LocalCluster(
                            workers=workers,
                            data_dir=tmp / f"{name}-tls",
                            log_level="warning",
                            secure=True,
                        )
                    )
                cm, scraper = None, None
                if args.metrics:
                    cm = stack.enter_context(
                        LocalCluster(
                            workers=workers,
                            data_dir=tmp / f"{name}-metrics",
                            log_level="warning",
                            metrics=True,
                        )
                    )
                    scraper = stack.enter_context(Scraper(cm))
                for run in range(args.runs):
                    base.append(plain(n))
                    if cm is not None and run % 2:  # every other run: metrics first
                        met.append(hotwire_run(cm, body, n, tmp, f"{name}-metrics-{run}"))
                    hw.append(hotwire_run(c, body, n, tmp, f"{name}-{run}"))
                    if ct is not None:
                        tls.append(hotwire_run(ct, body, n, tmp, f"{name}-tls-{run}"))
                    if cm is not None and not run % 2:
                        met.append(hotwire_run(cm, body, n, tmp, f"{name}-metrics-{run}"))
                    if bw_version:
                        bw.append(peer(n))
            entry: dict[str, object] = {
                "workers": workers,
                "hotwire_rps": [round(x, 1) for x in hw],
                "plain_loop_rps": [round(x, 1) for x in base],
                "hotwire_rps_median": _med(hw),
                "plain_loop_rps_median": _med(base),
                "ratio": round(statistics.median(hw) / statistics.median(base), 3),
            }
            if tls:
                entry["hotwire_tls_rps"] = [round(x, 1) for x in tls]
                entry["hotwire_tls_rps_median"] = _med(tls)
                entry["tls_cost"] = round(1 - statistics.median(tls) / statistics.median(hw), 3)
            if met and scraper is not None:
                entry["hotwire_metrics_rps"] = [round(x, 1) for x in met]
                entry["hotwire_metrics_rps_median"] = _med(met)
                entry["metrics_cost"] = round(1 - statistics.median(met) / statistics.median(hw), 3)
                ms = sorted(scraper.ms)
                entry["scrape_ms"] = {
                    "count": len(ms),
                    "median": round(statistics.median(ms), 2) if ms else None,
                    "max": round(ms[-1], 2) if ms else None,
                }
            if bw:
                entry["bytewax_workers"] = 1
                entry["bytewax_rps"] = [round(x, 1) for x in bw]
                entry["bytewax_rps_median"] = _med(bw)
                entry["ratio_vs_bytewax"] = round(statistics.median(hw) / statistics.median(bw), 3)
            result[name] = entry
    doc = json.dumps(result, indent=2)
    print(doc)
    if args.out:
        Path(args.out).write_text(doc + "\n")


if __name__ == "__main__":
    main()
