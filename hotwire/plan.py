"""Physical placement and the instructions the master sends to workers.

Pure data, shared by the planner (master) and the executor (worker). Every
instruction is a frozen, comparable dataclass that round-trips through
:func:`to_wire` / :func:`from_wire` (msgpack-able dicts), so the planner is
tested without a network and the worker performs exactly what was planned.

Identities
----------
* A PE's instances belong to a *generation* ``gen``: the app version at which
  they were created. A PE keeps its generation across upgrades that do not touch
  it; a change of code, config or parallelism (or of its keyed input stream)
  gives it a new generation, whose instances succeed the old ones.
* Instance id: ``"{pe}@{gen}.{index}"`` (unique within an app).
* Channel id: ``"{src_instance}>{dst_instance}"``; a channel is kept by an
  upgrade exactly when both of its ends are kept.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, fields
from typing import Any

import msgpack


def instance_id(pe: str, gen: int, index: int) -> str:
    return f"{pe}@{gen}.{index}"


def parse_instance_id(iid: str) -> tuple[str, int, int]:
    pe, rest = iid.rsplit("@", 1)
    gen, index = rest.split(".")
    return pe, int(gen), int(index)


def channel_id(src_iid: str, dst_iid: str) -> str:
    return f"{src_iid}>{dst_iid}"


pack_key = msgpack.Packer(use_bin_type=True).pack  # 5x faster than msgpack.packb per call


CANARY_BUCKETS = 10_000  # a canary's share is counted in basis points of the key space
# What a worker's refusal of an Adopt says (the master then plans without one).
ADOPT_REFUSED = "cannot take a canary's keys in while it runs"


@dataclass(frozen=True)
class CanarySplit:
    """How a PE in a canary splits its keys: instances ``first..n-1`` run the new
    code and own the keys whose bucket (``crc32 % CANARY_BUCKETS``) is below
    ``share``; instances ``0..first-1`` run the old code and own the others."""

    share: int  # basis points (1000 = 10%)
    first: int


def canary_index(h: int, n: int, canary: CanarySplit) -> int:
    """The instance (0..n-1) of a canary-split PE that owns a key of hash ``h``."""
    if h % CANARY_BUCKETS < canary.share:
        return canary.first + h % (n - canary.first)
    return h % canary.first


def key_partition(key: Any, n: int, canary: CanarySplit | None = None) -> int:
    """The index (0..n-1) of the instance that owns ``key``: stable across processes.

    With ``canary``, keys in the canary's share go to the canary's instances
    (:func:`canary_index`). Called on the event loop's thread only (the shared
    packer is not thread-safe).
    """
    if canary is not None:
        return canary_index(zlib.crc32(pack_key(key)), n, canary)
    if n == 1:
        return 0
    return zlib.crc32(pack_key(key)) % n


# ---------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Canary:
    """The new code of a PE in a canary: its instances ``first..`` run ``bundle``
    with ``config`` and own the keys (or batches) in ``share`` basis points."""

    share: int
    first: int
    bundle: str
    config: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def split(self) -> CanarySplit:
        return CanarySplit(self.share, self.first)


@dataclass(frozen=True)
class PEPlacement:
    """Where a PE's instances run: ``workers[i]`` hosts instance ``i``.

    In a canary, instances ``canary.first`` and up run the canary's bundle.
    """

    gen: int
    bundle: str  # content hash of the bundle whose code the instances run
    workers: tuple[str, ...]
    canary: Canary | None = None

    def bundle_of(self, index: int) -> str:
        c = self.canary
        return c.bundle if c is not None and index >= c.first else self.bundle

    @property
    def parallelism(self) -> int:
        return len(self.workers)

    def instance(self, pe: str, index: int) -> str:
        return instance_id(pe, self.gen, index)


Placement = dict[str, PEPlacement]  # pe name -> placement


def placement_to_dict(p: Placement) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pe, pl in p.items():
        out[pe] = {"gen": pl.gen, "bundle": pl.bundle, "workers": list(pl.workers)}
        if (c := pl.canary) is not None:
            out[pe]["canary"] = {
                "share": c.share,
                "first": c.first,
                "bundle": c.bundle,
                "config": dict(c.config),
            }
    return out


def placement_from_dict(d: dict[str, Any]) -> Placement:
    out: Placement = {}
    for pe, v in d.items():
        c = v.get("canary")
        canary = (
            None
            if c is None
            else Canary(int(c["share"]), int(c["first"]), str(c["bundle"]), dict(c["config"]))
        )
        out[pe] = PEPlacement(int(v["gen"]), str(v["bundle"]), tuple(v["workers"]), canary)
    return out


# ---------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One channel out of an instance, to instance ``instance`` on worker ``worker``."""

    channel: str
    instance: str
    worker: str


