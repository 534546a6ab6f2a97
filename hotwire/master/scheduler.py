"""Placing PE instances on workers: slots and spread. Pure and deterministic."""

from __future__ import annotations

from hotwire.master.diff import ChangeSet
from hotwire.model import LogicalModel
from hotwire.plan import PEPlacement, Placement


class SchedulingError(Exception):
    """The live workers have too few free slots for the instances to place."""


def schedule(
    new: LogicalModel,
    old_placement: Placement,
    change: ChangeSet,
    workers: dict[str, int],
    version: int,
    bundle: str,
) -> Placement:
    """The placement of ``new`` after the upgrade described by ``change``.

    PEs kept by the upgrade keep their placement. Added and regenerated PEs get
    ``gen=version`` and ``bundle``, and each of their instances goes to the live
    worker (``workers``: name -> slots) with the fewest instances of the new
    placement, ties broken by name. Instance ``i`` of a regenerated PE first tries
    the worker of the old instance ``i``, so its state handover stays local.
    Instance ``i`` of a PE fed by a forward stream first tries the worker of the
    upstream's instance ``i`` (placed before it), so the stream stays on the worker.
    Raises :class:`SchedulingError` when the instances do not fit in the slots.
    """
    regenerated = set(change.regenerated)
    added = set(change.pes_added)
    placing = sorted(
        pe for pe in new.graph.nodes if pe in added or pe in regenerated or pe not in old_placement
    )
    result: Placement = {
        pe: old_placement[pe] for pe in sorted(new.graph.nodes) if pe not in placing
    }
    load = {w: 0 for w in workers}
    for pl in result.values():
        for w in pl.workers:
            if w in load:
                load[w] += 1

    needed = sum(new.pe(pe).parallelism for pe in placing)
    free = sum(max(workers[w] - load[w], 0) for w in workers)
    if needed > free:
        names = ", ".join(repr(p) for p in placing[:5]) + (", ..." if len(placing) > 5 else "")
        raise SchedulingError(
            f"app {new.app!r} needs {needed} free slot(s) for the new instances of {names} "
            f"but the {len(workers)} live worker(s) have {free}; "
            "start more workers or give them more --slots"
        )

    chosen: dict[str, list[str | None]] = {pe: [None] * new.pe(pe).parallelism for pe in placing}
    # Pass 1: instances of regenerated (and renamed) PEs stay where their predecessor ran.
    was = {n: o for o, n in change.pes_renamed}
    for pe in placing:
        before = was.get(pe, pe)
        if (pe not in regenerated and pe not in was) or before not in old_placement:
            continue
        for i, w in enumerate(old_placement[before].workers[: len(chosen[pe])]):
            if w in workers and load[w] < workers[w]:
                chosen[pe][i] = w
                load[w] += 1
    # Pass 2: spread the rest; a forward stream's instances follow their upstream's.
    for pe in _upstream_first(new, placing):
        up = _forward_input(new, pe)
        for i, prior in enumerate(chosen[pe]):
            if prior is None:
                follow = _worker_of(up, i, chosen, result)
                if follow is not None and follow in workers and load[follow] < workers[follow]:
                    best = follow
                else:
                    best = min(
                        (x for x in workers if load[x] < workers[x]), key=lambda x: (load[x], x)
                    )
                chosen[pe][i] = best
                load[best] += 1
    for pe in placing:
        result[pe] = PEPlacement(version, bundle, tuple(w for w in chosen[pe] if w is not None))
    return dict(sorted(result.items()))


def _forward_input(model: LogicalModel, pe: str) -> str | None:
    """The upstream of ``pe``'s forward input stream (the first by name), if any."""
    ups = sorted(st.src for st in model.inputs(pe) if st.partition == "forward")
    return ups[0] if ups else None


def _upstream_first(model: LogicalModel, placing: list[str]) -> list[str]:
    """``placing`` in name order, except that a PE fed by a forward stream comes after
    that stream's upstream (forward streams form no cycle with equal parallelism)."""
    todo = set(placing)
    out: list[str] = []

    def visit(pe: str, seen: frozenset[str]) -> None:
        up = _forward_input(model, pe)
        if up in todo and up not in seen:
            visit(up, seen | {pe})
        if pe in todo:
            todo.discard(pe)
            out.append(pe)

    for pe in placing:
        visit(pe, frozenset())
    return out


def _worker_of(
    pe: str | None, i: int, chosen: dict[str, list[str | None]], result: Placement
) -> str | None:
    """The worker of instance ``i`` of ``pe`` (being placed, or kept), if known."""
    if pe is None:
        return None
    if pe in chosen:
        ws = chosen[pe]
        return ws[i] if i < len(ws) else None
    pl = result.get(pe)
    return pl.workers[i] if pl is not None and i < len(pl.workers) else None
