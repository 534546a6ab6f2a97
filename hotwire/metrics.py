"""Prometheus metrics of the master and the workers (``--metrics HOST:PORT``).

Nothing here runs on the record path. A worker's instances and data plane keep
plain counters (records, errors, seconds in the PE's code, a batch-time bucket
array, seconds blocked on credits, bytes and frames per peer), which the
heartbeats already carry in part; a :class:`WorkerCollector` reads them when
Prometheus scrapes. The master's transitions and checkpoints are rare events:
:class:`MasterMetrics` observes them into ``prometheus_client`` histograms and
counters as they happen, and reads the workers' liveness at scrape time.

A scrape runs on the HTTP server's thread while the event loop changes the
counters, so the snapshot is taken on the loop (:class:`OnLoop`); a loop busy
longer than a second (user code that blocks it) answers with the last one.

Names follow Prometheus' conventions: ``hotwire_`` prefix, ``_total`` for
counters, ``_seconds`` and ``_bytes`` for units. Labels are ``app``, ``pe``,
``instance`` (``pe@generation.index``), ``worker``, and a few bounded ones
(``peer``: another worker; ``phase``, ``action``, ``outcome``, ``reason``,
``event``); never a key or a record.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Upper bounds (seconds) of the batch-time histogram: a worker's instance counts each
# input batch in ``Instance.batch_hist`` by these (the last slot: longer batches).
BATCH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

T = TypeVar("T")

__all__ = [
    "MasterMetrics",
    "MetricsServer",
    "OnLoop",
    "WorkerCollector",
    "parse_address",
    "serve",
]


def parse_address(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` (port 0: any free one) -> (host, port); ValueError if malformed."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        msg = f"--metrics {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:9464 (port 0: any free)"
        raise ValueError(msg)
    return host.strip("[]"), int(port)


class MetricsServer:
    """Prometheus' HTTP exposition of ``registry`` on ``addr``, on a thread of its own."""

    def __init__(self, addr: str, registry: CollectorRegistry):
        host, port = parse_address(addr)
        try:
            self._server, self._thread = start_http_server(port, host, registry)
        except OSError as e:
            msg = f"--metrics {addr}: cannot listen: {e.strerror or e}"
            raise OSError(msg) from e
        self.address = f"{host}:{self._server.server_port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve(addr: str, *collectors: Collector) -> MetricsServer:
    """Serve ``collectors`` (each registered in a registry of the node's own) on ``addr``."""
    registry = CollectorRegistry(auto_describe=False)
    for c in collectors:
        registry.register(c)
    return MetricsServer(addr, registry)


