"""Bytewax as the peer of the benchmarks (bytewax 0.21.1, ``pip install hotwire[bench]``).

Three uses:

* **Throughput** (``bench/throughput.py``): the same functions as the plain loop and the
  hotwire app (``numbers``, ``scale``, ``keep``, ``add`` of its ``APP`` text) as a Bytewax
  dataflow run in-process with ``bytewax.testing.run_main`` (one worker). The input is a
  ``FixedPartitionedSource`` of one partition handing out batches of 1024 records
  (``islice`` of the ``numbers`` generator; like ``TestingSource(..., batch_size=1024)``
  without its per-item marker checks).
* **Upgrade** (``bench/upgrade.py``): what a Bytewax user must do to change the code of a
  running dataflow: run it with a recovery store (``RecoveryConfig`` on an SQLite
  directory made by ``init_db_dir``, snapshots at every epoch), kill the process
  mid-stream, and start the new version, which resumes from the last committed epoch.
  The dataflow mirrors the scenario app: a paced source (1 ms ticks, ``{seq, key, t}``,
  its position snapshotted), an optional ``extra`` map, a per-key ``stateful_map``
  counting ``n``, a ``DynamicSink`` appending ``{seq, key, n, code, t_emit, t_sink}``
  JSON lines (one O_APPEND write per batch; at-least-once: what was output after the
  last committed epoch is output again on resume) and an optional ``audit`` sink.
* **Saturated throughput** (``bench/upgrade.py --flink``, beside hotwire's and Flink's):
  ``saturate`` runs that dataflow's first version unpaced on a fixed number of records.

Run as a script, this file is one version of that dataflow (the process the driver
starts and kills):

    python bench/peer_bytewax.py --out F --recovery DIR --n N --rate R --keys K \
        [--code C] [--workers W] [--epoch-s E] [--extra] [--audit F2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import Any

try:
    from bytewax import operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
    from bytewax.outputs import DynamicSink, StatelessSinkPartition

    BYTEWAX_ERROR = ""
except ImportError as e:  # pragma: no cover - depends on the environment
    BYTEWAX_ERROR = str(e)

BATCH = 1024


def version() -> str | None:
    """The installed bytewax version, or None when it cannot be imported."""
    if BYTEWAX_ERROR:
        return None
    from importlib.metadata import version as v

    return v("bytewax")


# -- throughput -----------------------------------------------------------------
if not BYTEWAX_ERROR:

    class _IterPart(StatefulSourcePartition):
        def __init__(self, it: Iterator[Any], batch: int):
            self.it, self.batch = it, batch

        def next_batch(self) -> list[Any]:
            b = list(islice(self.it, self.batch))
            if not b:
                raise StopIteration
            return b

        def snapshot(self) -> None:
            return None

    class IterSource(FixedPartitionedSource):
        """One partition reading ``batch`` records at a time from an iterator."""

        def __init__(self, it: Iterator[Any], batch: int = BATCH):
            self.it, self.batch = it, batch

        def list_parts(self) -> list[str]:
            return ["it"]

        def build_part(self, step_id: str, for_part: str, resume_state: Any) -> _IterPart:
            return _IterPart(self.it, self.batch)

    class _ListPart(StatelessSinkPartition):
        def __init__(self, out: list[Any]):
            self.out = out

        def write_batch(self, items: list[Any]) -> None:
            self.out += items

    class ListSink(DynamicSink):
        def __init__(self, out: list[Any]):
            self.out = out

        def build(self, step_id: str, worker_index: int, worker_count: int) -> _ListPart:
            return _ListPart(self.out)


def _run_flow(flow: Any) -> None:
    from bytewax.testing import run_main

    run_main(flow)


def pipeline_rps(n: int, numbers: Callable, scale: Callable, keep: Callable) -> float:
    """source -> map(scale) -> filter(keep) -> sink, one worker in-process: records/s."""
    out: list[Any] = []
    flow = Dataflow("tp_pipeline")
    s = op.input("src", flow, IterSource(numbers(None)))
    s = op.filter("keep", op.map("scale", s, scale), keep)
    op.output("out", s, ListSink(out))
    t0 = time.perf_counter()
    _run_flow(flow)
    dt = time.perf_counter() - t0
    if len(out) != n - n // 10:
        raise RuntimeError(f"bytewax pipeline output {len(out)} records, expected {n - n // 10}")
    return n / dt


def keyed_rps(n: int, numbers: Callable, add: Callable) -> float:
    """source -> key_on(k) -> stateful_map(add) -> sink, one worker in-process: records/s.

    Bytewax keys are strings, so the key is ``str(r["k"])`` (the plain loop uses the int).
    """
    out: list[Any] = []

    def step(acc: float | None, r: dict[str, Any]) -> tuple[float, float]:
        acc = add(acc, r)
        return acc, acc

    flow = Dataflow("tp_keyed")
    s = op.input("src", flow, IterSource(numbers(None)))
    keyed = op.key_on("key", s, lambda r: str(r["k"]))
    op.output("out", op.stateful_map("sum", keyed, step), ListSink(out))
    t0 = time.perf_counter()
    _run_flow(flow)
    dt = time.perf_counter() - t0
    if len(out) != n:
        raise RuntimeError(f"bytewax keyed count output {len(out)} records, expected {n}")
    return n / dt


# -- the upgrade workload ---------------------------------------------------------
TICK_S = 0.001

if not BYTEWAX_ERROR:

    class _PacedPart(StatefulSourcePartition):
        """Emits ``{seq, key, t}`` at ``rate``/s in 1 ms ticks from ``start``; snapshot: seq."""

        def __init__(self, start: int, n: int, rate: float, keys: int):
            self.start = self.seq = start
            self.n, self.rate, self.keys = n, rate, keys
            self.t0 = time.monotonic()

        def next_batch(self) -> list[dict[str, Any]]:
            if self.seq >= self.n:
                raise StopIteration
            due = self.start + int((time.monotonic() - self.t0) * self.rate)
            end = min(self.n, due, self.seq + BATCH)
            now = time.time()
            batch = [{"seq": s, "key": f"k{s % self.keys}", "t": now} for s in range(self.seq, end)]
            self.seq = max(self.seq, end)
            return batch

        def next_awake(self) -> datetime | None:
            ahead = (self.seq + 1 - self.start) / self.rate - (time.monotonic() - self.t0)
            if ahead <= 0:
                return None
            return datetime.now(UTC) + timedelta(seconds=max(ahead, TICK_S))

        def snapshot(self) -> int:
            return self.seq

    class PacedSource(FixedPartitionedSource):
        def __init__(self, n: int, rate: float, keys: int):
            self.n, self.rate, self.keys = n, rate, keys

        def list_parts(self) -> list[str]:
            return ["paced"]

        def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _PacedPart:
            return _PacedPart(resume_state or 0, self.n, self.rate, self.keys)

    class _LinesPart(StatelessSinkPartition):
        def __init__(self, path: str, row: Callable[[Any, float], dict[str, Any]]):
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self.row = row

        def write_batch(self, items: list[Any]) -> None:
            t = time.time()
            if items:
                os.write(
                    self.fd, ("\n".join(json.dumps(self.row(x, t)) for x in items) + "\n").encode()
                )

        def close(self) -> None:
            os.close(self.fd)

    class JsonLines(DynamicSink):
        """Appends one JSON line per record, one write per batch, on every worker."""

        def __init__(self, path: str, row: Callable[[Any, float], dict[str, Any]]):
            self.path, self.row = path, row

        def build(self, step_id: str, worker_index: int, worker_count: int) -> _LinesPart:
            return _LinesPart(self.path, self.row)


def scenario_flow(
    out: str, n: int, rate: float, keys: int, code: int, extra: bool, audit: str
) -> Any:
    """One version of the scenario app as a Bytewax dataflow."""
    flow = Dataflow("peer")
    src = op.input("src", flow, PacedSource(n, rate, keys))
    s = op.key_on("enrich", src, lambda r: r["key"])
    if extra:
        s = op.map_value("extra", s, lambda r: {**r, "extra": 1})

    def count(n_: int | None, r: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        n_ = (n_ or 0) + 1
        return n_, {"seq": r["seq"], "key": r["key"], "n": n_, "t": r["t"], "code": code}

    counted = op.stateful_map("count", s, count)
    op.output(
        "out",
        counted,
        JsonLines(
            out,
            lambda kv, t: {
                "seq": kv[1]["seq"],
                "key": kv[1]["key"],
                "n": kv[1]["n"],
                "code": kv[1]["code"],
                "t_emit": kv[1]["t"],
                "t_sink": t,
            },
        ),
    )
    if audit:
        op.output("audit", src, JsonLines(audit, lambda r, t: {"seq": r["seq"], "key": r["key"]}))
    return flow


def _main() -> None:
    ap = argparse.ArgumentParser(description="one version of the Bytewax peer dataflow")
    ap.add_argument("--out", required=True)
    ap.add_argument("--recovery", required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--keys", type=int, required=True)
    ap.add_argument("--code", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--epoch-s", type=float, default=0.5)
    ap.add_argument("--extra", action="store_true")
    ap.add_argument("--audit", default="")
    a = ap.parse_args()
    from bytewax.recovery import RecoveryConfig
    from bytewax.run import cli_main

    flow = scenario_flow(a.out, a.n, a.rate, a.keys, a.code, a.extra, a.audit)
    cli_main(
        flow,
        workers_per_process=a.workers,
        epoch_interval=timedelta(seconds=a.epoch_s),
        recovery_config=RecoveryConfig(a.recovery),
    )


# -- the driver: stop, then resume the new version from the recovery store ----------
def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _spawn(out: Path, db: Path, n: int, rate: float, keys: int, v: dict[str, Any]) -> Any:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--out",
        str(out),
        "--recovery",
        str(db),
        "--n",
        str(n),
        "--rate",
        repr(rate),
        "--keys",
        str(keys),
        "--code",
        str(v.get("code", 1)),
        "--workers",
        str(v.get("workers", 1)),
        "--epoch-s",
        repr(v.get("epoch_s", 0.5)),
    ]
    if v.get("extra"):
        cmd.append("--extra")
    if v.get("audit"):
        cmd += ["--audit", str(out.with_suffix(".audit.jsonl"))]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)


def saturate(
    work: Path, *, n: int, keys: int, workers: int = 2, timeout: float = 300.0
) -> dict[str, Any]:
    """The scenario dataflow (v1) on ``n`` records as fast as it goes (``workers`` workers,
    a recovery store as in the upgrade runs): records/s at the sink after its first
    second (its first third if shorter)."""
    from bytewax.recovery import init_db_dir

    work.mkdir(parents=True, exist_ok=True)
    out, db = work / "bytewax-saturate.out.jsonl", work / "bytewax-saturate.db"
    out.unlink(missing_ok=True)
    db.mkdir(parents=True, exist_ok=True)
    for old in db.iterdir():
        old.unlink()
    init_db_dir(db, 1)
    # a rate no source reaches: the source emits a full batch whenever it is asked
    p = _spawn(out, db, n, 1e12, keys, {"workers": workers})
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        rc = None
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    if p.stderr:
        p.stderr.close()
    if rc != 0:
        raise RuntimeError(f"the saturating bytewax run exited with {rc}: {err[-1000:]}")
    with open(out) as f:
        ts = sorted(json.loads(line)["t_sink"] for line in f if line.strip())
    out.unlink()
    t0, t1 = ts[0] + min(1.0, (ts[-1] - ts[0]) / 3), ts[-1]  # leave out the start-up
    done = sum(1 for t in ts if t >= t0)
    return {"records": len(ts), "workers": workers, "rps": done / (t1 - t0) if t1 > t0 else None}


def stop_and_resume(
    work: Path,
    tag: str,
    v1: dict[str, Any],
    v2: dict[str, Any],
    *,
    n: int,
    rate: float,
    keys: int,
    warm: float,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Run ``v1`` with a recovery store, SIGKILL it after ``warm`` s of output, start ``v2``.

    Returns the sink rows, ``t_req`` (before the kill), ``t_done`` (the new process
    started), ``kill_start_ms`` and ``first_output_s`` (from ``t_req`` to the first
    record output by the new process), and the new process's exit code.
    """
    from bytewax.recovery import init_db_dir

    work.mkdir(parents=True, exist_ok=True)
    out, db = work / f"{tag}.out.jsonl", work / f"{tag}.db"
    out.unlink(missing_ok=True)
    db.mkdir(parents=True, exist_ok=True)
    for old in db.iterdir():
        old.unlink()
    init_db_dir(db, 1)
    p1 = _spawn(out, db, n, rate, keys, v1)
    deadline = time.monotonic() + timeout
    while _count_lines(out) == 0:
        if p1.poll() is not None or time.monotonic() > deadline:
            err = p1.stderr.read().decode(errors="replace") if p1.stderr else ""
            p1.kill()
            raise RuntimeError(f"bytewax v1 produced no output (rc {p1.poll()}): {err[-2000:]}")
        time.sleep(0.02)
    time.sleep(warm)
    t_req, c0 = time.time(), time.perf_counter()
    p1.send_signal(signal.SIGKILL)
    p1.wait()
    before = _count_lines(out)
    p2 = _spawn(out, db, n, rate, keys, v2)
    c1, t_done = time.perf_counter(), time.time()
    try:
        rc = p2.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p2.kill()
        p2.wait()
        rc = None
    err = p2.stderr.read().decode(errors="replace") if p2.stderr else ""
    for p in (p1, p2):
        if p.stderr:
            p.stderr.close()
    rows = []
    with open(out) as f:
        for i, line in enumerate(f):
            if line.strip():
                r = json.loads(line)
                if i >= before:
                    r["_v2"] = True
                rows.append(r)
    first_new = min((r["t_sink"] for r in rows if r.get("_v2")), default=None)
    return {
        "rows": rows,
        "t_req": t_req,
        "t_done": t_done,
        "kill_start_ms": (c1 - c0) * 1000,
        "first_output_s": None if first_new is None else first_new - t_req,
        "exit_code": rc,
        "stderr_tail": err[-1000:] if rc else "",
    }


if __name__ == "__main__":
    _main()
