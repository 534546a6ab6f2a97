"""Prometheus metrics of the master and the workers (``--metrics HOST:PORT``).

Nothing here runs on the record path. A worker's instances and data plane keep
plain counters (records, errors, seconds in the PE's code, a batch-time bucket
array, seconds blocked on credits, bytes and frames per peer), which the
heartbeats already carry in part; :class:`WorkerExposition` reads them when
Prometheus scrapes. The master's transitions and checkpoints are rare events:
:class:`MasterMetrics` observes them into ``prometheus_client`` histograms and
counters as they happen, and reads the workers' liveness at scrape time.

A worker serves its endpoint on its own event loop
(:class:`WorkerMetricsServer`): a scrape copies the counters and writes the text
between two of the loop's steps, and its answer, with a ``Server-Timing`` header
(what the scrape's parts took), goes out through the loop's transport. The
master's is prometheus_client's WSGI app on a thread of its own
(:class:`MetricsServer`), which reads the master's state on its loop
(:class:`OnLoop`). A node that runs TLS serves the endpoint over HTTPS with its own
certificate (:func:`https_context`) and answers plain HTTP with a 400.

A sink's end-to-end latency (``hotwire_e2e_latency_seconds``) comes from the batch
stamps of :class:`hotwire.worker.transport.Stamp`: sources on a worker with
``--metrics`` stamp their batches, and sinks count the time since, per batch.

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
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import accumulate, chain
from typing import TYPE_CHECKING, Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from hotwire.httpd import HttpError, LoopServer, Request, response

if TYPE_CHECKING:
    from hotwire.security.tls import TlsFiles

log = logging.getLogger(__name__)

# Upper bounds (seconds) of the batch-time histogram: a worker's instance counts each
# input batch in ``Instance.batch_hist`` by these (the last slot: longer batches).
BATCH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

# Upper bounds (seconds) of the end-to-end latency histogram: a sink's instance counts
# each stamped batch in ``Instance.e2e_hist`` by these (the last slot: longer ones).
E2E_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

T = TypeVar("T")

__all__ = [
    "MasterMetrics",
    "MetricsServer",
    "OnLoop",
    "WorkerExposition",
    "WorkerMetricsServer",
    "parse_address",
    "worker_exposition",
]


def parse_address(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` (port 0: any free one) -> (host, port); ValueError if malformed."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        msg = f"--metrics {addr!r}: expected HOST:PORT, e.g. 127.0.0.1:9464 (port 0: any free)"
        raise ValueError(msg)
    return host.strip("[]"), int(port)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No line per request on stderr."""


