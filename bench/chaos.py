"""Chaos: seeded random faults against a keyed app with an exactly-once sink, and a ledger.

    python bench/chaos.py [--faults N] [--seed S] [--out FILE] [--heartbeat-timeout 1]
                          [--rate R] [--keys K] [--kinds worker_kill,...] [--keep]
                          [--windows SIZE] [--connectors]

Starts a master and 3 workers (real processes on loopback; each worker's data
port behind a TCP proxy when the cluster supports it, so links can be cut) and
runs one app at a steady rate: a paced source -> key_by(key) -> a keyed class PE
counting per key and emitting ``{seq, key, n, code, t}`` -> a transactional
``JsonlSink``. Then it injects ``--faults`` faults drawn with
``random.Random(seed)``, one at a time, each followed by a settle wait (the app
runs again and committed output advances): SIGKILL of a worker (started again
under the same name), SIGKILL of the master (restarted on the same address and
data directory), a cut of every TCP link between workers, a SIGSTOP of a worker
for 1.5 heartbeat timeouts. Between two faults it runs an online upgrade (the
counting code's constant), rescale (the count or the sink) or rollback.

With ``--connectors`` the app reads a Redis stream that a producer thread feeds and
commits into PostgreSQL with two-phase commit, against a redis-server and a PostgreSQL
of the run's own, and the faults include killing either server (bench/chaos_connectors.py).

At the end it stops the source at a fixed number of records, waits until every
one of them is committed (bounded) and checks the committed output: lost,
duplicated, per-key state errors. Prints one JSON document (and writes it to
``--out``); exits 0 when nothing was lost, duplicated, miscounted or stuck,
else 1. The seed is in the document and on stderr: ``--seed S`` replays the
same fault sequence. See bench/README.md for every field.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import inspect
import json
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import chaos_connectors as cx

from hotwire.sinks import read_committed
from hotwire.testing.cluster import LocalCluster, write_app

APP = "chaos"
WORKERS = ("w1", "w2", "w3")
# worker_restart: SIGKILL a worker and start it again at once, before the master can
# declare it dead.
FAULT_KINDS = ("worker_kill", "master_kill", "link_cut", "worker_pause", "worker_restart")
EXTRA_KINDS: tuple[str, ...] = cx.KINDS  # --connectors only
TRANSITION_KINDS = ("upgrade", "rescale", "rollback")

APP_TEMPLATE = (
    '''\
"""bench/chaos.py's app: count records per key, commit them exactly once."""

import asyncio
import time

from hotwire import Topology
from hotwire.sdk import ProcessPE
from hotwire.sinks import JsonlSink

RATE = {rate!r}
KEYS = {keys}
N_MAX = {n_max}
END = {end!r}  # the driver writes the number of records here when it stops injecting


def records_end():
    try:
        with open(END, encoding="utf-8") as f:
            return int(f.read())
    except (OSError, ValueError):
        return N_MAX


async def source(ctx):
    """seq from the checkpointed position, paced to RATE, stamped with its emit time."""
    start = seq = int(ctx.position or 0)
    tick = max(1, int(RATE / 50))
    t0 = time.monotonic()
    while True:
        end = records_end()
        for _ in range(tick):
            if seq >= end:
                return
            yield {{"seq": seq, "key": f"k{{seq % KEYS}}", "t": time.time()}}
            seq += 1
        ahead = (seq - start) / RATE - (time.monotonic() - t0)
        await asyncio.sleep(ahead if ahead > 0 else 0)


