"""What changed between two logical models, as a small JSON-able record, and back.

The master records each version of an app; a one-PE change to an app of a
thousand PEs should not cost a thousand PEs' worth of serialising and storing.
:func:`model_delta` gives the PEs and streams added or changed (in full), those
removed (by name), and the order of PEs and streams when applying the rest
would not reproduce it; :func:`apply_delta` rebuilds the new model from the old
one. ``apply_delta(old, model_delta(old, new)) == new`` holds for every pair of
models without streams to undeclared PEs (:func:`model_delta` returns None for
those), including the order of PEs and streams, which :meth:`LogicalModel.to_json`
keeps.
"""

from __future__ import annotations

from typing import Any

from hotwire.model import LogicalModel, PESpec, StreamSpec

Edge = tuple[str, str]


def model_delta(old: LogicalModel, new: LogicalModel) -> dict[str, Any] | None:
    """The record that takes ``old`` to ``new``; None if a model has a stream to a PE
    it does not declare (the full model is the only faithful record then)."""
    og, ng = old.graph, new.graph
    old_pes: dict[str, PESpec | None] = dict(og.nodes(data="spec"))
    new_pes: dict[str, PESpec | None] = dict(ng.nodes(data="spec"))
    if None in old_pes.values() or None in new_pes.values():
        return None
    new_order = list(new_pes)
    changed = [p for n, p in new_pes.items() if p is not None and old_pes.get(n) != p]
    removed = [n for n in old_pes if n not in new_pes]
    old_streams: dict[Edge, StreamSpec] = {(u, v): s for u, v, s in og.edges(data="spec")}
    new_streams: dict[Edge, StreamSpec] = {(u, v): s for u, v, s in ng.edges(data="spec")}
    new_edges = list(new_streams)
    changed_st = [s for e, s in new_streams.items() if old_streams.get(e) != s]
    removed_st = [e for e in old_streams if e not in new_streams]
    out: dict[str, Any] = {
        "app": new.app,
        "pes": [p.to_dict() for p in changed],
        "pes_removed": removed,
        "streams": [s.to_dict() for s in changed_st],
        "streams_removed": [list(e) for e in removed_st],
    }
    nodes = _node_order(list(old_pes), set(removed), [p.name for p in changed])
    if nodes != new_order:
        out["pe_order"] = new_order
        nodes = new_order
    edges = _edge_order(
        nodes, list(old_streams), set(removed_st), [(s.src, s.dst) for s in changed_st]
    )
    if edges != new_edges:
        out["stream_order"] = [list(e) for e in new_edges]
    return out


def apply_delta(old: LogicalModel, delta: dict[str, Any]) -> LogicalModel:
    """``old`` with ``delta`` (from :func:`model_delta`) applied: a new model."""
    g = old.graph
    specs: dict[str, PESpec] = {n: g.nodes[n]["spec"] for n in g}
    removed = set(delta["pes_removed"])
    changed = [PESpec.from_dict(p) for p in delta["pes"]]
    nodes = delta.get("pe_order") or _node_order(list(specs), removed, [p.name for p in changed])
    specs.update((p.name, p) for p in changed)
    streams: dict[Edge, StreamSpec] = {e: g.edges[e]["spec"] for e in g.edges}
    removed_st = {(s, d) for s, d in delta["streams_removed"]}
    changed_st = [StreamSpec.from_dict(s) for s in delta["streams"]]
    order = delta.get("stream_order")
    edges = (
        [(s, d) for s, d in order]
        if order
        else _edge_order(nodes, list(streams), removed_st, [(s.src, s.dst) for s in changed_st])
    )
    streams.update(((s.src, s.dst), s) for s in changed_st)
    return LogicalModel.build(delta["app"], [specs[n] for n in nodes], [streams[e] for e in edges])


def _node_order(old: list[str], removed: set[str], changed: list[str]) -> list[str]:
    """The PEs in the order :func:`apply_delta` builds them without ``pe_order``: the
    old ones kept in place, then the new ones in the order the delta lists them."""
    known = set(old)
    return [n for n in old if n not in removed] + [n for n in changed if n not in known]


def _edge_order(
    nodes: list[str], old: list[Edge], removed: set[Edge], changed: list[Edge]
) -> list[Edge]:
    """The order the graph :func:`apply_delta` builds iterates its streams in (by
    source PE in PE order, then in the order they were added) without ``stream_order``."""
    known = set(old)
    by_src: dict[str, list[Edge]] = {}
    for e in [e for e in old if e not in removed] + [e for e in changed if e not in known]:
        by_src.setdefault(e[0], []).append(e)
    return [e for n in nodes for e in by_src.get(n, ())]