def https_context(tls: TlsFiles) -> ssl.SSLContext:
    """The metrics endpoint's TLS: the node's own certificate (the master's, or the
    worker's); a scraper checks it with the cluster CA and needs no certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


HANDSHAKE_TIMEOUT_S = 10.0
WRITE_TIMEOUT_S = 30.0  # for a scraper to read a worker's answer
_PLAIN_REFUSED = (
    "this endpoint serves HTTPS only: scrape it with scheme https and the cluster CA "
    "(tls_config: ca_file)"
)


def _tls_accept(sock: socket.socket, ctx: ssl.SSLContext) -> ssl.SSLSocket | None:
    """``sock`` after a TLS handshake (on the connection's own thread); None when the
    client spoke plain HTTP (answered 400 and closed) or failed the handshake."""
    sock.settimeout(HANDSHAKE_TIMEOUT_S)
    try:
        first = sock.recv(1, socket.MSG_PEEK)
        if first != b"\x16":  # not a TLS handshake record: plain HTTP, or garbage
            if first:
                refused = (_PLAIN_REFUSED + "\n").encode()
                sock.sendall(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n"
                    b"Connection: close\r\nContent-Length: "
                    + str(len(refused)).encode()
                    + b"\r\n\r\n"
                    + refused
                )
            sock.close()
            return None
        return ctx.wrap_socket(sock, server_side=True)
    except OSError as e:  # ssl.SSLError is one
        log.debug("metrics endpoint: refused a connection: %s", e)
        sock.close()
        return None


class MetricsServer:
    """Serve the master's metrics (``app``, prometheus_client's WSGI app) on
    ``addr``, on a thread of its own (each connection on one more); over HTTPS with
    ``tls`` (the handshake on each connection's thread)."""

    def __init__(self, addr: str, app: Callable[..., Any], tls: TlsFiles | None = None):
        host, port = parse_address(addr)
        context = https_context(tls) if tls is not None else None
        self.scheme = "https" if context is not None else "http"
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

            class Server(ThreadingWSGIServer):
                address_family = family

                def process_request_thread(self, request: Any, client_address: Any) -> None:
                    if context is not None:
                        request = _tls_accept(request, context)
                        if request is None:
                            return
                    super().process_request_thread(request, client_address)

            self._server = make_server(host, port, app, Server, _QuietHandler)
        except OSError as e:
            msg = f"--metrics {addr}: cannot listen: {e.strerror or e}"
            raise OSError(msg) from e
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="hotwire-metrics", daemon=True
        )
        self._thread.start()
        self.address = f"{host}:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


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
    """A worker's raw counters, as numbers: what the loop copies at a scrape.

    The instances' counters are in columns, in the order of ``keys``: ``scalars`` has
    one tuple per instance, the values of :data:`_INSTANCE_FAMILIES` in their order
    (``failed`` as 0 or 1); ``batches`` their batch-time bucket counts (per
    BATCH_BUCKETS bound, then +Inf, not cumulative) and ``process_s`` the seconds in
    the PE's code; ``e2e`` a sink's (index in ``keys``, bucket counts per E2E_BUCKETS
    bound and +Inf, seconds) for the sinks that counted a stamped batch."""

    worker: str = ""
    slots: int = 0
    keys: list[tuple[str, str]] = field(default_factory=list)  # (app, instance)
    scalars: list[tuple[int | float, ...]] = field(default_factory=list)
    batches: list[list[int]] = field(default_factory=list)
    process_s: list[float] = field(default_factory=list)
    e2e: list[tuple[int, list[int], float]] = field(default_factory=list)
    links: list[_LinkStats] = field(default_factory=list)
    drops: dict[str, int] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    handovers: dict[tuple[str, str], int] = field(default_factory=dict)
    handover_bytes: dict[tuple[str, str], int] = field(default_factory=dict)


def worker_snapshot(w: Any, empty: bool = False) -> _WorkerSnapshot:
    """On the worker's loop: copy the counters of ``w`` (a
    :class:`hotwire.worker.daemon.Worker`); with ``empty``, only its name and slots.
    Numbers only, no string formatted."""
    from hotwire.worker.channels import BLOCKED_S

    if empty:
        return _WorkerSnapshot(w.name, w.slots)
    rt = w.runtime
    live = set(rt.instances)
    for key in [k for k in BLOCKED_S if k not in live]:
        del BLOCKED_S[key]  # its instance stopped
    keys = list(rt.instances)
    insts = list(rt.instances.values())
    blocked = BLOCKED_S.get
    snap = _WorkerSnapshot(
        w.name,
        w.slots,
        keys,
        [
            (
                i.records_in,
                i.records_out,
                i.errors,
                i.dead_letters,
                1 if i.failed else 0,
                i.queued(),
                blocked(k, 0.0),
                i.late_dropped,
                i.chained,
            )
            for k, i in zip(keys, insts, strict=True)
        ],
        [i.batch_hist.copy() for i in insts],
        [i.process_s for i in insts],
        [(n, i.e2e_hist.copy(), i.e2e_s) for n, i in enumerate(insts) if i.e2e_hist is not None],
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


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v) if isinstance(v, int) else repr(float(v))


