"""The logical model of an app: PE specs joined by stream specs, as a networkx DiGraph.

The model is what the client builds by running app.py and what the master stores,
diffs and schedules. It holds no user code: callables are referred to by the PE's
name and identified by their fingerprint, so the master never imports an app.

Nodes are PE names with the attribute ``spec`` (a :class:`PESpec`); edges are
``(src, dst)`` with the attribute ``spec`` (a :class:`StreamSpec`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from hotwire.names import name_problem, shown

PE_KINDS = (
    "source",
    "map",
    "filter",
    "flat_map",
    "reduce",
    "process",
    "sink",
    "union",
    "dl_job",
    "timestamps",
    "window",
    "join",
)
PARTITIONS = ("shuffle", "key", "broadcast", "forward")
# Kinds whose instances may hold state (reduce accumulators, a class PE's snapshot):
# an upgrade refuses to remove one unless told to drop its state.
STATEFUL_KINDS = ("reduce", "process", "window", "join")


@dataclass(frozen=True)
class PESpec:
    """One process element of the logical model.

    ``fingerprint`` identifies behaviour: it changes when the callable's code,
    constants, closure values or the config change, and not when only line
    numbers, comments or formatting do. ``parallelism`` is kept apart so a
    rescale is not a code change. ``renamed_from`` names the PE's former name: an
    upgrade from a version that has a PE of that name (and none of this name)
    treats both as one PE and hands its state over.
    """

    name: str
    kind: str
    parallelism: int = 1
    fingerprint: str = ""
    callable_name: str = ""
    config: dict[str, Any] = field(default_factory=dict, compare=True, hash=False)
    keyed: bool = False  # the PE's input is key-partitioned (reduce, keyed process)
    renamed_from: str = ""  # the PE's name in an earlier version (an upgrade keeps its state)

    def to_dict(self) -> dict[str, Any]:
        # Field by field (what dataclasses.asdict gives, several times faster): the
        # master serialises every PE of a model on each transition.
        return {
            "name": self.name,
            "kind": self.kind,
            "parallelism": self.parallelism,
            "fingerprint": self.fingerprint,
            "callable_name": self.callable_name,
            "config": copy.deepcopy(self.config) if self.config else {},
            "keyed": self.keyed,
            "renamed_from": self.renamed_from,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PESpec:
        return cls(**d)


@dataclass(frozen=True)
class StreamSpec:
    """A stream from PE ``src`` to PE ``dst``.

    ``partition`` is one of :data:`PARTITIONS`; ``key_fingerprint`` identifies the
    key function of a ``key`` stream (empty otherwise).
    """

    src: str
    dst: str
    partition: str = "shuffle"
    key_fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "src": self.src,
            "dst": self.dst,
            "partition": self.partition,
            "key_fingerprint": self.key_fingerprint,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamSpec:
        return cls(**d)


@dataclass
class LogicalModel:
    """An app's logical model: its name and its graph of PE and stream specs."""

    app: str
    graph: nx.DiGraph

    @classmethod
    def build(cls, app: str, pes: list[PESpec], streams: list[StreamSpec]) -> LogicalModel:
        g = nx.DiGraph()
        for pe in pes:
            g.add_node(pe.name, spec=pe)
        for st in streams:
            g.add_edge(st.src, st.dst, spec=st)
        return cls(app, g)

    # -- accessors -------------------------------------------------------
    def pe(self, name: str) -> PESpec:
        spec: PESpec = self.graph.nodes[name]["spec"]
        return spec

    def stream(self, src: str, dst: str) -> StreamSpec:
        spec: StreamSpec = self.graph.edges[src, dst]["spec"]
        return spec

    @property
    def pes(self) -> list[PESpec]:
        return [self.graph.nodes[n]["spec"] for n in self.graph.nodes]

    @property
    def streams(self) -> list[StreamSpec]:
        return [self.graph.edges[e]["spec"] for e in self.graph.edges]

    def inputs(self, name: str) -> list[StreamSpec]:
        return [self.graph.edges[u, name]["spec"] for u in self.graph.predecessors(name)]

    def outputs(self, name: str) -> list[StreamSpec]:
        return [self.graph.edges[name, v]["spec"] for v in self.graph.successors(name)]

    # -- serialisation ---------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "pes": [p.to_dict() for p in self.pes],
            "streams": [s.to_dict() for s in self.streams],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LogicalModel:
        return cls.build(
            d["app"],
            [PESpec.from_dict(p) for p in d["pes"]],
            [StreamSpec.from_dict(s) for s in d["streams"]],
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> LogicalModel:
        return cls.from_dict(json.loads(text))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LogicalModel):
            return NotImplemented
        return self.to_json() == other.to_json()


