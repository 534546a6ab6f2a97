"""The upgrade planner: change set + placements -> per-worker instructions.

Pure. Only the *touched* streams are enumerated (those with an endpoint added,
removed or regenerated, and those added, removed or changed themselves), so a
plan's size grows with the change and not with the topology (invariant 3).

* prepare: ``StartInstance`` for each new instance (downstream PEs first on each
  worker), then ``Gate`` for each kept instance whose input channels change;
* switch: ``Switch`` for each kept instance whose routes change, then ``Retire``
  for each instance that goes.

A renamed PE (``ChangeSet.pes_renamed``) is planned like a regenerated one whose
old and new instances carry different names: the new name's instances start with
the old name's instances as predecessors, and those retire handing their state
to them (split by key when the PE is keyed), exactly once.

Epochs. When two or more kept PEs switch and they are related in the *kept
subgraph* of the old model (edges between PEs that are neither removed nor
regenerated) -- one is an ancestor of the other, or they share an ancestor --
switching each at its own batch boundary is no consistent cut. Those PEs and all
their kept ancestors then switch on epoch markers, aligned like checkpoint
barriers: every instance waits for the marker on its surviving input channels
from that set (``after_epoch``), switches, and sends it on its surviving output
channels into the set (``epoch_out``). The roots of the set (no kept input)
switch at their next batch boundary. A single switching PE, or unrelated ones,
need no epochs, and their plans carry none.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import networkx as nx

from hotwire.master.diff import ChangeSet, split_stream_name
from hotwire.model import STATEFUL_KINDS, LogicalModel, StreamSpec
from hotwire.plan import (
    Adopt,
    Gate,
    Instruction,
    KeyRef,
    PEPlacement,
    Placement,
    Plan,
    Retire,
    Route,
    StartInstance,
    StopApp,
    Successor,
    Switch,
    Target,
    channel_id,
    parse_instance_id,
)

Edge = tuple[str, str]


def stream_channels(st: StreamSpec, pl: Placement, index: int) -> list[tuple[int, str]]:
    """``(dst index, channel id)`` of the channels out of instance ``index`` of ``st.src``."""
    src, dst = pl[st.src], pl[st.dst]
    sid = src.instance(st.src, index)
    if st.partition == "forward":
        js: Iterable[int] = [index] if index < dst.parallelism else []
    else:
        js = range(dst.parallelism)
    return [(j, channel_id(sid, dst.instance(st.dst, j))) for j in js]


def _route(st: StreamSpec, pl: Placement, index: int, key_bundle: str) -> Route:
    dst = pl[st.dst]
    targets = tuple(
        Target(ch, dst.instance(st.dst, j), dst.workers[j])
        for j, ch in stream_channels(st, pl, index)
    )
    key = KeyRef(key_bundle, st.src, st.dst) if st.partition == "key" else None
    canary = dst.canary.split if dst.canary and st.partition in ("key", "shuffle") else None
    return Route(st.dst, st.partition, targets, key, canary)


def _in_channels(st: StreamSpec, pl: Placement, index: int) -> list[str]:
    """Channel ids into instance ``index`` of ``st.dst``."""
    src, dst = pl[st.src], pl[st.dst]
    did = dst.instance(st.dst, index)
    if st.partition == "forward":
        iis: Iterable[int] = [index] if index < src.parallelism else []
    else:
        iis = range(src.parallelism)
    return [channel_id(src.instance(st.src, i), did) for i in iis]


def _edges_of(model: LogicalModel, pes: Iterable[str]) -> set[Edge]:
    g = model.graph
    out: set[Edge] = set()
    for pe in pes:
        if pe in g:
            out.update(g.in_edges(pe))
            out.update(g.out_edges(pe))
    return out


def plan_upgrade(
    app: str,
    version: int,
    old: LogicalModel,
    old_pl: Placement,
    new: LogicalModel,
    new_pl: Placement,
    change: ChangeSet,
    bundle: str | None = None,
    adopt_canary: bool = False,
) -> Plan:
    """The instructions that turn ``old`` on ``old_pl`` into ``new`` on ``new_pl``.

    ``bundle`` is the new version's bundle: the key functions of streams the
    upgrade adds or changes live there (even when no PE gets new instances).

    ``adopt_canary``: a keyed PE leaving a canary for ``first`` instances (a
    promote) starts each new instance with the old-code instances as its
    predecessors and adopts the canary's keys (``Adopt``): it runs once they
    handed over, holding only the canary's share until the canary's part is in.
    """
    added, removed, regen = set(change.pes_added), set(change.pes_removed), set(change.regenerated)
    # A renamed PE is replaced like a regenerated one: the new name's instances
    # start, the old name's retire and hand their state over to them.
    renames = change.renames
    new_pes = added | regen | set(renames.values())
    gone = removed | regen | set(renames)
    was = {n: o for o, n in renames.items()}  # new name -> old name
    changed_streams = {
        split_stream_name(s, old, new)
        for s in (*change.streams_added, *change.streams_removed, *change.streams_changed)
    }
    touched_old = _edges_of(old, gone | added) | {
        e for e in changed_streams if old.graph.has_edge(*e)
    }
    touched_new = _edges_of(new, new_pes | removed) | {
        e for e in changed_streams if new.graph.has_edge(*e)
    }
    stream_level = {split_stream_name(s, old, new) for s in change.streams_changed}
    new_bundles = {pe: new_pl[pe].bundle for pe in new_pes}

    version_bundle = bundle or next(iter(new_bundles.values()), None)

    def key_bundle(u: str, v: str, i: int) -> str:
        # A route into a new or regenerated receiver uses the new version's bundle,
        # so the sender partitions with exactly the function the receiver indexes
        # its state with (and a changed stream always regenerates its receiver).
        # A new stream into a kept receiver also has its key function there only;
        # an untouched kept stream keeps the one the sender already runs.
        if v in new_bundles:
            return new_bundles[v]
        if (u, v) in changed_streams and version_bundle is not None:
            return version_bundle
        return new_pl[u].bundle_of(i)

    prepare: dict[str, list[Instruction]] = defaultdict(list)
    switch: dict[str, list[Instruction]] = defaultdict(list)
    switches: dict[tuple[str, int], Switch] = {}  # (kept pe, index) -> its switch
    starts: dict[str, list[tuple[str, int, StartInstance]]] = defaultdict(list)
    adopts: dict[str, list[Instruction]] = defaultdict(list)

    # -- new instances ---------------------------------------------------------
    for pe in sorted(new_pes):
        spec, pl = new.pe(pe), new_pl[pe]
        in_streams = sorted(new.inputs(pe), key=lambda s: s.src)
        out_streams = sorted(new.outputs(pe), key=lambda s: s.dst)
        keyed_in = next((s.src for s in in_streams if s.partition == "key"), None)
        preds: tuple[str, ...] = ()
        adopted: tuple[str, ...] = ()
        if pe in regen or pe in was:
            old_name = was.get(pe, pe)
            opl = old_pl[old_name]
            preds = tuple(opl.instance(old_name, i) for i in range(opl.parallelism))
            c = opl.canary
            if (
                adopt_canary
                and c is not None
                and pl.canary is None
                and pl.parallelism == c.first
                and spec.keyed
                and old_name == pe
            ):
                preds, adopted = preds[: c.first], preds[c.first :]
        for i in range(pl.parallelism):
            code = pl.bundle_of(i)  # in a canary, instances canary.first.. run the new code
            in_canary = pl.canary is not None and i >= pl.canary.first
            ins = StartInstance(
                app=app,
                version=version,
                pe=pe,
                kind=spec.kind,
                gen=pl.gen,
                index=i,
                parallelism=pl.parallelism,
                bundle=code,
                inputs=tuple(sorted(c for s in in_streams for c in _in_channels(s, new_pl, i))),
                routes=tuple(_route(s, new_pl, i, code) for s in out_streams),
                predecessors=preds,
                input_key=None if keyed_in is None else KeyRef(code, keyed_in, pe),
                config=pl.canary.config if pl.canary is not None and in_canary else spec.config,
            )
            starts[pl.workers[i]].append((pe, i, ins))
            if adopted:
                split = old_pl[pe].canary
                assert split is not None
                adopts[pl.workers[i]].append(
                    Adopt(app, version, ins.instance, adopted, split.split)
                )

    # -- kept instances: gates and switches -------------------------------------
    kept_in: dict[str, set[Edge]] = defaultdict(lambda: set())
    kept_out: dict[str, set[Edge]] = defaultdict(lambda: set())
    for u, v in touched_old | touched_new:
        if u not in new_pes and u not in gone:
            kept_out[u].add((u, v))
        if v not in new_pes and v not in gone:
            kept_in[v].add((u, v))

    for pe in sorted(kept_in):
        pl = new_pl[pe]
        for i in range(pl.parallelism):
            before = {
                c
                for e in kept_in[pe]
                if e in touched_old
                for c in _in_channels(old.stream(*e), old_pl, i)
            }
            after = {
                c
                for e in kept_in[pe]
                if e in touched_new
                for c in _in_channels(new.stream(*e), new_pl, i)
            }
            if before != after:
                prepare[pl.workers[i]].append(
                    Gate(
                        app,
                        version,
                        pl.instance(pe, i),
                        tuple(sorted(after - before)),
                        tuple(sorted(before - after)),
                    )
                )

    for pe in sorted(kept_out):
        pl = new_pl[pe]
        edges = sorted(kept_out[pe])
        for i in range(pl.parallelism):
            old_routes = {
                v: _route(old.stream(u, v), old_pl, i, old_pl[u].bundle_of(i))
                for u, v in edges
                if (u, v) in touched_old
            }
            new_routes = {
                v: _route(new.stream(u, v), new_pl, i, key_bundle(u, v, i))
                for u, v in edges
                if (u, v) in touched_new
            }
            before = {t.channel for r in old_routes.values() for t in r.targets}
            after = {t.channel for r in new_routes.values() for t in r.targets}
            if old_routes == new_routes and not any(e in stream_level for e in edges):
                continue
            switches[pe, i] = Switch(
                app,
                version,
                pl.instance(pe, i),
                routes=tuple(new_routes[v] for v in sorted(new_routes)),
                unrouted=tuple(sorted(v for v in old_routes if not new.graph.has_edge(pe, v))),
                ended=tuple(sorted(before - after)),
            )

    # -- epochs: related switching PEs switch at one consistent cut ----------------
    switching = {pe for pe, _ in switches}
    epochs = _epochs(old, old_pl, new, new_pl, gone, switching)
    for pe, (after_epoch, epoch_out) in epochs.items():
        pl = new_pl[pe]
        for i in range(pl.parallelism):
            sw = switches.get((pe, i)) or Switch(app, version, pl.instance(pe, i), (), (), ())
            switches[pe, i] = dataclasses.replace(
                sw, after_epoch=after_epoch[i], epoch_out=epoch_out[i]
            )
    for (pe, i), sw in sorted(switches.items()):
        switch[new_pl[pe].workers[i]].append(sw)

    # -- retiring instances ------------------------------------------------------
    for pe in sorted(gone):
        opl = old_pl[pe]
        succ: tuple[Successor, ...] = ()
        new_name = renames.get(pe, pe)
        if pe in regen or pe in renames:
            npl = new_pl[new_name]
            succ = tuple(
                Successor(npl.instance(new_name, j), npl.workers[j]) for j in range(npl.parallelism)
            )
        keyed = (new if new_name in new.graph else old).pe(new_name).keyed
        # Keys go to the successors as the senders will route them (a canary's split
        # included); keys of a canary's instances were split by it, not by index.
        split = new_pl[new_name].canary if succ else None
        # Leaving a canary for a placement without one at its old-code instances'
        # count: instance i < first keeps exactly the keys new instance i owns.
        stay = 0
        if keyed and opl.canary is not None and split is None:
            stay = opl.canary.first if len(succ) == opl.canary.first else 0
        for i in range(opl.parallelism):
            switch[opl.workers[i]].append(
                Retire(
                    app,
                    version,
                    opl.instance(pe, i),
                    successors=succ,
                    keyed=keyed,
                    canary=split.split if split is not None else None,
                    rehash=opl.canary is not None,
                    same_index=i < stay,
                )
            )

    # -- order: new instances downstream first, then gates ------------------------
    if starts:
        # Only edges among new PEs order their start (a local target must exist first).
        sub = new.graph.subgraph({pe for pe, _, _ in (t for v in starts.values() for t in v)})
        rank = {pe: r for r, pe in enumerate(nx.lexicographical_topological_sort(sub))}
        for w, items in starts.items():
            items.sort(key=lambda t: (-rank[t[0]], t[0], t[1]))
            prepare[w][:0] = [ins for _, _, ins in items]
    for w, ads in adopts.items():
        prepare[w].extend(ads)  # after the instance they go to is built

    return Plan(
        app=app,
        version=version,
        prepare={w: tuple(prepare[w]) for w in sorted(prepare) if prepare[w]},
        switch={w: tuple(switch[w]) for w in sorted(switch) if switch[w]},
    )


def canary_abort_placement(old_pl: Placement, pe: str) -> Placement:
    """``old_pl`` with ``pe``'s canary instances gone: its old-code instances
    ``0..first-1`` keep their generation, workers and ids."""
    pl = old_pl[pe]
    if pl.canary is None:
        raise ValueError(f"PE {pe!r} runs no canary")
    return {**old_pl, pe: PEPlacement(pl.gen, pl.bundle, pl.workers[: pl.canary.first])}


def plan_canary_abort(
    app: str, version: int, model: LogicalModel, old_pl: Placement, pe: str
) -> Plan:
    """End ``pe``'s canary by moving only the canary's keys back: the old-code
    instances keep running (no ``StartInstance``, no ``Retire``); each takes over
    its keys of the canary's state while it runs (``Adopt``, prepare), the senders
    into ``pe`` route by the plain partition again and end their channels to the
    canary's instances (``Switch``), and the canary's instances retire, splitting
    their state by ``key_partition(key, first)`` (``Retire``).

    The instructions of the running instances outside ``pe``'s senders, and ``pe``'s
    downstream (the canary's output channels end when it retires), do not change.
    """
    opl = old_pl[pe]
    c = opl.canary
    if c is None:
        raise ValueError(f"app {app!r}: PE {pe!r} runs no canary")
    new_pl = canary_abort_placement(old_pl, pe)
    npl = new_pl[pe]
    keyed = model.pe(pe).keyed
    prepare: dict[str, list[Instruction]] = defaultdict(list)
    switch: dict[str, list[Instruction]] = defaultdict(list)
    canaries = tuple(opl.instance(pe, k) for k in range(c.first, opl.parallelism))
    for j in range(c.first):
        prepare[npl.workers[j]].append(Adopt(app, version, npl.instance(pe, j), canaries, c.split))
    switches: dict[tuple[str, int], Switch] = {}
    for st in sorted(model.inputs(pe), key=lambda s: s.src):
        u = st.src
        upl = old_pl[u]
        for i in range(upl.parallelism):
            before = {ch for _, ch in stream_channels(st, old_pl, i)}
            after = {ch for _, ch in stream_channels(st, new_pl, i)}
            route = _route(st, new_pl, i, npl.bundle)  # as the canary's start routed
            sw = switches.get((u, i)) or Switch(app, version, upl.instance(u, i), (), (), ())
            switches[u, i] = dataclasses.replace(
                sw,
                routes=(*sw.routes, route),
                ended=tuple(sorted({*sw.ended, *(before - after)})),
            )
    epochs = _epochs(model, old_pl, model, new_pl, set(), {u for u, _ in switches})
    for u, (after_epoch, epoch_out) in epochs.items():
        upl = new_pl[u]
        for i in range(upl.parallelism):
            sw = switches.get((u, i)) or Switch(app, version, upl.instance(u, i), (), (), ())
            switches[u, i] = dataclasses.replace(
                sw, after_epoch=after_epoch[i], epoch_out=epoch_out[i]
            )
    for (u, i), sw in sorted(switches.items()):
        switch[new_pl[u].workers[i]].append(sw)
    succ = tuple(Successor(npl.instance(pe, j), npl.workers[j]) for j in range(c.first))
    for k in range(c.first, opl.parallelism):
        switch[opl.workers[k]].append(
            Retire(app, version, opl.instance(pe, k), successors=succ, keyed=keyed, rehash=True)
        )
    return Plan(
        app=app,
        version=version,
        prepare={w: tuple(prepare[w]) for w in sorted(prepare)},
        switch={w: tuple(switch[w]) for w in sorted(switch)},
    )


def _epochs(
    old: LogicalModel,
    old_pl: Placement,
    new: LogicalModel,
    new_pl: Placement,
    gone: set[str],
    switching: set[str],
) -> dict[str, tuple[list[tuple[str, ...]], list[tuple[str, ...]]]]:
    """Per kept PE that switches on epochs: ``after_epoch`` and ``epoch_out`` of each
    of its instances (by index). Empty when the switching PEs are unrelated.

    Only the kept ancestors of the switching PEs are walked, so the cost follows
    the change's upstream, not the whole app.
    """
    if len(switching) < 2:
        return {}
    g = old.graph

    def kept_preds(pe: str) -> list[str]:
        return [u for u in g.predecessors(pe) if u not in gone and u in new_pl]

    ancestors: dict[str, set[str]] = {}
    for x in switching:
        seen: set[str] = set()
        todo = kept_preds(x)
        while todo:
            u = todo.pop()
            if u not in seen:
                seen.add(u)
                todo.extend(kept_preds(u))
        ancestors[x] = seen
    coordinated = {
        x
        for x in switching
        for y in switching
        if x != y and (y in ancestors[x] or x in ancestors[y] or ancestors[x] & ancestors[y])
    }
    if not coordinated:
        return {}
    # Every kept ancestor lies on a path from a root of the kept subgraph (a PE
    # without kept inputs: a source, or one fed only by PEs that go) to a member.
    members = set(coordinated).union(*(ancestors[x] for x in coordinated))

    def surviving(u: str, v: str, index: int, inputs: bool) -> set[str]:
        """Channels of the kept stream u -> v at instance ``index`` of v (inputs) or
        u (outputs) present both before and after the upgrade."""
        if not new.graph.has_edge(u, v):
            return set()
        if inputs:
            return set(_in_channels(old.stream(u, v), old_pl, index)) & set(
                _in_channels(new.stream(u, v), new_pl, index)
            )
        return {c for _, c in stream_channels(old.stream(u, v), old_pl, index)} & {
            c for _, c in stream_channels(new.stream(u, v), new_pl, index)
        }

    out: dict[str, tuple[list[tuple[str, ...]], list[tuple[str, ...]]]] = {}
    for pe in sorted(members):
        pl: PEPlacement = new_pl[pe]
        ins = [u for u in g.predecessors(pe) if u in members]
        outs = [v for v in g.successors(pe) if v in members]
        out[pe] = (
            [
                tuple(sorted(set().union(*(surviving(u, pe, i, True) for u in ins))))
                for i in range(pl.parallelism)
            ],
            [
                tuple(sorted(set().union(*(surviving(pe, v, i, False) for v in outs))))
                for i in range(pl.parallelism)
            ],
        )
    return out


def plan_stop(app: str, version: int, placement: Placement) -> dict[str, tuple[StopApp]]:
    """One ``StopApp`` for every worker that hosts an instance of the app."""
    workers = {w for pl in placement.values() for w in pl.workers}
    return {w: (StopApp(app, version),) for w in sorted(workers)}


@dataclass(frozen=True)
class StateMove:
    """The state of PE ``src`` in a plan: handed to ``dst``'s instances, or dropped
    (``dst`` empty). ``size`` is its bytes at the last checkpoint, None when unknown.
    """

    src: str
    dst: str
    from_instances: int
    to_instances: int
    keyed: bool
    size: int | None = None

    @property
    def dropped(self) -> bool:
        return not self.dst

    def describe(self) -> str:
        """E.g. ``"state of 'count' (2 instance(s), 120 bytes at the last checkpoint)
        -> 'tally' (3 instance(s)), split by key"``."""
        held = "size unknown" if self.size is None else f"{self.size} bytes at the last checkpoint"
        what = f"state of {self.src!r} ({self.from_instances} instance(s), {held})"
        if self.dropped:
            return f"{what}: dropped"
        how = "split by key" if self.keyed else "by instance"
        return f"{what} -> {self.dst!r} ({self.to_instances} instance(s)), {how}"

    def to_dict(self) -> dict[str, object]:
        return {
            "from": self.src,
            "to": self.dst or None,
            "from_instances": self.from_instances,
            "to_instances": self.to_instances,
            "split": "by key" if self.keyed else "by instance",
            "bytes": self.size,
        }


def state_moves(
    plan: Plan, old: LogicalModel, sizes: dict[str, int] | None = None
) -> list[StateMove]:
    """Where the state of every retiring instance goes, by PE, from the plan's
    ``Retire`` instructions.

    Listed: PEs of a :data:`~hotwire.model.STATEFUL_KINDS` kind, and any other PE
    whose instances held state at the checkpoint ``sizes`` comes from (``{instance
    id: bytes of its state}``; a stateless instance counts 0).
    """
    sizes = sizes or {}
    retiring: dict[str, list[Retire]] = defaultdict(list)
    for batch in plan.switch.values():
        for ins in batch:
            if isinstance(ins, Retire):
                retiring[parse_instance_id(ins.instance)[0]].append(ins)
    moves = []
    for pe in sorted(retiring):
        rets = retiring[pe]
        known = [sizes.get(r.instance) for r in rets]
        size = None if any(b is None for b in known) else sum(b or 0 for b in known)
        if pe in old.graph and old.pe(pe).kind not in STATEFUL_KINDS and not size:
            continue
        succ = rets[0].successors
        dst = parse_instance_id(succ[0].instance)[0] if succ else ""
        moves.append(StateMove(pe, dst, len(rets), len(succ), rets[0].keyed, size))
    return moves