# Families of a worker's instances: name, type, help (the values: _WorkerSnapshot.scalars).
_INSTANCE_FAMILIES = (
    ("hotwire_records_in_total", "counter", "Records an instance took in."),
    ("hotwire_records_out_total", "counter", "Records an instance emitted."),
    ("hotwire_errors_total", "counter", "Records whose processing raised in user code."),
    ("hotwire_dead_letters_total", "counter", "Records written to the dead-letter file."),
    ("hotwire_instance_failed", "gauge", "1 when the instance stopped on an error."),
    ("hotwire_inbox_records", "gauge", "Records queued in the instance's inbox."),
    (
        "hotwire_credit_blocked_seconds_total",
        "counter",
        "Seconds the instance waited for credit to send downstream (backpressure).",
    ),
    (
        "hotwire_late_dropped_total",
        "counter",
        "Records dropped as late: a window with no .late() sink, or a join.",
    ),
    (
        "hotwire_chained_batches_total",
        "counter",
        "Input batches carried through the instance in a same-worker sender's task "
        "(a chain); compare hotwire_batch_process_seconds_count.",
    ),
)
_BATCH = "hotwire_batch_process_seconds"
_BATCH_HELP = "Time the PE's code took per input batch."
_E2E = "hotwire_e2e_latency_seconds"
_E2E_HELP = (
    "Seconds from a source's stamp of a batch to the end of a sink's code on it, per "
    "batch (sources stamp on workers with --metrics; other hosts' clock offset included)."
)
_PEER_FAMILIES = (
    (
        "hotwire_dataplane_sent_bytes_total",
        "counter",
        "Bytes of frames sent to a peer.",
        "bytes_out",
    ),
    (
        "hotwire_dataplane_received_bytes_total",
        "counter",
        "Bytes of frames from a peer.",
        "bytes_in",
    ),
    (
        "hotwire_dataplane_sent_frames_total",
        "counter",
        "Frames sent to a peer (not resends).",
        "frames_out",
    ),
    (
        "hotwire_dataplane_received_frames_total",
        "counter",
        "Frames received from a peer.",
        "frames_in",
    ),
    ("hotwire_dataplane_link_up", "gauge", "1 while a connection to the peer is up.", "up"),
)
_LE = (*(repr(b) for b in BATCH_BUCKETS), "+Inf")
_E2E_LE = (*(repr(b) for b in E2E_BUCKETS), "+Inf")


def _head(name: str, kind: str, doc: str) -> str:
    return f"\n# HELP {name} {doc}\n# TYPE {name} {kind}"


def _hist_prefixes(name: str, les: tuple[str, ...], lab: str) -> list[str]:
    """The start of each sample line of one histogram: buckets, _count, _sum."""
    return [
        *(f'\n{name}_bucket{{{lab},le="{le}"}} ' for le in les),
        f"\n{name}_count{{{lab}}} ",
        f"\n{name}_sum{{{lab}}} ",
    ]


class _Prefixes:
    """One instance's sample lines up to their value ("\\nname{labels} "), written once."""

    __slots__ = ("batch", "e2e", "lab", "scalars")

    def __init__(self, worker: str, app: str, instance: str):
        self.lab = lab = (
            f'app="{_esc(app)}",pe="{_esc(_pe(instance))}",instance="{_esc(instance)}",'
            f'worker="{worker}"'
        )
        self.scalars = tuple(f"\n{name}{{{lab}}} " for name, _, _ in _INSTANCE_FAMILIES)
        self.batch = _hist_prefixes(_BATCH, _LE, lab)
        self.e2e: list[str] | None = None  # a sink's, when it first has one


def _samples(prefixes: Iterable[str], values: Iterable[float]) -> Iterator[str]:
    """prefix, value, prefix, value...: the sample lines (each prefix starts with the
    newline that ends the line before), for one ``str.join``. Values are ints and
    floats (never bools): ``str`` writes them as ``_num`` would."""
    return chain.from_iterable(zip(prefixes, map(str, values), strict=True))


def _cumulative(counts: list[list[int]], sums: Iterable[float]) -> Iterator[int | float]:
    """Each histogram's values in the order of its lines: the cumulative bucket
    counts, the count, the sum."""
    return chain.from_iterable(
        map(chain, map(accumulate, counts), zip(map(sum, counts), sums, strict=True))
    )


