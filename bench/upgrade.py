"""Upgrade benchmark: hotwire's online upgrade against stop-and-resubmit, on a real local cluster.

    python bench/upgrade.py [--quick] [--rate R] [--keys K] [--runs N] [--out FILE]

Starts a master and two workers (real processes on loopback), measures the
saturated throughput of the scenario app and its latency at half of it, then
for each scenario performs the upgrade ``runs`` times while records flow at
``rate`` per second (reverting in between), and does the same change by
killing the app and submitting the new version (``restart``), and, when bytewax is
installed, the same change the Bytewax way: kill the dataflow and start the new version
resuming from its recovery store (``peer``, see ``peer_bytewax.py``), and with ``--flink``
the same change the Flink way on a local Flink cluster: stop with a savepoint, run the
new version from it (``flink``, for ``change_code`` and ``rescale_keyed``, see
``peer_flink.py``). Before the
first upgrade of an online run, the source has emitted every key of the domain
(``--keys``) once and the sink has seen each, so the keyed PE's state holds them all;
each upgrade's entry says how many keys and bytes its switch handed over, as the
workers counted them at the handover (``handed_over``). Finally it
measures how an upgrade's cost grows with the topology (``scaling``). Prints
one JSON document on stdout and writes it to ``--out``; the sink timelines
go beside it (``FILE.timeline.json``) for ``bench/plot.py``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import itertools

import peer_bytewax
import peer_flink
from workload import render_app, render_wide, wide_model

from hotwire.master.diff import diff
from hotwire.master.planner import plan_upgrade
from hotwire.master.scheduler import schedule
from hotwire.model import LogicalModel
from hotwire.testing import read_jsonl
from hotwire.testing.cluster import LocalCluster, poll_for, write_app
from hotwire.testing.scenarios import SCENARIOS, check_output

BENCH_SCENARIOS = (
    "insert_pe",
    "remove_pe",
    "change_code",
    "rescale_keyed",
    "reroute",
    "rollback",
    "migrate_state",
    "canary",
)
SAFETY = ("migrate_state", "canary")  # no stop-and-resubmit or peer counterpart
CANARY_SHARE = "10%"
# Input a run holds per upgrade call beyond the spacing (the call itself, status and
# history): a run's records must outlast its last event's window (measure() checks).
EVENT_S = 0.3
STATELESS = ("insert_pe", "remove_pe", "reroute")  # changes that move no keyed state
PEER_QUICK = ("change_code", "rescale_keyed")  # measured with --quick; the others reuse change_code


def with_state_version(app_text: str, version: int) -> str:
    """``app_text`` whose counting PE declares ``state_version = version`` and a
    ``migrate`` hook that rebuilds every key's count (one pass over the state)."""
    head = "class Count(ProcessPE):\n"
    if head not in app_text:
        raise ValueError("the app has no counting PE to version")
    hook = (
        f"    state_version = {version}\n\n"
        "    def migrate(self, state, from_version):\n"
        "        return {k: int(n) for k, n in state.items()}\n\n"
    )
    return app_text.replace(head, head + hook, 1)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- statistics -------------------------------------------------------------