@dataclass(frozen=True)
class KeyRef:
    """Where a key function lives: the stream ``src -> dst`` of the app in ``bundle``."""

    bundle: str
    src: str
    dst: str


@dataclass(frozen=True)
class Route:
    """An instance's output stream to PE ``dst_pe``.

    ``targets`` are ordered by the destination's instance index. ``shuffle`` deals
    batches round-robin, ``key`` sends a record to ``targets[key_partition(key, n)]``,
    ``broadcast`` to all, ``forward`` to the one target. With ``canary`` (the
    destination is in a canary), ``key`` sends by ``key_partition(key, n, canary)``
    and ``shuffle`` deals ``canary.share`` basis points of the batches round-robin
    to the canary's targets and the rest to the others.
    """

    dst_pe: str
    partition: str
    targets: tuple[Target, ...]
    key: KeyRef | None = None
    canary: CanarySplit | None = None


# ---------------------------------------------------------------------------
# Instructions
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StartInstance:
    """PREPARE: load ``bundle``, build the instance and run its ``setup``.

    It reads from ``inputs`` (channel ids). When ``predecessors`` is non-empty it
    processes nothing until each predecessor has handed over its state (possibly
    empty); a source emits nothing until then. ``input_key`` is the key function of
    a keyed PE's input stream, used to index keyed state.
    """

    app: str
    version: int
    pe: str
    kind: str
    gen: int
    index: int
    parallelism: int
    bundle: str
    inputs: tuple[str, ...]
    routes: tuple[Route, ...]
    predecessors: tuple[str, ...] = ()
    input_key: KeyRef | None = None
    config: dict[str, Any] = field(default_factory=dict, hash=False)
    initial_state: Any = field(default=None, hash=False, compare=False)  # from a checkpoint
    # A sample of the last checkpoint's state this instance will take over, in the
    # form ``initial_state`` has: prepare tries the new code's migrate, validate_state
    # and restore on it (on an object of its own) and fails the upgrade if they raise.
    state_check: Any = field(default=None, hash=False, compare=False)
    # Started outside a user's request (a restart from a checkpoint, a drain): a
    # transactional sink whose server is unreachable waits for it once the instance
    # runs, instead of failing prepare (which refuses a submit or an upgrade).
    wait_for_servers: bool = field(default=False, hash=False, compare=False)

    @property
    def instance(self) -> str:
        return instance_id(self.pe, self.gen, self.index)


@dataclass(frozen=True)
class Gate:
    """PREPARE: a kept instance gains ``appearing`` input channels and loses
    ``disappearing`` ones. It reads nothing from an appearing channel until every
    disappearing channel has delivered its end marker.
    """

    app: str
    version: int
    instance: str
    appearing: tuple[str, ...]
    disappearing: tuple[str, ...]


@dataclass(frozen=True)
class Adopt:
    """PREPARE: a keyed instance will take over the keys of ``predecessors`` (a
    canary's instances, retiring in this transition) while it runs: a kept
    old-code instance at the canary's abort, a new instance at its promote (which
    merges after it restored its ``StartInstance.predecessors``' state).

    From now on it holds every input record whose key lies in ``split``'s share
    (``crc32 % CANARY_BUCKETS < split.share``) and processes the others at once;
    once every predecessor's state has arrived it merges it into its own
    (``merge`` of a class PE, the runtime's dict for a ``reduce``), processes the
    input the predecessors held unprocessed, then the records it held, in order
    per channel. A checkpoint barrier that arrives meanwhile waits for the merge.
    A worker refuses it in prepare when the PE cannot merge state.
    """

    app: str
    version: int
    instance: str
    predecessors: tuple[str, ...]
    split: CanarySplit


