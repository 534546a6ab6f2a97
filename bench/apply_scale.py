"""Apply cost against app size: a one-PE code change applied to apps of N PEs.

    python bench/apply_scale.py [--pes 10,100,1000] [--upgrades 5] [--rounds 1]
                                [--profile DIR] [--out FILE]
    python bench/apply_scale.py --baseline DIR [--pairs 3] [--pes ...] [--upgrades ...]

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

With ``--baseline DIR`` (a directory holding another version's ``hotwire`` package,
e.g. ``git archive REV hotwire | tar -x -C DIR``), it runs the benchmark ``--pairs``
times with that version and as many times with this checkout's (or ``--current
DIR``'s), alternating (the
first of each pair alternates too) in fresh clusters, and reports both, each
pair's ratio of medians (this checkout / baseline) per size, and the median and
range of those ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sqlite3
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

import hotwire
from hotwire.testing.cluster import LocalCluster, write_app


def worker_phases(logs: list[Path]) -> dict[str, dict[str, list[float]]]:
    """Per app, each worker's own time (ms) for each prepare and switch batch, as the
    master logs the workers' acks (``w1 prepared in 12.3 ms``), in order."""
    out: dict[str, dict[str, list[float]]] = {}
    for path in logs:
        for line in path.read_text(errors="replace").splitlines():
            m = re.search(r"app '([^']+)': \S+ (prepared|switched) in ([\d.]+) ms", line)
            if m is not None:
                app = out.setdefault(m.group(1), {"prepared": [], "switched": []})
                app[m.group(2)].append(float(m.group(3)))
    return out


def spread(xs: list[float]) -> dict[str, float]:
    """Median, min and max, rounded to 0.01 ms."""
    return {
        "median": round(statistics.median(xs), 2),
        "min": round(min(xs), 2),
        "max": round(max(xs), 2),
    }