'''
    + cx.COUNT_PE
    + """

app = Topology({app!r})
src = app.source("src", source)
count = src.key_by(lambda r: r["key"]).process("count", Count, parallelism={count_p})
count.sink("out", JsonlSink, parallelism={sink_p}, config={{"dir": {out!r}}})
{windows}"""
)

# --windows SIZE: the same records, stamped with their seq as event time, counted per
# key in tumbling windows of SIZE seqs by a window PE that is upgraded and rescaled
# with the counting PE, into an exactly-once sink of its own.
WINDOWS_TEMPLATE = """
from hotwire.sdk.windows import Tumbling


def wcount(acc, r):
    return (acc or 0) + 1 + 0 * {code}  # the constant: an upgrade changes the code


ts = src.assign_timestamps("ts", lambda r: r["seq"])
win = ts.key_by(lambda r: r["key"]).window(
    "win", Tumbling({size}), aggregate=wcount, parallelism={count_p}
)
win.sink("wout", JsonlSink, parallelism={sink_p}, config={{"dir": {wout!r}}})
"""


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- statistics ---------------------------------------------------------------
def pct(values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) by nearest rank; None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    def r3(v: float | None) -> float | None:
        return None if v is None else round(v, 3)

    return {
        "n": len(values),
        "p50": r3(pct(values, 0.5)),
        "p99": r3(pct(values, 0.99)),
        "max": r3(max(values)) if values else None,
    }


# -- the app's versions -------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """What one version of the app is made of."""

    code: int = 1  # the constant the counting PE writes into every row
    count_p: int = 2
    sink_p: int = 2
    src_p: int = 1  # --connectors: the Redis stream source's (and parse's) parallelism


# -- the ledger: what is committed, and when it was first seen ----------------
@dataclass
class Seen:
    t_seen: float  # when the driver first saw the committed transaction file
    rows: int
    max_seq: int
    max_t: float  # the latest emit time of a record in it
    emitted: list[float]  # the emit time of every record in it


class Ledger(threading.Thread):
    """Polls the sink directory on a thread of its own; a JsonlSink commits a
    transaction by renaming its file, so a file seen once is complete."""

    def __init__(self, out: Path, interval: float = 0.02):
        super().__init__(name="chaos-ledger", daemon=True)
        self.out = out
        self.interval = interval
        self.files: dict[str, Seen] = {}
        self.order: list[Seen] = []
        self.seqs: Counter[int] = Counter()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.poll()
            except Exception as e:  # reported, never fatal to the run
                if len(self.errors) < 5:
                    self.errors.append(f"{type(e).__name__}: {e}")
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def poll(self) -> None:
        if not self.out.exists():
            return
        for p in sorted(self.out.glob("[!.]*.jsonl")):
            if p.name in self.files:
                continue
            now = time.time()
            rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line]
            seen = Seen(
                t_seen=now,
                rows=len(rows),
                max_seq=max((r["seq"] for r in rows), default=-1),
                max_t=max((r.get("t", 0.0) for r in rows), default=0.0),
                emitted=[r["t"] for r in rows if "t" in r],
            )
            with self._lock:
                self.files[p.name] = seen
                self.order.append(seen)
                self.seqs.update(r["seq"] for r in rows)

    def first_seen_after(self, t: float) -> float | None:
        """When the first record emitted after ``t`` was seen committed (None: not yet)."""
        with self._lock:
            for s in self.order:
                if s.max_t > t:
                    return s.t_seen
        return None

    def max_seq(self) -> int:
        with self._lock:
            return max(self.seqs, default=-1)

    def committed_below(self, n: int) -> int:
        with self._lock:
            return sum(1 for s in self.seqs if s < n)

    def latencies(self, windows: Sequence[tuple[float, float]]) -> list[float]:
        """Emit-to-seen-committed times of the records emitted within ``windows``."""
        with self._lock:
            return [
                s.t_seen - t
                for s in self.order
                for t in s.emitted
                if any(a <= t < b for a, b in windows)
            ]


# -- the verdict ----------------------------------------------------------------
def check(rows: list[dict[str, Any]], n: int, keys: int, ordered: bool = True) -> dict[str, Any]:
    """Lost, duplicated and per-key state errors in the committed rows of seqs 0..n-1.

    ``ordered``: a row's ``n`` must equal the number of committed seqs of its key up
    to and including its own seq (the counting PE's state at that record). Else (the
    records of a key reach the count from more than one source instance, in no seq
    order) the ``n`` of a key's rows must be 1, 2, ... its number of rows, each once;
    a row whose ``n`` is not one of those, or is another row's, is an error."""
    counts = Counter(r["seq"] for r in rows)
    lost = [s for s in range(n) if s not in counts]
    dups = sorted(s for s, k in counts.items() if k > 1)
    beyond = sorted(s for s in counts if s >= n or s < 0)
    per_key: dict[str, list[int]] = defaultdict(list)
    for s in sorted(counts):
        per_key[f"k{s % keys}"].append(s)
    state_errors: list[dict[str, Any]] = []
    wrong_key = 0
    ns: dict[str, Counter[int]] = defaultdict(Counter)
    for r in rows:
        if r["key"] != f"k{r['seq'] % keys}":
            wrong_key += 1
            continue
        if not ordered:
            ns[r["key"]][r["n"]] += 1
            if ns[r["key"]][r["n"]] > 1 or not 1 <= r["n"] <= len(per_key[r["key"]]):
                state_errors.append({"seq": r["seq"], "key": r["key"], "n": r["n"]})
            continue
        expect = bisect.bisect_right(per_key[r["key"]], r["seq"])
        if r["n"] != expect:
            state_errors.append({"seq": r["seq"], "key": r["key"], "n": r["n"], "expected": expect})
    state_errors.sort(key=lambda e: e["seq"])
    return {
        "records": n,
        "committed_rows": len(rows),
        "lost": len(lost),
        "lost_sample": _ranges(lost)[:10],
        "duplicated": sum(k - 1 for k in counts.values() if k > 1),
        "duplicated_sample": _ranges(dups)[:10],
        "state_errors": len(state_errors),
        "state_error_sample": state_errors[:10],
        "beyond_n": len(beyond),
        "wrong_key": wrong_key,
    }


def check_windows(rows: list[dict[str, Any]], n: int, keys: int, size: int) -> dict[str, Any]:
    """Lost, duplicated and miscounted windows in the committed window results: every
    (key, window) of seqs 0..n-1 once, its value the number of its seqs."""
    expected = Counter((f"k{s % keys}", float(s // size * size)) for s in range(n))
    got = Counter((r["key"], float(r["start"])) for r in rows if not r.get("update"))
    wrong = [
        {"key": r["key"], "start": r["start"], "value": r["value"], "expected": want}
        for r in rows
        if (want := expected.get((r["key"], float(r["start"])))) is not None and r["value"] != want
    ]
    return {
        "windows": len(expected),
        "window_rows": len(rows),
        "windows_lost": sum(1 for w in expected if w not in got),
        "windows_lost_sample": sorted(w for w in expected if w not in got)[:10],
        "windows_duplicated": sum(k - 1 for k in got.values() if k > 1),
        "windows_duplicated_sample": sorted(w for w, k in got.items() if k > 1)[:10],
        "windows_wrong": len(wrong),
        "windows_wrong_sample": wrong[:10],
        "windows_beyond": sum(1 for w in got if w not in expected),
        "window_updates": sum(1 for r in rows if r.get("update")),
    }


def _ranges(xs: list[int]) -> list[str]:
    """[1, 2, 3, 7] -> ["1-3", "7"]"""
    spans: list[list[int]] = []
    for x in xs:
        if spans and x == spans[-1][1] + 1:
            spans[-1][1] = x
        else:
            spans.append([x, x])
    return [str(a) if a == b else f"{a}-{b}" for a, b in spans]


# -- the run ------------------------------------------------------------------------
@dataclass
class Config:
    faults: int
    seed: int
    rate: float
    keys: int
    heartbeat_timeout: float
    checkpoint_interval: float
    switch_timeout: float
    settle_timeout: float
    transition_timeout: float
    kinds: tuple[str, ...]
    transitions: bool
    data_dir: str
    keep: bool
    log_level: str = "info"
    windows: int = 0  # tumbling window size in seqs; 0: no window branch
    connectors: bool = False  # Redis stream source and PostgreSQL sink, their servers killed
    batch: int = 32  # --connectors: entries per Redis read
    stream_rows: int = 64  # --connectors: rows a PostgresSink COPYs at a time mid-epoch


@dataclass
class Run:
    cfg: Config
    c: LocalCluster
    tmp: Path
    ledger: Ledger
    rng: random.Random
    t0: float
    shape: Shape = field(default_factory=Shape)
    versions: dict[int, Shape] = field(default_factory=dict)
    version: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    stuck: list[dict[str, Any]] = field(default_factory=list)
    stalls: list[dict[str, Any]] = field(default_factory=list)
    transition_errors: list[dict[str, Any]] = field(default_factory=list)
    busy_retries: int = 0
    paths: dict[Shape, str] = field(default_factory=dict)
    servers: cx.Servers | None = None  # --connectors

    def __post_init__(self) -> None:
        self.rng_rescale = random.Random(f"{self.cfg.seed}/rescale")
        self.rng_down = random.Random(f"{self.cfg.seed}/down")  # a server's time down

    # -- the cluster, read without failing while the master restarts ------------
    def status(self) -> Any | None:
        try:
            apps = self.c.client.status(APP, timeout=3).apps
            return apps[0] if apps else None
        except grpc.RpcError:
            return None

    def hosts(self) -> list[str]:
        st = self.status()
        if st is None:
            return list(WORKERS)
        return sorted({i.worker for p in st.pes for i in p.instances}) or list(WORKERS)

    def declared_dead(self, name: str) -> bool:
        """The master fenced ``name``'s session (declared it dead), or lists it not alive
        when it cannot say why (a master without fencing)."""
        try:
            for w in self.c.client.workers(timeout=3).workers:
                if w.name == name:
                    fenced = getattr(w, "fenced", None)
                    return bool(fenced) if fenced is not None else not w.alive
        except grpc.RpcError:
            return False
        return True

    def healthy(self) -> bool:
        st = self.status()
        return st is not None and st.state == "running" and self.c.live_workers() == len(WORKERS)

    def at(self) -> float:
        return round(time.time() - self.t0, 3)

    # -- the app ----------------------------------------------------------------------
    def app_path(self, shape: Shape) -> str:
        if shape not in self.paths and self.servers is not None:
            body = cx.app_source(
                APP,
                self.servers.redis_url,
                self.servers.pg_url,
                **asdict(shape),
                batch=self.cfg.batch,
                stream_rows=self.cfg.stream_rows,
            )
            name = f"v_c{shape.code}_r{shape.src_p}_p{shape.count_p}_s{shape.sink_p}.py"
            self.paths[shape] = write_app(self.tmp, name, body)
        if shape not in self.paths:
            body = APP_TEMPLATE.format(
                rate=self.cfg.rate,
                keys=self.cfg.keys,
                n_max=int(self.cfg.rate * 24 * 3600),
                end=str(self.tmp / "end"),
                code=shape.code,
                count_p=shape.count_p,
                sink_p=shape.sink_p,
                app=APP,
                out=str(self.tmp / "out"),
                windows=WINDOWS_TEMPLATE.format(
                    code=shape.code,
                    size=self.cfg.windows,
                    count_p=shape.count_p,
                    sink_p=shape.sink_p,
                    wout=str(self.tmp / "wout"),
                )
                if self.cfg.windows
                else "",
            )
            name = f"v_c{shape.code}_p{shape.count_p}_s{shape.sink_p}.py"
            self.paths[shape] = write_app(self.tmp, name, body)
        return self.paths[shape]

    # -- waiting -------------------------------------------------------------------
    def settle(self, since: float, what: str) -> tuple[float | None, bool]:
        """Wait until a record emitted after ``since`` is committed and the app runs on
        every worker again. Returns (seconds from ``since`` to that commit, settled)."""
        deadline = time.monotonic() + self.cfg.settle_timeout
        recovered: float | None = None
        while time.monotonic() < deadline:
            seen = self.ledger.first_seen_after(since)
            if seen is not None:
                recovered = seen - since
                if self.healthy():
                    return recovered, True
            time.sleep(0.05)
        st = self.status()
        stall = {
            "after": what,
            "at_s": self.at(),
            "recovered_s": None if recovered is None else round(recovered, 3),
            "app_state": st.state if st is not None else "no answer",
            "live_workers": self.c.live_workers(),
            "last_recovery": st.last_recovery if st is not None else "",
        }
        self.stalls.append(stall)
        log(f"did not settle within {self.cfg.settle_timeout:g} s after {what}: {stall}")
        return recovered, False

    # -- faults ---------------------------------------------------------------------
    def fault(self, kind: str) -> dict[str, Any]:
        ev: dict[str, Any] = {"kind": kind, "at_s": self.at()}
        hb = self.cfg.heartbeat_timeout
        if kind in ("worker_kill", "worker_pause", "worker_restart"):
            victim = self.rng.choice(self.hosts())
            ev["worker"] = victim
        t_fault = time.time()
        if kind == "worker_kill":
            self.c.kill_worker(victim)
            # Started again once the master has declared it dead (its instances restart
            # elsewhere from the checkpoint); then it rejoins under the same name.
            deadline = time.monotonic() + hb + 10
            while not self.declared_dead(victim) and time.monotonic() < deadline:
                time.sleep(0.05)
            ev["declared_dead_s"] = round(time.time() - t_fault, 3)
            self.c.restart_worker(victim)
            ev["restarted_s"] = round(time.time() - t_fault, 3)
        elif kind == "worker_restart":
            self.c.kill_worker(victim)
            self.c.restart_worker(victim)  # registers again before the heartbeat timeout
            ev["restarted_s"] = round(time.time() - t_fault, 3)
        elif kind == "master_kill":
            self.c.kill_master()
            self.c.restart_master()
            ev["restarted_s"] = round(time.time() - t_fault, 3)
        elif kind == "link_cut":
            ev["links_reset"] = self.c.cut_links()
        elif kind in cx.KINDS:
            assert self.servers is not None, f"{kind} needs --connectors"
            ev.update(self.servers.kill(kind, self.rng_down.uniform(0.2, 2.0)))
        elif kind == "worker_pause":
            self.c.pause_worker(victim)
            time.sleep(1.5 * hb)
            self.c.resume_worker(victim)
            ev["paused_s"] = round(time.time() - t_fault, 3)
        else:
            raise ValueError(f"unknown fault kind {kind!r}")
        recovered, settled = self.settle(t_fault, f"{kind} at {ev['at_s']} s")
        ev["recovery_s"] = None if recovered is None else round(recovered, 3)
        ev["settled"] = settled
        ev["settle_s"] = round(time.time() - t_fault, 3)
        st = self.status()
        if st is not None:
            ev["recoveries"] = st.recoveries
        return ev

    # -- transitions ------------------------------------------------------------------
    def transition(self, kind: str) -> dict[str, Any]:
        if kind == "rollback" and self.version < 2:
            kind = "upgrade"
        ev: dict[str, Any] = {"kind": kind, "at_s": self.at(), "from_version": self.version}
        if kind == "upgrade":
            target = Shape(self.shape.code % 3 + 1, *astuple(self.shape)[1:])
        elif kind == "rescale":
            x, sh = self.rng_rescale.random(), self.shape
            if self.servers is not None and x < 1 / 3:
                target = Shape(sh.code, sh.count_p, sh.sink_p, 3 - sh.src_p)
            elif x < (0.5 if self.servers is None else 2 / 3):
                target = Shape(sh.code, 5 - sh.count_p, sh.sink_p, sh.src_p)
            else:
                target = Shape(sh.code, sh.count_p, 3 - sh.sink_p, sh.src_p)
        else:
            target = self.versions[self.version - 1]
        ev["to"] = asdict(target)
        path = self.app_path(target)

        def call(timeout: float) -> Any:
            if kind == "rollback":
                return self.c.client.rollback(APP, timeout=timeout)
            return self.c.client.upgrade(path, timeout=timeout)

        t_start = time.time()
        deadline = time.monotonic() + self.cfg.transition_timeout
        reply = None
        retries = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                reply = call(left)
                break
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
                if code == grpc.StatusCode.FAILED_PRECONDITION and "in progress" in details:
                    retries += 1  # a recovery holds the app: not a failure, try again
                    time.sleep(0.2)
                    continue
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    break
                ev["error"] = f"{code.name}: {details}"
                break
        self.busy_retries += retries
        ev["busy_retries"] = retries
        ev["client_s"] = round(time.time() - t_start, 3)
        if reply is None and "error" not in ev:
            ev["stuck"] = f"did not return within {self.cfg.transition_timeout:g} s"
            self.stuck.append(ev)
        elif reply is not None:
            ev["applied"] = reply.applied
            ev["latency_ms"] = round(reply.latency_ms, 1)
            if reply.applied:
                self.version = int(reply.to_version)
                self.versions[self.version] = target
                self.shape = target
            else:
                ev["error"] = "not applied (no change?)"
        if "error" in ev:
            self.transition_errors.append(ev)
            log(f"{kind} failed: {ev['error']}")
        # An app left "upgrading" after the call returned is stuck as well.
        t_end = time.time()
        state_deadline = time.monotonic() + 10
        while time.monotonic() < state_deadline:
            st = self.status()
            if st is not None and st.state != "upgrading":
                break
            time.sleep(0.1)
        else:
            st = self.status()
            ev["stuck"] = f"app state {st.state if st else 'unknown'!r} 10 s after the call"
            self.stuck.append(ev)
        recovered, settled = self.settle(t_end, f"{kind} at {ev['at_s']} s")
        ev["output_after_s"] = None if recovered is None else round(recovered, 3)
        ev["settled"] = settled
        ev["version"] = self.version
        return ev


def _committed(d: Path) -> list[dict[str, Any]]:
    return read_committed(d) if d.exists() else []


def _fault_plan(rng: random.Random, kinds: Sequence[str], n: int) -> list[str]:
    """``n`` fault kinds: every kind once per round, each round in a seeded order."""
    plan: list[str] = []
    while len(plan) < n:
        rnd = list(kinds)
        rng.shuffle(rnd)
        plan += rnd
    return plan[:n]


def _log_errors(d: Path, limit: int = 30) -> list[str]:
    """Error lines and exception heads from the cluster's logs, for the report."""
    pat = re.compile(r"\b(ERROR|CRITICAL|Traceback|Exception|Error:)\b")
    out: list[str] = []
    for p in sorted(d.glob("*.log")):
        for line in p.read_text(errors="replace").splitlines():
            if pat.search(line):
                out.append(f"{p.name}: {line.strip()[:300]}")
    return out[:limit]


def _cluster(cfg: Config, d: Path) -> tuple[LocalCluster, dict[str, Any]]:
    params = inspect.signature(LocalCluster).parameters
    kw: dict[str, Any] = {
        "workers": len(WORKERS),
        "data_dir": d,
        "heartbeat_timeout": cfg.heartbeat_timeout,
        "checkpoint_interval": cfg.checkpoint_interval,
        "switch_timeout": cfg.switch_timeout,
        "log_level": cfg.log_level,
    }
    if "proxy_data" in params and hasattr(LocalCluster, "cut_links"):
        kw["proxy_data"] = True
    settings = {k: v for k, v in kw.items() if k != "data_dir"}
    return LocalCluster(**kw), settings


def run(cfg: Config) -> dict[str, Any]:
    t_wall = time.monotonic()
    # One generator per decision, all from the seed, so that what varies from run to run
    # (how many workers run the app when a victim is drawn) does not shift the others.
    rng = random.Random(cfg.seed)  # the order of the fault kinds
    rng_when = random.Random(f"{cfg.seed}/delays")
    rng_transitions = random.Random(f"{cfg.seed}/transitions")
    tmp = Path(cfg.data_dir) if cfg.data_dir else Path(tempfile.mkdtemp(prefix="hotwire-chaos-"))
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "end").unlink(missing_ok=True)
    out, wout = tmp / "out", tmp / "wout"
    for d in (out, wout):
        if d.exists():
            shutil.rmtree(d)
    c, settings = _cluster(cfg, tmp / "cluster")
    stack = contextlib.ExitStack()
    servers: cx.Servers | None = None
    producer: cx.Producer | None = None
    ledger: Ledger | cx.PgLedger
    if cfg.connectors:  # the run's own redis-server and PostgreSQL, a producer feeding in
        servers = stack.enter_context(cx.servers(tmp / "servers"))
        producer = cx.Producer(servers.redis_url, cfg.rate, cfg.keys)
        ledger = cx.PgLedger(servers.pg_url)
    else:
        ledger = Ledger(out)
    kinds = [k for k in cfg.kinds if k in FAULT_KINDS + EXTRA_KINDS]
    skipped: dict[str, str] = {}
    if "link_cut" in kinds and not settings.get("proxy_data"):
        kinds.remove("link_cut")
        skipped["link_cut"] = "LocalCluster cannot put workers behind proxies (no proxy_data)"
    plan = _fault_plan(rng, kinds, cfg.faults) if kinds else []
    r = Run(cfg, c, tmp, ledger, random.Random(f"{cfg.seed}/victims"), time.time())  # type: ignore[arg-type]
    r.servers = servers
    if servers is not None:
        r.shape = Shape(src_p=2)
    doc: dict[str, Any] = {"seed": cfg.seed}
    log(f"seed {cfg.seed}; faults planned: {plan}; data in {tmp}")
    leftover: dict[str, Any] = {}
    try:
        c.start()
        ledger.start()
        if producer is not None:
            producer.start()
        r.versions[1] = r.shape
        c.client.submit(r.app_path(r.shape))
        r.version = 1
        _, ok = r.settle(time.time(), "the submit")
        if not ok:
            raise RuntimeError(f"the app produced no committed output\n{c.logs()}")
        # Fault-free phases give the commit latency's noise floor: the records emitted
        # in the first 1.5 s of 2.5 s before the first fault, and those after the last.
        t_quiet = time.time()
        time.sleep(2.5)
        quiet = [(t_quiet, t_quiet + 1.5)]
        for i, kind in enumerate(plan):
            time.sleep(rng_when.uniform(0.2, 1.0))  # land at any phase of the checkpoints
            log(f"fault {i + 1}/{len(plan)}: {kind}")
            ev = r.fault(kind)
            r.events.append({"fault": i + 1, **ev})
            log(f"  {ev}")
            if cfg.transitions and i < len(plan) - 1:
                time.sleep(rng_when.uniform(0.2, 0.6))
                tk = rng_transitions.choice(TRANSITION_KINDS)
                log(f"transition: {tk}")
                tev = r.transition(tk)
                r.events.append({"transition": tk, **tev})
                log(f"  {tev}")
        quiet.append((time.time(), float("inf")))
        # Stop injecting: the source ends at a fixed seq, far enough ahead of what is
        # committed that it has not emitted it yet.
        n = ledger.max_seq() + 1 + max(int(cfg.rate * 3), 200)
        if producer is not None:  # it stops at a fixed seq a little ahead of where it is
            n = max(n, producer.seq + max(int(cfg.rate), 200))
            producer.stop_at(n)
        end_tmp = tmp / "end.tmp"
        end_tmp.write_text(str(n))
        os.replace(end_tmp, tmp / "end")
        log(f"no more faults; the source stops at {n} records; waiting for every commit")
        deadline = time.monotonic() + 30 + 2 * max(0, n - ledger.max_seq()) / cfg.rate
        while time.monotonic() < deadline and ledger.committed_below(n) < n:
            time.sleep(0.1)
        if cfg.windows:  # every (key, window) of seqs < n, fired by the source's end
            want = len({(s % cfg.keys, s // cfg.windows) for s in range(n)})
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(_committed(wout)) < want:
                time.sleep(0.2)
        # Late duplicates would land within a few checkpoints.
        time.sleep(3 * cfg.checkpoint_interval + 1)
        if servers is not None:  # nothing prepared and left, nothing pending in the group
            leftover = cx.leftovers(servers, APP, 30)
            rows = cx.rows(servers.pg_url)
        st = r.status()
        if st is None or st.state == "upgrading":
            r.stuck.append({"kind": "end", "stuck": f"app state {st.state if st else None!r}"})
        failed = [
            f"{p.name}[{i.index}] on {i.worker}: {i.error}"
            for p in (st.pes if st is not None else [])
            for i in p.instances
            if i.failed
        ]
        procs = [c.master, *c.workers]
        died = [p.label for p in procs if p is not None and p.proc.poll() is not None]
    finally:
        try:
            ledger.stop()
            if producer is not None:
                producer.halt()
        finally:
            try:
                c.stop()  # every process it started, whatever happened
            finally:
                stack.close()  # and every server
    if servers is None:
        rows = read_committed(out) if out.exists() else []
    verdict = check(rows, n, cfg.keys, ordered=servers is None)
    if servers is not None:
        assert producer is not None and isinstance(ledger, cx.PgLedger)
        verdict.update(leftover)
        verdict["producer_reconnects"] = producer.reconnects
        verdict["producer_errors"] = producer.errors
        verdict["ledger_unreachable_polls"] = ledger.unreachable_polls
    if cfg.windows:
        verdict.update(check_windows(_committed(wout), n, cfg.keys, cfg.windows))
    faults = [e for e in r.events if "fault" in e]
    transitions = [e for e in r.events if "transition" in e]
    rec = [e["recovery_s"] for e in faults if e["recovery_s"] is not None]
    by_kind: dict[str, list[float]] = defaultdict(list)
    for e in faults:
        if e["recovery_s"] is not None:
            by_kind[e["kind"]].append(e["recovery_s"])
    ok = not (verdict["lost"] or verdict["duplicated"] or verdict["state_errors"] or r.stuck)
    ok = ok and not any(verdict.get(k) for k in ("pg_prepared_xacts", "redis_pending"))
    ok = ok and not verdict.get("redis_stream_seqs_twice")
    ok = ok and not any(verdict.get(k) for k in ("windows_lost", "windows_duplicated"))
    ok = ok and not any(verdict.get(k) for k in ("windows_wrong", "windows_beyond"))
    doc.update(
        {
            "ok": ok,
            "faults_requested": cfg.faults,
            "faults": dict(Counter(e["kind"] for e in faults)),
            "fault_kinds_skipped": skipped,
            "transitions": {
                **{k: sum(1 for e in transitions if e["kind"] == k) for k in TRANSITION_KINDS},
                "applied": sum(1 for e in transitions if e.get("applied")),
                "busy_retries": r.busy_retries,
                "failed": len(r.transition_errors),
            },
            **verdict,
            "stuck": len(r.stuck),
            "stuck_detail": r.stuck,
            "recovery_s": summary(rec),
            "recovery_s_by_kind": {k: summary(v) for k, v in sorted(by_kind.items())},
            "not_recovered": sum(1 for e in faults if e["recovery_s"] is None),
            "transition_output_after_s": summary(
                [e["output_after_s"] for e in transitions if e.get("output_after_s") is not None]
            ),
            "commit_latency_s": summary(ledger.latencies(quiet)),
            "stalls": r.stalls,
            "transition_errors": r.transition_errors,
            "failed_instances": failed,
            "processes_died": died,
            "final_version": r.version,
            "events": r.events,
            "cluster": settings,
            "app": {
                "name": APP,
                "rate": cfg.rate,
                "keys": cfg.keys,
                "connectors": cfg.connectors,
                **({"batch": cfg.batch, "stream_rows": cfg.stream_rows} if cfg.connectors else {}),
                "versions": {v: asdict(s) for v, s in sorted(r.versions.items())},
            },
            "settle_timeout_s": cfg.settle_timeout,
            "transition_timeout_s": cfg.transition_timeout,
            "log_errors": _log_errors(tmp / "cluster"),
            "ledger_errors": ledger.errors,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            },
            "wall_s": round(time.monotonic() - t_wall, 1),
            "repro": "python bench/chaos.py " + " ".join(_argv(cfg)),
        }
    )
    if ok and not cfg.keep and not cfg.data_dir:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        doc["data_dir"] = str(tmp)
    return doc


def _argv(cfg: Config) -> list[str]:
    args = [
        f"--faults {cfg.faults}",
        f"--seed {cfg.seed}",
        f"--rate {cfg.rate:g}",
        f"--keys {cfg.keys}",
        f"--heartbeat-timeout {cfg.heartbeat_timeout:g}",
        f"--checkpoint-interval {cfg.checkpoint_interval:g}",
    ]
    if cfg.connectors:
        args.append("--connectors")
        if cfg.batch != 32 or cfg.stream_rows != 64:
            args.append(f"--batch {cfg.batch} --stream-rows {cfg.stream_rows}")
    if tuple(cfg.kinds) != _default_kinds(cfg.connectors):
        args.append(f"--kinds {','.join(cfg.kinds)}")
    if not cfg.transitions:
        args.append("--no-transitions")
    if cfg.windows:
        args.append(f"--windows {cfg.windows}")
    return args


def _default_kinds(connectors: bool) -> tuple[str, ...]:
    return FAULT_KINDS + cx.KINDS if connectors else FAULT_KINDS


def parse(argv: Sequence[str] | None = None) -> tuple[Config, str | None]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faults", type=int, default=20, help="faults to inject (default 20)")
    ap.add_argument("--seed", type=int, default=None, help="default: a random seed, printed")
    ap.add_argument("--out", default=None, help="also write the JSON document here")
    ap.add_argument("--rate", type=float, default=1000.0, help="source records/s (default 1000)")
    ap.add_argument("--keys", type=int, default=32)
    ap.add_argument("--heartbeat-timeout", type=float, default=1.0)
    ap.add_argument("--checkpoint-interval", type=float, default=0.3)
    ap.add_argument("--switch-timeout", type=float, default=10.0)
    ap.add_argument(
        "--settle-timeout", type=float, default=30.0, help="max wait after a fault or transition"
    )
    ap.add_argument(
        "--transition-timeout",
        type=float,
        default=60.0,
        help="an upgrade or rollback not answered within this is stuck",
    )
    ap.add_argument(
        "--kinds",
        default=None,
        help=f"fault kinds to draw from (default {','.join(FAULT_KINDS)}; "
        f"with --connectors also {','.join(EXTRA_KINDS)})",
    )
    ap.add_argument(
        "--no-transitions", action="store_true", help="no upgrade/rescale/rollback between faults"
    )
    ap.add_argument("--data-dir", default="", help="keep the cluster and output here")
    ap.add_argument("--keep", action="store_true", help="keep the data directory of a clean run")
    ap.add_argument("--log-level", default="info", help="the cluster processes' log level")
    ap.add_argument(
        "--windows",
        type=int,
        default=0,
        metavar="SIZE",
        help="also count per key in tumbling event-time windows of SIZE seqs (default off)",
    )
    ap.add_argument(
        "--connectors",
        action="store_true",
        help="the app reads a Redis stream and commits into PostgreSQL (2PC), both servers "
        "the run's own and killed by faults redis_kill and postgres_kill",
    )
    ap.add_argument(
        "--batch", type=int, default=32, help="--connectors: entries per Redis read (32)"
    )
    ap.add_argument(
        "--stream-rows",
        type=int,
        default=64,
        help="--connectors: rows the PostgreSQL sink COPYs at a time while an epoch runs (64)",
    )
    a = ap.parse_args(argv)
    allowed = _default_kinds(a.connectors)
    kinds = tuple(k for k in a.kinds.split(",") if k) if a.kinds is not None else allowed
    unknown = [k for k in kinds if k not in allowed]
    if unknown:
        ap.error(f"unknown fault kinds {unknown}; choose from {allowed}")
    if a.connectors and a.windows:
        ap.error("--connectors and --windows do not go together")
    if a.faults < 0 or a.rate <= 0 or a.keys < 1 or a.windows < 0:
        ap.error("--faults must be >= 0, --rate > 0, --keys >= 1 and --windows >= 0")
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 31)
    cfg = Config(
        faults=a.faults,
        seed=seed,
        rate=a.rate,
        keys=a.keys,
        heartbeat_timeout=a.heartbeat_timeout,
        checkpoint_interval=a.checkpoint_interval,
        switch_timeout=a.switch_timeout,
        settle_timeout=a.settle_timeout,
        transition_timeout=a.transition_timeout,
        kinds=kinds,
        transitions=not a.no_transitions,
        data_dir=a.data_dir,
        keep=a.keep,
        log_level=a.log_level,
        windows=a.windows,
        connectors=a.connectors,
        batch=a.batch,
        stream_rows=a.stream_rows,
    )
    return cfg, a.out


def main(argv: Sequence[str] | None = None, emit: Callable[[str], None] = print) -> int:
    cfg, out = parse(argv)
    log(f"seed {cfg.seed} (replay with --seed {cfg.seed})")
    doc = run(cfg)
    text = json.dumps(doc, indent=2)
    emit(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    verdict = "ok" if doc["ok"] else "FAILED"
    log(
        f"{verdict}: lost {doc['lost']}, duplicated {doc['duplicated']}, state errors "
        f"{doc['state_errors']}, stuck {doc['stuck']}; seed {cfg.seed}"
        + (
            f"; windows {doc['windows']}: lost {doc['windows_lost']}, duplicated "
            f"{doc['windows_duplicated']}, wrong {doc['windows_wrong']}"
            if cfg.windows
            else ""
        )
        + (
            f"; prepared left {doc['pg_prepared_xacts']}, pending {doc['redis_pending']}"
            if cfg.connectors
            else ""
        )
        + ("" if doc["ok"] else f"; cluster logs in {doc['data_dir']}")
    )
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