@dataclass(frozen=True)
class Switch:
    """SWITCH: at its next batch boundary a kept instance sends an end marker on each
    channel in ``ended``, then replaces its routes to the PEs in ``routes`` (by
    ``dst_pe``) and drops the routes to the PEs in ``unrouted``.

    When several kept PEs switch and one feeds the other (or both are fed by a
    common upstream), they must switch at one consistent cut of the stream:
    ``after_epoch`` lists input channels on which this version's epoch marker must
    arrive before the switch applies (channels that delivered it are held until
    all have: aligned like checkpoint barriers), and ``epoch_out`` lists kept
    output channels on which the instance sends the epoch marker right after it
    switched. An instance with nothing to change but a place on such a path gets
    a Switch with only these two fields set.
    """

    app: str
    version: int
    instance: str
    routes: tuple[Route, ...]
    unrouted: tuple[str, ...]
    ended: tuple[str, ...]
    after_epoch: tuple[str, ...] = ()
    epoch_out: tuple[str, ...] = ()


@dataclass(frozen=True)
class Successor:
    instance: str
    worker: str


@dataclass(frozen=True)
class Retire:
    """SWITCH: the instance goes on until every input channel has delivered its end
    marker (a source stops at its next batch boundary), then flushes, sends an end
    marker on every output channel, hands its state to ``successors`` and exits.

    State split: when ``keyed``, each key's state goes to
    ``successors[key_partition(key, len(successors), canary)]``; otherwise the whole
    state goes to ``successors[index % len(successors)]``. Every successor receives
    one handover from every predecessor, empty or not. ``rehash``: the instance's
    keys were not split by ``key_partition`` over its own PE's parallelism (it runs
    in a canary), so even with as many successors as instances every key is
    split anew. ``same_index``: every key of the instance belongs to
    ``successors[index]``, so its state goes there whole, without hashing a key
    (an old-code instance ``i`` of a canary owns keys with ``crc32 % first == i``,
    which a placement of ``first`` instances without the canary gives to ``i``).
    """

    app: str
    version: int
    instance: str
    successors: tuple[Successor, ...]
    keyed: bool = False
    canary: CanarySplit | None = None
    rehash: bool = False
    same_index: bool = False


@dataclass(frozen=True)
class StopApp:
    """Stop every instance of ``app`` on the worker now (``streamctl kill``)."""

    app: str
    version: int


Instruction = StartInstance | Gate | Adopt | Switch | Retire | StopApp

INSTRUCTION_TYPES: dict[str, type] = {
    t.__name__: t for t in (StartInstance, Gate, Adopt, Switch, Retire, StopApp)
}


@dataclass(frozen=True)
class Plan:
    """Instructions grouped by phase and worker.

    ``prepare`` runs everywhere and is acknowledged before anything in ``switch``
    is sent; a failed prepare is undone with an abort and nothing else changes.
    """

    app: str
    version: int
    prepare: dict[str, tuple[Instruction, ...]]  # worker -> instructions
    switch: dict[str, tuple[Instruction, ...]]

    @property
    def workers(self) -> set[str]:
        return set(self.prepare) | set(self.switch)

    def describe(self) -> list[str]:
        """One human line per instruction, by phase and worker."""
        lines: list[str] = []
        for phase, batches in (("prepare", self.prepare), ("switch", self.switch)):
            for worker in sorted(batches):
                for ins in batches[worker]:
                    lines.append(f"{phase:<7} {worker}: {_describe(ins)}")
        return lines

    def count(self) -> int:
        return sum(len(v) for v in self.prepare.values()) + sum(
            len(v) for v in self.switch.values()
        )