class WorkerExposition:
    """A worker's metrics in Prometheus' text format (0.0.4).

    :meth:`answer` (on the worker's loop) copies the counters
    (:func:`worker_snapshot`) and writes the text (:meth:`render`) in one go: the
    loop pays its CPU time once, in one piece.

    Each instance's labels are escaped and its sample lines' starts ("name{labels} ")
    written once, when it first appears, and kept while it lives; a scrape joins them
    with the values (``str.join`` over ``zip``/``map``: no Python code per sample).
    With 1000 PE instances (23,000 samples, 2.2 MB) the copy takes 1.4 ms and the text
    with its encoding 9 ms at best (bench/metrics_scrape.py; prometheus_client's
    generic writer took 300 ms for the text)."""

    def __init__(self, worker: Any = None) -> None:
        self.worker = worker  # a hotwire.worker.daemon.Worker, for answer()
        self._worker = ""
        self._prefixes: dict[tuple[str, str], _Prefixes] = {}
        self._keys: list[tuple[str, str]] = []
        self._columns: list[list[str]] = [[] for _ in _INSTANCE_FAMILIES]

    def _rows(self, s: _WorkerSnapshot) -> list[_Prefixes]:
        """The prefixes of ``s``'s instances in its order (the instances that
        stopped forgotten); the columns of the scalar families kept for the next."""
        if s.worker != self._worker:
            self._worker, self._prefixes, self._keys = s.worker, {}, []
        old, w = self._prefixes, _esc(s.worker)
        new = {k: old.get(k) or _Prefixes(w, *k) for k in s.keys}
        self._prefixes = new
        rows = [new[k] for k in s.keys]
        if s.keys != self._keys:
            self._keys = list(s.keys)
            self._columns = [list(col) for col in zip(*(r.scalars for r in rows), strict=True)] or [
                [] for _ in _INSTANCE_FAMILIES
            ]
        return rows

    def render(self, s: _WorkerSnapshot) -> str:
        rows = self._rows(s)
        columns = self._columns
        out: list[str] = []
        add = out.append
        values = list(zip(*s.scalars, strict=True)) or [() for _ in _INSTANCE_FAMILIES]
        for (name, kind, doc), pre, vals in zip(_INSTANCE_FAMILIES, columns, values, strict=True):
            add(_head(name, kind, doc))
            add("".join(_samples(pre, vals)))
        # A source takes no batch in: it has no batch-time histogram.
        took = [n for n, counts in enumerate(s.batches) if any(counts)]
        add(_head(_BATCH, "histogram", _BATCH_HELP))
        add(
            "".join(
                _samples(
                    chain.from_iterable([rows[n].batch for n in took]),
                    _cumulative([s.batches[n] for n in took], [s.process_s[n] for n in took]),
                )
            )
        )
        # Sinks that counted a stamped batch.
        add(_head(_E2E, "histogram", _E2E_HELP))
        for n, counts, total_s in s.e2e:
            r = rows[n]
            if r.e2e is None:
                r.e2e = _hist_prefixes(_E2E, _E2E_LE, r.lab)
            add("".join(_samples(r.e2e, _cumulative([counts], [total_s]))))
        w = _esc(s.worker)
        peers = [f'worker="{w}",peer="{_esc(link.peer)}"' for link in s.links]
        for name, kind, doc, attr in _PEER_FAMILIES:
            add(_head(name, kind, doc))
            for link, lab in zip(s.links, peers, strict=True):
                add(f"\n{name}{{{lab}}} {_num(getattr(link, attr))}")
        name = "hotwire_dataplane_drops_total"
        add(
            _head(
                name,
                "counter",
                "Frames or connections the data plane dropped, by reason; peer is empty "
                "when the connection never said who it was.",
            )
        )
        attributed: dict[str, int] = {}
        for link, lab in zip(s.links, peers, strict=True):
            for reason, n in sorted(link.drops.items()):
                add(f'\n{name}{{{lab},reason="{_esc(reason)}"}} {n}')
                attributed[reason] = attributed.get(reason, 0) + n
        for reason, n in sorted(s.drops.items()):
            unattributed = n - attributed.get(reason, 0)
            if unattributed > 0:
                add(f'\n{name}{{worker="{w}",peer="",reason="{_esc(reason)}"}} {unattributed}')
        name = "hotwire_dataplane_link_events_total"
        add(
            _head(
                name, "counter", "Reconnections, frames resent after one, and duplicates dropped."
            )
        )
        for event, n in sorted(s.stats.items()):
            add(f'\n{name}{{worker="{w}",event="{_esc(event)}"}} {n}')
        name = "hotwire_state_handovers_total"
        add(
            _head(
                name,
                "counter",
                "State handovers of retiring instances, to the same worker (local) or "
                "another (remote).",
            )
        )
        for (app, where), n in sorted(s.handovers.items()):
            add(f'\n{name}{{app="{_esc(app)}",worker="{w}",where="{where}"}} {n}')
        name = "hotwire_state_handover_bytes_total"
        add(
            _head(
                name,
                "counter",
                "Bytes of state handed over: to another worker (remote) the msgpack frames, "
                "with held input; to the same worker (local) the state's msgpack size.",
            )
        )
        for (app, where), n in sorted(s.handover_bytes.items()):
            add(f'\n{name}{{app="{_esc(app)}",worker="{w}",where="{where}"}} {n}')
        out[0] = out[0].lstrip("\n")
        add("\n")
        return "".join(out)

    def answer(self) -> tuple[bytes, float, float]:
        """On the worker's loop: the counters copied and the exposition written, and
        the seconds each took."""
        t0 = time.perf_counter()
        snap = worker_snapshot(self.worker)
        t1 = time.perf_counter()
        return self.render(snap).encode(), t1 - t0, time.perf_counter() - t1


