"""The Topology builder: operators that declare PEs and streams, and validation into a model.

Operators only record what was declared; :meth:`Topology.model` checks everything
at once and builds the :class:`~hotwire.model.LogicalModel`. A worker that loaded a
bundle asks :meth:`Topology.impl` and :meth:`Topology.key_fn` for the user code.
"""

from __future__ import annotations

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

__all__ = ["KeyedStream", "PEImpl", "Stream", "Topology"]

_FN_KINDS = ("source", "map", "filter", "flat_map", "reduce", "sink")
_CLASS_KINDS = ("process", "dl_job")
_SIGNATURES = {
    "source": "fn(ctx) -> iterator or async iterator",
    "map": "fn(record) -> record",
    "filter": "fn(record) -> bool",
    "flat_map": "fn(record) -> iterable",
    "reduce": "fn(acc | None, record) -> acc",
    "sink": "fn(record) -> None",
}


@dataclass(frozen=True)
class PEImpl:
    """A PE's implementation: ``fn`` for function PEs, ``cls`` for ``process`` and ``dl_job``."""

    kind: str
    fn: Callable[..., Any] | None = None
    cls: type | None = None


@dataclass
class _Edge:
    src: str
    partition: str
    key_fn: Any = None
    topology: Topology | None = None  # the topology the source stream belongs to


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


class Stream:
    """The output of a PE, as seen by the next PE (``partition`` is how it is divided)."""

    def __init__(
        self, topology: Topology, pe: str, partition: str = "shuffle", key_fn: Any = None
    ) -> None:
        self.topology = topology
        self.pe = pe
        self.partition = partition
        self.key_fn = key_fn

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.topology.name!r}, {self.pe!r}, {self.partition!r})"

    def _edge(self) -> _Edge:
        return _Edge(self.pe, self.partition, self.key_fn, self.topology)

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
        return KeyedStream(self.topology, self.pe, "key", fn)

    def broadcast(self) -> Stream:
        """Send every record of the next stream to every instance of the next PE."""
        return Stream(self.topology, self.pe, "broadcast")

    def forward(self) -> Stream:
        """Send instance i's records to instance i of the next PE (equal parallelism)."""
        return Stream(self.topology, self.pe, "forward")

    def shuffle(self) -> Stream:
        """Deal the next stream's records round-robin (the default)."""
        return Stream(self.topology, self.pe, "shuffle")

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
        return PEImpl(node.kind, node.fn, node.cls)

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
        fp = ""
        if config_ok and (target is not None or node.kind in ("union", "dl_job")):
            try:
                fp = pe_fingerprint(node.kind, target, config)
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
