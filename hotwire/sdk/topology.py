"""The Topology builder: operators that declare PEs and streams, and validation into a model.

Operators only record what was declared; :meth:`Topology.model` checks everything
at once and builds the :class:`~hotwire.model.LogicalModel`. A worker that loaded a
bundle asks :meth:`Topology.impl` and :meth:`Topology.key_fn` for the user code.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from hotwire.model import LogicalModel, PESpec, StreamSpec, check_structure
from hotwire.names import NAME_RULE, shown
from hotwire.sdk.errors import ValidationError
from hotwire.sdk.fingerprint import fingerprint, pe_fingerprint
from hotwire.sdk.pe import ProcessPE

__all__ = ["KeyedStream", "PEImpl", "Stream", "Topology", "WindowedStream"]

_FN_KINDS = (
    "source", "map", "filter", "flat_map", "reduce", "sink", "timestamps", "window", "join"
)
_CLASS_KINDS = ("process", "dl_job")
_SIGNATURES = {
    "source": "fn(ctx) -> iterator or async iterator",
    "map": "fn(record) -> record",
    "filter": "fn(record) -> bool",
    "flat_map": "fn(record) -> iterable",
    "reduce": "fn(acc | None, record) -> acc",
    "sink": "fn(record) -> None",
    "timestamps": "fn(record) -> timestamp (a number)",
    "window": "aggregate=fn(acc | None, record) -> acc or process=fn(key, (start, end), records)",
    "join": "fn(left, right) -> record (None: no record)",
}


@dataclass(frozen=True)
class PEImpl:
    """A PE's implementation: ``fn`` for function PEs, ``cls`` for ``process`` and ``dl_job``."""

    kind: str
    fn: Callable[..., Any] | None = None
    cls: type | None = None
    ts_fn: Callable[[Any], Any] | None = None  # a window's timestamp function
    # A join's inputs: (upstream PE, its timestamp function, its key function) each.
    sides: tuple[tuple[str, Any, Any], ...] = ()
    merge_fn: Callable[[Any, Any], Any] | None = None  # a session window's acc merge


@dataclass
class _Edge:
    src: str
    partition: str
    key_fn: Any = None
    topology: Topology | None = None  # the topology the source stream belongs to
    side: str = ""  # "late": a windowed PE's late side output


@dataclass
class _Node:
    name: Any
    kind: str
    parallelism: Any
    config: Any
    fn: Any = None
    cls: Any = None
    keyed: bool = False
    inputs: list[_Edge] = field(default_factory=list)
    renamed_from: Any = ""  # the PE's name in the running version, when renamed
    ts_fn: Any = None  # a window's own timestamp function (else its assigner's)
    join_ts: tuple[Any, Any] = (None, None)  # a join's own timestamp functions per side
    merge_fn: Any = None  # a session window's merge of two accumulators


