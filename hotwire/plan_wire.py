"""Instructions (:mod:`hotwire.plan`) as typed protobuf messages and back.

The master sends every instruction as a ``hotwire.v1.Instruction`` (a oneof of
the instruction kinds), so a worker of another version names what it cannot
read instead of misreading it. Values that are user data, a PE's config and the
states a restart restores, travel as msgpack inside the message.
"""

from __future__ import annotations

from typing import Any

from hotwire.codec import packb, unpackb
from hotwire.plan import (
    Adopt,
    CanarySplit,
    Gate,
    Instruction,
    KeyRef,
    Retire,
    Route,
    StartInstance,
    StopApp,
    Successor,
    Switch,
    Target,
)
from hotwire.proto import hotwire_pb2 as pb

__all__ = ["WireError", "from_pb", "to_pb"]


class WireError(ValueError):
    """An instruction this worker cannot read (a master of another version?)."""


def _keyref(k: KeyRef | None) -> pb.KeyRef | None:
    return None if k is None else pb.KeyRef(bundle=k.bundle, src=k.src, dst=k.dst)


def _route(r: Route) -> pb.Route:
    return pb.Route(
        dst_pe=r.dst_pe,
        partition=r.partition,
        targets=[
            pb.Target(channel=t.channel, instance=t.instance, worker=t.worker) for t in r.targets
        ],
        key=_keyref(r.key),
        canary=_split(r.canary),
    )


def _split(c: CanarySplit | None) -> pb.CanarySplit | None:
    return None if c is None else pb.CanarySplit(share=c.share, first=c.first)


def _from_split(msg: Any, present: bool) -> CanarySplit | None:
    return CanarySplit(msg.share, msg.first) if present else None


def to_pb(ins: Instruction) -> pb.Instruction:
    """The message for ``ins``."""
    if isinstance(ins, StartInstance):
        return pb.Instruction(
            start=pb.StartInstance(
                app=ins.app,
                version=ins.version,
                pe=ins.pe,
                kind=ins.kind,
                gen=ins.gen,
                index=ins.index,
                parallelism=ins.parallelism,
                bundle=ins.bundle,
                inputs=ins.inputs,
                routes=[_route(r) for r in ins.routes],
                predecessors=ins.predecessors,
                input_key=_keyref(ins.input_key),
                config=packb(dict(ins.config)),
                initial_state=b"" if ins.initial_state is None else packb(ins.initial_state),
                state_check=b"" if ins.state_check is None else packb(ins.state_check),
                wait_for_servers=ins.wait_for_servers,
            )
        )
    if isinstance(ins, Gate):
        return pb.Instruction(
            gate=pb.Gate(
                app=ins.app,
                version=ins.version,
                instance=ins.instance,
                appearing=ins.appearing,
                disappearing=ins.disappearing,
            )
        )
    if isinstance(ins, Adopt):
        return pb.Instruction(
            adopt=pb.Adopt(
                app=ins.app,
                version=ins.version,
                instance=ins.instance,
                predecessors=ins.predecessors,
                split=_split(ins.split),
            )
        )
    if isinstance(ins, Switch):
        return pb.Instruction(
            switch=pb.Switch(
                app=ins.app,
                version=ins.version,
                instance=ins.instance,
                routes=[_route(r) for r in ins.routes],
                unrouted=ins.unrouted,
                ended=ins.ended,
                after_epoch=ins.after_epoch,
                epoch_out=ins.epoch_out,
            )
        )
    if isinstance(ins, Retire):
        return pb.Instruction(
            retire=pb.Retire(
                app=ins.app,
                version=ins.version,
                instance=ins.instance,
                successors=[
                    pb.Successor(instance=s.instance, worker=s.worker) for s in ins.successors
                ],
                keyed=ins.keyed,
                canary=_split(ins.canary),
                rehash=ins.rehash,
                same_index=ins.same_index,
            )
        )
    if isinstance(ins, StopApp):
        return pb.Instruction(stop=pb.StopApp(app=ins.app, version=ins.version))
    raise TypeError(f"not an instruction: {ins!r}")


def _from_keyref(msg: Any, present: bool) -> KeyRef | None:
    return KeyRef(msg.bundle, msg.src, msg.dst) if present else None


def _from_route(r: pb.Route) -> Route:
    return Route(
        dst_pe=r.dst_pe,
        partition=r.partition,
        targets=tuple(Target(t.channel, t.instance, t.worker) for t in r.targets),
        key=_from_keyref(r.key, r.HasField("key")),
        canary=_from_split(r.canary, r.HasField("canary")),
    )


def from_pb(msg: pb.Instruction) -> Instruction:
    """The instruction in ``msg``; :class:`WireError` when it holds none this worker knows."""
    kind = msg.WhichOneof("kind")
    if kind == "start":
        m = msg.start
        return StartInstance(
            app=m.app,
            version=m.version,
            pe=m.pe,
            kind=m.kind,
            gen=m.gen,
            index=m.index,
            parallelism=m.parallelism,
            bundle=m.bundle,
            inputs=tuple(m.inputs),
            routes=tuple(_from_route(r) for r in m.routes),
            predecessors=tuple(m.predecessors),
            input_key=_from_keyref(m.input_key, m.HasField("input_key")),
            config=unpackb(m.config) if m.config else {},
            initial_state=unpackb(m.initial_state) if m.initial_state else None,
            state_check=unpackb(m.state_check) if m.state_check else None,
            wait_for_servers=m.wait_for_servers,
        )
    if kind == "gate":
        g = msg.gate
        return Gate(g.app, g.version, g.instance, tuple(g.appearing), tuple(g.disappearing))
    if kind == "adopt":
        a = msg.adopt
        return Adopt(
            a.app,
            a.version,
            a.instance,
            tuple(a.predecessors),
            CanarySplit(a.split.share, a.split.first),
        )
    if kind == "switch":
        s = msg.switch
        return Switch(
            app=s.app,
            version=s.version,
            instance=s.instance,
            routes=tuple(_from_route(r) for r in s.routes),
            unrouted=tuple(s.unrouted),
            ended=tuple(s.ended),
            after_epoch=tuple(s.after_epoch),
            epoch_out=tuple(s.epoch_out),
        )
    if kind == "retire":
        r = msg.retire
        return Retire(
            app=r.app,
            version=r.version,
            instance=r.instance,
            successors=tuple(Successor(s.instance, s.worker) for s in r.successors),
            keyed=r.keyed,
            canary=_from_split(r.canary, r.HasField("canary")),
            rehash=r.rehash,
            same_index=r.same_index,
        )
    if kind == "stop":
        return StopApp(msg.stop.app, msg.stop.version)
    raise WireError(
        "an instruction of a kind this worker does not know (its fields: "
        f"{[f.name for f, _ in msg.ListFields()] or 'none known'}); the master may run "
        "a newer hotwire: run the same version on master and workers"
    )
