"""The difference between two logical models of an app: the change set of an upgrade.

Pure: two :class:`~hotwire.model.LogicalModel` in, a frozen :class:`ChangeSet` out.
A PE's name is its identity across versions, and a stream's identity is its pair
of endpoints, named ``"src->dst"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hotwire.model import LogicalModel, PESpec, StreamSpec

CHANGE_KEYS = (
    "pes_added",
    "pes_removed",
    "pes_changed",
    "pes_rescaled",
    "streams_added",
    "streams_removed",
    "streams_changed",
)


def stream_name(src: str, dst: str) -> str:
    return f"{src}->{dst}"


def split_stream_name(name: str, *models: LogicalModel) -> tuple[str, str]:
    """The ``(src, dst)`` of a stream named ``"src->dst"``.

    When PE names themselves contain ``"->"`` the split that names an edge of one
    of ``models`` wins; without models the first ``"->"`` splits.
    """
    parts = name.split("->")
    if len(parts) < 2:
        raise ValueError(f"{name!r} is not a stream name; expected 'src->dst'")
    for i in range(1, len(parts)):
        src, dst = "->".join(parts[:i]), "->".join(parts[i:])
        if any(m.graph.has_edge(src, dst) for m in models):
            return src, dst
    return parts[0], "->".join(parts[1:])


@dataclass(frozen=True)
class ChangeSet:
    """What an upgrade changes; every field is a sorted tuple of names.

    ``pes_changed`` holds PEs whose spec differs in anything but parallelism (kind,
    fingerprint, callable, config, keyed); ``pes_rescaled`` those whose parallelism
    differs (a PE may be in both). ``streams_changed`` holds streams with the same
    endpoints and a different partitioning or key function. ``regenerated`` holds
    the PEs, present in both models, that get a new generation of instances.
    ``details`` says, per changed item, what changed (for :meth:`describe`).
    """

    pes_added: tuple[str, ...] = ()
    pes_removed: tuple[str, ...] = ()
    pes_changed: tuple[str, ...] = ()
    pes_rescaled: tuple[str, ...] = ()
    streams_added: tuple[str, ...] = ()
    streams_removed: tuple[str, ...] = ()
    streams_changed: tuple[str, ...] = ()
    regenerated: tuple[str, ...] = ()
    details: tuple[tuple[str, str], ...] = ()

    @property
    def is_empty(self) -> bool:
        return not any(getattr(self, k) for k in CHANGE_KEYS)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: list(getattr(self, k)) for k in CHANGE_KEYS}
        d["regenerated"] = list(self.regenerated)
        d["details"] = dict(self.details)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChangeSet:
        lists = {k: tuple(sorted(d.get(k, ()))) for k in (*CHANGE_KEYS, "regenerated")}
        details = tuple(sorted((str(k), str(v)) for k, v in dict(d.get("details", {})).items()))
        return cls(**lists, details=details)

    def describe(self) -> list[str]:
        """One human line per change, PEs first, e.g. ``"~ pe 'clean' (code)"``."""
        notes = dict(self.details)

        def note(key: str, fmt: str) -> str:
            return fmt.format(notes[key]) if key in notes else ""

        lines = [f"+ pe {n!r}" for n in self.pes_added]
        lines += [f"- pe {n!r}" for n in self.pes_removed]
        lines += [f"~ pe {n!r}" + note(f"pe:{n}", " ({})") for n in self.pes_changed]
        lines += [f"↕ pe {n!r}" + note(f"rescale:{n}", " {}") for n in self.pes_rescaled]
        lines += [f"+ stream {n!r}" for n in self.streams_added]
        lines += [f"- stream {n!r}" for n in self.streams_removed]
        lines += [f"~ stream {n!r}" + note(f"stream:{n}", " ({})") for n in self.streams_changed]
        return lines


def _pe_changes(old: PESpec, new: PESpec) -> list[str]:
    what = []
    if old.kind != new.kind:
        what.append(f"kind {old.kind} -> {new.kind}")
    if old.fingerprint != new.fingerprint or old.callable_name != new.callable_name:
        what.append("code")
    if old.config != new.config:
        what.append("config")
    if old.keyed != new.keyed:
        what.append("keyed" if new.keyed else "unkeyed")
    if not what and old.name != new.name:
        what.append("spec")
    return what


def _key_fns(model: LogicalModel, pe: str) -> set[tuple[str, str]]:
    """How a PE's inputs are partitioned: (partitioning, key function) of each."""
    return {(st.partition, st.key_fingerprint) for st in model.inputs(pe)}


def _stream_changes(old: StreamSpec, new: StreamSpec) -> list[str]:
    what = []
    if old.partition != new.partition:
        what.append(f"{old.partition} -> {new.partition}")
    if old.key_fingerprint != new.key_fingerprint:
        what.append("key")
    return what


def diff(old: LogicalModel, new: LogicalModel) -> ChangeSet:
    """The change set that turns ``old`` into ``new`` (``old`` may be empty)."""
    og, ng = old.graph, new.graph
    old_pes, new_pes = set(og.nodes), set(ng.nodes)
    details: dict[str, str] = {}
    changed, rescaled = [], []
    onodes, nnodes = og.nodes, ng.nodes
    for name in old_pes & new_pes:
        o, n = onodes[name]["spec"], nnodes[name]["spec"]
        if o == n:
            continue
        if what := _pe_changes(o, n):
            changed.append(name)
            details[f"pe:{name}"] = ", ".join(what)
        if o.parallelism != n.parallelism:
            rescaled.append(name)
            details[f"rescale:{name}"] = f"{o.parallelism} -> {n.parallelism}"

    old_edges, new_edges = set(og.edges), set(ng.edges)
    s_changed = []
    oedges, nedges = og.edges, ng.edges
    for u, v in old_edges & new_edges:
        os_, ns_ = oedges[u, v]["spec"], nedges[u, v]["spec"]
        if os_ == ns_:
            continue
        if what := _stream_changes(os_, ns_):
            s_changed.append((u, v))
            details[f"stream:{stream_name(u, v)}"] = ", ".join(what)
    s_added, s_removed = new_edges - old_edges, old_edges - new_edges

    # A keyed PE whose inputs change re-partitions its state; a PE whose input
    # stream changes partitioning moves records between its instances, so new
    # instances take over after the old ones drained (per-key order is kept).
    regenerated = set(changed) | set(rescaled)
    for _u, v in (*s_added, *s_removed):
        # A keyed PE fed through other PEs keeps its state where it is, as long as
        # its inputs are still partitioned by the same key functions.
        if (
            v in old_pes
            and v in new_pes
            and new.pe(v).keyed
            and _key_fns(old, v) != _key_fns(new, v)
        ):
            regenerated.add(v)
    for _u, v in s_changed:
        if v in old_pes and v in new_pes:
            regenerated.add(v)

    def names(edges: Any) -> tuple[str, ...]:
        return tuple(sorted(stream_name(u, v) for u, v in edges))

    return ChangeSet(
        pes_added=tuple(sorted(new_pes - old_pes)),
        pes_removed=tuple(sorted(old_pes - new_pes)),
        pes_changed=tuple(sorted(changed)),
        pes_rescaled=tuple(sorted(rescaled)),
        streams_added=names(s_added),
        streams_removed=names(s_removed),
        streams_changed=names(s_changed),
        regenerated=tuple(sorted(regenerated)),
        details=tuple(sorted(details.items())),
    )