class Stream:
    """The output of a PE, as seen by the next PE (``partition`` is how it is divided)."""

    def __init__(
        self,
        topology: Topology,
        pe: str,
        partition: str = "shuffle",
        key_fn: Any = None,
        side: str = "",
    ) -> None:
        self.topology = topology
        self.pe = pe
        self.partition = partition
        self.key_fn = key_fn
        self.side = side

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.topology.name!r}, {self.pe!r}, {self.partition!r})"

    def _edge(self) -> _Edge:
        return _Edge(self.pe, self.partition, self.key_fn, self.topology, self.side)

    def _add(
        self,
        name: str,
        kind: str,
        parallelism: Any,
        config: Any,
        fn: Any = None,
        cls: Any = None,
        keyed: bool = False,
        renamed_from: str = "",
    ) -> Stream:
        node = _Node(name, kind, parallelism, config, fn, cls, keyed, [self._edge()], renamed_from)
        return self.topology._add(node)

    # -- partitioning of the next stream ---------------------------------------
    def key_by(self, fn: Callable[[Any], Any]) -> KeyedStream:
        """Key-partition the next stream by ``fn(record)`` (``reduce`` needs it)."""
        return KeyedStream(self.topology, self.pe, "key", fn, self.side)

    def broadcast(self) -> Stream:
        """Send every record of the next stream to every instance of the next PE."""
        return Stream(self.topology, self.pe, "broadcast", side=self.side)

    def forward(self) -> Stream:
        """Send instance i's records to instance i of the next PE (equal parallelism)."""
        return Stream(self.topology, self.pe, "forward", side=self.side)

    def shuffle(self) -> Stream:
        """Deal the next stream's records round-robin (the default)."""
        return Stream(self.topology, self.pe, "shuffle", side=self.side)

    # -- operators ---------------------------------------------------------------
    def map(
        self,
        name: str,
        fn: Callable[[Any], Any],
        parallelism: int = 1,
        config: Any = None,
        *,
        renamed_from: str = "",
    ) -> Stream:
        """``fn(record) -> record`` (sync or async)."""
        return self._add(name, "map", parallelism, config, fn=fn, renamed_from=renamed_from)

    def filter(
        self,
        name: str,
        fn: Callable[[Any], Any],
        parallelism: int = 1,
        config: Any = None,
        *,
        renamed_from: str = "",
    ) -> Stream:
        """Keep records for which ``fn(record)`` is true (sync or async)."""
        return self._add(name, "filter", parallelism, config, fn=fn, renamed_from=renamed_from)

    def flat_map(
        self,
        name: str,
        fn: Callable[[Any], Any],
        parallelism: int = 1,
        config: Any = None,
        *,
        renamed_from: str = "",
    ) -> Stream:
        """``fn(record) -> iterable``: emit each element (sync or async)."""
        return self._add(name, "flat_map", parallelism, config, fn=fn, renamed_from=renamed_from)

    def assign_timestamps(
        self,
        name: str,
        fn: Callable[[Any], Any],
        *,
        out_of_orderness: float = 0.0,
        idle_timeout: float | None = None,
        watermark_interval: float = 0.05,
        parallelism: int = 1,
        config: Any = None,
        renamed_from: str = "",
    ) -> Stream:
        """Give the stream event time: ``fn(record)`` is a record's timestamp (a
        number, in any unit). Records pass unchanged; the watermark that follows
        them is the largest timestamp seen minus ``out_of_orderness`` (records
        may come that much out of order and still be on time), sent at most every
        ``watermark_interval`` seconds. A channel silent for ``idle_timeout``
        seconds stops holding back the watermark of the PEs it feeds (None: it
        holds it until it speaks again).
        """
        conf = _with(
            config,
            out_of_orderness=out_of_orderness,
            idle_timeout=idle_timeout,
            watermark_interval=watermark_interval,
        )
        return self._add(name, "timestamps", parallelism, conf, fn=fn, renamed_from=renamed_from)

    def reduce(
        self,
        name: str,
        fn: Callable[[Any, Any], Any],
        parallelism: int = 1,
        config: Any = None,
        *,
        renamed_from: str = "",
    ) -> Stream:
        """Keyed state: ``fn(acc | None, record) -> acc``; emits ``(key, acc)``."""
        return self._add(
            name,
            "reduce",
            parallelism,
            config,
            fn=fn,
            keyed=self.partition == "key",
            renamed_from=renamed_from,
        )

    def process(
        self,
        name: str,
        cls: type[ProcessPE],
        parallelism: int = 1,
        config: Any = None,
        *,
        renamed_from: str = "",
    ) -> Stream:
        """A class-based PE (a :class:`ProcessPE` subclass); keyed when called on a KeyedStream."""
        return self._add(
            name,
            "process",
            parallelism,
            config,
            cls=cls,
            keyed=self.partition == "key",
            renamed_from=renamed_from,
        )

    def dl_job(
        self,
        name: str,
        request: Any,
        parallelism: int = 1,
        config: Any = None,
        *,
        renamed_from: str = "",
    ) -> Stream:
        """A deep-learning job PE: records go to the job ``request`` describes; outputs return."""
        if config is None:
            conf: Any = {"request": request}
        elif isinstance(config, dict):
            conf = {**config, "request": request}
        else:
            conf = config  # model() reports it
        return self._add(name, "dl_job", parallelism, conf, renamed_from=renamed_from)

    def union(
        self,
        name: str,
        *others: Stream,
        parallelism: int = 1,
        config: Any = None,
        renamed_from: str = "",
    ) -> Stream:
        """One PE reading this stream and ``others`` (identity)."""
        node = _Node(name, "union", parallelism, config, renamed_from=renamed_from)
        node.inputs.append(self._edge())
        for other in others:
            if isinstance(other, Stream):
                node.inputs.append(other._edge())
            else:
                node.inputs.append(_Edge(repr(other), "shuffle", None, None))
        return self.topology._add(node)

    def window(
        self,
        name: str,
        windows: Any,
        *,
        aggregate: Callable[[Any, Any], Any] | None = None,
        process: Callable[[Any, tuple[Any, Any], list[Any]], Any] | None = None,
        merge: Callable[[Any, Any], Any] | None = None,
        allowed_lateness: float = 0.0,
        timestamp: Callable[[Any], Any] | None = None,
        parallelism: int = 1,
        config: Any = None,
        renamed_from: str = "",
    ) -> WindowedStream:
        """Windows per key over event time (:mod:`hotwire.sdk.windows`: ``Tumbling``,
        ``Sliding``, ``Session``), fired when the watermark passes their end.

        With ``aggregate=fn(acc | None, record) -> acc`` a window keeps one
        accumulator and emits ``{"key", "start", "end", "value", "update",
        "version"}``; session windows that merge combine accumulators with
        ``merge(a, b)``. With ``process=fn(key, (start, end), records)`` a window
        keeps its records and emits what ``fn`` returns (an iterable). A record
        is late when every window it falls in has closed (its end plus
        ``allowed_lateness`` is at or below the watermark): it goes to the side
        output :meth:`WindowedStream.late`. A record that comes after its window
        fired but within the lateness fires the window again (``update`` true).
        The timestamp is ``timestamp(record)``, or the upstream assigner's
        function when the records reach the window unchanged in shape.
        """
        spec = _window_config(windows)
        mode = "process" if process is not None and aggregate is None else "aggregate"
        window = {**spec, "mode": mode, "allowed_lateness": allowed_lateness}
        node = _Node(
            name,
            "window",
            parallelism,
            _with(config, window=window),
            fn=aggregate if mode == "aggregate" else process,
            keyed=self.partition == "key",
            inputs=[self._edge()],
            renamed_from=renamed_from,
            ts_fn=timestamp,
            merge_fn=merge,
        )
        node.window_fns = (aggregate, process)  # type: ignore[attr-defined]
        self.topology._add(node)
        return WindowedStream(self.topology, name)

    def interval_join(
        self,
        name: str,
        other: Stream,
        lower: float,
        upper: float,
        fn: Callable[[Any, Any], Any],
        *,
        timestamp: Callable[[Any], Any] | None = None,
        other_timestamp: Callable[[Any], Any] | None = None,
        parallelism: int = 1,
        config: Any = None,
        renamed_from: str = "",
    ) -> Stream:
        """Join two keyed streams by key and event time: each record ``a`` of this
        stream meets each record ``b`` of ``other`` with the same key and
        ``a.t + lower <= b.t <= a.t + upper``, and ``fn(a, b)`` is emitted (unless
        None). Both streams need event time; records are kept until the watermark
        passes the interval they can still join in. Records below the watermark
        (late) join nothing and are counted as dropped.
        """
        join = {"kind": "interval", "lower": lower, "upper": upper}
        return self._join(name, other, join, fn, (timestamp, other_timestamp),
                          parallelism, config, renamed_from)

    def window_join(
        self,
        name: str,
        other: Stream,
        windows: Any,
        fn: Callable[[Any, Any], Any],
        *,
        timestamp: Callable[[Any], Any] | None = None,
        other_timestamp: Callable[[Any], Any] | None = None,
        parallelism: int = 1,
        config: Any = None,
        renamed_from: str = "",
    ) -> Stream:
        """Join two keyed streams per key and window (``Tumbling``, ``Sliding`` or
        ``Session``): when a window fires, ``fn(a, b)`` is emitted (unless None)
        for each pair of a record ``a`` of this stream and ``b`` of ``other`` in it.
        """
        join = {**_window_config(windows), "join": "window"}
        return self._join(name, other, join, fn, (timestamp, other_timestamp),
                          parallelism, config, renamed_from)

    def _join(
        self,
        name: str,
        other: Any,
        join: dict[str, Any],
        fn: Any,
        ts: tuple[Any, Any],
        parallelism: Any,
        config: Any,
        renamed_from: str,
    ) -> Stream:
        other_edge = other._edge() if isinstance(other, Stream) else _Edge(repr(other), "shuffle")
        node = _Node(
            name,
            "join",
            parallelism,
            _with(config, join=join, sides=[self.pe, other_edge.src]),
            fn=fn,
            keyed=True,
            inputs=[self._edge(), other_edge],
            renamed_from=renamed_from,
            join_ts=ts,
        )
        return self.topology._add(node)

    def sink(
        self,
        name: str,
        fn: Callable[[Any], Any],
        parallelism: int = 1,
        config: Any = None,
        *,
        renamed_from: str = "",
    ) -> None:
        """``fn(record) -> None`` (sync or async); the end of a stream."""
        self._add(name, "sink", parallelism, config, fn=fn, renamed_from=renamed_from)


