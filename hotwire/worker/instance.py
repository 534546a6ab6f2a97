"""A running PE instance: an asyncio task reading its inbox.

The inbox carries, in arrival order, batches from input channels, end markers,
state handovers from predecessors, and control items (switch, retire). The
instance applies the gating rule:

* while it waits for predecessors' state it holds every input batch;
* a channel that appears by an upgrade is held until every channel it replaces
  has delivered its end marker.

Held batches return no credit, so their senders stop at the credit limit.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

from hotwire.codec import packb
from hotwire.names import confined
from hotwire.pe.executors import EXECUTORS, Executor, _keyed_items
from hotwire.plan import Gate, Retire, StartInstance, Switch, key_partition
from hotwire.worker.channels import (
    BARRIER,
    BATCH,
    CONTROL,
    END,
    EPOCH,
    STATE,
    OutChannel,
    RouteState,
    emit_all,
)

if TYPE_CHECKING:
    from hotwire.worker.runtime import Runtime

log = logging.getLogger(__name__)

SOURCE_BATCH = 256
SOURCE_LINGER_S = 0.002
PUMP_CHUNKS = 4  # chunks a source thread may pull ahead of the instance
YIELD_EVERY_S = 0.002  # longest an instance with a full inbox keeps the loop
MAX_LOGGED_ERRORS = 20
ON_ERROR = ("skip", "fail", "dead_letter")  # a PE's config["on_error"] policies


@dataclass(frozen=True)
class Checkpoint:
    """Control item: a source snapshots its position and sends barrier ``id`` downstream."""

    id: int


@dataclass(frozen=True)
class CheckpointDone:
    """Control item: checkpoint ``id`` is stored; transactional sinks commit up to it."""

    id: int


class StateError(Exception):
    """A PE's snapshot cannot be serialised; the message names the PE."""