class OnLoop:
    """Run ``fn`` on ``loop`` for a thread that scrapes; the last result if the loop
    does not run it within ``timeout`` seconds."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float = 1.0):
        self.loop = loop
        self.timeout = timeout
        self._last: dict[Callable[[], Any], Any] = {}
        self._lock = threading.Lock()

    def __call__(self, fn: Callable[[], T], default: T) -> T:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:
                    fut.set_exception(e)

        try:
            self.loop.call_soon_threadsafe(run)
            value = fut.result(self.timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            with self._lock:
                return self._last.get(fn, default)  # type: ignore[no-any-return]
        except RuntimeError:  # the loop is closed
            return default
        with self._lock:
            self._last[fn] = value
        return value


def _pe(iid: str) -> str:
    return iid.rpartition("@")[0] or iid


# ---------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------


@dataclass
class _InstanceStats:
    app: str
    instance: str
    records_in: int
    records_out: int
    errors: int
    dead_letters: int
    failed: bool
    queued: int
    process_s: float
    batches: list[int]  # per BATCH_BUCKETS bound, then +Inf (not cumulative)
    blocked_s: float


@dataclass
class _LinkStats:
    peer: str
    up: bool
    bytes_out: int
    bytes_in: int
    frames_out: int
    frames_in: int
    drops: dict[str, int]


@dataclass
class _WorkerSnapshot:
    worker: str = ""
    slots: int = 0
    instances: list[_InstanceStats] = field(default_factory=list)
    links: list[_LinkStats] = field(default_factory=list)
    drops: dict[str, int] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    handovers: dict[tuple[str, str], int] = field(default_factory=dict)
    handover_bytes: dict[str, int] = field(default_factory=dict)


def worker_snapshot(w: Any, empty: bool = False) -> _WorkerSnapshot:
    """On the worker's loop: copy the counters of ``w`` (a
    :class:`hotwire.worker.daemon.Worker`); with ``empty``, only its name and slots."""
    from hotwire.worker.channels import BLOCKED_S

    if empty:
        return _WorkerSnapshot(w.name, w.slots)
    rt = w.runtime
    live = set(rt.instances)
    for key in [k for k in BLOCKED_S if k not in live]:
        del BLOCKED_S[key]  # its instance stopped
    snap = _WorkerSnapshot(w.name, w.slots)
    for (app, iid), i in rt.instances.items():
        snap.instances.append(
            _InstanceStats(
                app,
                iid,
                i.records_in,
                i.records_out,
                i.errors,
                i.dead_letters,
                bool(i.failed),
                i.queued(),
                i.process_s,
                list(i.batch_hist),
                BLOCKED_S.get((app, iid), 0.0),
            )
        )
    dp = rt.dataplane
    for peer, link in dp.links.items():
        snap.links.append(
            _LinkStats(
                peer,
                link.conn is not None,
                link.bytes_out,
                link.bytes_in,
                link.frames_out,
                link.frames_in,
                dict(link.drops),
            )
        )
    snap.drops = dict(dp.drops)
    snap.stats = dict(dp.stats)
    snap.handovers = dict(rt.handovers)
    snap.handover_bytes = dict(rt.handover_bytes)
    return snap


class WorkerCollector(Collector):
    """The metrics of one worker, read from its counters at scrape time."""

    def __init__(self, snapshot: Callable[[], _WorkerSnapshot]):
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        s = self.snapshot()
        w = s.worker
        labels = ["app", "pe", "instance", "worker"]

        def family(
            kind: type[Any], name: str, doc: str, value: Callable[[_InstanceStats], float]
        ) -> Any:
            m = kind(name, doc, labels=labels)
            for i in s.instances:
                m.add_metric([i.app, _pe(i.instance), i.instance, w], value(i))
            return m

        yield family(
            CounterMetricFamily,
            "hotwire_records_in",
            "Records an instance took in (a source: none).",
            lambda i: i.records_in,
        )
        yield family(
            CounterMetricFamily,
            "hotwire_records_out",
            "Records an instance emitted.",
            lambda i: i.records_out,
        )
        yield family(
            CounterMetricFamily,
            "hotwire_errors",
            "Records whose processing raised in user code.",
            lambda i: i.errors,
        )
        yield family(
            CounterMetricFamily,
            "hotwire_dead_letters",
            "Records written to the dead-letter file.",
            lambda i: i.dead_letters,
        )
        yield family(
            GaugeMetricFamily,
            "hotwire_instance_failed",
            "1 when the instance stopped on an error (on_error='fail').",
            lambda i: float(i.failed),
        )
        yield family(
            GaugeMetricFamily,
            "hotwire_inbox_records",
            "Records queued in the instance's inbox, not yet processed.",
            lambda i: i.queued,
        )
        yield family(
            CounterMetricFamily,
            "hotwire_credit_blocked_seconds",
            "Seconds the instance waited for credit to send downstream (backpressure).",
            lambda i: i.blocked_s,
        )
        hist = HistogramMetricFamily(
            "hotwire_batch_process_seconds",
            "Time the PE's code took per input batch.",
            labels=labels,
        )
        for i in s.instances:
            if not sum(i.batches):
                continue  # a source: it takes no batch in
            cum, buckets = 0, []
            for bound, n in zip((*BATCH_BUCKETS, float("inf")), i.batches, strict=True):
                cum += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cum))
            hist.add_metric([i.app, _pe(i.instance), i.instance, w], buckets, i.process_s)
        yield hist

        peer_labels = ["worker", "peer"]
        for name, doc, attr in (
            ("hotwire_dataplane_sent_bytes", "Bytes of frames sent to a peer worker.", "bytes_out"),
            (
                "hotwire_dataplane_received_bytes",
                "Bytes of frames received from a peer.",
                "bytes_in",
            ),
            (
                "hotwire_dataplane_sent_frames",
                "Frames sent to a peer worker (resends apart).",
                "frames_out",
            ),
            (
                "hotwire_dataplane_received_frames",
                "Frames received from a peer worker.",
                "frames_in",
            ),
        ):
            c = CounterMetricFamily(name, doc, labels=peer_labels)
            for link in s.links:
                c.add_metric([w, link.peer], getattr(link, attr))
            yield c
        g = GaugeMetricFamily(
            "hotwire_dataplane_link_up",
            "1 while a connection to the peer is up.",
            labels=peer_labels,
        )
        for link in s.links:
            g.add_metric([w, link.peer], float(link.up))
        yield g
        c = CounterMetricFamily(
            "hotwire_dataplane_drops",
            "Frames or connections the data plane dropped, by reason; peer is empty when "
            "the connection never said who it was.",
            labels=["worker", "peer", "reason"],
        )
        attributed: dict[str, int] = {}
        for link in s.links:
            for reason, n in sorted(link.drops.items()):
                c.add_metric([w, link.peer, reason], n)
                attributed[reason] = attributed.get(reason, 0) + n
        for reason, n in sorted(s.drops.items()):
            if n - attributed.get(reason, 0) > 0:
                c.add_metric([w, "", reason], n - attributed.get(reason, 0))
        yield c
        c = CounterMetricFamily(
            "hotwire_dataplane_link_events",
            "Reconnections, frames resent after one, and duplicates dropped.",
            labels=["worker", "event"],
        )
        for event, n in sorted(s.stats.items()):
            c.add_metric([w, event], n)
        yield c
        c = CounterMetricFamily(
            "hotwire_state_handovers",
            "State handovers this worker's retiring instances made, to an instance on the "
            "same worker (local) or another (remote).",
            labels=["app", "worker", "where"],
        )
        for (app, where), n in sorted(s.handovers.items()):
            c.add_metric([app, w, where], n)
        yield c
        c = CounterMetricFamily(
            "hotwire_state_handover_bytes",
            "Bytes of state (msgpack frames) handed to instances on other workers.",
            labels=["app", "worker"],
        )
        for app, n in sorted(s.handover_bytes.items()):
            c.add_metric([app, w], n)
        yield c


# ---------------------------------------------------------------------------
# Master
# ---------------------------------------------------------------------------

PHASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class TransitionClock:
    """Times the phases of one transition from the actions its state machine emits:
    prepare (intent stored, prepare sent) until the first switch is sent, switch until
    the commit is stored, commit until the reply; an aborted transition's abort."""

    def __init__(self, metrics: MasterMetrics, app: str):
        self.metrics = metrics
        self.app = app
        self.phase = "prepare"
        self.since = time.perf_counter()

    def _enter(self, phase: str) -> None:
        now = time.perf_counter()
        if phase != self.phase:
            self.metrics.phase_seconds.labels(self.app, self.phase).observe(now - self.since)
            log.debug(
                "app %r: %s phase took %.1f ms", self.app, self.phase, (now - self.since) * 1000
            )
            self.phase, self.since = phase, now

    def saw(self, action: Any) -> None:
        from hotwire.master import transition as tr

        if isinstance(action, tr.SendSwitch):
            self._enter("switch")
        elif isinstance(action, tr.SendAbort):
            self._enter("abort")
        elif isinstance(action, tr.RestartFromCheckpoint | tr.StopEverywhere):
            self._enter("recover")
        elif isinstance(action, tr.StoreCommit):
            self._enter("commit")
        elif isinstance(action, tr.Reply):
            self._enter("done")