class KeyedStream(Stream):
    """A key-partitioned stream (from :meth:`Stream.key_by`); the next PE's input is keyed."""


class WindowedStream(Stream):
    """The results of a windowed PE; :meth:`late` is its side output of late records."""

    def late(self) -> Stream:
        """The records that came too late for every window they fall in."""
        return Stream(self.topology, self.pe, "shuffle", side="late")


class Topology:
    """An app: a named graph of PEs. The name is the app's identity across versions."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._nodes: list[_Node] = []
        self._extra: list[tuple[str, _Edge]] = []  # from connect()

    def __repr__(self) -> str:
        return f"Topology({self.name!r}, {len(self._nodes)} PEs)"

    def _add(self, node: _Node) -> Stream:
        self._nodes.append(node)
        return Stream(self, node.name)

    def source(
        self,
        name: str,
        fn: Callable[[Any], Any],
        parallelism: int = 1,
        config: Any = None,
        *,
        renamed_from: str = "",
    ) -> Stream:
        """``fn(ctx)`` returns an iterator or async iterator (sync or async generator functions).

        Every operator takes ``renamed_from="old"``: the PE was called ``old`` in the
        running version, and an upgrade hands its state over to this name.
        """
        return self._add(
            _Node(name, "source", parallelism, config, fn=fn, renamed_from=renamed_from)
        )

    def connect(self, stream: Stream, pe: str, partition: str | None = None) -> None:
        """Add an input edge from ``stream`` to the existing PE ``pe`` (may make cycles).

        ``partition`` defaults to the stream's own partitioning (``key`` for a KeyedStream).
        """
        edge = stream._edge()
        if partition is not None:
            edge.partition = partition
        self._extra.append((pe, edge))

    # -- for workers -----------------------------------------------------------
    def _node(self, pe: str) -> _Node:
        for node in self._nodes:
            if node.name == pe:
                return node
        raise KeyError(f"app {self.name!r} has no PE {pe!r}")

    def impl(self, pe_name: str) -> PEImpl:
        """The implementation of PE ``pe_name`` (raises KeyError if there is none)."""
        node = self._node(pe_name)
        if node.kind == "dl_job":
            from hotwire.jobs.pe import DLJobPE  # only workers need it

            return PEImpl("dl_job", None, DLJobPE)
        if node.kind == "window":
            ts_fn, _problem = self._timestamp_fn(node)
            return PEImpl("window", node.fn, None, ts_fn=ts_fn, merge_fn=node.merge_fn)
        if node.kind == "join":
            sides = tuple(
                (e.src, self._timestamp_fn(node, [e.src], ts)[0], e.key_fn)
                for e, ts in zip(node.inputs, node.join_ts, strict=True)
            )
            return PEImpl("join", node.fn, None, sides=sides)
        return PEImpl(node.kind, node.fn, node.cls)

    # -- event time ---------------------------------------------------------------
    def _timestamp_fn(
        self, node: _Node, srcs: list[str] | None = None, explicit: Any = None
    ) -> tuple[Any, str]:
        """A window's (or a join side's) timestamp function and, if it has none,
        why (else "").

        Its own ``timestamp=``, else the function of the assigner upstream of it,
        found by walking its inputs (or ``srcs``) back to the nearest assigners.
        Every path must meet an assigner (or another window) before it reaches a
        source.
        """
        assigners: dict[str, Any] = {}
        bare: list[str] = []
        windows: list[str] = []
        seen: set[str] = set()
        todo = [e.src for e in self._inputs(node.name)] if srcs is None else list(srcs)
        if explicit is None and srcs is None:
            explicit = node.ts_fn
        while todo:
            src = todo.pop()
            if src in seen or not isinstance(src, str):
                continue
            seen.add(src)
            try:
                up = self._node(src)
            except KeyError:
                continue
            if up.kind == "timestamps":
                assigners[up.name] = up.fn
            elif up.kind in ("window", "join"):
                windows.append(up.name)
            elif up.kind == "source":
                bare.append(up.name)
            else:
                todo.extend(e.src for e in self._inputs(up.name))
        if bare:
            return None, (
                f"records reach it from source {sorted(bare)[0]!r} with no timestamp "
                "assigner on the way; call .assign_timestamps(...) on that stream"
            )
        if explicit is not None:
            return explicit, ""
        fns = {id(f): f for f in assigners.values()}
        if windows:
            return None, (
                f"it reads the results of {sorted(windows)[0]!r}, a window or join; pass "
                "timestamp=fn (for example lambda r: r['end'] - 1)"
            )
        if len(fns) != 1:
            return None, (
                "it reads from several timestamp assigners with different functions "
                f"({', '.join(sorted(assigners))}); pass timestamp=fn"
            )
        return next(iter(fns.values())), ""

    def _inputs(self, pe: str) -> list[_Edge]:
        return [e for dst, e in self._edges() if dst == pe]

    def _late_targets(self, pe: str) -> list[str]:
        return sorted(
            {dst for dst, e in self._edges() if e.src == pe and e.side and isinstance(dst, str)}
        )

    def key_fn(self, src: str, dst: str) -> Callable[[Any], Any]:
        """The key function of the keyed stream ``src -> dst`` (raises KeyError if none)."""
        for dst_name, edge in self._edges():
            if dst_name == dst and edge.src == src and edge.partition == "key":
                if edge.key_fn is None:
                    break
                fn: Callable[[Any], Any] = edge.key_fn
                return fn
        raise KeyError(f"app {self.name!r} has no keyed stream {src!r} -> {dst!r}")

    def _edges(self) -> list[tuple[str, _Edge]]:
        out = [(node.name, e) for node in self._nodes for e in node.inputs]
        return out + list(self._extra)

    # -- validation ---------------------------------------------------------------
    def model(self) -> LogicalModel:
        """Validate the topology and return its logical model.

        Raises :class:`ValidationError` listing every problem found.
        """
        problems: list[str] = []
        app = self.name
        # App and PE names are checked by check_structure, as the master does.
        if not self._nodes:
            problems.append(f"app {app!r} has no PEs; add a source with app.source(...)")
        counts = Counter(n.name for n in self._nodes if isinstance(n.name, str))
        for name, count in sorted(counts.items()):
            if count > 1:
                problems.append(
                    f"PE {name!r} of app {app!r}: the name is used by {count} PEs; "
                    "give each PE a unique name"
                )
        names = set(counts)
        pes: list[PESpec] = []
        built: set[str] = set()
        for node in self._nodes:
            spec = self._check_node(node, problems)
            if spec is not None and spec.name not in built:
                built.add(spec.name)  # a duplicate name keeps its first PE in the graph
                pes.append(spec)
        streams = self._check_edges(names, problems)
        model = LogicalModel.build(app, pes, streams)
        problems.extend(_in_app(app, p) for p in check_structure(model))
        if problems:
            raise ValidationError(_unique(problems))
        return model

    def _check_node(self, node: _Node, problems: list[str]) -> PESpec | None:
        app = self.name
        name = node.name
        where = f"PE {name!r} of app {app!r}"
        if not isinstance(name, str):
            problems.append(f"{where}: the name must be a string; {NAME_RULE}")
            return None
        if not isinstance(node.renamed_from, str):
            problems.append(
                f"{where}: renamed_from must be the PE's old name (a string), "
                f"got {node.renamed_from!r}"
            )
            node.renamed_from = ""
        if isinstance(node.parallelism, bool):
            problems.append(
                f"{where}: parallelism must be an integer >= 1, got {node.parallelism!r}"
            )
        config = {} if node.config is None else node.config
        config_ok = _check_config(config, where, problems)
        policy = config.get("on_error", "skip") if isinstance(config, dict) else "skip"
        if policy not in ("skip", "fail", "dead_letter"):
            problems.append(
                f"{where}: config on_error={policy!r} is not a policy; "
                "use 'skip' (the default), 'fail' or 'dead_letter'"
            )
        target: Any = None
        callable_name = ""
        if node.kind in _FN_KINDS:
            if callable(node.fn):
                target = node.fn
                callable_name = _callable_name(node.fn)
            else:
                problems.append(
                    f"{where}: the {node.kind} function {node.fn!r} is not callable; "
                    f"pass {_SIGNATURES[node.kind]}"
                )
        elif node.kind == "process":
            if isinstance(node.cls, type) and issubclass(node.cls, ProcessPE):
                target = node.cls
                callable_name = node.cls.__qualname__
            else:
                problems.append(
                    f"{where}: process needs a subclass of hotwire.sdk.ProcessPE, "
                    f"got {node.cls!r}; define class MyPE(ProcessPE) with process(record)"
                )
        elif node.kind == "dl_job":
            callable_name = "DLJobPE"
        if config_ok and node.kind in ("source", "sink"):
            _check_connector(node.fn, config, where, problems)
        if node.kind == "reduce" and not node.keyed:
            problems.append(
                f"{where}: reduce needs a keyed input; call .key_by(fn) on the stream "
                "before .reduce(...)"
            )
        extra: list[Any] = []  # more user functions the PE runs (a window's)
        if config_ok and node.kind == "timestamps":
            problems.extend(f"{where}: {p}" for p in _assigner_problems(node, config))
        elif config_ok and node.kind == "window":
            ts_fn, why = self._timestamp_fn(node)
            problems.extend(f"{where}: {p}" for p in _window_problems(node, config, why))
            config = {**config, "late_to": self._late_targets(name)}
            extra = [f for f in (ts_fn, node.merge_fn) if callable(f)]
        elif config_ok and node.kind == "join":
            found = _join_problems(node, config)
            for e, ts in zip(node.inputs, node.join_ts, strict=False):
                if not isinstance(e.src, str):
                    continue
                side_fn, why = self._timestamp_fn(node, [e.src], ts)
                if why:
                    found.append(f"its input from {e.src!r} needs event time: {why}")
                elif callable(side_fn):
                    extra.append(side_fn)
            problems.extend(f"{where}: {p}" for p in found)
        fp = ""
        if config_ok and (target is not None or node.kind in ("union", "dl_job")):
            try:
                fp = pe_fingerprint(node.kind, target, config)
                if extra:
                    more = "".join(fingerprint(f) for f in extra)
                    fp = hashlib.sha256((fp + more).encode()).hexdigest()
            except Exception as e:
                problems.append(f"{where}: cannot fingerprint {callable_name}: {e}")
        return PESpec(
            name=name,
            kind=node.kind,
            parallelism=node.parallelism,
            fingerprint=fp,
            callable_name=callable_name,
            config=dict(config) if config_ok else {},
            keyed=node.keyed,
            renamed_from=node.renamed_from,
        )

    def _check_edges(self, names: set[str], problems: list[str]) -> list[StreamSpec]:
        app = self.name
        streams: list[StreamSpec] = []
        seen: set[tuple[str, str]] = set()
        keyed_pes = {n.name for n in self._nodes if n.keyed}
        for dst, edge in self._edges():
            if not isinstance(dst, str):
                continue
            where = f"PE {dst!r} of app {app!r}"
            if edge.topology is None:
                problems.append(f"{where}: its input {edge.src} is not a Stream; pass streams")
                continue
            if edge.topology is not self:
                problems.append(
                    f"{where}: its input from {edge.src!r} belongs to app "
                    f"{edge.topology.name!r}; streams can only join PEs of the same Topology"
                )
                continue
            if edge.src not in names:
                continue  # its PE has an invalid name, already reported
            if dst not in names:
                problems.append(
                    f"{where}: connect() names a PE that does not exist; "
                    "declare the PE before connecting to it"
                )
                continue
            if (edge.src, dst) in seen:
                problems.append(
                    f"{where}: reads the stream from {edge.src!r} twice; "
                    "connect each upstream PE once"
                )
                continue
            seen.add((edge.src, dst))
            key_fp = ""
            if edge.partition == "key":
                if callable(edge.key_fn):
                    key_fp = fingerprint(edge.key_fn)
                else:
                    problems.append(
                        f"{where}: the key function {edge.key_fn!r} of its input from "
                        f"{edge.src!r} is not callable; pass key_by(fn) with fn(record) -> key"
                    )
            elif dst in keyed_pes:
                problems.append(
                    f"{where}: it is keyed but its input from {edge.src!r} is not "
                    "key-partitioned; use .key_by(fn) on that stream"
                )
            streams.append(StreamSpec(edge.src, dst, edge.partition, key_fp))
        return streams


def _callable_name(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return str(name) if name else type(fn).__qualname__


_HINTS = {
    "forward needs equal parallelism": "give both PEs the same parallelism or drop .forward()",
    "is on a cycle": "remove the app.connect() that closes the loop",
    "a source cannot have inputs": "connect streams to a non-source PE",
    "unknown partitioning": "use one of shuffle, key, broadcast, forward",
}


def _in_app(app: str, problem: str) -> str:
    """A structural problem from check_structure, with the app named and a hint added."""
    if f"app {shown(app)}" not in problem:
        problem = f"app {shown(app)}: {problem}"
    for fragment, hint in _HINTS.items():
        if fragment in problem:
            return f"{problem}; {hint}"
    return problem


def _unique(problems: list[str]) -> list[str]:
    return list(dict.fromkeys(problems))


def _check_connector(target: Any, config: dict[str, Any], where: str, problems: list[str]) -> None:
    """A connector's own config check (``check_config(config) -> list of problems``),
    so that bad options are refused when the model is built, before anything runs."""
    check = getattr(target, "check_config", None)
    if not callable(check):
        return
    try:
        found = check(config)
    except Exception as e:
        found = [f"{type(e).__name__}: {e}"]
    name = getattr(target, "__qualname__", type(target).__name__)
    problems.extend(f"{where}: {name} {p}" for p in found or ())


def _check_config(config: Any, where: str, problems: list[str]) -> bool:
    """Whether ``config`` is a dict with str keys that JSON and msgpack both serialise."""
    if not isinstance(config, dict):
        problems.append(
            f"{where}: config must be a dict, got {type(config).__name__}; pass config={{...}}"
        )
        return False
    bad = _bad_config_value(config, "config")
    if bad is None:
        try:
            msgpack.packb(config, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as e:
            bad = f"config is not msgpack-serialisable ({e})"
    if bad is not None:
        problems.append(
            f"{where}: {bad}; use str keys and None, bool, int, float, str, list, dict values"
        )
        return False
    return True


def _bad_config_value(v: Any, path: str) -> str | None:
    if v is None or isinstance(v, (bool, int, str)):
        return None
    if isinstance(v, float):
        return None if math.isfinite(v) else f"{path} is {v!r}, which JSON cannot hold"
    if isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            bad = _bad_config_value(x, f"{path}[{i}]")
            if bad:
                return bad
        return None
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                return f"{path} has the non-str key {k!r}"
            bad = _bad_config_value(x, f"{path}[{k!r}]")
            if bad:
                return bad
        return None
    return f"{path} holds a value of type {type(v).__name__}"


# -- event time ---------------------------------------------------------------------
def _with(config: Any, **params: Any) -> Any:
    """The user's ``config`` with an operator's own parameters added (a non-dict
    config is left for model() to report)."""
    if config is None:
        return dict(params)
    if isinstance(config, dict):
        return {**config, **params}
    return config


def _window_config(windows: Any) -> dict[str, Any]:
    """A window kind's config; anything else becomes a kind model() reports."""
    return windows.to_config() if hasattr(windows, "to_config") else {"kind": repr(windows)}


