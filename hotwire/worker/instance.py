"""A running PE instance: an asyncio task that drives its state machine.

The inbox carries, in arrival order, batches from input channels, end markers,
epoch markers, checkpoint barriers, state handovers from predecessors, and
control items (switch, retire, checkpoint). Each becomes an event of the
instance's :class:`hotwire.worker.machine.InstanceMachine`, which decides what is
held, aligned, released and handed over (the gating rule, epochs, barriers,
handover, the error policy); this module carries out the actions it returns: it
runs the user function on records, emits, forwards markers, snapshots and
restores state, and hands it over.

Held batches return no credit, so their senders stop at the credit limit.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import logging
import threading
import time
import zlib
from bisect import bisect_left
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

from hotwire.codec import packb
from hotwire.eventtime import INF, NEG_INF, InputWatermarks, is_marker, marker, marker_value
from hotwire.logs import as_task, task_context
from hotwire.metrics import BATCH_BUCKETS, E2E_BUCKETS
from hotwire.names import confined
from hotwire.pe.executors import EXECUTORS, Executor, _keyed_items
from hotwire.pe.state import REPLICATED_KEY, keyed_wire, split_replicated
from hotwire.plan import (
    ADOPT_REFUSED,
    CANARY_BUCKETS,
    Adopt,
    Gate,
    Retire,
    StartInstance,
    Switch,
    key_partition,
    pack_key,
)
from hotwire.worker import machine as sm
from hotwire.worker.channels import (
    BARRIER,
    BATCH,
    CONTROL,
    END,
    EPOCH,
    STATE,
    OutChannel,
    RouteState,
    Stamp,
    emit_all,
)
from hotwire.worker.machine import Checkpoint, CheckpointDone

if TYPE_CHECKING:
    from hotwire.worker.runtime import Runtime

log = logging.getLogger(__name__)

# Records per source batch (a batch is also cut after SOURCE_LINGER_S). Every hop
# costs per batch; 1024 against 256 gave the one-worker pipeline of
# bench/throughput.py about 1.2 M records/s against 0.87 M, the keyed count 1.26 M
# against 1.07 M. A slow source still sends small batches: the linger cuts them.
SOURCE_BATCH = 1024
SOURCE_LINGER_S = 0.002
# Chunks a source thread may pull ahead of the instance. The thread pulls while it
# holds the interpreter, until its chunks run out: more chunks, fewer hand-overs of
# the interpreter between it and the loop. bench/throughput.py's one-worker pipeline,
# 3 runs of 3,000,000 records twice per value: 16 chunks 1.65-1.89 M records/s (CPU
# 0.54-0.63 s per million), 4 chunks 1.37-1.60 M (0.64-0.75 s); 8 and 32 in between.
PUMP_CHUNKS = 16
TICK = 16  # inbox item: a timestamp assigner's timer for its next watermark
MAX_INLINE = 16  # longest run of same-worker PEs one task carries a batch through
_INLINE_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("inline_depth", default=0)
YIELD_EVERY_S = 0.002  # longest an instance with a full inbox keeps the loop


class StateError(Exception):
    """A PE's snapshot cannot be serialised; the message names the PE."""