class Instance:
    """One instance of one PE of one app on this worker."""

    def __init__(
        self,
        runtime: Runtime,
        spec: StartInstance,
        ctx: Any,
        executor: Executor | None,
        source_fn: Any = None,
    ):
        self.runtime = runtime
        self.spec = spec
        self.app = spec.app
        self.iid = spec.instance
        self.pe = spec.pe
        self.kind = spec.kind
        self.ctx = ctx
        self.executor = executor
        self.source_fn = source_fn
        self.inbox: asyncio.Queue[tuple[int, Any, Any, Any]] = asyncio.Queue()
        self.inputs: set[str] = set(spec.inputs)
        self.routes: dict[str, RouteState] = {}
        self.out: dict[str, OutChannel] = {}
        # gating
        self.holding: set[str] = set()
        self.held: dict[str, list[tuple[list[Any], Any]]] = {}
        self.gates: dict[int, tuple[set[str], set[str]]] = {}  # version -> (appearing, remaining)
        # epoch alignment: channels past this version's cut are held until the switch
        self.epochs: dict[int, set[str]] = {}
        self.epoch_held: set[str] = set()
        self.pending_switch: dict[int, tuple[Switch, set[str]]] = {}
        self._switched: dict[int, asyncio.Future[None]] = {}
        # checkpoint alignment: barrier id -> input channels still to deliver it
        self.barrier_need: dict[int, set[str]] = {}
        self.barrier_held: set[str] = set()
        self.last_checkpoint = 0
        self.abandoned = 0  # checkpoints up to this one were given up: their barriers are ignored
        self.pending_preds: set[str] = set(spec.predecessors)
        self.pred_states: list[Any] = []
        self.pred_pending: list[tuple[str, list[Any]]] = []
        # lifecycle
        self.retire: Retire | None = None
        self.activated = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.released: asyncio.Future[None] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()
        self.gate_released: dict[int, asyncio.Future[None]] = {}
        self.task: asyncio.Task[None] | None = None
        # counters
        self._yielded = 0.0
        self.records_in = 0
        self.records_out = 0
        self.errors = 0
        self.position = 0  # records a source has emitted, over all its generations
        # user errors: the PE's policy, why the instance stopped ("" while it runs)
        config = getattr(ctx, "config", None)
        policy = config.get("on_error") if isinstance(config, dict) else None
        self.on_error_policy = policy or "skip"
        if self.on_error_policy not in ON_ERROR:
            raise ValueError(
                f"config on_error={self.on_error_policy!r} is not one of "
                f"{', '.join(map(repr, ON_ERROR))}; fix the PE's config"
            )
        self.failed = ""
        self.dead_letters = 0

    # -- set-up (prepare phase) ------------------------------------------
    def start_task(self) -> None:
        self.task = asyncio.get_running_loop().create_task(
            self._main(), name=f"{self.app}/{self.iid}"
        )

    def apply_gate(self, gate: Gate) -> None:
        appearing, remaining = set(gate.appearing), set(gate.disappearing) & self.inputs
        self.inputs |= appearing
        fut = asyncio.get_running_loop().create_future()
        self.gate_released[gate.version] = fut
        if remaining and appearing:
            self.holding |= appearing
            self.gates[gate.version] = (appearing, remaining)
        else:
            fut.set_result(None)

    def undo_gate(self, version: int) -> None:
        appearing, _ = self.gates.pop(version, (set(), set()))
        self.holding -= appearing
        self.inputs -= appearing
        fut = self.gate_released.pop(version, None)
        if fut is not None and not fut.done():
            fut.cancel()

    # -- main loop -------------------------------------------------------
    async def _main(self) -> None:
        try:
            await self.activated.wait()
            if self.kind == "source":
                await self._run_source()
            else:
                await self._run()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.errors += 1
            self.failed = self.failed or f"{type(e).__name__}: {e}"
            log.exception("instance %s/%s failed", self.app, self.iid)
            if not self.finished.done():
                self.finished.set_result(None)

    async def _run(self) -> None:
        if not self.pending_preds:
            self._set_released()
        get = self.inbox.get
        while not self.finished.done():
            kind, ch, payload, ret = await get()
            if kind == BATCH:
                if (
                    self.pending_preds
                    or ch in self.holding
                    or ch in self.epoch_held
                    or ch in self.barrier_held
                ):
                    self.held.setdefault(ch, []).append((payload, ret))
                else:
                    await self._process(ch, payload, ret)
            elif kind == BARRIER:
                if (
                    self.pending_preds
                    or ch in self.holding
                    or ch in self.epoch_held
                    or ch in self.barrier_held
                ):
                    # A barrier stays behind the batches held before it on its
                    # channel: the cut must include them.
                    self.held.setdefault(ch, []).append((None, payload))
                else:
                    await self._on_barrier(ch, payload)
            elif kind == END:
                await self._on_end(ch)
            elif kind == EPOCH:
                await self._on_epoch(ch, payload)
            elif kind == STATE:
                await self._on_state(ch, payload)
            elif kind == CONTROL:
                await self._on_control(payload)
            if self.retire is not None and not self.inputs and not self.pending_preds:
                await self._finish()

    async def _process(self, ch: str, records: list[Any], ret: Any) -> None:
        assert self.executor is not None
        if self.failed:
            # Stopped by on_error="fail": hold input and return no credit, so the
            # senders stop at their credit limit.
            self.held.setdefault(ch, []).append((records, ret))
            return
        if self.kind == "sink" and self.runtime.hold.held():
            await self.runtime.hold.wait()  # the master may have fenced this worker
        out = await self.executor.process(records)
        rest = self.executor.take_rest()
        self.records_in += len(records) - len(rest)
        if rest:
            # on_error="fail" stopped the PE at a record: it and the records after
            # it stay unprocessed, held (with no credit returned) for the upgrade
            # that fixes the PE, which hands them to the new instance.
            self.held.setdefault(ch, []).append((rest, ret))
        elif ret is not None:
            ret.grant(self.app, ch, 1)
        if out:
            self.records_out += len(out)
            await emit_all(self.routes, out)
        # A full inbox never suspends ``inbox.get()``, and a sender with credit never
        # suspends either: without this an overloaded instance (a slow sink, say)
        # would starve the worker's heartbeats, control stream and data-plane reads.
        now = time.monotonic()
        if now - self._yielded > YIELD_EVERY_S:
            self._yielded = now
            await asyncio.sleep(0)

    async def _release_held(self, channels: set[str] | None = None) -> None:
        for ch in list(self.held):
            if ch in self.holding or ch in self.epoch_held or ch in self.barrier_held:
                continue
            if channels is None or ch in channels:
                batches = self.held.pop(ch)
                for i, (records, ret) in enumerate(batches):
                    if records is not None:
                        await self._process(ch, records, ret)
                        continue
                    await self._on_barrier(ch, ret)  # a queued barrier: ``ret`` is its id
                    if ch in self.barrier_held:
                        # Held again until the checkpoint aligns; the rest waits.
                        self.held[ch] = self.held.get(ch, []) + batches[i + 1 :]
                        break

    async def _on_end(self, ch: str) -> None:
        if self.barrier_need:
            # End markers come only with a transition, and the master abandons the
            # checkpoint in flight when a transition begins: this alignment can
            # never complete (a sender may have forwarded its barrier on a channel
            # it has since ended). Drop it, and let what it held go first, before
            # a gate below lets a replacing channel through: order per key holds.
            await self._abandon_checkpoints(max(self.barrier_need))
        self.inputs.discard(ch)
        self.runtime.forget_in(self.app, ch)
        for version, (appearing, remaining) in list(self.gates.items()):
            remaining.discard(ch)
            if not remaining:
                del self.gates[version]
                self.holding -= appearing
                if not self.pending_preds:
                    await self._release_held(appearing)
                fut = self.gate_released.get(version)
                if fut is not None and not fut.done():
                    fut.set_result(None)

    # -- checkpoints -------------------------------------------------------
    async def _on_barrier(self, ch: str, cid: int) -> None:
        if cid <= self.last_checkpoint or self.failed:
            # A failed instance holds input it never processed: no checkpoint may
            # cut past it, so its barriers stop here (the last complete checkpoint
            # stays the one recovery restores).
            return
        if cid <= self.abandoned:
            return  # a checkpoint this instance gave up (see _abandon_checkpoints)
        stale = [c for c in self.barrier_need if c < cid]
        if stale:
            # A newer checkpoint began: the older one cannot complete any more (its
            # barrier was lost on some input, or the master superseded it).
            await self._abandon_checkpoints(max(stale))
            if cid <= self.last_checkpoint:
                return  # the released input completed this checkpoint meanwhile
        need = self.barrier_need.get(cid)
        if need is None:
            # Align on the inputs open now; channels that appear later owe nothing.
            need = self.barrier_need[cid] = set(self.inputs)
        need.discard(ch)
        self.barrier_held.add(ch)
        if not need:
            await self._complete_checkpoint(cid)

    async def _abandon_checkpoints(self, upto: int) -> None:
        """Give up aligning checkpoints up to ``upto`` (they cannot complete): later
        barriers of theirs are ignored, and the channels they held flow again, in
        their order (their reports would be ignored by the master anyway)."""
        self.abandoned = max(self.abandoned, upto)
        for c in [c for c in self.barrier_need if c <= upto]:
            del self.barrier_need[c]
        if self.barrier_need:
            return  # a newer alignment still holds its channels
        released = set(self.barrier_held)
        self.barrier_held.clear()
        if not self.pending_preds:
            await self._release_held(released)

    async def _complete_checkpoint(self, cid: int) -> None:
        del self.barrier_need[cid]
        self.last_checkpoint = max(self.last_checkpoint, cid)
        pre_commit = getattr(self.executor, "pre_commit", None)
        if pre_commit is not None:
            pre_commit(cid)  # the open transaction becomes part of this checkpoint
        try:
            state = self._checked(self._snapshot())
        except StateError as e:
            self._state_failed(e)
            return
        self.runtime.on_checkpoint(self.app, cid, self.iid, state)
        for out in list(self.out.values()):
            await out.barrier(cid)
        released = set(self.barrier_held)
        self.barrier_held.clear()
        if not self.pending_preds:
            await self._release_held(released)

    def _checked(self, state: Any) -> Any:
        """``state`` if it serialises; a :class:`StateError` naming the PE if not.

        State crosses workers and goes into checkpoints as msgpack, while a
        same-worker handover could pass the object itself: checking every snapshot
        makes state that cannot be serialised fail the same way wherever the
        successor runs, with an error that says what to fix."""
        if state is None:
            return state
        try:
            packb(state)
        except (TypeError, ValueError, OverflowError) as e:
            raise StateError(
                f"app {self.app!r} PE {self.pe!r} instance {self.spec.index}: the state "
                f"from snapshot() cannot be serialised ({e}); return msgpack values "
                "(dict, list, str, bytes, int, float, bool, None)"
            ) from e
        return state

    def _state_failed(self, e: StateError) -> None:
        self.errors += 1
        self.failed = str(e)
        log.error("%s; the instance stops", e)

    def _snapshot(self) -> Any:
        if self.kind == "source":
            return {"position": self.position}
        assert self.executor is not None
        state = self.executor.snapshot()
        if self.executor.keyed and isinstance(state, dict):
            return [[k, v] for k, v in state.items()]
        return state

    def restore_checkpoint(self, states: list[Any]) -> None:
        """Start from a checkpoint's states (recovery: one or, after a rescale, several).

        A transactional sink commits the transactions the checkpoint holds: the
        checkpoint is complete, so they are part of the output."""
        self._restore(states)
        commit_all = getattr(self.executor, "commit_all", None)
        if commit_all is not None:
            commit_all()

    async def _source_checkpoint(self, cid: int) -> None:
        self.last_checkpoint = max(self.last_checkpoint, cid)
        self.runtime.on_checkpoint(self.app, cid, self.iid, self._checked(self._snapshot()))
        for out in list(self.out.values()):
            await out.barrier(cid)

    async def _on_state(self, src: str, payload: Any) -> None:
        state, pending = payload
        if src not in self.pending_preds:
            log.warning("%s/%s: unexpected state from %s dropped", self.app, self.iid, src)
            return
        self.pending_preds.discard(src)
        self.pred_states.append(state)
        if pending:
            self.pred_pending.append((src, pending))
        if not self.pending_preds:
            self._restore(self.pred_states)
            self.pred_states = []
            self._set_released()
            if self.kind != "source":
                # Input a predecessor held unprocessed (it stopped on an error)
                # comes before anything that reached this instance directly.
                pred_pending, self.pred_pending = self.pred_pending, []
                for pred, records in pred_pending:
                    await self._process(f"handover:{pred}", records, None)
                # Held channels that no gate still holds flow now, in arrival order.
                await self._release_held({c for c in self.held if c not in self.holding})

    def _restore(self, states: list[Any]) -> None:
        if self.kind == "source":
            positions = [s["position"] for s in states if isinstance(s, dict) and "position" in s]
            self.position = max(positions, default=0)
            self.ctx.position = self.position
        elif self.executor is not None:
            self.executor.restore(states)

    def _set_released(self) -> None:
        if not self.released.done():
            self.released.set_result(None)

    def switched(self, version: int) -> asyncio.Future[None]:
        """Resolved once this instance applied its switch of ``version``."""
        fut = self._switched.get(version)
        if fut is None:
            fut = self._switched[version] = asyncio.get_running_loop().create_future()
        return fut

    async def _on_control(self, item: Any) -> None:
        if isinstance(item, Switch):
            remaining = set(item.after_epoch) - self.epochs.get(item.version, set())
            if remaining:
                self.pending_switch[item.version] = (item, remaining)
            else:
                await self._apply_switch(item)
        elif isinstance(item, Retire):
            self.retire = item
        elif isinstance(item, Checkpoint) and self.kind == "source":
            await self._source_checkpoint(item.id)
        elif isinstance(item, CheckpointDone):
            done = getattr(self.executor, "checkpoint_complete", None)
            if done is not None:
                done(item.id)

    async def _on_epoch(self, ch: str, version: int) -> None:
        # Records behind the marker belong after the cut: hold them until we switch.
        self.epochs.setdefault(version, set()).add(ch)
        self.epoch_held.add(ch)
        pending = self.pending_switch.get(version)
        if pending is not None:
            pending[1].discard(ch)
            if not pending[1]:
                del self.pending_switch[version]
                await self._apply_switch(pending[0])

    async def _apply_switch(self, sw: Switch) -> None:
        for ch in sw.ended:
            out = self.out.pop(ch, None)
            if out is not None:
                await out.end()
                self.runtime.forget_out(self.app, ch)
        for dst in sw.unrouted:
            self.routes.pop(dst, None)
        for route in sw.routes:
            self.routes[route.dst_pe] = self.runtime.make_route(self, route)
        for ch in sw.epoch_out:
            out = self.out.get(ch)
            if out is not None:
                await out.epoch(sw.version)
        self.epochs.pop(sw.version, None)
        if sw.after_epoch:
            self.epoch_held -= set(sw.after_epoch)
            if not self.pending_preds:
                await self._release_held(set(sw.after_epoch))
        fut = self.switched(sw.version)
        if not fut.done():
            fut.set_result(None)
        for v in [v for v in self._switched if v < sw.version]:
            del self._switched[v]  # only the newest switch can still be waited for

    # -- sources ---------------------------------------------------------
    async def _run_source(self) -> None:
        # Wait for predecessors' state (a replaced source resumes from its position).
        while self.pending_preds:
            kind, ch, payload, _ = await self.inbox.get()
            if kind == STATE:
                await self._on_state(ch, payload)
            elif kind == CONTROL:
                await self._on_control(payload)
        self._set_released()
        if await self._source_controls():
            return
        try:
            pump = _Pump(self.source_fn(self.ctx))
        except Exception as e:
            self._source_failed(e)
            pump = None
        ctl: asyncio.Future[Any] | None = None
        try:
            while True:
                if await self._source_controls(pump):
                    pump = None
                    return
                if pump is not None and pump.buf:
                    await self._emit_source(pump.take())
                    continue
                if pump is not None and pump.finished:
                    if pump.error is not None:
                        # The user's iterator raised: it cannot go on. The source stays
                        # (for controls: an upgrade restarts it from its position).
                        self._source_failed(pump.error)
                    pump = None
                    continue
                # Wait for records or a control item, whichever comes first: an idle
                # source still switches, retires and checkpoints at once.
                if ctl is None:
                    ctl = asyncio.ensure_future(self.inbox.get())
                waits: set[asyncio.Future[Any]] = {ctl}
                if pump is not None:
                    waits.add(pump.ready_future())
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if ctl.done():
                    kind, _ch, payload, _ret = ctl.result()
                    ctl = None
                    if kind == CONTROL:
                        await self._on_control(payload)
        finally:
            if ctl is not None:
                ctl.cancel()
            if pump is not None:
                await pump.stop()

    async def _source_controls(self, pump: _Pump | None = None) -> bool:
        """Apply queued control items; True when the source has retired."""
        while not self.inbox.empty():
            kind, _ch, payload, _ = self.inbox.get_nowait()
            if kind == CONTROL:
                await self._on_control(payload)
        if self.retire is not None:
            if pump is not None:
                # What the pump already pulled from the iterator goes out first.
                await pump.stop()
                if pump.buf:
                    await self._emit_source(pump.take())
            await self._finish()
            return True
        return False

    async def _emit_source(self, chunk: list[Any]) -> None:
        if self.runtime.hold.held():
            await self.runtime.hold.wait()  # the master may have fenced this worker
        self.position += len(chunk)
        self.records_out += len(chunk)
        await emit_all(self.routes, chunk)

    # -- retirement ------------------------------------------------------
    async def _finish(self) -> None:
        if self.finished.done():
            return
        retire = self.retire
        assert retire is not None
        for ch, out in list(self.out.items()):
            await out.end()
            self.runtime.forget_out(self.app, ch)
        self.out.clear()
        succ = retire.successors
        pre_commit = getattr(self.executor, "pre_commit", None)
        if pre_commit is not None:
            # A transactional sink's open transaction is pre-committed and handed
            # over; it commits with the successor's next complete checkpoint. With
            # no successor (the sink is removed) nothing can replay into it: commit.
            pre_commit(self.last_checkpoint + 1)
            if not succ:
                self.executor.commit_all()  # type: ignore[union-attr]
        pending = self._unprocessed()
        if succ:
            parts = self._split_state(retire)
            held = self._split_pending(retire, pending)
            for s, part, recs in zip(succ, parts, held, strict=True):
                await self.runtime.send_state(self.app, s.instance, s.worker, self.iid, part, recs)
        elif pending:
            log.warning(
                "app %r PE %r instance %d: removed with %d unprocessed records, which are "
                "dropped with it",
                self.app,
                self.pe,
                self.spec.index,
                len(pending),
            )
        await self.teardown()
        self.runtime.remove_instance(self)
        self.finished.set_result(None)

    def _unprocessed(self) -> list[Any]:
        """Held input this instance never processed, in order per channel."""
        pending = [
            r
            for batches in self.held.values()
            for records, _ in batches
            if records is not None  # not a queued barrier
            for r in records
        ]
        self.held.clear()
        return pending

    def _split_pending(self, retire: Retire, pending: list[Any]) -> list[list[Any]]:
        """Unprocessed input for each successor: by key when keyed, else to one."""
        n = len(retire.successors)
        parts: list[list[Any]] = [[] for _ in range(n)]
        if not pending:
            return parts
        key_fn = self.executor.key_fn if self.executor is not None else None
        if retire.keyed and key_fn is not None and n > 1:
            for r in pending:
                parts[key_partition(key_fn(r), n)].append(r)
        else:
            parts[self.spec.index % n] = pending
        return parts

    def _split_state(self, retire: Retire) -> list[Any]:
        n = len(retire.successors)
        if self.kind == "source":
            state: Any = {"position": self.position}
        else:
            assert self.executor is not None
            state = self.executor.snapshot()
        if retire.keyed and state and n == self.spec.parallelism:
            # Same parallelism: every key of instance i belongs to new instance i.
            whole: list[Any] = [[] for _ in range(n)]
            succ = retire.successors[self.spec.index]
            # A local successor takes the state object itself; over the wire keyed
            # state travels as [key, value] pairs (msgpack map keys must be strings).
            self._checked(state)
            local = succ.worker == self.runtime.name and isinstance(state, dict)
            whole[self.spec.index] = state if local else [[k, v] for k, v in _keyed_items(state)]
            return whole
        if retire.keyed and state:
            parts: list[list[Any]] = [[] for _ in range(n)]
            for k, v in _keyed_items(state):
                parts[key_partition(k, n)].append([k, v])
            return parts
        out: list[Any] = [None] * n
        out[self.spec.index % n] = state
        return out

    async def teardown(self) -> None:
        if self.executor is not None:
            try:
                await self.executor.teardown()
            except Exception:
                log.exception("%s/%s: teardown raised", self.app, self.iid)

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    # -- errors ----------------------------------------------------------
    def on_error(self, record: Any, exc: BaseException) -> bool:
        """User code raised on ``record``: apply the PE's ``on_error`` policy.

        Returns False when the instance stops (``on_error="fail"``)."""
        self.errors += 1
        policy = self.on_error_policy
        if policy == "fail":
            self.failed = f"{type(exc).__name__}: {exc}"
            log.error(
                "app %r PE %r instance %d: %s (record %.200r); the instance stops "
                "(on_error='fail')",
                self.app,
                self.pe,
                self.spec.index,
                self.failed,
                record,
            )
            return False
        if policy == "dead_letter":
            self._dead_letter(record, exc)
        if self.errors <= MAX_LOGGED_ERRORS:
            log.error(
                "app %r PE %r instance %d: %s: %s (record %.200r); record %s",
                self.app,
                self.pe,
                self.spec.index,
                type(exc).__name__,
                exc,
                record,
                "dead-lettered" if policy == "dead_letter" else "skipped",
            )
        return True

    def _source_failed(self, exc: BaseException) -> None:
        self.errors += 1
        self.failed = f"{type(exc).__name__}: {exc}"
        log.error(
            "app %r PE %r instance %d: the source raised %s at position %d; it stops "
            "(an upgrade or rollback restarts it from this position)",
            self.app,
            self.pe,
            self.spec.index,
            self.failed,
            self.position,
        )
        if self.on_error_policy == "dead_letter":
            self._dead_letter(None, exc, position=self.position)

    def _dead_letter(self, record: Any, exc: BaseException, **extra: Any) -> None:
        """Append the failing record and the error as a JSON line to
        ``<data dir>/dead-letter/<app>.<pe>.jsonl``."""
        doc = {
            "app": self.app,
            "pe": self.pe,
            "instance": self.spec.index,
            "error": f"{type(exc).__name__}: {exc}",
            "unix": time.time(),
            **extra,
            "record": record,
        }
        try:
            line = json.dumps(doc, default=_json_safe)
        except (TypeError, ValueError):
            line = json.dumps({**doc, "record": None, "record_repr": repr(record)}, default=repr)
        path = confined(self.runtime.dead_letter_dir, f"{self.app}.{self.pe}.jsonl")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as e:
            log.error(
                "app %r PE %r instance %d: cannot write the dead letter to %s: %s",
                self.app,
                self.pe,
                self.spec.index,
                path,
                e,
            )
            return
        self.dead_letters += 1


