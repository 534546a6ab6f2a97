"""Apply cost against app size: a one-PE code change applied to apps of N PEs.

    python bench/apply_scale.py [--pes 10,100,1000] [--upgrades 5] [--rounds 1]
                                [--profile DIR] [--out FILE]

Starts a master and two workers (real processes on loopback, log level debug so the
master logs its phase times), submits the app of ``bench/workload.py``'s
``render_wide`` with N PEs (two sources, chains of maps, a sink per chain), and applies
``--upgrades`` upgrades that each change the config of one map (``m0_0``), so each
upgrade regenerates exactly one PE. The apply latency is what the master reports
(request to commit); ``rtt_ms`` is the client's round trip including loading
``app.py`` on the client. ``--rounds`` repeats every size that many times, sizes
interleaved, on the same cluster. With ``--profile DIR``, py-spy samples the master
and one worker during the upgrades of the largest size and writes speedscope files
into DIR. Prints one JSON document and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from upgrade import master_phases
from workload import render_wide

from hotwire.testing.cluster import LocalCluster, write_app


def spread(xs: list[float]) -> dict[str, float]:
    """Median, min and max, rounded to 0.01 ms."""
    return {
        "median": round(statistics.median(xs), 2),
        "min": round(min(xs), 2),
        "max": round(max(xs), 2),
    }


def run_size(
    cluster: LocalCluster, work: Path, pes: int, upgrades: int, tag: str
) -> dict[str, Any]:
    """Submit the app of ``pes`` PEs, apply ``upgrades`` one-PE changes, kill it."""
    name = f"wide{pes}{tag}"
    paths = [
        write_app(work, f"{name}.v{v}.py", render_wide(pes, name=name, rate=200.0, version=v))
        for v in range(upgrades + 1)
    ]
    t = time.perf_counter()
    sub = cluster.client.submit(paths[0], timeout=600)
    submit_rtt = (time.perf_counter() - t) * 1000
    apply_ms: list[float] = []
    rtt_ms: list[float] = []
    for p in paths[1:]:
        time.sleep(0.2)
        t = time.perf_counter()
        r = cluster.client.upgrade(p, timeout=600)
        rtt_ms.append((time.perf_counter() - t) * 1000)
        if not r.applied:
            raise RuntimeError(f"upgrade of {name} with {p} was not applied")
        changed = json.loads(r.changes_json or "{}").get("regenerated", [])
        if changed != ["m0_0"]:
            raise RuntimeError(f"upgrade of {name} regenerated {changed}, not only m0_0")
        apply_ms.append(r.latency_ms)
    cluster.client.kill(name, timeout=600)
    return {
        "app": name,
        "pes": pes,
        "submit_apply_ms": round(sub.latency_ms, 2),
        "submit_rtt_ms": round(submit_rtt, 2),
        "apply_ms": apply_ms,
        "rtt_ms": rtt_ms,
    }


def start_profile(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--format",
            "speedscope",
            "--output",
            str(out),
            "--rate",
            "200",
            "--duration",
            str(int(seconds)),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pes", default="10,100,1000", help="PE counts, comma-separated")
    ap.add_argument("--upgrades", type=int, default=5, help="upgrades per size and round")
    ap.add_argument("--rounds", type=int, default=1, help="times each size is measured")
    ap.add_argument("--profile", default="", help="py-spy the largest size into this directory")
    ap.add_argument("--out", default="bench/results/apply_scale.json")
    a = ap.parse_args(argv)
    sizes = [int(x) for x in a.pes.split(",") if x]
    runs: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hotwire-apply-") as tmp:
        work = Path(tmp)
        with LocalCluster(
            workers=2,
            slots=max(64, max(sizes) // 2 + 32),
            data_dir=work / "cluster",
            log_level="debug",
        ) as cluster:
            for rnd in range(a.rounds):
                for pes in sizes:
                    spies: list[tuple[str, subprocess.Popen[bytes]]] = []
                    if a.profile and pes == max(sizes) and rnd == 0:
                        d = Path(a.profile)
                        d.mkdir(parents=True, exist_ok=True)
                        assert cluster.master is not None
                        for role, proc in (
                            ("master", cluster.master.proc),
                            ("worker", cluster.workers[0].proc),
                        ):
                            out = d / f"{role}_{pes}.speedscope.json"
                            spies.append((role, start_profile(proc.pid, out, 600)))
                        time.sleep(1.0)
                    print(f"round {rnd}: {pes} PEs", file=sys.stderr, flush=True)
                    runs.append(
                        {"round": rnd, **run_size(cluster, work, pes, a.upgrades, f"r{rnd}")}
                    )
                    for role, spy in spies:
                        spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
                        _, err = spy.communicate(timeout=120)
                        if spy.returncode not in (0, -2):
                            print(f"py-spy on the {role}: {err.decode()[-400:]}", file=sys.stderr)
            phases = master_phases(sorted(cluster.dir.glob("master.*.log")))
    sizes_out = []
    for pes in sizes:
        mine = [r for r in runs if r["pes"] == pes]
        apply_all = [x for r in mine for x in r["apply_ms"]]
        rtt_all = [x for r in mine for x in r["rtt_ms"]]
        entry: dict[str, Any] = {
            "pes": pes,
            "upgrades": len(apply_all),
            "apply_ms": spread(apply_all),
            "rtt_ms": spread(rtt_all),
            "submit_apply_ms": [r["submit_apply_ms"] for r in mine],
        }
        ph: dict[str, list[float]] = {}
        for r in mine:
            for k, v in phases.get(r["app"], {}).items():
                ph.setdefault(k, []).extend(v[1:])  # the first line of each app is its submit
        entry["master_phases_ms"] = {k: spread(v) for k, v in ph.items() if v}
        sizes_out.append(entry)
    base = next((s for s in sizes_out if s["pes"] == min(sizes)), None)
    for s in sizes_out:
        if base is not None:
            s["apply_ratio_to_smallest"] = round(
                s["apply_ms"]["median"] / base["apply_ms"]["median"], 2
            )
    doc = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_avg": [round(x, 2) for x in os.getloadavg()],
        },
        "config": {"pes": sizes, "upgrades": a.upgrades, "rounds": a.rounds, "workers": 2},
        "sizes": sizes_out,
        "runs": runs,
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