@dataclass
class HandedOver:
    """What retiring instances of PE ``pe`` handed over in a switch, counted at the
    handover: keys of keyed state, bytes (to another worker the frames' bytes, which
    carry the held input too; on the same worker the state's msgpack size), one
    handover per successor (``local`` of them on the same worker) and the input
    records held unprocessed that went with the state."""

    pe: str
    keys: int = 0
    bytes: int = 0
    handovers: int = 0
    local: int = 0
    held: int = 0

    def add(self, keys: int, size: int, held: int) -> None:
        self.keys += keys
        self.bytes += size
        self.handovers += 1
        self.held += held

    def merge(self, other: HandedOver) -> None:
        self.keys += other.keys
        self.bytes += other.bytes
        self.handovers += other.handovers
        self.local += other.local
        self.held += other.held


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
        # Held while an inbox item, or a batch a same-worker sender hands over
        # directly (take_inline), is carried out: one at a time, as in one task.
        self._turn = asyncio.Lock()
        self._inline_ok = False  # the loop runs and has nothing of its own in hand
        self._log_context = task_context(app=self.app, pe=self.pe, instance=self.iid)
        self.routes: dict[str, RouteState] = {}
        self.out: dict[str, OutChannel] = {}
        config = getattr(ctx, "config", None)
        policy = config.get("on_error") if isinstance(config, dict) else None
        self.machine = sm.InstanceMachine(
            spec.inputs, spec.predecessors, source=spec.kind == "source", on_error=policy or "skip"
        )
        # lifecycle
        self.activated = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.released: asyncio.Future[None] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()
        self.gate_released: dict[int, asyncio.Future[None]] = {}
        self.adopted: dict[int, asyncio.Future[None]] = {}  # by version: merged
        self._switched: dict[int, asyncio.Future[None]] = {}
        self.task: asyncio.Task[None] | None = None
        self._pump: _Pump | None = None  # a source's running iterator
        # counters
        self._yielded = 0.0
        self.records_in = 0
        self.process_s = 0.0  # time spent in the PE's code (status: ms per record)
        self.batch_hist = [0] * (len(BATCH_BUCKETS) + 1)  # input batches by time taken
        self.records_out = 0
        self.dead_letters = 0
        self._packed_size: int | None = None  # the state packed for its handover, bytes
        # A sink's stamped batches (see Stamp) by seconds from their source's stamp to
        # the end of the sink's code, per E2E_BUCKETS (last slot: longer), and their sum.
        self.e2e_hist: list[int] | None = None
        self.e2e_s = 0.0
        self.position = 0  # records a source has emitted, over all its generations
        # A source's iterator object, and its position at each checkpoint cut not yet
        # complete: a ``checkpoint_complete(position)`` method of the object hears when
        # the checkpoint that covers ``position`` records is stored (e.g. to ack them).
        self._source_obj: Any = None
        self._cuts: dict[int, int] = {}
        # Event time: the watermark of each input channel (from the first marker on),
        # and a timestamp assigner's next marker, sent at most every interval.
        self._wm: InputWatermarks | None = None
        self._event_time = spec.kind in ("timestamps", "window", "join", "process")
        self._tick_at = 0.0  # when the timer of a TICK already asked for fires
        self._join = spec.kind == "join"
        self._last_mark = 0.0
        self._announced = False  # whether an assigner sent the watermark it took over
        self._tick_due = False
        self.late_dropped = 0  # late records of a windowed PE with no late side output
        self.batches = 0  # input batches taken (from the inbox or a sender's task)
        self.chained = 0  # of them, taken in a same-worker sender's task (take_inline)
        # A transactional sink started outside a user's request: its setup, and the
        # commits of the checkpoint it restored, run in its task once it runs.
        self.deferred_setup = False
        self._commit_restored = False

    # -- what the machine knows -----------------------------------------------
    @property
    def failed(self) -> str:
        """Why the instance stopped; "" while it runs."""
        return self.machine.failed

    @property
    def errors(self) -> int:
        return self.machine.errors

    @property
    def on_error_policy(self) -> str:
        return self.machine.on_error

    @property
    def inputs(self) -> set[str]:
        return self.machine.inputs

    @property
    def gates(self) -> dict[int, tuple[set[str], set[str]]]:
        """Gates not open yet: version -> (appearing, disappearing channels still open)."""
        return self.machine.gates

    @property
    def last_checkpoint(self) -> int:
        return self.machine.last_checkpoint

    def queued(self) -> int:
        """Records waiting in the inbox (not yet processed): at most the input
        channels' credits times the batch size."""
        items = getattr(self.inbox, "_queue", ())
        return sum(len(p) for k, _ch, p, _r in list(items) if k == BATCH)

    # -- set-up (prepare phase) ------------------------------------------
    def start_task(self) -> None:
        self.task = asyncio.get_running_loop().create_task(
            self._main(),
            name=f"{self.app}/{self.iid}",
            context=self._log_context,
        )

    def apply_gate(self, gate: Gate) -> None:
        self.gate_released[gate.version] = asyncio.get_running_loop().create_future()
        acts = self.machine.handle(sm.Gate(gate.version, gate.appearing, gate.disappearing))
        for a in acts:
            assert type(a) is sm.GateOpened, a
            self._gate_opened(a.version)

    def apply_adopt(self, adopt: Adopt) -> None:
        """Prepare: hold the records of ``adopt``'s share until the canary's state is
        merged (see :class:`hotwire.plan.Adopt`); ValueError when this PE cannot."""
        ex = self.executor
        why = "it runs no executor" if ex is None else ex.cannot_merge()
        if why or ex is None or ex.key_fn is None:
            raise ValueError(
                f"app {self.app!r} PE {self.pe!r} instance {self.spec.index} {ADOPT_REFUSED}: "
                f"{why or 'its input is not keyed'}"
            )
        key_fn, share = ex.key_fn, adopt.split.share

        def in_share(r: Any) -> bool:
            if is_marker(r):
                return False
            try:
                return zlib.crc32(pack_key(key_fn(r))) % CANARY_BUCKETS < share
            except Exception:
                return False  # processed now: the PE reports the record that fails

        self.adopted[adopt.version] = asyncio.get_running_loop().create_future()
        self.machine.handle(sm.Adopt(adopt.version, adopt.predecessors, in_share))

    def undo_gate(self, version: int) -> None:
        self.machine.handle(sm.Abort(version))
        for futs in (self.gate_released, self.adopted):
            fut = futs.pop(version, None)
            if fut is not None and not fut.done():
                fut.cancel()
        if self.machine.flow:
            # Input held on an aborted channel flows, in the instance's own task.
            self.inbox.put_nowait((CONTROL, None, sm.RESUME, None))

    def _gate_opened(self, version: int) -> None:
        fut = self.gate_released.get(version)
        if fut is not None and not fut.done():
            fut.set_result(None)

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
            self._failed(e)

    def _failed(self, e: Exception) -> None:
        self.machine.handle(sm.Fail(f"{type(e).__name__}: {e}"))
        log.exception("instance %s/%s failed", self.app, self.iid)
        if not self.finished.done():
            self.finished.set_result(None)

    async def _run(self) -> None:
        handle = self.machine.handle
        await self._perform(handle(sm.START))
        first = await self._setup_beside_inbox() if self.deferred_setup else []
        get, turn = self.inbox.get, self._turn
        try:
            while not self.finished.done():
                if first:
                    kind, ch, payload, ret = first.pop()
                else:
                    self._inline_ok = True
                    kind, ch, payload, ret = await get()
                # No await between taking the item and the turn when it is free, so
                # a sender never hands a batch over (take_inline) in between.
                async with turn:
                    if kind == BATCH:
                        self.batches += 1
                        acts = handle(sm.Batch(ch, payload, ret))
                    elif kind == BARRIER:
                        acts = handle(sm.Barrier(ch, payload))
                    elif kind == END:
                        acts = handle(sm.End(ch))
                    elif kind == EPOCH:
                        acts = handle(sm.Epoch(ch, payload))
                    elif kind == STATE:
                        state, pending = payload
                        acts = handle(sm.Handover(ch, state, pending))
                    elif kind == CONTROL:
                        acts = handle(_event(payload))
                    elif kind == TICK:
                        await self._on_tick()
                        continue
                    else:
                        continue
                    if acts:
                        await self._perform(acts)
        finally:
            self._inline_ok = False

    def can_take_inline(self) -> bool:
        """Whether a batch from a same-worker sender may be carried out in the
        sender's task now (:meth:`take_inline`): nothing of this instance's own is
        queued or under way (so order per channel holds), and the sender's chain is
        not already :data:`MAX_INLINE` deep."""
        return (
            self._inline_ok
            and not self._turn.locked()
            and self.inbox.empty()
            and _INLINE_DEPTH.get() < MAX_INLINE
        )

    async def take_inline(self, ch: str, records: list[Any], ret: Any) -> None:
        """Carry out a batch from a same-worker sender in the sender's task, as this
        instance's own loop would; only right after :meth:`can_take_inline` said so,
        with no await in between.

        A chain of same-worker PEs then runs as one task over each batch, without an
        inbox hand-off and a task switch per PE (operator chaining). The instance's
        machine decides as for any batch: a held channel still holds it. An error
        fails this instance, never the sender.
        """
        token = _INLINE_DEPTH.set(_INLINE_DEPTH.get() + 1)
        self.batches += 1
        self.chained += 1
        try:
            async with self._turn:
                with as_task(self._log_context):
                    acts = self.machine.handle(sm.Batch(ch, records, ret))
                    if acts:
                        await self._perform(acts)
        except asyncio.CancelledError:
            if self.machine.busy is not None:
                # The sender was stopped (its app or it alone) halfway through this
                # batch, which cannot be finished or given back: stop here as well,
                # and say so.
                log.warning(
                    "instance %s/%s stopped: its sender was stopped while carrying a batch "
                    "through it",
                    self.app,
                    self.iid,
                )
                self.machine.handle(sm.Fail("stopped with its sender halfway through a batch"))
                self._stop_loop()
            raise
        except Exception as e:
            self._failed(e)
            self._stop_loop()
        finally:
            _INLINE_DEPTH.reset(token)

    def _stop_loop(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)
        self.inbox.put_nowait((-1, None, None, None))  # its loop wakes, sees it finished

    async def _setup_beside_inbox(self) -> list[tuple[Any, Any, Any, Any]]:
        """Run the deferred setup (a sink waiting for its server) while taking each
        handover of state alone (no records in it) from the inbox, so the switch that
        moved the sink completes; the first other item waits for the setup and is
        returned for the loop (backpressure). Raises the setup's error."""
        setup = asyncio.ensure_future(self._deferred_setup())
        try:
            while True:
                getter = asyncio.ensure_future(self.inbox.get())
                try:
                    await asyncio.wait({getter, setup}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not getter.done():
                        getter.cancel()  # the item, if any, stays in the inbox
                if not getter.done() or getter.cancelled():
                    setup.result()  # the setup ended first: its error, or on
                    return []
                item = getter.result()
                kind, ch, payload, _ret = item
                if kind != STATE or payload[1]:
                    await setup
                    return [item]
                await self._perform(self.machine.handle(sm.Handover(ch, *payload)))
        finally:
            if not setup.done():
                setup.cancel()

    async def _perform(self, acts: list[sm.Action]) -> None:
        """Carry out ``acts`` in order; report each blocking action's outcome to the
        machine and carry out what it returns next."""
        while acts:
            report: sm.Event | None = None
            for a in acts:
                if isinstance(a, sm.Process):
                    report = await self._process(a)
                elif isinstance(a, sm.Snapshot):
                    report = await self._snapshot_for(a.checkpoint)
                elif isinstance(a, sm.ForwardBarrier):
                    for out in list(self.out.values()):
                        await out.barrier(a.checkpoint)
                elif isinstance(a, sm.ApplySwitch):
                    await self._apply_switch(a.switch)
                elif isinstance(a, sm.GateOpened):
                    self._gate_opened(a.version)
                elif isinstance(a, sm.ForgetInput):
                    self.runtime.forget_in(self.app, a.channel)
                elif isinstance(a, sm.Restore):
                    self._restore(list(a.states))
                elif isinstance(a, sm.Merge):
                    self._merge(a)
                elif isinstance(a, sm.Released):
                    self._set_released()
                elif isinstance(a, sm.Finish):
                    await self._finish(a)
                elif isinstance(a, sm.Commit) and self.kind == "source":
                    self._source_checkpoint_complete(a.checkpoint)
                elif isinstance(a, sm.Commit):
                    done = getattr(self.executor, "acheckpoint_complete", None)
                    if done is not None:
                        await done(a.checkpoint)  # off the loop; waits out an outage
                elif isinstance(a, sm.DropState):
                    log.warning(
                        "%s/%s: unexpected state from %s dropped", self.app, self.iid, a.src
                    )
                elif isinstance(a, sm.DeadLetter):
                    self._dead_letter(a)
                elif isinstance(a, sm.ReturnCredit):
                    for ch, ret in a.batches:
                        ret.grant(self.app, ch, 1)
                else:
                    raise TypeError(f"instance {self.iid}: no way to carry out {a!r}")
            acts = self.machine.handle(report) if report is not None else []

    async def _process(self, a: sm.Process) -> sm.Processed:
        assert self.executor is not None
        records, ret = a.records, a.ret
        if len(records) == 1 and is_marker(records[0]):
            return await self._on_marker(a)
        if self._join:
            self.executor.set_channel(a.channel)  # type: ignore[union-attr]
        if self._wm is not None:
            self._wm.saw(a.channel, time.monotonic())
        if self.kind == "sink" and self.runtime.hold.held():
            await self.runtime.hold.wait()  # the master may have fenced this worker
        t0 = time.perf_counter()
        out = await self.executor.process(records)
        took = time.perf_counter() - t0
        self.process_s += took
        self.batch_hist[bisect_left(BATCH_BUCKETS, took)] += 1
        rest = self.executor.take_rest()
        self.records_in += len(records) - len(rest)
        if not rest and ret is not None:
            ret.grant(self.app, a.channel, 1)
        # A stamped batch's output keeps its source time; a sink measures from it.
        stamp = ret.t if type(ret) is Stamp else None
        if stamp is not None and self.kind == "sink":
            self._e2e(stamp)
        if out:
            self.records_out += len(out)
            await emit_all(self.routes, out, stamp)
        # A full inbox never suspends ``inbox.get()``, and a sender with credit never
        # suspends either: without this an overloaded instance (a slow sink, say)
        # would starve the worker's heartbeats, control stream and data-plane reads.
        now = time.monotonic()
        if now - self._yielded > YIELD_EVERY_S:
            self._yielded = now
            await asyncio.sleep(0)
        # The records the PE did not process (it stopped on an error) stay held,
        # with no credit returned, for the upgrade that fixes the PE.
        if self._event_time:
            await self._after_event_time_batch()
        return sm.Processed(rest) if rest else sm.PROCESSED

    # -- event time --------------------------------------------------------
    async def _on_marker(self, a: sm.Process) -> sm.Processed:
        """A watermark marker arrived on ``a.channel``: the instance's watermark is
        the minimum over its inputs; when that rises, a windowed PE fires what it
        closes and the marker goes on downstream."""
        t, idle = marker_value(a.records[0])
        if a.ret is not None:
            a.ret.grant(self.app, a.channel, 1)
        wm = self._wm
        if wm is None:
            wm = self._wm = InputWatermarks()
        now = time.monotonic()
        wm.observe(a.channel, t, idle, now)
        new = wm.advance(self.machine.inputs, now)
        if new is None:
            return sm.PROCESSED
        if self.kind == "timestamps":
            await self._assigner_mark(force=False)  # an upstream +inf: the input ended
            return sm.PROCESSED
        if self.kind in ("window", "join"):
            ex: Any = self.executor
            await self._emit_results(ex.advance(new))
            new = max(new, ex.watermark)
        elif self.kind == "process":
            await self._emit_timer_results(self.executor.fire_timers("event", new))  # type: ignore[union-attr]
        await self._send_watermark(new, wm.idle_timeout())
        return sm.PROCESSED

    def _watermark_out(self) -> float:
        """The watermark this instance has sent downstream (or would: a windowed
        PE's restored one)."""
        ex: Any = self.executor
        if self.kind == "timestamps":
            return float(ex.emitted)
        out = self._wm.out if self._wm is not None else NEG_INF
        return max(out, ex.watermark) if self.kind in ("window", "join") else out

    async def _assigner_mark(self, force: bool) -> None:
        """A timestamp assigner sends its watermark when it rose, at most once per
        ``watermark_interval`` (a timer sends the last one of a burst)."""
        ex: Any = self.executor
        if ex is None or self.finished.done():
            return
        if not self._announced:
            # A successor's new channels start at the watermark its predecessors sent.
            self._announced = True
            if ex.emitted > NEG_INF:
                await self._send_watermark(ex.emitted, ex.idle)
        w = ex.watermark()
        if self._wm is not None:
            w = max(w, self._wm.out)  # +inf from upstream: the input ended
        if w <= ex.emitted:
            return
        now = time.monotonic()
        wait = ex.interval - (now - self._last_mark)
        if not force and wait > 0:
            if not self._tick_due:
                self._tick_due = True
                asyncio.get_running_loop().call_later(
                    wait, self.inbox.put_nowait, (TICK, None, None, None)
                )
            return
        ex.emitted = w
        self._last_mark = now
        await self._send_watermark(w, ex.idle)

    async def _send_watermark(self, t: float, idle: float | None) -> None:
        """Send the marker of watermark ``t`` on every output channel."""
        for route in list(self.routes.values()):
            for ch in route.channels:
                await ch.send([marker(t, idle)])

    async def _after_event_time_batch(self) -> None:
        if self.kind == "timestamps":
            await self._assigner_mark(force=False)
            return
        if self.kind == "process":
            if self.executor.timers:  # type: ignore[union-attr]
                self._schedule_timers()
            return
        ex: Any = self.executor
        await self._emit_results(ex.take_out())
        if self._join:
            if ex.late > self.late_dropped:
                if not self.late_dropped:
                    log.warning(
                        "app %r PE %r: records below the watermark join nothing and are "
                        "dropped (counted as late_dropped)",
                        self.app,
                        self.pe,
                    )
                self.late_dropped = ex.late
            return
        late = ex.take_late()
        if late:
            routes = {d: r for d, r in self.routes.items() if d in ex.late_to}
            if routes:
                self.records_out += len(late)
                await emit_all(routes, late)
            else:
                if not self.late_dropped:
                    log.warning(
                        "app %r PE %r: records too late for every window are dropped; "
                        "attach a sink to .late() to keep them",
                        self.app,
                        self.pe,
                    )
                self.late_dropped += len(late)

    async def _on_tick(self) -> None:
        """A timer of this instance is due: a timestamp assigner's next watermark, or
        a class PE's processing-time timers."""
        self._tick_due = False
        if self.kind == "timestamps":
            await self._assigner_mark(force=True)
        elif self.kind == "process" and not self.finished.done() and not self.machine.failed:
            ex: Any = self.executor
            await self._emit_timer_results(ex.fire_timers("processing", time.time()))
            if ex.timers:
                self._schedule_timers()

    def _schedule_timers(self) -> None:
        """Ask for a TICK when the next processing-time timer is due."""
        nxt = self.executor.timers.next_processing()  # type: ignore[union-attr]
        if nxt is None or (self._tick_due and self._tick_at <= nxt):
            return
        self._tick_due, self._tick_at = True, nxt
        delay = max(0.0, nxt - time.time())
        asyncio.get_running_loop().call_later(
            delay, self.inbox.put_nowait, (TICK, None, None, None)
        )

    async def _emit_timer_results(self, out: list[Any]) -> None:
        if out:
            self.records_out += len(out)
            await emit_all(self.routes, out)

    async def _emit_results(self, results: list[Any]) -> None:
        """A windowed PE's results go to every output except its late side output."""
        if not results:
            return
        late_to = self.executor.late_to  # type: ignore[union-attr]
        routes = {d: r for d, r in self.routes.items() if d not in late_to}
        self.records_out += len(results)
        if routes:
            await emit_all(routes, results)

    def _e2e(self, stamp: float) -> None:
        """A sink finished a batch whose source stamped it at ``stamp`` (its worker's
        ``time.time()``: another host's clock offset is part of the figure; a negative
        one counts as 0)."""
        took = max(0.0, time.time() - stamp)
        if self.e2e_hist is None:
            self.e2e_hist = [0] * (len(E2E_BUCKETS) + 1)
        self.e2e_hist[bisect_left(E2E_BUCKETS, took)] += 1
        self.e2e_s += took

    # -- checkpoints -------------------------------------------------------
    async def _snapshot_for(self, cid: int) -> sm.Snapshotted | sm.Fail:
        """Snapshot for checkpoint ``cid`` and report it to the runtime."""
        pre_commit = getattr(self.executor, "apre_commit", None)
        if pre_commit is not None:
            await pre_commit(cid)  # the open transaction becomes part of this checkpoint
        if self.kind == "source":
            self._cuts[cid] = self.position
        try:
            data = self._packed(self._snapshot())
        except StateError as e:
            log.error("%s; the instance stops", e)
            return sm.Fail(str(e))
        self.runtime.on_checkpoint(self.app, cid, self.iid, data)
        return sm.SNAPSHOTTED

    def _source_checkpoint_complete(self, cid: int) -> None:
        """Checkpoint ``cid`` is stored: tell the source's iterator object the
        position it covers (``checkpoint_complete(position)``, if it has one)."""
        covered = [c for c in self._cuts if c <= cid]
        if not covered:
            return
        position = max(self._cuts.pop(c) for c in covered)
        done = getattr(self._source_obj, "checkpoint_complete", None)
        if done is None:
            return
        try:
            done(position)
        except Exception:
            log.exception("%s/%s: the source's checkpoint_complete raised", self.app, self.iid)

    def _checked(self, state: Any) -> Any:
        """``state`` if it serialises; a :class:`StateError` naming the PE if not.

        State crosses workers and goes into checkpoints as msgpack, while a
        same-worker handover could pass the object itself: checking every snapshot
        makes state that cannot be serialised fail the same way wherever the
        successor runs, with an error that says what to fix."""
        if state is not None:
            self._packed(state)
        return state

    def _packed(self, state: Any) -> bytes:
        """``state`` as msgpack (what a checkpoint stores: packed once, here); a
        :class:`StateError` naming the PE if it cannot be serialised."""
        try:
            return packb(state)
        except (TypeError, ValueError, OverflowError) as e:
            raise StateError(
                f"app {self.app!r} PE {self.pe!r} instance {self.spec.index}: the state "
                f"from snapshot() cannot be serialised ({e}); return msgpack values "
                "(dict, list, str, bytes, int, float, bool, None)"
            ) from e

    def _snapshot(self) -> Any:
        if self.kind == "source":
            return self._source_state()
        assert self.executor is not None
        state = self.executor.snapshot()
        if self.executor.keyed and isinstance(state, dict):
            state = keyed_wire(state)
        return self.executor.versioned(state)

    async def restore_checkpoint(self, states: list[Any]) -> None:
        """Start from a checkpoint's states (recovery: one or, after a rescale, several).

        A transactional sink commits the transactions the checkpoint holds: the
        checkpoint is complete, so they are part of the output."""
        self._restore(states)
        commit_all = getattr(self.executor, "acommit_all", None)
        if commit_all is not None:
            if self.deferred_setup:
                self._commit_restored = True  # once its setup ran (_deferred_setup)
                return
            await commit_all()

    async def _deferred_setup(self) -> None:
        """The setup of a sink started outside a user's request, waiting with backoff
        while its server is unreachable (status shows the instance waiting), then the
        commits of the checkpoint it restored. Its inbox fills meanwhile: backpressure."""
        assert self.executor is not None
        await self.executor.setup(wait=True)  # type: ignore[call-arg]
        if self._commit_restored:
            await self.executor.acommit_all()  # type: ignore[attr-defined]
        self.deferred_setup = self._commit_restored = False

    def _source_state(self) -> dict[str, int]:
        """A source's state: its position, and which of how many instances it is."""
        return {"position": self.position, "instance": self.spec.index, "of": self.spec.parallelism}

    def _restore(self, states: list[Any]) -> None:
        if self.kind == "source":
            found = [s for s in states if isinstance(s, dict) and "position" in s]
            n, me = self.spec.parallelism, self.spec.index
            preds = sorted(
                (
                    {
                        "instance": int(s.get("instance", me)),
                        "of": int(s.get("of", n)),
                        "position": s["position"],
                    }
                    for s in found
                ),
                key=lambda p: p["instance"],
            )
            self.ctx.predecessors = preds
            if any(p["of"] != n for p in preds):
                # Another parallelism: every old instance's state reached every new
                # one. The position (records emitted) is that of the old instances j
                # with j % n == me, as without the rescale; a partitioned source
                # merges all of ctx.predecessors.
                found = [p for p in preds if p["instance"] % n == me]
            self.position = max((s["position"] for s in found), default=0)
            self.ctx.position = self.position
        elif self.executor is not None:
            self.executor.restore(states)

    def _merge(self, m: sm.Merge) -> None:
        assert self.executor is not None
        t0 = time.perf_counter()
        self.executor.merge(list(m.states))
        log.debug(
            "%s/%s: merged the state of %d canary instance(s) in %.1f ms",
            self.app,
            self.iid,
            len(m.states),
            (time.perf_counter() - t0) * 1000,
        )
        fut = self.adopted.get(m.version)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _set_released(self) -> None:
        if not self.released.done():
            self.released.set_result(None)

    # -- switches ----------------------------------------------------------
    def switched(self, version: int) -> asyncio.Future[None]:
        """Resolved once this instance applied its switch of ``version``."""
        fut = self._switched.get(version)
        if fut is None:
            fut = self._switched[version] = asyncio.get_running_loop().create_future()
        return fut

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
        if self._wm is not None or (self._event_time and self.executor is not None):
            # New output channels start from the watermark already sent on the others.
            w = self._watermark_out()
            if w > NEG_INF:
                idle = self._wm.idle_timeout() if self._wm is not None else None
                for route in sw.routes:
                    for ch in self.routes[route.dst_pe].channels:
                        await ch.send([marker(w, idle)])
        for ch in sw.epoch_out:
            out = self.out.get(ch)
            if out is not None:
                await out.epoch(sw.version)
        fut = self.switched(sw.version)
        if not fut.done():
            fut.set_result(None)
        for v in [v for v in self._switched if v < sw.version]:
            del self._switched[v]  # only the newest switch can still be waited for

    # -- sources ---------------------------------------------------------
    async def _run_source(self) -> None:
        machine = self.machine
        await self._perform(machine.handle(sm.START))
        # Wait for predecessors' state (a replaced source resumes from its position).
        while machine.pending_preds and not self.finished.done():
            kind, ch, payload, _ = await self.inbox.get()
            if kind == STATE:
                state, pending = payload
                await self._perform(machine.handle(sm.Handover(ch, state, pending)))
            elif kind == CONTROL:
                await self._perform(machine.handle(_event(payload)))
        if await self._source_controls():
            return
        try:
            self._source_obj = self.source_fn(self.ctx)
            self._pump = _Pump(self._source_obj)
        except Exception as e:
            await self._source_failed(e)
        ctl: asyncio.Future[Any] | None = None
        try:
            while True:
                if await self._source_controls():
                    return
                pump = self._pump
                if pump is not None and pump.buf:
                    await self._emit_source(pump.take())
                    continue
                if pump is not None and pump.finished:
                    self._pump = None
                    if pump.error is not None:
                        # The user's iterator raised: it cannot go on. The source stays
                        # (for controls: an upgrade restarts it from its position).
                        await self._source_failed(pump.error)
                    else:
                        await self._send_watermark(INF, None)  # its input is complete
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
                        await self._perform(machine.handle(_event(payload)))
        finally:
            if ctl is not None:
                ctl.cancel()
            if self._pump is not None:
                await self._pump.stop()

    async def _source_controls(self) -> bool:
        """Apply queued control items; True when the source has retired."""
        while not self.inbox.empty() and not self.finished.done():
            kind, _ch, payload, _ = self.inbox.get_nowait()
            if kind == CONTROL:
                await self._perform(self.machine.handle(_event(payload)))
        return self.finished.done()

    async def _emit_source(self, chunk: list[Any]) -> None:
        if self.runtime.hold.held():
            await self.runtime.hold.wait()  # the master may have fenced this worker
        self.position += len(chunk)
        self.records_out += len(chunk)
        await emit_all(self.routes, chunk, time.time() if self.runtime.stamp else None)

    # -- retirement ------------------------------------------------------
    async def _finish(self, fin: sm.Finish) -> None:
        if self.finished.done():
            return
        pump, self._pump = self._pump, None
        if pump is not None:
            # What a source's pump already pulled from the iterator goes out first.
            await pump.stop()
            if pump.buf:
                await self._emit_source(pump.take())
        retire = fin.retire
        for ch, out in list(self.out.items()):
            await out.end()
            self.runtime.forget_out(self.app, ch)
        self.out.clear()
        succ = retire.successors
        pre_commit = getattr(self.executor, "apre_commit", None)
        if pre_commit is not None:
            # A transactional sink's open transaction is pre-committed and handed
            # over; it commits with the successor's next complete checkpoint. With
            # no successor (the sink is removed) nothing can replay into it: commit.
            await pre_commit(self.last_checkpoint + 1)
            if not succ:
                await self.executor.acommit_all()  # type: ignore[union-attr]
        pending = [r for r in fin.unprocessed if not is_marker(r)]  # watermarks re-form
        if succ:
            self._packed_size = None
            parts, keys = self._split_state(retire)
            held = self._split_pending(retire, pending)
            handed = HandedOver(self.pe)
            for s, part, recs, k in zip(succ, parts, held, keys, strict=True):
                sent = await self.runtime.send_state(
                    self.app, s.instance, s.worker, self.iid, part, recs
                )
                if sent is None:  # the same worker: the object itself, counted as msgpack
                    handed.local += 1
                    sent = self._local_size(part)
                    self.runtime.handover_bytes[self.app, "local"] += sent
                handed.add(k, sent, len(recs))
            self.runtime.handed_over(self.app, retire.version, handed)
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

    def _split_pending(self, retire: Retire, pending: list[Any]) -> list[list[Any]]:
        """Unprocessed input for each successor: by key when keyed, else to one."""
        n = len(retire.successors)
        parts: list[list[Any]] = [[] for _ in range(n)]
        if not pending:
            return parts
        key_fn = self.executor.key_fn if self.executor is not None else None
        if retire.keyed and key_fn is not None and n > 1:
            for r in pending:
                parts[key_partition(key_fn(r), n, retire.canary)].append(r)
        else:
            parts[self.spec.index % n] = pending
        return parts

    def _split_state(self, retire: Retire) -> tuple[list[Any], list[int]]:
        """The state for each successor, split by key when keyed, each part with
        the state version of the code that wrote it (see ``hotwire.pe.state``),
        and the number of keys in each part (0 for state that is not keyed)."""
        parts = self._split_bare_state(retire)
        keys = [len(p) if retire.keyed and isinstance(p, dict | list) else 0 for p in parts]
        if self.executor is None:
            return parts, keys
        return [self.executor.versioned(p) for p in parts], keys

    def _local_size(self, part: Any) -> int:
        """Bytes of ``part`` as msgpack: what the serialisability check packed, or
        packed here."""
        if part is None or (isinstance(part, list | dict) and not part):
            return 0
        if self._packed_size is not None:
            size, self._packed_size = self._packed_size, None
            return size
        return len(self._packed(part))

    def _split_bare_state(self, retire: Retire) -> list[Any]:
        n = len(retire.successors)
        if self.kind == "source":
            state: Any = self._source_state()
            if n != self.spec.parallelism:
                return [state] * n  # rescaled: each successor hears every position
        else:
            assert self.executor is not None
            state = self.executor.snapshot()
        same = n == self.spec.parallelism and not retire.rehash
        if self.kind == "timestamps" and not same:
            return [state] * n  # every new assigner starts at the watermark already sent
        if (
            retire.keyed
            and state
            and not retire.canary
            and (same or retire.same_index)
            and self.spec.index < n
        ):
            # Every key of instance i belongs to new instance i: the same parallelism,
            # or an old-code instance of a canary leaving it (Retire.same_index).
            whole: list[Any] = [[] for _ in range(n)]
            succ = retire.successors[self.spec.index]
            # A local successor takes the state object itself; over the wire keyed
            # state travels as keyed_wire() makes it (pairs unless its keys survive).
            local = succ.worker == self.runtime.name and isinstance(state, dict)
            size = len(self._packed(state))  # fails here if it cannot be serialised
            if local:
                self._packed_size = size  # the handover's bytes
                whole[self.spec.index] = state
            elif isinstance(state, dict):
                whole[self.spec.index] = keyed_wire(state)
            else:
                whole[self.spec.index] = [[k, v] for k, v in _keyed_items(state)]
            return whole
        if retire.keyed and state:
            return self._split_keys(state, retire)
        out: list[Any] = [None] * n
        out[self.spec.index % n] = state
        return out

    def _split_keys(self, state: Any, retire: Retire) -> list[Any]:
        n = len(retire.successors)
        parts: list[list[Any]] = [[] for _ in range(n)]
        for k, v in _keyed_items(state):
            if k == REPLICATED_KEY:  # the instance's own entry (watermark, timers)
                own = split_replicated(v, n, lambda key: key_partition(key, n, retire.canary))
                for part, value in zip(parts, own, strict=True):
                    part.append([k, value])
                continue
            parts[key_partition(k, n, retire.canary)].append([k, v])
        return parts

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
        go_on = True
        for a in self.machine.handle(sm.RecordError(record, f"{type(exc).__name__}: {exc}")):
            if type(a) is sm.Stop:
                go_on = False
                log.error(
                    "app %r PE %r instance %d: %s (record %.200r); the instance stops "
                    "(on_error='fail')",
                    self.app,
                    self.pe,
                    self.spec.index,
                    a.error,
                    a.record,
                )
            elif type(a) is sm.DeadLetter:
                self._dead_letter(a)
            elif type(a) is sm.Skip and a.log:
                log.error(
                    "app %r PE %r instance %d: %s (record %.200r); record %s",
                    self.app,
                    self.pe,
                    self.spec.index,
                    a.error,
                    a.record,
                    a.outcome,
                )
        return go_on

    async def _source_failed(self, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        log.error(
            "app %r PE %r instance %d: the source raised %s at position %d; it stops "
            "(an upgrade or rollback restarts it from this position)",
            self.app,
            self.pe,
            self.spec.index,
            reason,
            self.position,
        )
        await self._perform(self.machine.handle(sm.Fail(reason, position=self.position)))

    def _dead_letter(self, dl: sm.DeadLetter) -> None:
        """Append the failing record and the error as a JSON line to
        ``<data dir>/dead-letter/<app>.<pe>.jsonl``."""
        record = dl.record
        doc = {
            "app": self.app,
            "pe": self.pe,
            "instance": self.spec.index,
            "error": dl.error,
            "unix": time.time(),
            **({} if dl.position is None else {"position": dl.position}),
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


def _event(item: Any) -> sm.Event:
    """The machine event for a control item from the inbox."""
    if isinstance(item, Switch):
        return sm.Switch(item)
    if isinstance(item, Retire):
        return sm.Retire(item)
    return item  # type: ignore[no-any-return]  # Checkpoint, CheckpointDone, Resume


def _json_safe(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("latin-1")
    return repr(v)


ACLOSE_TIMEOUT_S = 5.0  # longest a source's aclose() may hold up its instance's retirement


async def _aclose(obj: Any) -> None:
    """Close a source's iterator; one that raises or hangs is logged, never waited for
    past :data:`ACLOSE_TIMEOUT_S` (a retiring source would otherwise stall a switch)."""
    close = getattr(obj, "aclose", None)
    if close is None:
        return
    try:
        await asyncio.wait_for(close(), ACLOSE_TIMEOUT_S)
    except TimeoutError:
        log.warning(
            "a source's aclose() did not return within %.0f s; its instance goes on "
            "without waiting for it",
            ACLOSE_TIMEOUT_S,
        )
    except Exception as e:
        log.warning("a source's aclose() raised %s: %s", type(e).__name__, e)


STOP_TIMEOUT_S = 5.0  # longest a source's pull task may hold up its instance's retirement


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel a source's pull task and wait until it ends, cancelling again as needed.

    A cancel can be swallowed: on Python 3.11 ``asyncio.wait_for`` returns its inner
    result instead of raising when the cancel arrives as that result does (NATS's
    client fetches through it), and a user's iterator may catch it. Waiting once on
    a swallowed cancel waited forever, and the switch retiring the source stalled.
    The pull loop also stops by itself after its next record (``_stopping``).
    """
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while not task.done():
        if time.monotonic() > deadline:
            log.warning(
                "a source's iterator ignored cancellation for %.0f s; its instance goes on "
                "without waiting for it",
                STOP_TIMEOUT_S,
            )
            return
        task.cancel()
        await asyncio.wait({task}, timeout=0.05)


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
            while not self._stopping:
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
        self._stopping = True
        if self.task is not None:
            await _cancel(self.task)
        if self._thread is not None:
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


__all__ = ["EXECUTORS", "Checkpoint", "CheckpointDone", "Instance", "StateError"]