def cpu_ms(pid: int) -> float:
    """CPU time (user + system, ms) process ``pid`` has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def run_size(
    cluster: LocalCluster, work: Path, pes: int, upgrades: int, tag: str
) -> dict[str, Any]:
    """Submit the app of ``pes`` PEs, apply ``upgrades`` one-PE changes, kill it.

    Also the CPU time the master and the workers used per upgrade: over the upgrades
    (from the first upgrade's request to the last one's reply, with the app's records
    flowing), less what they used over as long a time right after with no upgrade
    (heartbeats, checkpoints, the records), divided by the upgrades."""
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
    assert cluster.master is not None
    pids = {"master": cluster.master.proc.pid} | {
        f"worker{i}": w.proc.pid for i, w in enumerate(cluster.workers)
    }
    time.sleep(0.2)
    cpu0 = {k: cpu_ms(pid) for k, pid in pids.items()}
    t0 = time.perf_counter()
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
    busy = {k: cpu_ms(pid) - cpu0[k] for k, pid in pids.items()}
    time.sleep(time.perf_counter() - t0)
    idle = {k: cpu_ms(pid) - cpu0[k] - busy[k] for k, pid in pids.items()}
    cpu = {k: (busy[k] - idle[k]) / upgrades for k in pids}
    cluster.client.kill(name, timeout=600)
    return {
        "app": name,
        "pes": pes,
        "submit_apply_ms": round(sub.latency_ms, 2),
        "submit_rtt_ms": round(submit_rtt, 2),
        "apply_ms": apply_ms,
        "rtt_ms": rtt_ms,
        "cpu_ms_per_upgrade": {k: round(v, 1) for k, v in cpu.items()},
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


def paired(a: argparse.Namespace) -> dict[str, Any]:
    """Alternate runs of the baseline's package and this checkout's (see the module doc)."""
    here = Path(__file__).resolve()
    own = ["--pes", a.pes, "--upgrades", str(a.upgrades), "--rounds", str(a.rounds)]
    sides = {
        "baseline": str(Path(a.baseline).resolve()),
        "current": str(Path(a.current).resolve() if a.current else here.parents[1]),
    }
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "current": []}
    with tempfile.TemporaryDirectory(prefix="hotwire-apply-pairs-") as tmp:
        for i in range(a.pairs):
            order = ["baseline", "current"] if i % 2 == 0 else ["current", "baseline"]
            for side in order:
                out = Path(tmp) / f"{side}{i}.json"
                env = {**os.environ, "PYTHONPATH": sides[side]}
                print(f"pair {i}: {side}", file=sys.stderr, flush=True)
                # cwd: not the checkout, whose hotwire/ would come before PYTHONPATH
                # in the cluster's processes (python -m puts the cwd first)
                subprocess.run(
                    [sys.executable, str(here), *own, "--out", str(out)],
                    env=env,
                    cwd=tmp,
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                runs[side].append(json.loads(out.read_text()))
    sizes = [s["pes"] for s in runs["current"][0]["sizes"]]
    summary = []
    for n in sizes:

        def medians(side: str, n: int = n) -> list[float]:
            return [
                next(s for s in r["sizes"] if s["pes"] == n)["apply_ms"]["median"]
                for r in runs[side]
            ]

        def every(side: str, n: int = n) -> list[float]:
            return [
                x
                for r in runs[side]
                for run in r["runs"]
                if run["pes"] == n
                for x in run["apply_ms"]
            ]

        def cpu(side: str, who: str, n: int = n) -> list[float]:
            return [
                run["cpu_ms_per_upgrade"][who]
                for r in runs[side]
                for run in r["runs"]
                if run["pes"] == n
            ]

        def stored(side: str, n: int = n) -> float:
            return float(
                statistics.median(
                    next(s for s in r["sizes"] if s["pes"] == n)["stored_model_bytes"][
                        "later_versions"
                    ]["median"]
                    for r in runs[side]
                )
            )

        ratios = [c / b for c, b in zip(medians("current"), medians("baseline"), strict=True)]
        summary.append(
            {
                "pes": n,
                "baseline_apply_ms": spread(every("baseline")),
                "current_apply_ms": spread(every("current")),
                "baseline_pair_medians_ms": medians("baseline"),
                "current_pair_medians_ms": medians("current"),
                "cpu_ms_per_upgrade": {
                    side: {
                        who: spread(cpu(side, who))
                        for who in runs[side][0]["runs"][0]["cpu_ms_per_upgrade"]
                    }
                    for side in ("baseline", "current")
                },
                "stored_model_bytes_per_later_version": {
                    side: stored(side) for side in ("baseline", "current")
                },
                "ratio_current_to_baseline": {
                    "per_pair": [round(x, 3) for x in ratios],
                    "median": round(statistics.median(ratios), 3),
                    "min": round(min(ratios), 3),
                    "max": round(max(ratios), 3),
                },
            }
        )
    for side in ("baseline", "current"):
        small = next(s for s in summary if s["pes"] == min(sizes))[f"{side}_apply_ms"]["median"]
        for s in summary:
            s[f"{side}_ratio_to_{min(sizes)}_pes"] = round(
                s[f"{side}_apply_ms"]["median"] / small, 2
            )
    return {
        "config": {"pairs": a.pairs, **sides, "argv": own},
        "summary": summary,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pes", default="10,100,1000", help="PE counts, comma-separated")
    ap.add_argument("--upgrades", type=int, default=5, help="upgrades per size and round")
    ap.add_argument("--rounds", type=int, default=1, help="times each size is measured")
    ap.add_argument("--profile", default="", help="py-spy the largest size into this directory")
    ap.add_argument("--out", default="bench/results/apply_scale.json")
    ap.add_argument("--baseline", default="", help="a directory with another hotwire package")
    ap.add_argument("--pairs", type=int, default=3, help="with --baseline: runs of each")
    ap.add_argument(
        "--current",
        default="",
        help="with --baseline: the package to compare with it (default: this checkout's)",
    )
    a = ap.parse_args(argv)
    if a.baseline:
        doc = paired(a)
        text = json.dumps(doc, indent=2)
        print(text)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(text + "\n")
        return 0
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
            logs = sorted(cluster.dir.glob("master.*.log"))
            with sqlite3.connect(cluster.dir / "master" / "hotwire.db") as db:
                stored = {
                    (a, int(v)): int(n)
                    for a, v, n in db.execute(
                        "SELECT app, version, length(model_json) FROM versions"
                    )
                }
            phases = master_phases(logs)
            on_workers = worker_phases(logs)
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
        # each worker's own prepare and switch (every batch; the submit's are the first two)
        wk: dict[str, list[float]] = {}
        for r in mine:
            for k, v in on_workers.get(r["app"], {}).items():
                wk.setdefault(f"worker_{k}_ms", []).extend(v[2:])
        entry["worker_batches_ms"] = {k: spread(v) for k, v in wk.items() if v}
        # the master's CPU per upgrade (the sleeps between upgrades included: idle work)
        entry["cpu_ms_per_upgrade"] = {
            k: spread([r["cpu_ms_per_upgrade"][k] for r in mine])
            for k in mine[0]["cpu_ms_per_upgrade"]
        }
        # what the master's store holds of each version's model: version 1, the others
        sizes_of = [[n for (a, v), n in sorted(stored.items()) if a == r["app"]] for r in mine]
        entry["stored_model_bytes"] = {
            "first_version": sizes_of[0][0],
            "later_versions": spread([float(n) for s in sizes_of for n in s[1:]]),
        }
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
            "hotwire_package": str(Path(hotwire.__file__).parent),
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