def _describe(ins: Instruction) -> str:
    if isinstance(ins, StartInstance):
        extra = f", after state of {len(ins.predecessors)}" if ins.predecessors else ""
        return (
            f"start {ins.instance} ({ins.kind}, {len(ins.inputs)} inputs, "
            f"{len(ins.routes)} outputs{extra})"
        )
    if isinstance(ins, Gate):
        return (
            f"gate {ins.instance}: hold {len(ins.appearing)} new input(s) until "
            f"{len(ins.disappearing)} old one(s) end"
        )
    if isinstance(ins, Adopt):
        return (
            f"adopt {ins.instance}: hold keys of the {ins.split.share / 100:g}% share until "
            f"the state of {len(ins.predecessors)} is merged"
        )
    if isinstance(ins, Switch):
        parts = []
        if ins.after_epoch:
            parts.append(f"wait for the epoch marker on {len(ins.after_epoch)} input(s)")
        if ins.ended:
            parts.append(f"end {len(ins.ended)} channel(s)")
        if ins.routes:
            parts.append(f"route to {', '.join(r.dst_pe for r in ins.routes)}")
        if ins.unrouted:
            parts.append(f"stop routing to {', '.join(ins.unrouted)}")
        if ins.epoch_out:
            parts.append(f"send the epoch marker on {len(ins.epoch_out)} channel(s)")
        return f"switch {ins.instance}: {'; '.join(parts) or 'nothing'}"
    if isinstance(ins, Retire):
        to = f" -> state to {len(ins.successors)}" if ins.successors else ""
        return f"retire {ins.instance}{to}"
    return f"stop app {ins.app}"


# ---------------------------------------------------------------------------
# Wire form
# ---------------------------------------------------------------------------


def _enc(v: Any) -> Any:
    if isinstance(v, (Route, Target, KeyRef, Successor, CanarySplit)):
        return {f.name: _enc(getattr(v, f.name)) for f in fields(v)}
    if isinstance(v, tuple):
        return [_enc(x) for x in v]
    return v


def to_wire(ins: Instruction) -> dict[str, Any]:
    d = {f.name: _enc(getattr(ins, f.name)) for f in fields(ins)}
    d["type"] = type(ins).__name__
    return d


def _target(d: dict[str, Any]) -> Target:
    return Target(**d)


def _keyref(d: dict[str, Any] | None) -> KeyRef | None:
    return None if d is None else KeyRef(**d)


def _route(d: dict[str, Any]) -> Route:
    return Route(
        dst_pe=d["dst_pe"],
        partition=d["partition"],
        targets=tuple(_target(t) for t in d["targets"]),
        key=_keyref(d.get("key")),
        canary=_split(d.get("canary")),
    )


def _split(d: dict[str, Any] | None) -> CanarySplit | None:
    return None if d is None else CanarySplit(**d)


def from_wire(d: dict[str, Any]) -> Instruction:
    d = dict(d)
    cls = INSTRUCTION_TYPES[d.pop("type")]
    if cls is StartInstance:
        d["inputs"] = tuple(d["inputs"])
        d["routes"] = tuple(_route(r) for r in d["routes"])
        d["predecessors"] = tuple(d["predecessors"])
        d["input_key"] = _keyref(d.get("input_key"))
    elif cls is Gate:
        d["appearing"] = tuple(d["appearing"])
        d["disappearing"] = tuple(d["disappearing"])
    elif cls is Adopt:
        d["predecessors"] = tuple(d["predecessors"])
        d["split"] = CanarySplit(**d["split"])
    elif cls is Switch:
        d["routes"] = tuple(_route(r) for r in d["routes"])
        d["unrouted"] = tuple(d["unrouted"])
        d["ended"] = tuple(d["ended"])
        d["after_epoch"] = tuple(d.get("after_epoch", ()))
        d["epoch_out"] = tuple(d.get("epoch_out", ()))
    elif cls is Retire:
        d["successors"] = tuple(Successor(**s) for s in d["successors"])
        d["canary"] = _split(d.get("canary"))
    result: Instruction = cls(**d)
    return result