def _number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _sync_fn_problem(fn: Any, what: str) -> str:
    if inspect.iscoroutinefunction(fn):
        return f"the {what} function must be sync (def, not async def)"
    return ""


def _assigner_problems(node: _Node, config: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if callable(node.fn) and (p := _sync_fn_problem(node.fn, "timestamp")):
        out.append(p)
    ooo = config.get("out_of_orderness")
    if not _number(ooo) or ooo < 0:
        out.append(f"out_of_orderness must be a number >= 0, got {ooo!r}")
    idle = config.get("idle_timeout")
    if idle is not None and (not _number(idle) or idle <= 0):
        out.append(f"idle_timeout must be a number > 0 (seconds) or None, got {idle!r}")
    every = config.get("watermark_interval")
    if not _number(every) or every <= 0:
        out.append(f"watermark_interval must be a number > 0 (seconds), got {every!r}")
    return out


def _window_problems(node: _Node, config: dict[str, Any], no_timestamps: str) -> list[str]:
    from hotwire.eventtime import WindowSpec

    out: list[str] = []
    if no_timestamps:
        out.append(f"a window needs event time: {no_timestamps}")
    if not node.keyed or not node.inputs or node.inputs[0].partition != "key":
        out.append("a window needs a keyed input; call .key_by(fn) before .window(...)")
    w = config.get("window")
    if not isinstance(w, dict):
        return out + ["the window is missing from its config"]
    if "size" not in w and "gap" not in w and w.get("kind") not in ("tumbling", "sliding", "session"):
        out.append(
            f"windows must be Tumbling(size), Sliding(size, slide) or Session(gap) from "
            f"hotwire.sdk.windows, got {w.get('kind')}"
        )
    else:
        out.extend(WindowSpec.from_config(w).problems())
    late = w.get("allowed_lateness")
    if not _number(late) or late < 0:
        out.append(f"allowed_lateness must be a number >= 0, got {late!r}")
    aggregate, process = getattr(node, "window_fns", (None, None))
    if (aggregate is None) == (process is None):
        out.append("pass exactly one of aggregate=fn(acc | None, record) and "
                   "process=fn(key, (start, end), records)")
    for fn, what in ((aggregate, "aggregate"), (process, "process"), (node.ts_fn, "timestamp"),
                     (node.merge_fn, "merge")):
        if fn is None:
            continue
        if not callable(fn):
            out.append(f"the {what} function {fn!r} is not callable")
        elif p := _sync_fn_problem(fn, what):
            out.append(p)
    if w.get("kind") == "session" and aggregate is not None and node.merge_fn is None:
        out.append(
            "session windows with aggregate= need merge=fn(acc_a, acc_b) -> acc to "
            "combine two sessions a record joins"
        )
    return out


def _join_problems(node: _Node, config: dict[str, Any]) -> list[str]:
    from hotwire.eventtime import WindowSpec

    out: list[str] = []
    if len(node.inputs) != 2 or node.inputs[0].src == node.inputs[1].src:
        out.append("a join reads two different streams")
    elif any(e.partition != "key" for e in node.inputs):
        out.append("a join needs both inputs keyed; call .key_by(fn) on each before joining")
    if callable(node.fn) and (p := _sync_fn_problem(node.fn, "join")):
        out.append(p)
    if config.get("on_error") == "fail":
        out.append("on_error='fail' is not supported by joins; use 'skip' or 'dead_letter'")
    j = config.get("join", {})
    if j.get("kind") == "interval":
        lo, hi = j.get("lower"), j.get("upper")
        if not _number(lo) or not _number(hi):
            out.append(f"the join bounds must be finite numbers, got lower={lo!r} upper={hi!r}")
        elif lo > hi:
            out.append(f"the join's lower bound {lo!r} is above its upper bound {hi!r}")
    else:
        out.extend(WindowSpec.from_config(j).problems())
    for ts, what in zip(node.join_ts, ("timestamp", "other_timestamp"), strict=True):
        if ts is not None and not callable(ts):
            out.append(f"{what} {ts!r} is not callable")
    return out