def _json_safe(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("latin-1")
    return repr(v)


async def _aclose(obj: Any) -> None:
    close = getattr(obj, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:
            pass


class _Pump:
    """Pulls a source's iterator into a buffer, apart from the instance's loop.

    An async iterator is pulled by a task on the event loop. A sync one is pulled
    by a thread of its own, so a blocking source never stalls other PEs; the
    thread hands chunks over without waiting for the loop, and stops after
    :data:`PUMP_CHUNKS` chunks that were not taken yet. Records count toward the
    source's position only when the instance emits them.
    """

    def __init__(self, it: Any):
        self.buf: list[Any] = []
        self.finished = False
        self.error: Exception | None = None
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._space = asyncio.Event()
        self._space.set()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._slots = threading.Semaphore(PUMP_CHUNKS)
        self._taken_slots = 0
        self.task: asyncio.Task[None] | None = None
        if inspect.isasyncgen(it) or hasattr(it, "__anext__"):
            self.it: Any = it
            self.task = self._loop.create_task(self._pull_async(it))
        else:
            self.it = iter(it)
            self._thread = threading.Thread(
                target=self._pull_sync, name="hotwire-source", daemon=True
            )
            self._thread.start()

    def ready_future(self) -> asyncio.Future[None]:
        if self._waiter is None or self._waiter.done():
            self._waiter = self._loop.create_future()
            if self.buf or self.finished:
                self._waiter.set_result(None)
        return self._waiter

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def take(self) -> list[Any]:
        chunk, self.buf = self.buf, []
        self._space.set()
        for _ in range(self._taken_slots):
            self._slots.release()
        self._taken_slots = 0
        return chunk

    def _deliver(self, chunk: list[Any], done: bool, error: Exception | None) -> None:
        self.buf.extend(chunk)
        self._taken_slots += 1
        if done:
            self.finished = True
            self.error = error
        self._wake()

    async def _pull_async(self, it: AsyncIterator[Any]) -> None:
        anext_ = it.__anext__
        n = 0
        try:
            while True:
                if not self._space.is_set():
                    await self._space.wait()
                record = await anext_()  # not buf.append(await ...): take() swaps buf meanwhile
                self.buf.append(record)
                self._wake()
                n += 1
                if len(self.buf) >= SOURCE_BATCH:
                    self._space.clear()
                elif n % SOURCE_BATCH == 0:
                    await asyncio.sleep(0)  # a source that never awaits still yields
        except StopAsyncIteration:
            self.finished = True
        except Exception as e:
            self.finished, self.error = True, e
        self._wake()

    def _pull_sync(self) -> None:
        while True:
            self._slots.acquire()
            if self._stopping:
                return
            chunk, done, error = _take(self.it)
            try:
                self._loop.call_soon_threadsafe(self._deliver, chunk, done, error)
            except RuntimeError:  # the loop closed
                return
            if done:
                return

    async def stop(self) -> None:
        """Stop pulling; what was already pulled stays in ``buf``."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self._thread is not None:
            self._stopping = True
            self._slots.release()
            await asyncio.to_thread(self._thread.join, 2.0)
            await asyncio.sleep(0)  # chunks the thread handed over land in buf
        await _aclose(self.it)
        close = getattr(self.it, "close", None)
        if close is not None and self._thread is not None and not self._thread.is_alive():
            try:
                close()
            except Exception:
                pass


def _take(it: Iterator[Any]) -> tuple[list[Any], bool, Exception | None]:
    """Up to SOURCE_BATCH records or SOURCE_LINGER_S, pulled in growing C-speed slices."""
    chunk: list[Any] = []
    deadline = time.monotonic() + SOURCE_LINGER_S
    step = 1
    try:
        while True:
            before = len(chunk)
            chunk.extend(islice(it, step))  # keeps what was pulled if the iterator raises
            if len(chunk) - before < step:
                return chunk, True, None
            if len(chunk) >= SOURCE_BATCH or time.monotonic() > deadline:
                return chunk, False, None
            step = min(step * 2, SOURCE_BATCH - len(chunk))
    except Exception as e:
        return chunk, True, e  # what came before the error still goes out


__all__ = ["EXECUTORS", "Instance"]