def check_structure(model: LogicalModel) -> list[str]:
    """Problems in a model's shape and names, each naming the PE; empty when it is sound.

    App and PE names must follow :data:`hotwire.names.NAME_RULE`: they become
    parts of file names on the workers.

    The SDK reports these (and more, about callables) on the client; the master
    runs this again on what it receives, since it never trusts a client.
    """
    problems: list[str] = []
    g = model.graph
    if not model.app or not isinstance(model.app, str):
        problems.append("the app has no name")
    elif bad := name_problem(model.app, f"app {shown(model.app)}"):
        problems.append(bad)
    ghosts = [n for n in g.nodes if "spec" not in g.nodes[n]]
    if ghosts:  # a stream names a PE the model does not declare
        return problems + [f"a stream names PE {shown(n)}, which the model lacks" for n in ghosts]
    renamed: dict[str, str] = {}  # old name -> the PE that takes it over
    app = shown(model.app)
    for pe in model.pes:
        where = f"PE {shown(pe.name)} of app {app}"
        if bad := name_problem(pe.name, where):
            problems.append(bad)
        if pe.renamed_from:
            if bad := name_problem(pe.renamed_from, f"{where}: renamed_from"):
                problems.append(bad)
            elif pe.renamed_from == pe.name:
                problems.append(f"{where}: renamed_from names the PE itself; drop it")
            elif pe.renamed_from in g:
                problems.append(
                    f"{where}: renamed_from {pe.renamed_from!r} is the name of another PE of "
                    "the app; a renamed PE's old name must be free"
                )
            elif pe.renamed_from in renamed:
                problems.append(
                    f"{where}: renamed_from {pe.renamed_from!r} is claimed by PE "
                    f"{renamed[pe.renamed_from]!r} too; one PE takes over another's state"
                )
            renamed.setdefault(pe.renamed_from, pe.name)
        if pe.kind not in PE_KINDS:
            problems.append(f"{where}: unknown kind {pe.kind!r}")
        if not isinstance(pe.parallelism, int) or pe.parallelism < 1:
            problems.append(f"{where}: parallelism must be an integer >= 1, got {pe.parallelism!r}")
        ins = list(g.predecessors(pe.name))
        outs = list(g.successors(pe.name))
        if pe.kind == "source" and ins:
            problems.append(f"{where}: a source cannot have inputs")
        if pe.kind != "source" and not ins:
            problems.append(f"{where}: has no input stream")
        if pe.kind == "sink" and outs:
            problems.append(f"{where}: a sink cannot have outputs")
        if pe.kind != "sink" and not outs:
            problems.append(
                f"{where}: its output stream goes nowhere; add a sink or another PE after it"
            )
    for st in model.streams:
        if st.partition not in PARTITIONS:
            problems.append(
                f"stream {st.src!r} -> {st.dst!r}: unknown partitioning {st.partition!r}"
            )
        if st.partition == "forward":
            ps, pd = model.pe(st.src).parallelism, model.pe(st.dst).parallelism
            if ps != pd:
                problems.append(
                    f"stream {st.src!r} -> {st.dst!r}: forward needs equal parallelism, "
                    f"got {ps} and {pd}"
                )
    if nx.is_directed_acyclic_graph(g):  # one pass; naming the cycles costs more
        return problems
    for cycle in nx.simple_cycles(g):
        problems.append(f"PE {cycle[0]!r}: is on a cycle {' -> '.join([*cycle, cycle[0]])}")
        if len(problems) > 50:
            break
    return problems