def pct(values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) by nearest rank; None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def r3(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def summary(values: Sequence[float], *qs: str) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for q in qs:
        if q == "max":
            out[q] = r3(max(values)) if values else None
        else:
            out[q] = r3(pct(values, int(q[1:]) / 100))
    return out


def max_gap(ts: Sequence[float], t0: float, t1: float) -> float:
    """Longest interval (s) without a sink record in ``[t0, t1]``; ``ts`` sorted.

    The last record before ``t0`` and the first after ``t1`` count as the
    window's edges, so a silence that starts before or ends after it is whole.
    """
    import bisect

    lo = max(bisect.bisect_left(ts, t0) - 1, 0)
    hi = min(bisect.bisect_right(ts, t1) + 1, len(ts))
    window = ts[lo:hi]
    if len(window) < 2:
        return t1 - t0
    return max(b - a for a, b in itertools.pairwise(window))


def rate_in(ts: Sequence[float], t0: float, t1: float) -> float | None:
    import bisect

    if t1 <= t0:
        return None
    return (bisect.bisect_right(ts, t1) - bisect.bisect_left(ts, t0)) / (t1 - t0)


# -- one measured app ---------------------------------------------------------
@dataclass
class Event:
    kind: str  # "upgrade", "rollback", "revert", "restart"
    t_req: float  # wall clock, before the request
    t_done: float  # wall clock, after the reply
    apply_ms: float  # master: request to commit (UpgradeReply.latency_ms); restart: kill + submit
    rtt_ms: float  # client round trip (includes running app.py and bundling)
    timed: bool = True
    # what the switch handed over per PE, as the workers counted it at the handover
    # (UpgradeReply.handover_json); None when the reply does not say (a canary's end)
    handed: list[dict[str, Any]] | None = None

    def handed_total(self) -> dict[str, Any] | None:
        """Keys and bytes handed over by every PE of the switch, and per PE."""
        if self.handed is None:
            return None
        return {
            "kind": self.kind,
            "keys": sum(h["keys"] for h in self.handed),
            "bytes": sum(h["bytes"] for h in self.handed),
            "by_pe": {
                h["pe"]: {k: h[k] for k in ("keys", "bytes", "handovers", "local")}
                for h in self.handed
                if h["keys"] or h["bytes"]
            },
        }


@dataclass
class Run:
    name: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    n: int = 0

    @property
    def sink_times(self) -> list[float]:
        return sorted(r["t_sink"] for r in self.rows)


class Bench:
    def __init__(self, cluster: LocalCluster, work: Path, rate: float, keys: int):
        self.c = cluster
        self.work = work
        self.rate = rate
        self.keys = keys

    def _files(self, tag: str) -> tuple[str, str]:
        out, audit = self.work / f"{tag}.out.jsonl", self.work / f"{tag}.audit.jsonl"
        for p in (out, audit):
            p.unlink(missing_ok=True)
        return str(out), str(audit)

    def _count(self, path: str) -> int:
        try:
            with open(path, "rb") as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0

    @property
    def fill_s(self) -> float:
        """Time the source takes to emit every key of the domain once (record i has
        key ``i % keys``)."""
        return self.keys / self.rate

    def _prefill(self, out: str) -> None:
        """Wait until the sink has seen every key of the domain: the keyed PE, which
        feeds the sink, then holds state for each, so the first upgrade hands all
        ``keys`` of them over."""
        seen: set[str] = set()
        done = {"offset": 0}

        def all_keys() -> bool:
            try:
                with open(out, "rb") as f:
                    f.seek(done["offset"])
                    chunk = f.read()
            except FileNotFoundError:
                return False
            end = chunk.rfind(b"\n") + 1  # whole lines only
            done["offset"] += end
            for line in chunk[:end].splitlines():
                seen.add(json.loads(line)["key"])
            return len(seen) >= self.keys

        poll_for(all_keys, self.fill_s + 60, interval=0.1, what=f"all {self.keys} keys seen")

    def _wait_rows(self, out: str, n: int, timeout: float) -> None:
        """Wait for at least ``n`` rows and then until the sink has been quiet for 0.3 s."""
        seen = {"count": -1, "since": time.monotonic()}

        def done() -> bool:
            c = self._count(out)
            now = time.monotonic()
            if c != seen["count"]:
                seen["count"], seen["since"] = c, now
            return c >= n and now - seen["since"] > 0.3

        try:
            poll_for(done, timeout, interval=0.05, what=f"{n} rows")
        except TimeoutError:
            log(f"  only {self._count(out)} of {n} records reached the sink in time")

    def apps(
        self, tag: str, name: str, shapes: Sequence[Any], n: int | None, rate: float | None
    ) -> tuple[str, list[str]]:
        out, audit = self._files(tag)
        paths = [
            write_app(
                self.work,
                f"{tag}.v{i + 1}.py",
                render_app(s, out=out, audit=audit, n=n, rate=rate, keys=self.keys, name=name),
            )
            for i, s in enumerate(shapes)
        ]
        return out, paths

    # -- saturation and latency ----------------------------------------------
    def saturate(self, seconds: float) -> float:
        v1 = SCENARIOS["change_code"][0]
        out, (app,) = self.apps("saturate", "saturate", [v1], None, None)
        self.c.client.submit(app)
        poll_for(lambda: self._count(out) > 0, 20, what="saturating records")
        time.sleep(seconds)
        self.c.client.kill("saturate")
        ts = sorted(r["t_sink"] for r in read_jsonl(out))
        t0, t1 = ts[0] + min(1.0, seconds / 3), ts[-1]
        return rate_in(ts, t0, t1) or 0.0

    def steady(self, rate: float, seconds: float) -> dict[str, Any]:
        v1 = SCENARIOS["change_code"][0]
        n = int(rate * seconds)
        out, (app,) = self.apps("steady", "steady", [v1], n, rate)
        self.c.client.submit(app)
        self._wait_rows(out, n, seconds + 20)
        self.c.client.kill("steady")
        rows = read_jsonl(out)
        ts = sorted(r["t_sink"] for r in rows)
        skip = ts[0] + 0.5  # leave out the start-up
        lat = [(r["t_sink"] - r["t_emit"]) * 1000 for r in rows if r["t_sink"] > skip]
        return {
            "rate": rate,
            "records": len(rows),
            "throughput_rps": r3(rate_in(ts, skip, ts[-1])),
            "latency_ms": summary(lat, "p50", "p99", "max"),
        }

    # -- online upgrades ----------------------------------------------------
    def online(self, scenario: str, runs: int, warm: float, spacing: float) -> Run:
        base = "change_code" if scenario == "rollback" else scenario
        v1, v2 = SCENARIOS[base]
        n = int(self.rate * (self.fill_s + warm + runs * 2 * (spacing + EVENT_S) + 1.5))
        name = f"b_{scenario}"
        out, (app1, app2) = self.apps(scenario, name, [v1, v2], n, self.rate)
        run = Run(scenario, n=n)
        self.c.client.submit(app1)
        self._prefill(out)
        time.sleep(warm)
        for _ in range(runs):
            if scenario == "rollback":
                run.events.append(self._upgrade(app2, "upgrade", timed=False))
                time.sleep(spacing)
                run.events.append(self._rollback(name))
            else:
                run.events.append(self._upgrade(app2, "upgrade"))
                time.sleep(spacing)
                run.events.append(self._upgrade(app1, "revert", timed=False))
            time.sleep(spacing)
        self._wait_rows(out, n, 30)
        self.c.client.kill(name)
        run.rows = read_jsonl(out)
        check_covered(run)
        return run

    def _upgrade(self, app: str, kind: str, timed: bool = True) -> Event:
        e, _ = self._upgrade_reply(app, kind)
        e.timed = timed
        return e

    def _upgrade_reply(self, app: str, kind: str) -> tuple[Event, Any]:
        t0, p0 = time.time(), time.perf_counter()
        r = self.c.client.upgrade(app)
        p1 = time.perf_counter()
        if not r.applied:
            raise RuntimeError(f"upgrade with {app} was not applied")
        e = Event(kind, t0, time.time(), r.latency_ms, (p1 - p0) * 1000)
        e.handed = json.loads(r.handover_json or "[]")
        return e, r

    def _rollback(self, name: str) -> Event:
        t0, p0 = time.time(), time.perf_counter()
        r = self.c.client.rollback(name, to_version=1)
        p1 = time.perf_counter()
        if not r.applied:
            raise RuntimeError(f"rollback of {name} was not applied")
        e = Event("rollback", t0, time.time(), r.latency_ms, (p1 - p0) * 1000)
        e.handed = json.loads(r.handover_json or "[]")
        return e

    # -- upgrade safety: a state migration, a canary ----------------------------
    def _wait_checkpoint(self, name: str, after: int, timeout: float = 30) -> int:
        """Wait for a complete checkpoint of ``name`` newer than ``after``; its id."""

        def newer() -> bool:
            return self.c.client.status(name).apps[0].last_checkpoint > after

        poll_for(newer, timeout, interval=0.1, what=f"a checkpoint of {name} after {after}")
        return int(self.c.client.status(name).apps[0].last_checkpoint)

    def migrate_state(self, runs: int, warm: float, spacing: float) -> tuple[Run, list[str]]:
        """Upgrades that each raise the counting PE's ``state_version`` (1, 2, 3, ...),
        with a ``migrate`` hook that rebuilds every key's state, after every key was
        seen and checkpointed: the compatibility check and the migration of the handed
        over state are on every upgrade's path. Returns the run and the state check's
        line of each upgrade."""
        v1 = SCENARIOS["change_code"][0]
        n = int(self.rate * (self.fill_s + warm + runs * (spacing + EVENT_S) + 1.5))
        name = "b_migrate_state"
        out, apps = self.apps(
            "migrate_state",
            name,
            [replace(v1, count_code=i + 1) for i in range(runs + 1)],
            n,
            self.rate,
        )
        for i, path in enumerate(apps):
            Path(path).write_text(with_state_version(Path(path).read_text(), i + 1))
        run = Run("migrate_state", n=n)
        checks: list[str] = []
        self.c.client.submit(apps[0])
        self._prefill(out)
        ck = self.c.client.status(name).apps[0].last_checkpoint
        self._wait_checkpoint(name, ck)  # a checkpoint holding every key
        time.sleep(warm)
        for path in apps[1:]:
            e, r = self._upgrade_reply(path, "upgrade")
            run.events.append(e)
            checks.append(r.state_check)
            time.sleep(spacing)
        self._wait_rows(out, n, 30)
        self.c.client.kill(name)
        run.rows = read_jsonl(out)
        check_covered(run)
        return run, checks

    def canary(self, runs: int, warm: float, spacing: float, share: str) -> Run:
        """Per run: a canary of ``count`` on ``share`` of its keys, promoted; another,
        aborted. The canaries alternate between the two codes of ``change_code``."""
        v1, v2 = SCENARIOS["change_code"]
        n = int(self.rate * (self.fill_s + warm + runs * 4 * (spacing + EVENT_S) + 1.5))
        name = "b_canary"
        out, (app1, app2) = self.apps("canary", name, [v1, v2], n, self.rate)
        run = Run("canary", n=n)
        self.c.client.submit(app1)
        self._prefill(out)
        time.sleep(warm)
        running = app1
        for _ in range(runs):
            for end in ("promote", "abort"):
                other = app2 if running == app1 else app1
                t0, p0 = time.time(), time.perf_counter()
                r = self.c.client.upgrade(other, canary=f"count={share}")
                p1 = time.perf_counter()
                if not r.canary:
                    raise RuntimeError(f"the canary with {other} did not start")
                e = Event("canary_start", t0, time.time(), r.latency_ms, (p1 - p0) * 1000)
                e.handed = json.loads(r.handover_json or "[]")
                run.events.append(e)
                time.sleep(spacing)
                t0, p0 = time.time(), time.perf_counter()
                c = self.c.client.canary(name, end)
                p1 = time.perf_counter()
                e = Event(end, t0, time.time(), c.latency_ms, (p1 - p0) * 1000)
                if end == "promote":  # a new version: its record says what was handed over
                    last = self.c.client.history(name).versions[-1]
                    e.handed = json.loads(last.changes_json or "{}").get("handed_over")
                run.events.append(e)
                if end == "promote":
                    running = other
                time.sleep(spacing)
        self._wait_rows(out, n, 30)
        self.c.client.kill(name)
        run.rows = read_jsonl(out)
        check_covered(run)
        return run

    # -- the baseline: stop and resubmit -------------------------------------------
    def restart(self, scenario: str, i: int, warm: float) -> Run:
        base = "change_code" if scenario == "rollback" else scenario
        v1, v2 = SCENARIOS[base]
        if scenario == "rollback":
            v1, v2 = v2, v1  # stop the new version, resubmit the old one
        n = int(self.rate * (warm + 1.5))
        name = f"r_{scenario}"
        out, (app1, app2) = self.apps(f"restart-{scenario}-{i}", name, [v1, v2], n, self.rate)
        run = Run(f"restart:{scenario}", n=n)
        self.c.client.submit(app1)
        poll_for(lambda: self._count(out) > 0, 20, what="records flowing")
        time.sleep(warm)
        t0, p0 = time.time(), time.perf_counter()
        self.c.client.kill(name)
        self.c.client.submit(app2)
        p1 = time.perf_counter()
        run.events.append(Event("restart", t0, time.time(), (p1 - p0) * 1000, (p1 - p0) * 1000))
        self._wait_rows(out, n, 30)
        self.c.client.kill(name)
        run.rows = read_jsonl(out)
        check_covered(run)
        return run

    # -- the peer: Bytewax, stopped and resumed from its recovery store ----------------
    def peer(self, scenario: str, i: int, warm: float, epoch_s: float) -> tuple[Run, float | None]:
        """The scenario's change done to a Bytewax dataflow: kill, start v2 from recovery.

        The versions mirror the scenario's shapes: ``count_code`` is the code the counting
        ``stateful_map`` outputs, ``count_p`` the number of Bytewax workers, ``extra`` a map
        before it, ``audit_from`` a second sink (always fed from the source). Returns the
        run and the time (ms) from the kill to the first record output by the new process.
        """
        base = "change_code" if scenario == "rollback" else scenario
        v1, v2 = SCENARIOS[base]
        if scenario == "rollback":
            v1, v2 = v2, v1
        n = int(self.rate * (warm + 1.5))

        def version(s: Any) -> dict[str, Any]:
            return {
                "code": s.count_code,
                "workers": s.count_p,
                "extra": s.extra,
                "audit": bool(s.audit_from),
                "epoch_s": epoch_s,
            }

        r = peer_bytewax.stop_and_resume(
            self.work / "peer",
            f"peer-{scenario}-{i}",
            version(v1),
            version(v2),
            n=n,
            rate=self.rate,
            keys=self.keys,
            warm=warm,
        )
        if r["exit_code"] != 0:
            log(f"  bytewax v2 exited with {r['exit_code']}: {r['stderr_tail']}")
        run = Run(f"bytewax:{scenario}", rows=r["rows"], n=n)
        ms = r["kill_start_ms"]
        run.events.append(Event("restart", r["t_req"], r["t_done"], ms, ms))
        first = r["first_output_s"]
        return run, None if first is None else first * 1000

    # -- scaling --------------------------------------------------------------
    def scaling_cluster(self, pes: int, upgrades: int) -> dict[str, Any]:
        name = f"wide{pes}"
        paths = [
            write_app(
                self.work, f"{name}.v{v}.py", render_wide(pes, name=name, rate=200.0, version=v)
            )
            for v in range(upgrades + 1)
        ]
        t = time.perf_counter()
        sub = self.c.client.submit(paths[0], timeout=600)
        submit_ms = (time.perf_counter() - t) * 1000
        apply_ms, rtt_ms, changed = [], [], []
        for p in paths[1:]:
            time.sleep(0.2)
            e = self._upgrade(p, "upgrade")
            apply_ms.append(e.apply_ms)
            rtt_ms.append(e.rtt_ms)
        self.c.client.kill(name, timeout=600)
        old, new = wide_model(pes, version=0), wide_model(pes, version=1)
        changed = diff(old, new).regenerated
        return {
            "pes": pes,
            "changed_pes": len(changed),
            **diff_plan_ms(pes),
            "apply_ms": r3(statistics.median(apply_ms)),
            "apply_ms_all": [r3(a) for a in apply_ms],
            "rtt_ms": r3(statistics.median(rtt_ms)),
            "submit_ms": r3(submit_ms),
            "submit_apply_ms": r3(sub.latency_ms),
        }


def diff_plan_ms(pes: int, repeat: int = 5) -> dict[str, float]:
    """Median times (ms) of diff, schedule and plan_upgrade for one changed PE among ``pes``.

    Pure functions on logical models: no cluster, no user code.
    """
    old, new = wide_model(pes, version=0), wide_model(pes, version=1)
    workers = {"w1": pes, "w2": pes}
    empty = LogicalModel.build(old.app, [], [])
    old_pl = schedule(old, {}, diff(empty, old), workers, 1, "bundle-1")
    times: dict[str, list[float]] = {
        "diff_ms": [],
        "schedule_ms": [],
        "plan_ms": [],
        "diff_plan_ms": [],
    }
    for _ in range(repeat):
        t0 = time.perf_counter()
        change = diff(old, new)
        t1 = time.perf_counter()
        new_pl = schedule(new, old_pl, change, workers, 2, "bundle-2")
        t2 = time.perf_counter()
        plan_upgrade(old.app, 2, old, old_pl, new, new_pl, change)
        t3 = time.perf_counter()
        for k, v in (
            ("diff_ms", t1 - t0),
            ("schedule_ms", t2 - t1),
            ("plan_ms", t3 - t2),
            ("diff_plan_ms", t3 - t0),
        ):
            times[k].append(v * 1000)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


# -- reading a run ------------------------------------------------------------
def window(e: Event) -> tuple[float, float]:
    """Where an event's gap is looked for: from the request to a little after the reply."""
    return e.t_req, e.t_done + 0.1


def check_covered(run: Run) -> None:
    """Raise unless the run's records outlast its last event's window: an input that
    ended inside it would make its gap the end of the stream, not the upgrade's."""
    ts = run.sink_times
    if not run.events or not ts:
        return
    end = max(window(e)[1] for e in run.events)
    if ts[-1] < end:
        raise RuntimeError(
            f"{run.name}: the input ran out at {ts[-1] - ts[0]:.2f} s, before the window "
            f"of the last event ended ({end - ts[0]:.2f} s); raise the run's record count"
        )


def measure(run: Run) -> dict[str, Any]:
    ts = run.sink_times
    timed = [e for e in run.events if e.timed]
    gaps = [max_gap(ts, *window(e)) * 1000 for e in timed]
    lat_during = [
        (r["t_sink"] - r["t_emit"]) * 1000
        for r in run.rows
        if any(e.t_req <= r["t_sink"] <= e.t_done + 0.5 for e in timed)
    ]
    v = check_output(run.rows, run.n)
    v.state_resets = max(v.state_resets, count_resets(run.rows))
    before = [rate_in(ts, e.t_req - 1.0, e.t_req) for e in timed]
    during = [rate_in(ts, e.t_req, max(e.t_done, e.t_req + 0.05)) for e in timed]
    after = [rate_in(ts, e.t_done, e.t_done + 1.0) for e in timed]
    return {
        "gaps": gaps,
        "apply": [e.apply_ms for e in timed],
        "rtt": [e.rtt_ms for e in timed],
        "lat_during": lat_during,
        "verdict": v,
        "throughput_rps": {
            k: r3(statistics.median([x for x in xs if x is not None]))
            if any(x is not None for x in xs)
            else None
            for k, xs in (("before", before), ("during", during), ("after", after))
        },
    }


def handed_summary(events: Iterable[Event]) -> dict[str, Any]:
    """Per upgrade, the keys and bytes its switch handed over as the workers counted
    them at the handover (``handed_over``; None where the reply does not say), and
    their p50 and max over the upgrades."""
    per = [e.handed_total() for e in events]
    known = [h for h in per if h is not None]
    return {
        "handed_over": per,
        "handed_keys": summary([h["keys"] for h in known], "p50", "max"),
        "handed_bytes": summary([h["bytes"] for h in known], "p50", "max"),
    }


def count_resets(rows: list[dict[str, Any]]) -> int:
    """Keys whose count went back to 1 after the key had been seen (duplicates included)."""
    seen: set[str] = set()
    reset: set[str] = set()
    for r in sorted(rows, key=lambda r: r["t_sink"]):
        if r["n"] == 1 and r["key"] in seen:
            reset.add(r["key"])
        seen.add(r["key"])
    return len(reset)


def new_output_gap(run: Run, e: Event) -> float:
    """Longest interval (ms) around ``e`` with no sink record of a not-yet-seen sequence number."""
    best, seen_max, last = 0.0, -1, None
    for r in sorted(run.rows, key=lambda r: r["t_sink"]):
        if r["seq"] <= seen_max:
            continue
        seen_max = r["seq"]
        t = r["t_sink"]
        if last is not None and t >= e.t_req and last <= e.t_done:
            best = max(best, t - last)
        last = t
    return best * 1000


def steady_gap(run: Run, length: float) -> list[float]:
    """Max gap (ms) of each window of ``length`` s that is at least 0.3 s away from any upgrade."""
    ts = run.sink_times
    if not ts:
        return []
    busy = [(e.t_req - 0.2, e.t_done + 0.2) for e in run.events]
    out = []
    t = ts[0] + 0.5  # leave out the start-up
    while t + length < ts[-1] - 0.2:
        if not any(a < t + length and t < b for a, b in busy):
            out.append(max_gap(ts, t, t + length) * 1000)
        t += length
    return out


def timeline(run: Run, bin_s: float = 0.05) -> dict[str, Any]:
    """Sink throughput and latency per ``bin_s`` bin, times relative to the first record."""
    if not run.rows:
        return {"name": run.name, "bins": [], "events": []}
    t0 = min(r["t_sink"] for r in run.rows)
    bins: dict[int, list[float]] = {}
    dups: dict[int, int] = {}
    seen: set[int] = set()
    for r in sorted(run.rows, key=lambda r: r["t_sink"]):
        b = int((r["t_sink"] - t0) / bin_s)
        bins.setdefault(b, []).append((r["t_sink"] - r["t_emit"]) * 1000)
        if r["seq"] in seen:
            dups[b] = dups.get(b, 0) + 1
        seen.add(r["seq"])
    rows = []
    for b in range(max(bins) + 1):
        lat = bins.get(b, [])
        rows.append(
            [
                round(b * bin_s, 3),
                round(len(lat) / bin_s, 1),
                r3(pct(lat, 0.5)),
                r3(pct(lat, 0.99)),
                round(dups.get(b, 0) / bin_s, 1),
            ]
        )
    return {
        "name": run.name,
        "bin_s": bin_s,
        "columns": ["t", "rps", "lat_p50_ms", "lat_p99_ms", "dup_rps"],
        "bins": rows,
        "events": [
            {"kind": e.kind, "t": round(e.t_req - t0, 4), "t_done": round(e.t_done - t0, 4)}
            for e in run.events
        ],
    }


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model or platform.processor(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def scenario_entry(
    bench: Bench,
    scenario: str,
    runs: int,
    restarts: int,
    warm: float,
    spacing: float,
    timelines: list[dict[str, Any]],
    peer_cfg: dict[str, Any] | None = None,
    peer_done: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    log(f"{scenario}: {runs} online upgrade(s) at {bench.rate:g} records/s")
    run = bench.online(scenario, runs, warm, spacing)
    m = measure(run)
    v = m["verdict"]
    length = statistics.median([e.t_done + 0.1 - e.t_req for e in run.events if e.timed])
    steady = steady_gap(run, length)
    timelines.append(timeline(run))
    log(f"{scenario}: {restarts} stop-and-resubmit run(s)")
    r_gaps: list[float] = []
    r_new: list[float] = []
    r_lost = r_dup = r_resets = 0
    r_apply: list[float] = []
    for i in range(restarts):
        rr = bench.restart(scenario, i, warm)
        rm = measure(rr)
        r_gaps += rm["gaps"]
        r_apply += rm["apply"]
        r_new += [new_output_gap(rr, e) for e in rr.events]
        rv = rm["verdict"]
        r_lost, r_dup, r_resets = (
            r_lost + rv.lost,
            r_dup + rv.duplicated,
            r_resets + rv.state_resets,
        )
        if i == 0:
            timelines.append(timeline(rr))
    gap_p50 = statistics.median(m["gaps"])
    restart_p50 = statistics.median(r_gaps) if r_gaps else None
    entry = {
        "name": scenario,
        "rate": bench.rate,
        "keys": bench.keys,
        "runs": len(m["gaps"]),
        "apply_ms": summary(m["apply"], "p50", "p99", "max"),
        "client_rtt_ms": summary(m["rtt"], "p50", "max"),
        "gap_ms": summary(m["gaps"], "p50", "max"),
        "gap_ms_all": [r3(g) for g in m["gaps"]],
        "steady_gap_ms_p99": r3(pct(steady, 0.99)),
        "steady_windows": len(steady),
        "latency_ms_during": summary(m["lat_during"], "p50", "p99", "max"),
        "throughput_rps": m["throughput_rps"],
        **handed_summary(e for e in run.events if e.timed),
        "received": v.received,
        "lost": v.lost,
        "duplicated": v.duplicated,
        "out_of_order": v.out_of_order,
        "state_resets": v.state_resets,
        "restart": {
            "runs": len(r_gaps),
            "gap_ms": summary(r_gaps, "p50", "max"),
            "kill_submit_ms": summary(r_apply, "p50", "max"),
            "new_output_gap_ms": summary(r_new, "p50", "max"),
            "lost": r_lost,
            "duplicated": r_dup,
            "state_resets": r_resets,
        },
        "gap_ratio": r3(restart_p50 / gap_p50) if restart_p50 and gap_p50 else None,
        "gap_ratio_new_output": r3(statistics.median(r_new) / gap_p50)
        if r_new and gap_p50
        else None,
        "peer": PEER,
    }
    if peer_cfg is not None and peer_done is not None:
        peer = peer_entry(bench, scenario, warm, length, timelines, peer_cfg, peer_done)
        entry["peer"] = peer
        peer_p50 = (peer.get("gap_ms") or {}).get("p50")
        entry["gap_ratio_vs_peer"] = r3(peer_p50 / gap_p50) if peer_p50 and gap_p50 else None
    log(
        f"{scenario}: apply p50 {entry['apply_ms']['p50']} ms, gap p50/max "
        f"{entry['gap_ms']['p50']}/{entry['gap_ms']['max']} ms (steady p99 "
        f"{entry['steady_gap_ms_p99']}), restart gap p50 {entry['restart']['gap_ms']['p50']} ms, "
        f"lost/dup/resets {v.lost}/{v.duplicated}/{v.state_resets}"
    )
    return entry


def safety_entry(
    bench: Bench,
    scenario: str,
    runs: int,
    warm: float,
    spacing: float,
    timelines: list[dict[str, Any]],
) -> dict[str, Any]:
    """A ``migrate_state`` or ``canary`` entry: apply times and gaps per kind of event
    (``upgrade``; ``canary_start``, ``promote``, ``abort``), exactly-once and state."""
    checks: list[str] = []
    if scenario == "migrate_state":
        log(f"migrate_state: {runs} upgrade(s) raising state_version, {bench.keys} keys")
        run, checks = bench.migrate_state(runs, warm, spacing)
    else:
        log(f"canary: {runs} canary(ies) on {CANARY_SHARE} promoted and {runs} aborted")
        run = bench.canary(runs, warm, spacing, CANARY_SHARE)
    timelines.append(timeline(run))
    ts = run.sink_times
    m = measure(run)
    v = m["verdict"]
    by_kind: dict[str, Any] = {}
    for kind in dict.fromkeys(e.kind for e in run.events):
        evs = [e for e in run.events if e.kind == kind]
        gaps = [max_gap(ts, *window(e)) * 1000 for e in evs]
        by_kind[kind] = {
            "runs": len(evs),
            "apply_ms": summary([e.apply_ms for e in evs], "p50", "max"),
            "apply_ms_all": [r3(e.apply_ms) for e in evs],
            "client_rtt_ms": summary([e.rtt_ms for e in evs], "p50", "max"),
            "gap_ms": summary(gaps, "p50", "max"),
            "gap_ms_all": [r3(g) for g in gaps],
            **handed_summary(evs),
        }
    length = statistics.median([e.t_done + 0.1 - e.t_req for e in run.events])
    steady = steady_gap(run, length)
    entry: dict[str, Any] = {
        "name": scenario,
        "rate": bench.rate,
        "keys": bench.keys,
        "runs": len(run.events),
        "apply_ms": summary(m["apply"], "p50", "p99", "max"),
        "gap_ms": summary(m["gaps"], "p50", "max"),
        "gap_ms_all": [r3(g) for g in m["gaps"]],
        "events": by_kind,
        "steady_gap_ms_p99": r3(pct(steady, 0.99)),
        "steady_windows": len(steady),
        "latency_ms_during": summary(m["lat_during"], "p50", "p99", "max"),
        "throughput_rps": m["throughput_rps"],
        "received": v.received,
        "lost": v.lost,
        "duplicated": v.duplicated,
        "out_of_order": v.out_of_order,
        "state_resets": v.state_resets,
    }
    if scenario == "migrate_state":
        entry["state_check"] = checks
    else:
        entry["share"] = CANARY_SHARE
    log(
        f"{scenario}: "
        + "; ".join(
            f"{k} apply p50 {b['apply_ms']['p50']} ms gap p50/max "
            f"{b['gap_ms']['p50']}/{b['gap_ms']['max']} ms"
            for k, b in by_kind.items()
        )
        + f" (steady p99 {entry['steady_gap_ms_p99']}); lost/dup/resets "
        f"{v.lost}/{v.duplicated}/{v.state_resets}"
    )
    return entry


def peer_entry(
    bench: Bench,
    scenario: str,
    warm: float,
    length: float,
    timelines: list[dict[str, Any]],
    cfg: dict[str, Any],
    done: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The ``peer`` field of a scenario: Bytewax stopped and resumed from recovery.

    With ``cfg["only"]`` set (``--quick``), scenarios not in it reuse the measurement of
    ``change_code`` (measured first if needed): for Bytewax every change is the same
    kill and resume.
    """
    only = cfg.get("only")
    measured = scenario if not only or scenario in only else "change_code"
    if measured in done:
        out = dict(done[measured])
        if measured != scenario:
            out["reused_from"] = measured
        return out
    log(f"{measured}: {cfg['runs']} Bytewax stop-and-resume run(s)")
    gaps: list[float] = []
    new_gaps: list[float] = []
    first: list[float] = []
    kill: list[float] = []
    steady: list[float] = []
    lost = dup = ooo = resets = resets_first = 0
    received = 0
    for i in range(cfg["runs"]):
        run, first_ms = bench.peer(measured, i, warm, cfg["epoch_s"])
        m = measure(run)
        v = m["verdict"]
        gaps += m["gaps"]
        kill += m["apply"]
        steady += steady_gap(run, length)
        new_gaps += [new_output_gap(run, e) for e in run.events]
        if first_ms is not None:
            first.append(first_ms)
        received += v.received
        lost, dup, ooo = lost + v.lost, dup + v.duplicated, ooo + v.out_of_order
        resets += v.state_resets
        resets_first += check_output(run.rows, run.n).state_resets
        if i == 0:
            timelines.append(timeline(run))
    s = SCENARIOS["change_code" if measured == "rollback" else measured]
    out = {
        "available": True,
        "system": f"bytewax {peer_bytewax.version()}",
        "how": "kill -9 the dataflow process, start the new version with the same "
        "RecoveryConfig (SQLite recovery directory); it resumes from the last committed "
        "epoch; at-least-once file sink",
        "measured": measured,
        "runs": len(gaps),
        "epoch_interval_s": cfg["epoch_s"],
        "workers": [s[0].count_p, s[1].count_p]
        if measured != "rollback"
        else [s[1].count_p, s[0].count_p],
        "gap_ms": summary(gaps, "p50", "max"),
        "gap_ms_all": [r3(g) for g in gaps],
        "steady_gap_ms_p99": r3(pct(steady, 0.99)),
        "steady_windows": len(steady),
        "new_output_gap_ms": summary(new_gaps, "p50", "max"),
        "first_output_ms": summary(first, "p50", "max"),
        "kill_start_ms": summary(kill, "p50", "max"),
        "received": received,
        "lost": lost,
        "duplicated": dup,
        "out_of_order": ooo,
        "state_resets": resets,
        "state_resets_first_delivery": resets_first,
    }
    done[measured] = out
    log(
        f"{measured}: bytewax gap p50/max {out['gap_ms']['p50']}/{out['gap_ms']['max']} ms, "
        f"lost/dup/resets {lost}/{dup}/{resets} (first-delivery resets {resets_first})"
    )
    if measured != scenario:
        out = {**out, "reused_from": measured}
    return out


FLINK_SATURATE_N = 60000  # records of the unpaced Flink and Bytewax runs


def flink_entries(
    doc: dict[str, Any], work: Path, *, runs: int, warm: float, missing: dict[str, Any] | None
) -> None:
    """The ``flink`` field of each scenario that has a Flink counterpart, and Flink's and
    Bytewax's saturated throughput on the same records beside hotwire's; the Flink
    cluster runs only meanwhile (the hotwire cluster is idle then)."""
    wanted = [s for s in doc["scenarios"] if s["name"] in peer_flink.SCENARIO_VERSIONS]
    keys = doc["config"]["keys"]
    if peer_bytewax.version() is not None:
        log(f"bytewax: saturated throughput ({FLINK_SATURATE_N} records, 2 workers)")
        bw = peer_bytewax.saturate(work / "bytewax-sat", n=FLINK_SATURATE_N, keys=keys)
        doc["throughput"]["bytewax"] = {
            **bw,
            "rps": r3(bw["rps"]),
            "system": f"bytewax {peer_bytewax.version()}",
        }
    if missing is not None or not wanted:
        for s in wanted:
            s["flink"] = missing
        return
    rate = doc["config"]["rate"]
    log("flink: starting a local Flink cluster")
    with peer_flink.FlinkCluster(peer_flink.flink_python(), work=work / "flink") as fc:
        n = FLINK_SATURATE_N
        log(f"flink: saturated throughput ({n} records)")
        sat = peer_flink.saturate(fc, work, n=n, keys=keys)
        doc["throughput"]["flink"] = {
            **sat,
            "rps": r3(sat["rps"]),
            "system": f"apache-flink {fc.version}",
        }
        for s in wanted:
            log(f"{s['name']}: {runs} Flink stop-with-savepoint run(s)")
            r = peer_flink.peer_runs(
                fc, work / "flink-runs", s["name"], runs, rate=rate, keys=keys, warm=warm, after=3.0
            )
            f = r["entry"]
            s["flink"] = f
            hw, fl = (s.get("gap_ms") or {}).get("p50"), f["gap_ms"]["p50"]
            s["gap_ratio_vs_flink"] = r3(fl / hw) if hw and fl else None
            log(
                f"{s['name']}: flink gap p50/max {f['gap_ms']['p50']}/{f['gap_ms']['max']} ms, "
                f"lost/dup/resets {f['lost']}/{f['duplicated']}/{f['state_resets']}"
            )


def peer_status() -> dict[str, Any]:
    if peer_bytewax.version() is None:
        return {
            "available": False,
            "reason": f"bytewax is not importable ({peer_bytewax.BYTEWAX_ERROR}); "
            "pip install 'hotwire[bench]'",
        }
    return {"available": False, "reason": "skipped (--no-peer)"}


PEER = peer_status()


PHASE_LINES = {
    "planned_ms": r"planned \(diff, placement, plan, state sample\) in ([\d.]+) ms",
    "prepare_ms": r"prepare phase took ([\d.]+) ms",
    "switch_ms": r"switch phase took ([\d.]+) ms",
    "commit_ms": r"commit phase took ([\d.]+) ms",
}


def master_phases(logs: Sequence[Path]) -> dict[str, dict[str, list[float]]]:
    """Per app, the master's debug lines of each transition in order (its submit
    first): the time from the request to the prepare, then each phase, in ms."""
    out: dict[str, dict[str, list[float]]] = {}
    for path in logs:
        for line in path.read_text(errors="replace").splitlines():
            m = re.search(r"app '([^']+)': (.*)$", line)
            if m is None:
                continue
            for name, pattern in PHASE_LINES.items():
                v = re.search(pattern, m.group(2))
                if v is not None:
                    app = out.setdefault(m.group(1), {f: [] for f in PHASE_LINES})
                    app[name].append(float(v.group(1)))
    return out


def goals(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal of the issue, the measured value and whether it is met."""
    out: list[dict[str, Any]] = []

    def add(goal: str, value: Any, ok: Callable[[Any], bool]) -> None:
        out.append({"goal": goal, "value": value, "met": value is not None and ok(value)})

    sc = {s["name"]: s for s in doc["scenarios"]}
    rate = doc["config"]["rate"]
    for name in STATELESS:
        if name in sc:
            add(
                f"{name}: gap_ms max <= 10 at {rate:g}/s",
                sc[name]["gap_ms"]["max"],
                lambda v: v <= 10,
            )
    if "rescale_keyed" in sc:
        add(
            f"rescale_keyed: gap_ms max <= 100 with {doc['config']['keys']} keys",
            sc["rescale_keyed"]["gap_ms"]["max"],
            lambda v: v <= 100,
        )
    for s in doc["scenarios"]:
        if s["name"] not in SAFETY:
            # The measure: against the time until the restart's first new
            # record (new_output_gap_ms), which is what a user waits for.
            add(
                f"{s['name']}: gap_ratio_new_output >= 100",
                s["gap_ratio_new_output"],
                lambda v: v >= 100,
            )
        add(
            f"{s['name']}: lost = duplicated = state_resets = 0",
            [s["lost"], s["duplicated"], s["state_resets"]],
            lambda v: v == [0, 0, 0],
        )
    if "change_code" in sc:
        add(
            "change_code (one PE): apply_ms p50 <= 50",
            sc["change_code"]["apply_ms"]["p50"],
            lambda v: v <= 50,
        )
    if "migrate_state" in sc:
        add(
            f"migrate_state: apply_ms p50 <= 50 with the state check on "
            f"{doc['config']['keys']} keys",
            sc["migrate_state"]["apply_ms"]["p50"],
            lambda v: v <= 50,
        )
    if "canary" in sc:
        for kind, what in (("promote", "promote"), ("abort", "rollback")):
            ev = sc["canary"]["events"].get(kind)
            add(
                f"canary: gap_ms max <= 10 at the {what}",
                ev["gap_ms"]["max"] if ev else None,
                lambda v: v <= 10,
            )
    by_pes = {s["pes"]: s for s in doc["scaling"]}
    if 10 in by_pes and 1000 in by_pes and by_pes[10].get("apply_ms"):
        add(
            "apply_ms at 1000 PEs <= 2x at 10 PEs",
            r3(by_pes[1000]["apply_ms"] / by_pes[10]["apply_ms"]),
            lambda v: v <= 2,
        )
    if 10000 in by_pes:
        add("diff+plan of 10000 PEs <= 200 ms", by_pes[10000]["diff_plan_ms"], lambda v: v <= 200)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs; under 2 minutes on 2 cores")
    ap.add_argument("--rate", type=float, default=10000.0, help="input records per second")
    ap.add_argument(
        "--keys",
        type=int,
        default=50000,
        help="key domain of the keyed stage; every key is seen once before the first upgrade",
    )
    ap.add_argument(
        "--runs", type=int, default=None, help="upgrades per scenario (default 10, quick 3)"
    )
    ap.add_argument(
        "--restarts",
        type=int,
        default=None,
        help="stop-and-resubmit runs per scenario (default 3, quick 1)",
    )
    ap.add_argument(
        "--scenarios",
        default=",".join(BENCH_SCENARIOS),
        help="comma-separated subset of: " + ", ".join(BENCH_SCENARIOS),
    )
    ap.add_argument(
        "--scaling",
        default=None,
        help="PE counts on the cluster, comma-separated (default 10,100,1000); '' for none",
    )
    ap.add_argument(
        "--peer-epoch-s",
        type=float,
        default=0.5,
        help="Bytewax epoch (= snapshot) interval of the peer runs, s (default 0.5)",
    )
    ap.add_argument("--no-peer", action="store_true", help="skip the Bytewax peer runs")
    ap.add_argument(
        "--flink",
        action="store_true",
        help="also run the Flink peer (stop with a savepoint, run the new version from it) "
        "for " + " and ".join(peer_flink.SCENARIO_VERSIONS) + " on a local Flink cluster; "
        "PyFlink from HOTWIRE_FLINK_PYTHON or this interpreter",
    )
    ap.add_argument(
        "--tls",
        action="store_true",
        help="run the cluster with mTLS under a cluster CA and tokens (as `streamctl up` does)",
    )
    ap.add_argument(
        "--netns",
        action="store_true",
        help="master and each worker in a network namespace of its own (needs root, ip, nft)",
    )
    ap.add_argument(
        "--loss",
        type=int,
        default=0,
        metavar="PCT",
        help="with --netns: drop PCT %% of every host's outgoing TCP packets at random",
    )
    ap.add_argument(
        "--phases",
        action="store_true",
        help="run the cluster at log level debug and add the master's time per "
        "transition phase (request to prepare, prepare, switch, commit) per app",
    )
    ap.add_argument("--out", default="bench/results/upgrade.json", help="where to write the JSON")
    a = ap.parse_args(argv)
    if a.loss and not a.netns:
        ap.error("--loss needs --netns")
    runs = a.runs or (3 if a.quick else 10)
    restarts = a.restarts if a.restarts is not None else (1 if a.quick else 3)
    scenarios = [s for s in a.scenarios.split(",") if s]
    for s in scenarios:
        if s not in BENCH_SCENARIOS:
            ap.error(f"unknown scenario {s!r}; choose from {', '.join(BENCH_SCENARIOS)}")
    scaling = [
        int(x) for x in (a.scaling if a.scaling is not None else "10,100,1000").split(",") if x
    ]
    warm, spacing = (1.0, 0.4) if a.quick else (1.5, 0.6)
    config = {
        "rate": a.rate,
        "keys": a.keys,
        # each online run waits until the sink has seen every key before its first
        # upgrade (the source emits key i % keys): the keyed PE holds all of them
        "prefill": "every key of the domain seen at the sink before the first upgrade",
        "runs": runs,
        "restarts": restarts,
        "quick": a.quick,
        "workers": 2,
        "warm_s": warm,
        "spacing_s": spacing,
        "scenarios": scenarios,
        "scaling_pes": scaling,
        "tls": a.tls,
        "netns": a.netns,
        "loss_pct": a.loss,
        "phases": a.phases,
    }
    peer_cfg: dict[str, Any] | None = None
    if not a.no_peer and peer_bytewax.version() is not None:
        peer_cfg = {
            "runs": restarts or 1,
            "epoch_s": a.peer_epoch_s,
            "only": PEER_QUICK if a.quick else None,
        }
        config["peer"] = {
            "system": f"bytewax {peer_bytewax.version()}",
            "runs": peer_cfg["runs"],
            "epoch_interval_s": a.peer_epoch_s,
            "measured": list(PEER_QUICK) if a.quick else "every scenario",
        }
    peer_done: dict[str, dict[str, Any]] = {}
    flink_missing = peer_flink.unavailable() if a.flink else None
    if flink_missing is not None:
        log(f"flink peer skipped: {flink_missing['reason']}")
    t_start = time.perf_counter()
    timelines: list[dict[str, Any]] = []
    doc: dict[str, Any] = {"machine": machine(), "config": config}
    with tempfile.TemporaryDirectory(prefix="hotwire-bench-") as tmp:
        work = Path(tmp)
        slots = max(64, max(scaling, default=0) // 2 + 32)
        kind: Any = LocalCluster
        if a.netns:
            from hotwire.testing.netns import NetnsCluster

            kind = NetnsCluster
        with kind(
            workers=2,
            slots=slots,
            data_dir=work / "cluster",
            log_level="debug" if a.phases else "warning",
            secure=a.tls,
        ) as cluster:
            if a.netns:
                for host in cluster.net.hosts:
                    cluster.net.loss(host, a.loss)
            bench = Bench(cluster, work, a.rate, a.keys)
            log("saturated throughput")
            sat = bench.saturate(2.0 if a.quick else 4.0)
            log(f"saturated: {sat:.0f} records/s; latency at half of it")
            half = bench.steady(round(sat / 2, -2) or 1000.0, 2.0 if a.quick else 5.0)
            doc["throughput"] = {"saturated_rps": r3(sat), "at_half": half}
            if sat and a.rate > 0.8 * sat:
                log(f"warning: --rate {a.rate:g} is above 80% of the saturated throughput")
            doc["scenarios"] = [
                safety_entry(bench, s, runs, warm, spacing, timelines)
                if s in SAFETY
                else scenario_entry(
                    bench, s, runs, restarts, warm, spacing, timelines, peer_cfg, peer_done
                )
                for s in scenarios
            ]
            if a.flink:
                flink_entries(doc, work, runs=restarts or 1, warm=warm, missing=flink_missing)
            doc["scaling"] = []
            for pes in scaling:
                log(f"scaling: one PE changed among {pes}")
                doc["scaling"].append(bench.scaling_cluster(pes, 2 if a.quick else 5))
            if a.phases:
                doc["master_phases"] = master_phases(sorted(cluster.dir.glob("master.*.log")))
    log("scaling: diff + plan alone for 10000 PEs")
    doc["scaling"].append(
        {"pes": 10000, "changed_pes": 1, **diff_plan_ms(10000, 3), "apply_ms": None}
    )
    doc["goals"] = goals(doc)
    doc["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(doc, indent=2)
    print(text)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        out.with_suffix(".timeline.json").write_text(json.dumps(timelines) + "\n")
        log(f"wrote {out} and {out.with_suffix('.timeline.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