class MasterMetrics(Collector):
    """Transitions and checkpoints as they happen; workers and apps at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.phase_seconds = Histogram(
            "hotwire_transition_phase_seconds",
            "Time a transition (submit, upgrade, rollback, restart, move, canary) spent in "
            "each phase: prepare, switch, commit, abort, recover.",
            ["app", "phase"],
            buckets=PHASE_BUCKETS,
            registry=self.registry,
        )
        self.transition_seconds = Histogram(
            "hotwire_transition_seconds",
            "Request to commit of a committed transition (the latency streamctl reports).",
            ["app", "action"],
            buckets=PHASE_BUCKETS,
            registry=self.registry,
        )
        self.transitions = Counter(
            "hotwire_transitions",
            "Transitions by outcome: committed, aborted (nothing switched), restarted (a "
            "switch failed; the running version restarted from its checkpoint), stopped, "
            "failed.",
            ["app", "action", "outcome"],
            registry=self.registry,
        )
        self.checkpoint_seconds = Histogram(
            "hotwire_checkpoint_duration_seconds",
            "Barrier injected to every instance's state reported, per complete checkpoint.",
            ["app"],
            buckets=PHASE_BUCKETS,
            registry=self.registry,
        )
        self.checkpoints = Counter(
            "hotwire_checkpoints", "Complete checkpoints.", ["app"], registry=self.registry
        )
        self.last_checkpoint: dict[str, float] = {}  # app -> time.time() of the last one
        self.scrape: Callable[[], list[Metric]] = list
        self.registry.register(self)

    def clock(self, app: str) -> TransitionClock:
        return TransitionClock(self, app)

    def transition_done(self, app: str, action: str, outcome: str, latency_s: float) -> None:
        self.transitions.labels(app, action, outcome).inc()
        if outcome == "committed":
            self.transition_seconds.labels(app, action).observe(latency_s)

    def checkpoint_done(self, app: str, seconds: float) -> None:
        self.checkpoint_seconds.labels(app).observe(seconds)
        self.checkpoints.labels(app).inc()
        self.last_checkpoint[app] = time.time()

    def collect(self) -> Iterator[Metric]:
        yield from self.scrape()


def master_families(m: Any, metrics: MasterMetrics) -> list[Metric]:
    """On the master's loop: workers' liveness and slots, apps' versions, checkpoint
    ages and recoveries of ``m`` (a :class:`hotwire.master.service.Master`)."""
    now_mono, now = time.monotonic(), time.time()
    ms = m.membership
    up = GaugeMetricFamily(
        "hotwire_worker_up", "1 while the worker's heartbeats arrive.", labels=["worker"]
    )
    slots = GaugeMetricFamily(
        "hotwire_worker_slots", "PE instances the worker may run.", labels=["worker"]
    )
    used = GaugeMetricFamily(
        "hotwire_worker_instances", "PE instances the worker reported running.", labels=["worker"]
    )
    age = GaugeMetricFamily(
        "hotwire_worker_heartbeat_age_seconds",
        "Seconds since the worker's last heartbeat.",
        labels=["worker"],
    )
    for name, w in sorted(ms.workers.items()):
        up.add_metric([name], float(ms.alive(name)))
        slots.add_metric([name], w.slots)
        used.add_metric([name], len(w.running))
        age.add_metric([name], max(0.0, now_mono - w.last_seen))
    version = GaugeMetricFamily("hotwire_app_version", "The app's running version.", labels=["app"])
    ck_age = GaugeMetricFamily(
        "hotwire_checkpoint_age_seconds",
        "Seconds since the app's last complete checkpoint (since this master started).",
        labels=["app"],
    )
    recoveries = CounterMetricFamily(
        "hotwire_recoveries", "Restarts of the app from its last checkpoint.", labels=["app"]
    )
    events = getattr(m.recovery, "events", [])
    for name, st in sorted(m.engine.apps.items()):
        if st.state != "running":
            continue
        version.add_metric([name], st.version)
        if name in metrics.last_checkpoint:
            ck_age.add_metric([name], max(0.0, now - metrics.last_checkpoint[name]))
        n = sum(1 for e in events if e.get("app") == name and e.get("event") == "recovery")
        recoveries.add_metric([name], n)
    return [up, slots, used, age, version, ck_age, recoveries]
