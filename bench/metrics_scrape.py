"""How long a Prometheus scrape of a worker takes with a large app on it.

    python bench/metrics_scrape.py [--pes 1000] [--rate 100] [--scrapes 100] [--out FILE]

One worker (with ``--metrics``) runs an app of ``--pes`` PEs: a paced source
(``--rate`` records/s), a chain of maps behind it and a sink, one instance each, so
every PE has series for records, errors, inbox and credit waits, the maps a
batch-time histogram and the sink an end-to-end latency histogram; every record
passes every PE, which keeps the worker's loop busy meanwhile. The benchmark
scrapes the worker's endpoint ``--scrapes`` times, one after another, on a new
connection each (as Prometheus does: a worker closes each after its answer), and prints
as JSON the times (request sent to the last byte read), the size of the
exposition, and where the time went: the worker's ``Server-Timing`` header gives,
in ms, ``request`` (connection accepted to request read, on the worker's loop),
``snapshot`` (the counters copied on the loop), ``text`` (the exposition written,
on the loop) and ``write`` (the previous answer's, from the first write until the
kernel had taken all of it); ``rest`` is the client's time less the first three:
connecting, the loop's turns before it accepted, the transfer and this process
reading. The issue's goal: a scrape of a 1000-PE app's worker in at most 100 ms.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hotwire.testing.cluster import LocalCluster, poll_for, write_app

APP = """
from hotwire import Topology
from hotwire.testing.sources import counter

app = Topology("wide")
s = app.source("src", counter(rate={rate}))
for i in range({maps}):
    s = s.map(f"m{{i}}", lambda r: r)
s.sink("out", lambda r: None)
"""


PARTS = ("request", "snapshot", "text")


def scrape(host: str, port: int) -> tuple[bytes, float, dict[str, float]]:
    """One scrape on a new connection: the body, ms from request to last byte, and
    the worker's Server-Timing parts (ms)."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    t0 = time.perf_counter()
    conn.request("GET", "/metrics")
    r = conn.getresponse()
    body = r.read()
    ms = (time.perf_counter() - t0) * 1000
    conn.close()
    if r.status != 200:
        raise RuntimeError(f"scrape answered {r.status}: {body[:200]!r}")
    parts = {}
    for item in (r.getheader("Server-Timing") or "").split(","):
        name, _, dur = item.strip().partition(";dur=")
        if dur:
            parts[name] = float(dur)
    return body, ms, parts


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "median": round(statistics.median(xs), 2),
        "p90": round(xs[int(0.9 * (len(xs) - 1))], 2),
        "max": round(xs[-1], 2),
        "min": round(xs[0], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pes", type=int, default=1000)
    ap.add_argument("--rate", type=int, default=100, help="the source's records/s")
    ap.add_argument("--scrapes", type=int, default=100)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="hotwire-scrape-") as d:
        tmp = Path(d)
        app = write_app(tmp, "wide.py", APP.format(maps=args.pes - 2, rate=args.rate))
        with LocalCluster(
            workers=1, slots=args.pes + 10, data_dir=tmp / "c", log_level="warning", metrics=True
        ) as c:
            t0 = time.perf_counter()
            c.client.submit(app)
            submit_s = time.perf_counter() - t0
            host, _, port = c.metrics_addresses["w1"].rpartition(":")

            def every_pe_counts() -> bool:
                body = scrape(host, int(port))[0]
                return b'pe="out"' in body and b"hotwire_e2e_latency_seconds_count" in body

            poll_for(every_pe_counts, 120, 0.5, what="every PE in the exposition")
            times, parts, rest = [], {k: [] for k in (*PARTS, "write")}, []
            body = b""
            for _ in range(args.scrapes):
                body, ms, p = scrape(host, int(port))
                times.append(ms)
                for k, v in p.items():
                    parts.setdefault(k, []).append(v)
                rest.append(ms - sum(p.get(k, 0.0) for k in PARTS))
    text = body.decode()
    series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    doc = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },
        "config": {"pes": args.pes, "scrapes": args.scrapes, "source_rate": args.rate},
        "submit_s": round(submit_s, 2),
        "exposition_bytes": len(body),
        "series": series,
        "scrape_ms": _stats(times),
        "parts_ms": {k: _stats(v) for k, v in parts.items() if v},
        "rest_ms": _stats(rest),
        "goal_ms": 100,
    }
    out = json.dumps(doc, indent=2)
    print(out)
    if args.out:
        Path(args.out).write_text(out + "\n")


if __name__ == "__main__":
    main()
