"""How long a Prometheus scrape of a worker takes with a large app on it.

    python bench/metrics_scrape.py [--pes 1000] [--scrapes 50] [--out FILE]

One worker (with ``--metrics``) runs an app of ``--pes`` PEs: a paced source
(100 records/s), a chain of maps behind it and a sink, one instance each, so every PE has
series for records, errors, inbox and credit waits, and the maps a batch-time
histogram. The benchmark scrapes the worker's endpoint ``--scrapes`` times, one
after another, and prints the times (HTTP request to the last byte) and the size of
the exposition as JSON. The issue's goal: a scrape of a 1000-PE app's worker in
at most 100 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hotwire.testing.cluster import LocalCluster, poll_for, write_app

APP = """
from hotwire import Topology
from hotwire.testing.sources import counter

app = Topology("wide")
s = app.source("src", counter(rate=100))
for i in range({maps}):
    s = s.map(f"m{{i}}", lambda r: r)
s.sink("out", lambda r: None)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pes", type=int, default=1000)
    ap.add_argument("--scrapes", type=int, default=50)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hotwire-scrape-") as d:
        tmp = Path(d)
        app = write_app(tmp, "wide.py", APP.format(maps=args.pes - 2))
        with LocalCluster(
            workers=1, slots=args.pes + 10, data_dir=tmp / "c", log_level="warning", metrics=True
        ) as c:
            t0 = time.perf_counter()
            c.client.submit(app)
            submit_s = time.perf_counter() - t0
            url = f"http://{c.metrics_addresses['w1']}/metrics"

            def last_pe_counts() -> bool:
                with urllib.request.urlopen(url, timeout=30) as r:
                    body = r.read().decode()
                return 'pe="out"' in body and "hotwire_records_in_total" in body

            poll_for(last_pe_counts, 120, 0.5, what="every PE in the exposition")
            times, size = [], 0
            for _ in range(args.scrapes):
                t0 = time.perf_counter()
                with urllib.request.urlopen(url, timeout=30) as r:
                    body = r.read()
                times.append((time.perf_counter() - t0) * 1000)
                size = len(body)
            series = sum(1 for line in body.decode().splitlines() if not line.startswith("#"))
    times.sort()
    doc = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average": os.getloadavg(),
        },
        "config": {"pes": args.pes, "scrapes": args.scrapes, "source_rate": 100},
        "submit_s": round(submit_s, 2),
        "exposition_bytes": size,
        "series": series,
        "scrape_ms": {
            "median": round(statistics.median(times), 2),
            "p90": round(times[int(0.9 * (len(times) - 1))], 2),
            "max": round(times[-1], 2),
            "min": round(times[0], 2),
        },
        "goal_ms": 100,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