class WorkerMetricsServer:
    """A worker's metrics endpoint: GET or HEAD of ``/`` or ``/metrics``, served on
    the worker's event loop (:class:`hotwire.httpd.LoopServer`), over HTTPS with
    ``tls``.

    The exposition is written on the loop between two of its steps, and the answer
    goes out through the loop's transport as the scraper reads it; the
    ``Server-Timing`` header gives, in ms, ``request`` (connection accepted to
    request read: the TLS handshake, the client, and the loop's turns),
    ``snapshot`` (the counters copied), ``text`` (the exposition written) and
    ``write`` (the previous answer's, until the scraper had read all but what the
    kernel buffers). A loop held by user code answers once it is free: a
    scraper's timeout shows the stall (``up == 0``) instead of stale counters."""

    def __init__(self, worker: Any, tls: TlsFiles | None = None):
        self.exposition = WorkerExposition(worker)
        self.server = LoopServer(
            self._handle,
            context=https_context(tls) if tls is not None else None,
            methods=("GET", "HEAD"),
            https_only=_PLAIN_REFUSED,
            name="metrics endpoint",
        )
        self._last_write_ms: float | None = None

    @property
    def scheme(self) -> str:
        return self.server.scheme

    async def start(self, addr: str) -> str:
        host, port = parse_address(addr)
        try:
            return await self.server.start(host, port)
        except OSError as e:
            msg = f"--metrics {addr}: cannot listen: {e.strerror or e}"
            raise OSError(msg) from e

    async def close(self) -> None:
        await self.server.close()

    async def _handle(self, req: Request, writer: asyncio.StreamWriter) -> None:
        if req.path not in ("/", "/metrics"):
            raise HttpError(404, "not found: the metrics are on /metrics")
        data, snap_s, text_s = self.exposition.answer()
        timing = [
            ("request", (req.read_at - req.started) * 1000),
            ("snapshot", snap_s * 1000),
            ("text", text_s * 1000),
        ]
        if self._last_write_ms is not None:
            timing.append(("write", self._last_write_ms))
        header = ", ".join(f"{k};dur={v:.2f}" for k, v in timing)
        out = response(
            200,
            data,
            CONTENT_TYPE_LATEST,
            (("Server-Timing", header),),
            head_only=req.method == "HEAD",
        )
        t0 = time.perf_counter()
        writer.write(out)
        # A scraper that stops reading lets the connection go (and its copy of the text).
        await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
        self._last_write_ms = (time.perf_counter() - t0) * 1000


def worker_exposition(s: _WorkerSnapshot) -> str:
    """The text of ``s`` written by a fresh :class:`WorkerExposition` (no kept prefixes)."""
    return WorkerExposition().render(s)


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
