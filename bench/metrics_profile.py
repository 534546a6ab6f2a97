"""Where a worker with --metrics spends its CPU on metrics: a sampling profile.

    python bench/metrics_profile.py [--records N] [--rate HZ] [--out FILE]

The paired runs of ``throughput.py --metrics`` compare records/s with metrics on and
off, but on a shared machine their spread is wider than the cost they look for.
This benchmark measures the cost from inside instead: it runs ``throughput.py``'s
two workloads (``pipeline`` on one worker, ``keyed_count`` across two, the same
apps) on clusters with ``--metrics``, scraped every second as Prometheus would,
while py-spy samples every worker process (``--nonblocking``, ``--rate`` samples
per second, idle threads left out). Each sample is a stack; it is metrics work when
a frame of it is in ``hotwire/metrics.py`` (snapshots and the text exposition) or in
the metrics HTTP server (``socketserver``, ``http.server``, ``wsgiref``), when a frame is
``Instance._e2e`` (a sink's latency count), or when its innermost frame is the
``Stamp`` class or a line of ``Instance._process`` or ``_emit_source`` that names
the stamp (those lines also pass it on to ``emit_all``: their own time is counted
whole, an upper bound). What the profile cannot see: passing the stamp down
``RouteState.emit`` and ``send`` (a default ``None`` without metrics) and the extra
float in each data-plane frame. Line numbers come from the source files as this
process imports them: the workers must run the same files.

Prints one JSON document: per workload and worker the samples, the metrics
samples by part, and their share of the worker's samples; and the share over
all workers of the workload.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import KEYED, PIPELINE, Scraper, hotwire_run

from hotwire.testing.cluster import LocalCluster
from hotwire.worker import instance, transport


def _lines(obj: Any, having: str = "") -> set[tuple[str, int]]:
    """(file name, line) of the lines of a function or class, as py-spy names frames;
    with ``having``, only the lines that contain it."""
    src, first = inspect.getsourcelines(obj)
    name = Path(inspect.getsourcefile(obj) or "").name
    return {(name, first + i) for i, line in enumerate(src) if having in line}


# The batch stamp: Instance._e2e in any frame (all of it is metrics work); the Stamp
# class and the lines of Instance._process and _emit_source that read or take a stamp
# only as the innermost frame (their own time, not the calls they make: what
# Stamp.grant delegates to, or emit_all, would run without metrics too).
STAMP_ANY = _lines(instance.Instance._e2e)
STAMP_LEAF = (
    _lines(transport.Stamp)
    | _lines(instance.Instance._process, "stamp")
    | _lines(instance.Instance._emit_source, "stamp")
)


def _where(frame: str) -> tuple[str, str, int]:
    """(path, file name, line) of a py-spy frame "fn (path/file.py:LINE)"."""
    loc = frame.rsplit("(", 1)[-1].rstrip(")")
    path, _, line = loc.rpartition(":")
    return path, Path(path).name, int(line) if line.isdigit() else -1


def _part(frames: list[str]) -> str | None:
    """The metrics part a sample (its frames, outermost first) belongs to, if any."""
    for i, frame in enumerate(reversed(frames)):
        path, name, line = _where(frame)
        if path.endswith("hotwire/metrics.py"):
            return "exposition"
        if (
            path.endswith("hotwire/httpd.py")
            or name in ("socketserver.py", "simple_server.py")
            or "/wsgiref/" in path
            or path.endswith("/http/server.py")
        ):
            return "http_server"
        if path.endswith(f"hotwire/worker/{name}") and (
            (name, line) in STAMP_ANY or (i == 0 and (name, line) in STAMP_LEAF)
        ):
            return "stamp"
    return None


def classify(raw: str) -> tuple[int, Counter[str]]:
    """(samples, metrics samples by part) of py-spy's raw (collapsed) output."""
    total = 0
    parts: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        part = _part(stack.split(";"))
        if part is not None:
            parts[part] += int(n)
    return total, parts


def profile(body: str, workers: int, n: int, rate: int, tmp: Path, tag: str) -> dict[str, Any]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with LocalCluster(workers=workers, data_dir=tmp / tag, metrics=True) as c:
        procs = []
        for w in c.workers:
            out = tmp / f"{tag}-{w.label}.txt"
            args = [spy, "record", "--pid", str(w.proc.pid), "--rate", str(rate)]
            args += ["--format", "raw", "--nonblocking", "--output", str(out)]
            procs.append(
                (
                    w.label,
                    out,
                    subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
                )
            )
        with Scraper(c) as scraper:
            rps, _cpu = hotwire_run(c, body, n, tmp, tag)
        for _label, _out, p in procs:
            p.send_signal(signal.SIGINT)
        result: dict[str, Any] = {"workers": {}, "rps": round(rps, 1), "scrapes": len(scraper.ms)}
        all_total, all_parts = 0, Counter[str]()
        for label, out, p in procs:
            _, err = p.communicate(timeout=60)
            if not out.exists():
                raise RuntimeError(f"py-spy wrote no profile of {label}: {err.decode()[-500:]}")
            total, parts = classify(out.read_text())
            all_total += total
            all_parts += parts
            result["workers"][label] = {
                "samples": total,
                "metrics_samples": dict(parts),
                "metrics_share": round(sum(parts.values()) / total, 4) if total else None,
            }
        result["samples"] = all_total
        result["metrics_samples"] = dict(all_parts)
        result["metrics_share"] = (
            round(sum(all_parts.values()) / all_total, 4) if all_total else None
        )
        return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=3_000_000)
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--out", default="")
    ap.add_argument("--keep", default="", help="a directory to keep py-spy's raw profiles in")
    args = ap.parse_args()
    doc: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average": os.getloadavg(),
        },
        "config": {"records": args.records, "rate": args.rate},
    }
    with tempfile.TemporaryDirectory(prefix="hotwire-mprof-") as d:
        tmp = Path(d)
        doc["pipeline"] = profile(PIPELINE, 1, args.records, args.rate, tmp, "pipeline")
        doc["keyed_count"] = profile(KEYED, 2, args.records, args.rate, tmp, "keyed")
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            for f in tmp.glob("*-w*.txt"):
                shutil.copy(f, args.keep)
    doc["machine"]["load_average_after"] = os.getloadavg()
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
