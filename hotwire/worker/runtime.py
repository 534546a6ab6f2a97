"""The worker's runtime: its PE instances, their channels, and the instructions it performs.

:class:`Runtime` performs the phases of the upgrade protocol (``hotwire.plan``):
``prepare`` builds new instances (bundle loaded, PE built, ``setup`` run, channels
connected) and installs gates, and undoes all of it if anything fails;
``switch`` activates what prepare built and delivers switch and retire items to
the instances' inboxes; ``abort`` drops a prepare; ``stop`` ends an app. It is
also the data plane's receiver, routing decoded frames to instance inboxes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotwire.pe.eventtime import JoinExecutor, TimestampExecutor, WindowExecutor
from hotwire.pe.executors import (
    EXECUTORS,
    Executor,
    ProcessExecutor,
    StateCheckError,
    TransactionalSinkExecutor,
)
from hotwire.plan import Adopt, Gate, Instruction, KeyRef, Retire, Route, StartInstance, Switch
from hotwire.sdk.bundle import load_bundle, unload_bundle
from hotwire.worker.channels import (
    BARRIER,
    CONTROL,
    END,
    EPOCH,
    STATE,
    LocalChannel,
    OutChannel,
    RemoteChannel,
    RouteState,
)
from hotwire.worker.channels import BATCH as _BATCH
from hotwire.worker.fence import OutputHold
from hotwire.worker.instance import Checkpoint, CheckpointDone, HandedOver, Instance
from hotwire.worker.transport import LINK_TIMEOUT_S, DataPlane, InStream, Stamp

log = logging.getLogger(__name__)

SWITCH_TIMEOUT_S = 60.0
KEEP_SWITCHES = 4
KEEP_BUNDLES = 2  # newest bundles kept even when nothing uses them
# After a preload (LOAD): more kept, so that loads of other apps' upgrades arriving
# while one prepares do not drop the bundle it is about to use.
KEEP_LOADED = 8


class PrepareError(Exception):
    """A prepare failed; the message says which PE, instance and why."""


class SwitchTimeout(Exception):
    """A switch did not settle in time; the message says what it still waits for."""


@dataclass
class _Switching:
    """A delivered switch: what it waits for, with a label for each."""

    gated: list[Instance] = field(default_factory=list)
    waits: list[asyncio.Future[Any]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    handed: dict[str, HandedOver] = field(default_factory=dict)  # by PE

    def add(self, fut: asyncio.Future[Any], label: str) -> None:
        self.waits.append(fut)
        self.labels.append(label)


@dataclass
class Prepared:
    instances: list[Instance] = field(default_factory=list)
    gated: list[Instance] = field(default_factory=list)


class Runtime:
    def __init__(self, name: str, bundle_dir: Path, link_timeout: float = LINK_TIMEOUT_S):
        self.name = name
        self.bundle_dir = bundle_dir
        self.dead_letter_dir = bundle_dir.parent / "dead-letter"  # PEs with on_error="dead_letter"
        self.dataplane = DataPlane(name, self, link_timeout)
        self.instances: dict[tuple[str, str], Instance] = {}
        self.in_channels: dict[tuple[str, str], Instance] = {}
        self.out_channels: dict[tuple[str, str], OutChannel] = {}
        self.bundles: dict[str, bytes] = {}
        self.prepared: dict[tuple[str, int], Prepared] = {}
        self.switches: dict[tuple[str, int], _Switching] = {}
        self.drops: Counter[str] = self.dataplane.drops
        self.hold = OutputHold(name)  # sources and sinks wait while the master may have fenced us
        # Called with (app, checkpoint id, instance id, its state as msgpack) when an
        # instance snapshots.
        self.on_checkpoint: Callable[[str, int, str, bytes], None] = lambda *a: None
        # State handovers made here, by (app, "local" | "remote"): how many, and their
        # bytes (hotwire.metrics): to another worker the frames' (state and held input),
        # on this one the state's as msgpack (the instance counts it).
        self.handovers: Counter[tuple[str, str]] = Counter()
        self.handover_bytes: Counter[tuple[str, str]] = Counter()
        # Whether this worker's sources stamp their batches with the time they emit
        # them, for the sinks' end-to-end latency (on with --metrics; see Stamp).
        self.stamp = False

    # ------------------------------------------------------------------
    # Data plane receiver
    # ------------------------------------------------------------------
    def on_batch(self, app: str, channel: str, records: list[Any], ret: InStream | Stamp) -> bool:
        inst = self.in_channels.get((app, channel))
        if inst is None or not isinstance(records, list):
            return False
        inst.inbox.put_nowait((_BATCH, channel, records, ret))
        return True

    def on_end(self, app: str, channel: str) -> bool:
        inst = self.in_channels.get((app, channel))
        if inst is None:
            return False
        inst.inbox.put_nowait((END, channel, None, None))
        return True

    def on_state(
        self, app: str, dst: str, src: str, state: Any, pending: list[Any] | None = None
    ) -> bool:
        inst = self.instances.get((app, dst))
        if inst is None or not isinstance(pending, list | None):
            return False
        inst.inbox.put_nowait((STATE, src, (state, pending or []), None))
        return True

    def on_epoch(self, app: str, channel: str, version: int) -> bool:
        inst = self.in_channels.get((app, channel))
        if inst is None:
            return False
        inst.inbox.put_nowait((EPOCH, channel, version, None))
        return True

    def on_barrier(self, app: str, channel: str, checkpoint: int) -> bool:
        inst = self.in_channels.get((app, channel))
        if inst is None:
            return False
        inst.inbox.put_nowait((BARRIER, channel, checkpoint, None))
        return True

    def checkpoint_done(self, app: str, checkpoint: int) -> int:
        """Checkpoint ``checkpoint`` of ``app`` is stored: tell its transactional sinks
        and its sources (a source's iterator may ack what the checkpoint covers)."""
        told = [
            i
            for (a, _), i in self.instances.items()
            if a == app
            and (i.kind == "source" or isinstance(i.executor, TransactionalSinkExecutor))
        ]
        for inst in told:
            inst.inbox.put_nowait((CONTROL, None, CheckpointDone(checkpoint), None))
        return len(told)

    def checkpoint(self, app: str, checkpoint: int) -> int:
        """Start checkpoint ``checkpoint`` at this worker's source instances of ``app``."""
        sources = [i for (a, _), i in self.instances.items() if a == app and i.kind == "source"]
        for inst in sources:
            inst.inbox.put_nowait((CONTROL, None, Checkpoint(checkpoint), None))
        return len(sources)

    async def send_state(
        self, app: str, dst: str, worker: str, src: str, state: Any, pending: list[Any]
    ) -> int | None:
        """Hand ``src``'s state, and input it held unprocessed, to successor ``dst``
        (to another worker: kept and resent until that worker acknowledges it).
        Return the bytes of the frame sent to another worker; None on this one,
        which takes the objects themselves."""
        if worker == self.name:
            self.handovers[app, "local"] += 1
            if not self.on_state(app, dst, src, state, pending):
                log.error("state handover %s -> %s: no such instance here", src, dst)
            return None
        self.handovers[app, "remote"] += 1
        sent = self.dataplane.send_state(worker, app, dst, src, state, pending)
        self.handover_bytes[app, "remote"] += sent
        return sent

    def handed_over(self, app: str, version: int, handed: HandedOver) -> None:
        """A retiring instance of the switch to epoch ``version`` handed its state
        over: counted in that switch's answer to the master."""
        sw = self.switches.get((app, version))
        if sw is None:
            return
        total = sw.handed.setdefault(handed.pe, HandedOver(handed.pe))
        total.merge(handed)

    # ------------------------------------------------------------------
    # Bundles and code
    # ------------------------------------------------------------------
    def add_bundle(self, h: str, data: bytes) -> None:
        if h in self.bundles:
            self.bundles[h] = self.bundles.pop(h)  # the newest stays last
        else:
            self.bundles[h] = data

    def evict_bundles(self, keep: int = KEEP_BUNDLES) -> list[str]:
        """Drop bundles no instance, prepare or route uses, except the newest
        ``keep`` (a master sends a bundle again with any prepare that needs it, so
        nothing here has to be kept for later)."""
        used = set(list(self.bundles)[-keep:])
        for inst in self.instances.values():
            used.add(inst.spec.bundle)
            if inst.spec.input_key is not None:
                used.add(inst.spec.input_key.bundle)
            used.update(r.route.key.bundle for r in inst.routes.values() if r.route.key)
        for st in self.prepared.values():
            used.update(i.spec.bundle for i in st.instances)
        evicted = [h for h in self.bundles if h not in used]
        for h in evicted:
            del self.bundles[h]
            unload_bundle(h, self.bundle_dir)
        return evicted

    def topology(self, h: str) -> Any:
        # load_bundle is imported with the worker, not at its first deployment: the
        # SDK (and networkx, which its model uses) takes a few hundred ms to import.
        data = self.bundles.get(h)
        if data is None:
            raise PrepareError(f"bundle {h[:12]} was not sent to worker {self.name!r}")
        return load_bundle(h, data, self.bundle_dir)

    def load(self, h: str) -> Any:
        """Import a bundle's app now; a failure is a prepare error naming the worker."""
        try:
            return self.topology(h)
        except PrepareError:
            raise
        except Exception as e:
            raise PrepareError(f"worker {self.name!r} cannot load the app bundle: {e}") from e

    def key_fn(self, ref: KeyRef | None) -> Any:
        if ref is None:
            return None
        return self.topology(ref.bundle).key_fn(ref.src, ref.dst)

    # ------------------------------------------------------------------
    # Channels and routes
    # ------------------------------------------------------------------
    def make_route(self, inst: Instance, route: Route) -> RouteState:
        channels: list[OutChannel] = []
        for t in route.targets:
            out = inst.out.get(t.channel)
            if out is None:
                if t.worker == self.name:
                    dst = self.instances.get((inst.app, t.instance))
                    if dst is None:
                        raise PrepareError(
                            f"app {inst.app!r}: target instance {t.instance} of "
                            f"{inst.iid} is not on worker {self.name!r}"
                        )
                    out = LocalChannel(inst.app, t.channel, dst)
                else:
                    out = RemoteChannel(inst.app, t.channel, self.dataplane, t.worker)
                inst.out[t.channel] = out
                self.out_channels[(inst.app, t.channel)] = out
            channels.append(out)
        return RouteState(route, channels, self.key_fn(route.key))

    def forget_out(self, app: str, channel: str) -> None:
        self.out_channels.pop((app, channel), None)

    def forget_in(self, app: str, channel: str) -> None:
        self.in_channels.pop((app, channel), None)

    # ------------------------------------------------------------------
    # Instances
    # ------------------------------------------------------------------
    async def _build(self, ins: StartInstance) -> Instance:
        from hotwire.sdk.pe import Context

        topo = self.topology(ins.bundle)
        impl = topo.impl(ins.pe)
        ctx = Context(
            app=ins.app,
            pe=ins.pe,
            instance=ins.index,
            parallelism=ins.parallelism,
            config=dict(ins.config),
            version=ins.version,
            generation=ins.gen,
            hold=self.hold if ins.kind in ("source", "sink") else None,
        )
        inst = Instance(self, ins, ctx, None, source_fn=impl.fn if ins.kind == "source" else None)
        self.instances[(ins.app, inst.iid)] = inst
        for ch in ins.inputs:
            self.in_channels[(ins.app, ch)] = inst
        try:
            if ins.kind != "source":
                key_fn = self.key_fn(ins.input_key)
                executor: Executor
                if ins.kind in ("process", "dl_job"):
                    executor = ProcessExecutor(impl.cls, ctx, inst.on_error, key_fn)
                elif ins.kind == "timestamps":
                    executor = TimestampExecutor(impl.fn, ctx, inst.on_error, key_fn)
                elif ins.kind == "join":
                    executor = JoinExecutor(impl.fn, ctx, inst.on_error, key_fn, sides=impl.sides)
                elif ins.kind == "window":
                    executor = WindowExecutor(
                        impl.fn,
                        ctx,
                        inst.on_error,
                        key_fn,
                        ts_fn=impl.ts_fn,
                        merge_fn=impl.merge_fn,
                    )
                elif ins.kind == "sink" and _is_transactional(impl.fn):
                    executor = TransactionalSinkExecutor(impl.fn, ctx, inst.on_error, key_fn)
                else:
                    executor = EXECUTORS[ins.kind](impl.fn, ctx, inst.on_error, key_fn)
                inst.executor = executor
                if ins.wait_for_servers and isinstance(executor, TransactionalSinkExecutor):
                    # No user waits for this start: the sink's setup (and the commits
                    # of a restored checkpoint) run once the instance runs, waiting for
                    # an unreachable server there instead of failing prepare.
                    inst.deferred_setup = True
                else:
                    await executor.setup()
                if ins.state_check is not None:
                    await self._check_state(ins, impl.cls, key_fn)
            elif not ins.wait_for_servers:
                # A connector source's server must answer a start a user asked for
                # (submit, upgrade); a restart or a drain waits for it instead.
                probe = getattr(impl.fn, "check_server", None)
                if callable(probe):
                    await asyncio.to_thread(probe)
            for route in ins.routes:
                inst.routes[route.dst_pe] = self.make_route(inst, route)
            if ins.initial_state is not None:
                await inst.restore_checkpoint(ins.initial_state)
        except BaseException:
            self.remove_instance(inst)
            raise
        inst.start_task()
        return inst

    async def _check_state(self, ins: StartInstance, cls: Any, key_fn: Any) -> int:
        """Try the new code's migrate, validate_state and restore on ``ins.state_check``
        (a sample of the state the instance takes over) on an object of its own.

        Raises :class:`PrepareError` naming the PE, the key and the error; returns
        the number of keys (or states) tried. Only class PEs (``process``) have
        these hooks; a ``dl_job`` is not set up twice (its setup starts a job).
        """
        if ins.kind != "process" or not ins.state_check:
            return 0
        from hotwire.sdk.pe import Context

        ctx = Context(
            app=ins.app,
            pe=ins.pe,
            instance=ins.index,
            parallelism=ins.parallelism,
            config=dict(ins.config),
        )

        def ignore(_record: Any, _error: BaseException) -> None:
            return None  # the probe processes no record

        probe = ProcessExecutor(cls, ctx, ignore, key_fn)
        where = f"app {ins.app!r} PE {ins.pe!r} instance {ins.index} on worker {self.name!r}"
        await probe.setup()  # raises as the instance's own setup would
        try:
            return await asyncio.to_thread(probe.check_state, list(ins.state_check))
        except StateCheckError as e:
            raise PrepareError(
                f"{where}: the new code cannot take over the state of the last checkpoint: "
                f"{e}; the running version keeps running (make restore() accept this state, "
                "or raise state_version and add migrate(state, from_version))"
            ) from e
        finally:
            try:
                await probe.teardown()
            except Exception:
                log.exception("%s: teardown of the state check's object raised", where)

    async def check_state(self, app: str, instructions: list[Instruction]) -> int:
        """A dry run's state check: :meth:`_check_state` for each new instance that
        carries a sample; builds, registers and changes nothing."""
        tried = 0
        for ins in instructions:
            if not isinstance(ins, StartInstance) or ins.state_check is None:
                continue
            impl = self.topology(ins.bundle).impl(ins.pe)
            tried += await self._check_state(ins, impl.cls, self.key_fn(ins.input_key))
        return tried

    def remove_instance(self, inst: Instance) -> None:
        key = (inst.app, inst.iid)
        if self.instances.get(key) is inst:
            del self.instances[key]
        for ch in [c for (a, c), i in self.in_channels.items() if i is inst and a == inst.app]:
            del self.in_channels[(inst.app, ch)]
            self.dataplane.close_in(inst.app, ch)
        for ch, out in list(inst.out.items()):
            self.out_channels.pop((inst.app, ch), None)
            if isinstance(out, RemoteChannel):
                out.release()

    async def _drop(self, inst: Instance) -> None:
        inst.stop()
        if inst.task is not None:
            await asyncio.gather(inst.task, return_exceptions=True)
        await inst.teardown()
        self.remove_instance(inst)

    # ------------------------------------------------------------------
    # Phases
    # ------------------------------------------------------------------
    async def prepare(self, app: str, version: int, instructions: list[Instruction]) -> None:
        st = self.prepared[(app, version)] = Prepared()
        try:
            for ins in instructions:
                if isinstance(ins, StartInstance):
                    try:
                        st.instances.append(await self._build(ins))
                    except PrepareError:
                        raise
                    except Exception as e:
                        raise PrepareError(
                            f"app {app!r} PE {ins.pe!r} instance {ins.index} on worker "
                            f"{self.name!r}: {type(e).__name__}: {e}"
                        ) from e
                elif isinstance(ins, Gate):
                    inst = self._get(app, ins.instance)
                    inst.apply_gate(ins)
                    for ch in ins.appearing:
                        self.in_channels[(app, ch)] = inst
                    st.gated.append(inst)
                elif isinstance(ins, Adopt):
                    inst = self._get(app, ins.instance)
                    try:
                        inst.apply_adopt(ins)
                    except ValueError as e:
                        raise PrepareError(f"worker {self.name!r}: {e}") from e
                    st.gated.append(inst)
                else:
                    raise PrepareError(f"{type(ins).__name__} is not a prepare instruction")
            # Connect downstream links before anything switches.
            for inst in st.instances:
                for out in inst.out.values():
                    if isinstance(out, RemoteChannel):
                        await out.connect()
        except BaseException:
            await self.abort(app, version)
            raise

    async def abort(self, app: str, version: int) -> None:
        st = self.prepared.pop((app, version), None)
        if st is None:
            return
        for inst in reversed(st.instances):
            await self._drop(inst)
        for inst in st.gated:
            appearing = inst.gates.get(version, (set(), set()))[0]
            inst.undo_gate(version)
            for ch in appearing:
                if self.in_channels.get((app, ch)) is inst:
                    del self.in_channels[(app, ch)]

    async def switch(
        self,
        app: str,
        version: int,
        instructions: list[Instruction],
        timeout: float = SWITCH_TIMEOUT_S,
    ) -> list[HandedOver]:
        """Deliver a switch once and wait up to ``timeout`` for it to settle; what
        its retiring instances handed over, per PE.

        Idempotent: a switch sent again (a master retrying, or restarted) waits for
        the same instances again. Waiting never cancels what it waits for: a switch
        that did not finish in time keeps going, and the master decides what next.
        """
        sw = self.switches.get((app, version))
        if sw is None:
            sw = self.switches[(app, version)] = self._deliver_switch(app, version, instructions)
            # Remember the last few switches per app (a master resends only its last one).
            mine = sorted(v for a, v in self.switches if a == app)
            for old in mine[:-KEEP_SWITCHES]:
                self.switches.pop((app, old), None)
        if sw.waits:
            _, pending = await asyncio.wait(sw.waits, timeout=timeout)
            if pending:
                what = ", ".join(
                    label for w, label in zip(sw.waits, sw.labels, strict=True) if w in pending
                )
                raise SwitchTimeout(
                    f"app {app!r}: the switch to epoch {version} did not finish within "
                    f"{timeout:g} s on worker {self.name!r}; still waiting for {what}"
                )
        for inst in sw.gated:
            inst.gate_released.pop(version, None)
            inst.adopted.pop(version, None)
        self.evict_bundles()
        return [sw.handed[pe] for pe in sorted(sw.handed)]

    def _deliver_switch(
        self, app: str, version: int, instructions: list[Instruction]
    ) -> _Switching:
        targets = []
        for ins in instructions:
            if not isinstance(ins, (Switch, Retire)):
                raise PrepareError(f"{type(ins).__name__} is not a switch instruction")
            targets.append((ins, self._get(app, ins.instance)))
        st = self.prepared.pop((app, version), Prepared())
        sw = _Switching(gated=list(st.gated))
        for inst in st.instances:
            inst.activated.set()
            sw.add(inst.released, f"new instance {inst.iid} to receive its state")
        for inst in st.gated:
            fut = inst.gate_released.get(version)
            if fut is not None:
                sw.add(fut, f"gate of {inst.iid} to open")
            fut = inst.adopted.get(version)
            if fut is not None:
                sw.add(fut, f"instance {inst.iid} to merge the canary's state")
        for ins, inst in targets:
            if isinstance(ins, Retire):
                sw.add(inst.finished, f"instance {inst.iid} to retire")
            else:
                sw.add(inst.switched(version), f"instance {inst.iid} to switch")
            inst.inbox.put_nowait((CONTROL, None, ins, None))
        if log.isEnabledFor(logging.DEBUG):
            t0 = asyncio.get_running_loop().time()
            for w, what in zip(sw.waits, sw.labels, strict=True):
                w.add_done_callback(
                    lambda _f, what=what: log.debug(
                        "%s: %s settled after %.1f ms",
                        app,
                        what,
                        (asyncio.get_running_loop().time() - t0) * 1000,
                    )
                )
        return sw

    async def stop(self, app: str) -> int:
        victims = [i for (a, _), i in self.instances.items() if a == app]
        for inst in victims:
            await self._drop(inst)
        for key in [k for k in self.prepared if k[0] == app]:
            await self.abort(*key)
        for key in [k for k in self.switches if k[0] == app]:
            del self.switches[key]
        self.dataplane.forget_app(app)
        self.evict_bundles()
        return len(victims)

    async def drop(self, app: str, iids: list[str]) -> int:
        """Stop the named instances of ``app``: the master no longer places them here.
        Returns how many were running."""
        n = 0
        for iid in iids:
            inst = self.instances.get((app, iid))
            if inst is None:
                continue
            for st in self.prepared.values():  # a later abort must not drop it again
                if inst in st.instances:
                    st.instances.remove(inst)
            await self._drop(inst)
            n += 1
        self.evict_bundles()
        return n

    async def close(self) -> None:
        for inst in list(self.instances.values()):
            await self._drop(inst)
        await self.dataplane.close()

    def _get(self, app: str, iid: str) -> Instance:
        inst = self.instances.get((app, iid))
        if inst is None:
            raise PrepareError(
                f"app {app!r}: instance {iid} is not running on worker {self.name!r}"
            )
        return inst

    def running(self) -> list[tuple[str, str, int, int, int, str, int, float, int]]:
        """(app, instance, records in, records out, errors, why it failed or "", dead
        letters, seconds spent in the PE's code, records dropped as late, input batches
        taken, of them taken in a same-worker sender's task)."""
        return [
            (
                a,
                iid,
                i.records_in,
                i.records_out,
                i.errors,
                i.failed,
                i.dead_letters,
                i.process_s,
                i.late_dropped,
                i.batches,
                i.chained,
            )
            for (a, iid), i in self.instances.items()
        ]

    def waiting(self) -> dict[tuple[str, str], tuple[str, float, int]]:
        """(app, instance) -> (the server it waits for or "", for how many seconds,
        records queued in its inbox)."""
        now = time.monotonic()
        out = {}
        for key, i in self.instances.items():
            what = getattr(i.ctx, "waiting", "") or ""
            since = getattr(i.ctx, "waiting_since", 0.0) or 0.0
            out[key] = (what, max(0.0, now - since) if what else 0.0, i.queued())
        return out


def _is_transactional(fn: Any) -> bool:
    from hotwire.sinks import TransactionalSink

    return isinstance(fn, type) and issubclass(fn, TransactionalSink)
