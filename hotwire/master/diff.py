"""The difference between two logical models of an app: the change set of an upgrade.

Pure: two :class:`~hotwire.model.LogicalModel` in, a frozen :class:`ChangeSet` out.
A PE's name is its identity across versions, and a stream's identity is its pair
of endpoints, named ``"src->dst"``.

Renames. A PE of the new model declared ``renamed_from="old"`` is the old model's
PE ``old`` under a new name when ``old`` is in the old model and not in the new
one. Without a declaration, a rename is inferred when exactly one PE disappeared
and exactly one appeared, both of the same kind with the same (non-empty) code
fingerprint, config and keying, fed by the same PEs and feeding the same PEs. The
old model is relabelled with the renames before it is compared, so a renamed PE
shows as a rename plus whatever else changed (code, config, parallelism), and
its streams keep their identity under the new names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from hotwire.model import STATEFUL_KINDS, LogicalModel, PESpec, StreamSpec
from hotwire.plan import instance_id, parse_instance_id

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

    ``pes_renamed`` holds ``(old name, new name)`` pairs: one PE under a new name,
    whose state goes to its new instances (it is neither added nor removed, and
    not in ``regenerated``, which holds PEs of the same name only; it may be in
    ``pes_changed`` and ``pes_rescaled`` under its new name).
    ``renames_inferred`` holds the new names of renames that were not declared
    with ``renamed_from`` but inferred from the code and the graph.
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
    pes_renamed: tuple[tuple[str, str], ...] = ()
    renames_inferred: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.pes_renamed and not any(getattr(self, k) for k in CHANGE_KEYS)

    @property
    def renames(self) -> dict[str, str]:
        """Old name -> new name of every renamed PE."""
        return dict(self.pes_renamed)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: list(getattr(self, k)) for k in CHANGE_KEYS}
        d["regenerated"] = list(self.regenerated)
        d["details"] = dict(self.details)
        d["pes_renamed"] = [list(p) for p in self.pes_renamed]
        d["renames_inferred"] = list(self.renames_inferred)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChangeSet:
        lists = {
            k: tuple(sorted(d.get(k, ())))
            for k in (*CHANGE_KEYS, "regenerated", "renames_inferred")
        }
        details = tuple(sorted((str(k), str(v)) for k, v in dict(d.get("details", {})).items()))
        renamed = tuple(sorted((str(o), str(n)) for o, n in d.get("pes_renamed", ())))
        return cls(**lists, details=details, pes_renamed=renamed)

    def describe(self) -> list[str]:
        """One human line per change, PEs first, e.g. ``"~ pe 'clean' (code)"``."""
        notes = dict(self.details)

        def note(key: str, fmt: str) -> str:
            return fmt.format(notes[key]) if key in notes else ""

        inferred = set(self.renames_inferred)
        lines = [
            f"> pe {o!r} renamed to {n!r}"
            + (" (inferred: same code, config and place in the graph)" if n in inferred else "")
            for o, n in self.pes_renamed
        ]
        lines += [f"+ pe {n!r}" for n in self.pes_added]
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


def find_renames(old: LogicalModel, new: LogicalModel) -> tuple[dict[str, str], set[str]]:
    """The renames from ``old`` to ``new`` (old name -> new name) and which of them
    (by new name) were inferred rather than declared."""
    og, ng = old.graph, new.graph
    renames: dict[str, str] = {}
    for spec in new.pes:
        was = spec.renamed_from
        if was and was in og and was not in ng and spec.name not in og and was not in renames:
            renames[was] = spec.name
    gone = [n for n in og.nodes if n not in ng and n not in renames]
    taken = set(renames.values())
    came = [n for n in ng.nodes if n not in og and n not in taken]
    if len(gone) != 1 or len(came) != 1:
        return renames, set()
    o, n = og.nodes[gone[0]]["spec"], ng.nodes[came[0]]["spec"]
    same_pe = (
        o.kind == n.kind
        and o.kind in STATEFUL_KINDS
        and o.fingerprint != ""
        and o.fingerprint == n.fingerprint
        and o.config == n.config
        and o.keyed == n.keyed
    )

    def named(x: str) -> str:
        return n.name if x == o.name else renames.get(x, x)

    same_place = {named(u) for u in og.predecessors(o.name)} == set(ng.predecessors(n.name)) and {
        named(v) for v in og.successors(o.name)
    } == set(ng.successors(n.name))
    if same_pe and same_place:
        renames[o.name] = n.name
        return renames, {n.name}
    return renames, set()


def relabel(model: LogicalModel, renames: dict[str, str]) -> LogicalModel:
    """``model`` with its PEs renamed (old name -> new name), streams following them."""
    if not renames:
        return model

    def named(x: str) -> str:
        return renames.get(x, x)

    return LogicalModel.build(
        model.app,
        [dataclasses.replace(p, name=named(p.name)) for p in model.pes],
        [dataclasses.replace(s, src=named(s.src), dst=named(s.dst)) for s in model.streams],
    )


def diff(old: LogicalModel, new: LogicalModel) -> ChangeSet:
    """The change set that turns ``old`` into ``new`` (``old`` may be empty)."""
    renames, inferred = find_renames(old, new)
    change = _diff(relabel(old, renames), new)
    if not renames:
        return change
    new_names = set(renames.values())
    return dataclasses.replace(
        change,
        regenerated=tuple(n for n in change.regenerated if n not in new_names),
        pes_renamed=tuple(sorted(renames.items())),
        renames_inferred=tuple(sorted(inferred)),
    )


def _diff(old: LogicalModel, new: LogicalModel) -> ChangeSet:
    og, ng = old.graph, new.graph
    old_pes, new_pes = set(og.nodes), set(ng.nodes)
    details: dict[str, str] = {}
    changed, rescaled = [], []
    # plain dicts: one lookup per PE instead of a view's item access, at every upgrade
    onodes, nnodes = dict(og.nodes(data="spec")), dict(ng.nodes(data="spec"))
    for name in old_pes & new_pes:
        o, n = onodes[name], nnodes[name]
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
    oedges = {(u, v): s for u, v, s in og.edges(data="spec")}
    nedges = {(u, v): s for u, v, s in ng.edges(data="spec")}
    for u, v in old_edges & new_edges:
        os_, ns_ = oedges[u, v], nedges[u, v]
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


def renamed_states(cut: dict[str, Any], model: LogicalModel) -> dict[str, Any]:
    """A checkpoint's ``{instance id: state}`` with the instances of PEs that ``model``
    renamed (``renamed_from``) under their new names: a cut taken before the rename
    restores into the renamed PE."""
    renames = {
        p.renamed_from: p.name
        for p in model.pes
        if p.renamed_from and p.renamed_from not in model.graph
    }
    if not renames:
        return cut
    out: dict[str, Any] = {}
    for iid, state in cut.items():
        pe, gen, index = parse_instance_id(iid)
        out[instance_id(renames[pe], gen, index) if pe in renames else iid] = state
    return out
