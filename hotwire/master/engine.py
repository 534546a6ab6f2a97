"""The master's transition engine: the apps, their locks, the store, and every change.

:class:`TransitionEngine` owns the committed state of every app (``apps``), one
lock per app (:class:`~hotwire.master.locks.AppLocks`: one transition at a time,
waiters sleep until the release), and the store handle. Every change to an app
goes through it: a client's submit, upgrade, rollback or kill (called by
:class:`~hotwire.master.service.Master`), a restart from a checkpoint, instances
moved off a draining worker and the finishing of a transition a crashed master
left half done (called by :class:`~hotwire.master.recovery.Recovery`).

The steps of a transition are the pure state machine of
:mod:`hotwire.master.transition`; the engine plans (diff, schedule, planner),
carries out the machine's actions over the workers' instruction streams and the
store, and feeds their outcomes back as events. Each transition method expects
its caller to hold the app's lock (:meth:`TransitionEngine.claim` for a client,
which refuses while it is held; :meth:`TransitionEngine.hold` for the master's
own work, which waits for it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import msgpack

from hotwire.codec import unpackb
from hotwire.logs import log_context
from hotwire.master import canary as cn
from hotwire.master import transition as tr
from hotwire.master.cut import checkpoint_samples, sampled_keys, states_for_restart
from hotwire.master.diff import ChangeSet, diff, renamed_states
from hotwire.master.locks import AppLocks
from hotwire.master.membership import Membership
from hotwire.master.planner import (
    StateMove,
    canary_abort_placement,
    plan_canary_abort,
    plan_stop,
    plan_upgrade,
    state_moves,
)
from hotwire.master.progress import TransitionProgress
from hotwire.master.scheduler import SchedulingError, schedule
from hotwire.master.store import Store
from hotwire.metrics import MasterMetrics
from hotwire.model import STATEFUL_KINDS, LogicalModel
from hotwire.model_delta import apply_delta, model_delta
from hotwire.plan import (
    ADOPT_REFUSED,
    Placement,
    Plan,
    StartInstance,
    from_wire,
    parse_instance_id,
    placement_from_dict,
    placement_to_dict,
    to_wire,
)
from hotwire.plan_wire import to_pb
from hotwire.proto import hotwire_pb2 as pb

log = logging.getLogger(__name__)


class Refused(Exception):
    """A request the master turns down: carries the gRPC status code and a reason."""

    def __init__(self, code: grpc.StatusCode, reason: str):
        super().__init__(reason)
        self.code = code


class SwitchFailed(Refused):
    """A switch did not finish on every worker: the app is half switched."""


def _adopt_refused(e: Refused) -> bool:
    """A prepare that a worker refused because a PE cannot take a canary's keys in
    while it runs (nothing changed)."""
    return e.code == grpc.StatusCode.ABORTED and ADOPT_REFUSED in str(e)


@dataclass
class AppState:
    name: str
    version: int
    state: str  # running | killed
    model: LogicalModel
    bundle: str
    placement: Placement
    epoch: int  # the last transition id; new instances get generation epoch + 1


@dataclass
class Outcome:
    app: str
    from_version: int
    to_version: int
    change: ChangeSet
    plan: Plan
    applied: bool
    latency_ms: float
    state_check: str = ""  # what the state compatibility check found ("" : not run)
    state_check_failed: bool = False
    moves: list[StateMove] = field(default_factory=list)  # where state goes
    handed: list[dict[str, Any]] = field(default_factory=list)  # see handed_over()


@dataclass
class Interrupted:
    """A transition a crashed master left in its store."""

    app: str
    epoch: int
    phase: str  # prepare | switch
    record: dict[str, Any]

    @property
    def workers(self) -> list[str]:
        return list(self.record["prepare_workers"])


@dataclass
class _Job:
    """What the engine needs to carry out one transition's actions."""

    app: str
    epoch: int
    workers: list[str]
    intent: dict[str, Any]  # what StoreCommit records
    record: bytes  # the stored intent: the intent, the workers and the switch batches
    prepare: dict[str, list[pb.Instruction]] = field(default_factory=dict)
    switch: dict[str, list[pb.Instruction]] = field(default_factory=dict)
    bundles: dict[str, bytes] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    latency_ms: float = 0.0
    # what each worker's switch handed over (its ack), by worker
    handed: dict[str, list[pb.HandedOver]] = field(default_factory=dict)
    plan_lines: list[str] = field(default_factory=list)  # Plan.describe(), for progress
    # the model and placement that intent["model"] and intent["placement"] record, so
    # the commit need not build them back (None when a restarted master finishes a
    # transition from its store)
    model: LogicalModel | None = None
    placement: Placement | None = None


def handed_over(handed: dict[str, list[pb.HandedOver]]) -> list[dict[str, Any]]:
    """What a switch handed over, per PE over every worker (``handed``: each
    worker's ack), as the workers counted it at the handover:
    ``[{pe, keys, bytes, handovers, local, held}]``."""
    by_pe: dict[str, dict[str, Any]] = {}
    for acks in handed.values():
        for h in acks:
            t = by_pe.setdefault(h.pe, {"pe": h.pe, **dict.fromkeys(HANDED_FIELDS, 0)})
            for f in HANDED_FIELDS:
                t[f] += getattr(h, f)
    return [by_pe[pe] for pe in sorted(by_pe)]


HANDED_FIELDS = ("keys", "bytes", "handovers", "local", "held")
# A version whose number is a multiple of this records its model whole; the others
# record what changed since the version before (so a read applies at most this
# many deltas less one).
MODEL_SNAPSHOT_EVERY = 16


class TransitionEngine:
    """The apps, their locks and the store, and the one way to change an app."""

    def __init__(
        self,
        membership: Membership,
        switch_timeout: float = 30.0,
        prepare_timeout: float = 60.0,
        abort_timeout: float = 10.0,
    ):
        self.membership = membership
        self.switch_timeout = switch_timeout  # longest a worker waits for a switch to settle
        self.prepare_timeout = prepare_timeout
        self.abort_timeout = abort_timeout
        self.switch_grace = 10.0  # how much longer than the switch itself its ack may take
        self.timer_margin = 1.0  # a phase's timer fires after its sends' own timeouts
        self.apps: dict[str, AppState] = {}  # committed state; change it only through here
        self.locks = AppLocks()
        self.store: Store | None = None
        self.draining: set[str] = set()  # workers that get no new instances
        self.canaries: dict[str, cn.CanaryRun] = {}  # app -> its canary in progress
        self.canary_log: list[cn.CanaryRun] = []  # every canary since the master started
        # Hooks (set by Recovery): a transition of the app begins; it committed; a
        # restart from the checkpoint finished (with what it did).
        self.on_begin: Callable[[str], None] = lambda app: None
        self._preloads: set[asyncio.Task[Any]] = set()  # LOAD sends in flight
        self.on_commit: Callable[[str], None] = lambda app: None
        self.on_restart: Callable[[dict[str, Any]], None] = lambda event: None
        # Phase durations and outcomes of transitions, checkpoints (Prometheus).
        self.metrics = MasterMetrics()
        # The last transition of each app, phase by phase (the dashboard's progress);
        # on_progress(app) is called at each of its phase changes.
        self.progress: dict[str, TransitionProgress] = {}
        self.on_progress: Callable[[str], None] = lambda app: None

    async def load(self, store: Store) -> None:
        """Take the store and the apps it recorded."""
        self.store = store
        for name, version, state, epoch in await store.read(store.apps):
            rec = await store.read(store.version, name, version)
            if rec is not None:
                self.apps[name] = AppState(
                    name, version, state, rec.model, rec.bundle_hash, rec.placement, epoch
                )
        # Canaries: the ended ones for history, the running ones resumed (their
        # start time is kept, so --canary-for counts from the real start).
        for record in await store.read(store.canaries):
            run = cn.CanaryRun.from_record(record)
            self.canary_log.append(run)
            if run.outcome:
                continue
            st = self.running(run.app)
            pl = st.placement.get(run.pe) if st is not None else None
            if pl is not None and pl.canary is not None and run.app not in self.canaries:
                self.canaries[run.app] = run
                log.info("app %r: canary of PE %r resumed", run.app, run.pe)
                continue
            run.outcome, run.why = "aborted", "its split was gone when the master restarted"
            run.ended = time.time()
            await asyncio.wrap_future(store.put_canary(run.row()))

    # ------------------------------------------------------------------
    # Locks
    # ------------------------------------------------------------------
    def busy(self, app: str) -> bool:
        """Whether a transition (or the master's own work) holds ``app``'s lock."""
        return app in self.locks

    def holder(self, app: str) -> str:
        return self.locks.holder(app)

    @asynccontextmanager
    async def claim(self, app: str, what: str) -> AsyncIterator[None]:
        """Hold ``app``'s lock for a client's request, refused while it is held."""
        if not self.locks.take(app, what):
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"app {app!r}: {self.locks.holder(app)} is in progress; "
                "wait for it to finish and try again",
            )
        try:
            with log_context(app=app):
                yield
        finally:
            self.locks.release(app)

    @asynccontextmanager
    async def hold(self, app: str, what: str) -> AsyncIterator[None]:
        """Hold ``app``'s lock, waiting for it to be free."""
        await self.locks.acquire(app, what)
        try:
            with log_context(app=app):
                yield
        finally:
            self.locks.release(app)

    async def wait_idle(self, app: str) -> None:
        """Return once ``app``'s lock is free, without taking it."""
        await self.locks.wait_free(app)

    def _held(self, app: str) -> None:
        if app not in self.locks:
            raise RuntimeError(f"app {app!r}: a transition needs the app's lock; hold it first")

    # ------------------------------------------------------------------
    # Reading
    # ------------------------------------------------------------------
    def running(self, app: str) -> AppState | None:
        st = self.apps.get(app)
        return st if st is not None and st.state == "running" else None

    def preload(self, app: str, bundle_hash: str, bundle: bytes) -> None:
        """Send ``bundle`` to the live workers running ``app`` now, for them to import
        while the master plans the change (the import of a large app.py takes
        milliseconds). The prepare sends it again and waits for its import: a load
        that fails, comes late or reaches no worker changes nothing."""
        st = self.running(app)
        if st is None:
            return
        ms = self.membership
        for w in sorted({w for pl in st.placement.values() for w in pl.workers}):
            if not (ms.alive(w) and ms.connected(w)):
                continue
            task = asyncio.get_running_loop().create_task(
                ms.send(w, pb.LOAD, app, 0, [], {bundle_hash: bundle}, timeout=30)
            )
            self._preloads.add(task)
            task.add_done_callback(self._preload_done)

    def _preload_done(self, task: asyncio.Task[Any]) -> None:
        self._preloads.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("a bundle preload was not delivered: %s", task.exception())

    def free_slots(self, app: str) -> dict[str, int]:
        """Slots on live, non-draining workers that apps other than ``app`` leave free."""
        load: dict[str, int] = {}
        for other in self.apps.values():
            if other.name == app or other.state != "running":
                continue
            for pl in other.placement.values():
                for w in pl.workers:
                    load[w] = load.get(w, 0) + 1
        return {
            n: max(w.slots - load.get(n, 0), 0)
            for n, w in self.membership.live().items()
            if n not in self.draining
        }

    def _store(self) -> Store:
        if self.store is None:
            raise RuntimeError("the transition engine has no store yet")
        return self.store

    # ------------------------------------------------------------------
    # Transitions (the caller holds the app's lock)
    # ------------------------------------------------------------------
    async def change(
        self,
        app: str,
        version: int,
        action: str,
        old: LogicalModel,
        old_pl: Placement,
        new: LogicalModel,
        bundle: bytes,
        bundle_hash: str,
        dry_run: bool = False,
        rolled_back_to: int = 0,
        drop_state: Collection[str] = (),
        recorded: dict[str, Any] | None = None,
        adopt_canary: bool = False,
    ) -> Outcome:
        """Take ``app`` from ``old`` to ``new`` as ``version`` (a submit, upgrade or
        rollback); with ``dry_run``, only plan it.

        An upgrade that removes a PE of a stateful kind is refused before anything
        is planned unless ``drop_state`` names it (:meth:`_check_removals`)."""
        self._held(app)
        store = self._store()
        t0 = time.perf_counter()
        change = diff(old, new)
        self._check_removals(app, action, old, change, drop_state)
        cur_version = version - 1
        cur = self.apps.get(app)
        epoch = (cur.epoch if cur is not None else 0) + 1
        try:
            new_pl = schedule(new, old_pl, change, self.free_slots(app), epoch, bundle_hash)
        except SchedulingError as e:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from e
        plan = plan_upgrade(app, epoch, old, old_pl, new, new_pl, change, bundle_hash, adopt_canary)
        moves = state_moves(plan, old, self._state_sizes(app))
        if change.is_empty and action != "submit":
            return Outcome(app, cur_version, cur_version, change, plan, False, 0.0)
        plan, checked = self._with_state_check(app, plan)
        outcome = Outcome(app, cur_version, version, change, plan, False, 0.0, checked)
        outcome.moves = moves
        if dry_run:
            await self._dry_state_check(outcome, bundle_hash, bundle)
            return outcome
        await asyncio.wrap_future(store.put_bundle(bundle_hash, bundle))
        intent = {
            "kind": "version",
            "version": version,
            "action": action,
            "model": self._model_text(app, version, old, new),
            "bundle": bundle_hash,
            "placement": placement_to_dict(new_pl),
            "changes": {**change.to_dict(), **_applied(plan, moves), **(recorded or {})},
            "rolled_back_to": rolled_back_to,
        }
        fallback = tr.Fallback.RESTART if self.running(app) else tr.Fallback.STOP
        job = await self._apply(
            plan, bundle_hash, bundle, intent, fallback, t0, model=new, placement=new_pl
        )
        outcome.applied = True
        outcome.latency_ms = job.latency_ms
        outcome.handed = handed_over(job.handed)
        log.info(
            "app %r: %s to version %d in %.1f ms (%d instructions)",
            app,
            action,
            version,
            job.latency_ms,
            plan.count(),
        )
        return outcome

    def _model_text(self, app: str, version: int, old: LogicalModel, new: LogicalModel) -> str:
        """What version ``version`` records of ``new``: the changes since ``old`` when
        ``old`` is the app's current version, the version before (see
        :data:`MODEL_SNAPSHOT_EVERY`); else the whole model."""
        cur = self.apps.get(app)
        if (
            cur is not None
            and cur.model is old
            and cur.version == version - 1
            and version % MODEL_SNAPSHOT_EVERY != 0
        ):
            delta = model_delta(old, new)
            if delta is not None:
                return json.dumps({"delta_of": cur.version, **delta}, sort_keys=True)
        return new.to_json()

    def _intent_model(self, intent: dict[str, Any]) -> LogicalModel:
        """The model a stored intent records (whole, or a delta on the app's current
        version, read from the store if the app is at another one)."""
        d = json.loads(intent["model"])
        if "delta_of" not in d:
            return LogicalModel.from_dict(d)
        cur = self.apps.get(d["app"])
        if cur is not None and cur.version == d["delta_of"]:
            return apply_delta(cur.model, d)
        store = self._store()
        return store.model_of(d["app"], int(intent["version"]), intent["model"])

    def _with_state_check(self, app: str, plan: Plan) -> tuple[Plan, str]:
        """``plan`` with a sample of the last checkpoint's state on every new class-PE
        instance that takes state over (prepare tries the new code on it), and a
        line saying what is checked."""
        takers: dict[str, tuple[frozenset[str], int, bool]] = {}
        for ins in plan.prepare.values():
            for i in ins:
                if isinstance(i, StartInstance) and i.kind == "process" and i.predecessors:
                    olds = frozenset(parse_instance_id(p)[0] for p in i.predecessors)
                    takers[i.pe] = (olds, i.parallelism, i.input_key is not None)
        if not takers:
            return plan, "no class PE takes over state: nothing to check"
        ck = self._store().checkpoint(app)
        if ck is None:
            return plan, "no checkpoint yet: the state was not checked"
        samples = checkpoint_samples(ck[2], takers)

        def with_check(i: Any) -> Any:
            if isinstance(i, StartInstance) and i.pe in takers and (i.pe, i.index) in samples:
                return replace(i, state_check=samples[(i.pe, i.index)])
            return i

        plan = Plan(
            plan.app,
            plan.version,
            {w: tuple(with_check(i) for i in ins) for w, ins in plan.prepare.items()},
            plan.switch,
        )
        keys = sum(sampled_keys(s, takers[pe][2]) for (pe, _i), s in samples.items())
        pes = ", ".join(repr(pe) for pe in sorted(takers))
        return plan, f"PE {pes}: {keys} keys of checkpoint {ck[0]} tried"

    async def _dry_state_check(self, outcome: Outcome, bundle_hash: str, bundle: bytes) -> None:
        """Run the state check of ``outcome.plan`` on the workers it places the new
        instances on (CHECK_STATE: nothing is built), and record what it found."""
        ms = self.membership
        plan = outcome.plan
        checks = {
            w: [to_pb(i) for i in ins if isinstance(i, StartInstance) and i.state_check]
            for w, ins in plan.prepare.items()
        }
        checks = {w: ins for w, ins in checks.items() if ins}
        if not checks:
            return

        async def check(w: str, ins: list[pb.Instruction]) -> str:
            try:
                ack = await ms.send(
                    w,
                    pb.CHECK_STATE,
                    plan.app,
                    plan.version,
                    ins,
                    {bundle_hash: bundle},
                    timeout=self.prepare_timeout,
                )
            except Exception as e:
                return f"worker {w!r} could not run the state check: {e}"
            return "" if ack.ok else ack.error or "refused without a reason"

        errors = [e for e in await asyncio.gather(*(check(w, i) for w, i in checks.items())) if e]
        if errors:
            outcome.state_check_failed = True
            outcome.state_check = errors[0]
        else:
            outcome.state_check = f"passed: {outcome.state_check}"

    async def restart(
        self, app: str, why: str, dead: str = "", avoid: Collection[str] = ()
    ) -> None:
        """Stop ``app`` everywhere and start its running version from its last
        checkpoint on the live workers (but not on those in ``avoid``)."""
        self._held(app)
        store = self._store()
        t0 = time.perf_counter()
        st = self.apps[app]
        ms = self.membership
        hosts = {w for pl in st.placement.values() for w in pl.workers}
        # Stop the survivors, and a worker merely late with its heartbeats too.
        reachable = [w for w in sorted(hosts) if ms.alive(w) or ms.connected(w)]
        await asyncio.gather(
            *(ms.send(w, pb.STOP, app, st.epoch, [], timeout=10) for w in reachable),
            return_exceptions=True,
        )
        # A cut taken before a rename names the PE by its old name.
        states = renamed_states(self._checkpoint_states(app), st.model)
        epoch = st.epoch + 1
        empty = LogicalModel.build(app, [], [])
        change = diff(empty, st.model)
        try:
            slots = {w: n for w, n in self.free_slots(app).items() if w not in avoid}
            new_pl = schedule(st.model, {}, change, slots, epoch, st.bundle)
        except SchedulingError as e:
            raise RuntimeError(f"app {app!r} cannot be restarted now: {e}") from e
        plan = plan_upgrade(app, epoch, empty, {}, st.model, new_pl, change, st.bundle)
        restored = states_for_restart(
            states,
            {pe: pl.parallelism for pe, pl in new_pl.items()},
            {pe: st.model.pe(pe).keyed for pe in new_pl},
        )

        def with_state(ins: Any) -> Any:
            if not isinstance(ins, StartInstance):
                return ins
            # No user waits for a restart: an instance whose server is down waits for it.
            ins = replace(ins, wait_for_servers=True)
            if (ins.pe, ins.index) in restored:
                return replace(ins, initial_state=restored[(ins.pe, ins.index)])
            return ins

        plan = Plan(
            app,
            epoch,
            {w: tuple(with_state(i) for i in ins) for w, ins in plan.prepare.items()},
            plan.switch,
        )
        bundle = await store.read(store.bundle, st.bundle) or b""
        # A restart whose own switch fails is not restarted again here: the caller
        # (a recovery) tries again.
        await self._apply(plan, st.bundle, bundle, _placement_intent(st, new_pl), tr.Fallback.NONE)
        ms_taken = (time.perf_counter() - t0) * 1000
        self.on_restart(
            {
                "app": app,
                "event": "recovery",
                "worker": dead,
                "why": why,
                "restored": len(states),
                "ms": ms_taken,
            }
        )
        log.warning(
            "app %r restarted from checkpoint on the live workers in %.0f ms "
            "(%s; %d instance states restored)",
            app,
            ms_taken,
            why,
            len(states),
        )

    # ------------------------------------------------------------------
    # Canaries (the caller holds the app's lock)
    # ------------------------------------------------------------------
    async def start_canary(
        self,
        app: str,
        new: LogicalModel,
        bundle: bytes,
        bundle_hash: str,
        pe: str,
        share: int,
        max_errors: float = -1.0,
        promote_after: float = 0.0,
    ) -> Outcome:
        """Run ``new``'s code of ``pe`` next to the running code on ``share`` basis
        points of its keys (or batches): a placement change of the running version,
        state handed over by key. :meth:`promote_canary` or :meth:`abort_canary` ends it."""
        self._held(app)
        store = self._store()
        t0 = time.perf_counter()
        cur = self.running(app)
        if cur is None:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"app {app!r} is not running")
        if app in self.canaries:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"app {app!r}: a canary of PE {self.canaries[app].pe!r} is running; "
                f"'streamctl canary promote {app}' or 'streamctl canary abort {app}' first",
            )
        change = diff(cur.model, new)
        epoch = cur.epoch + 1
        try:
            cn.check(app, pe, cur.model, new, change)
            new_pl = cn.placement(
                cur.placement, pe, new, share, bundle_hash, epoch, self.free_slots(app)
            )
        except cn.CanaryError as e:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from e
        regen = ChangeSet(regenerated=(pe,))
        plan = plan_upgrade(
            app, epoch, cur.model, cur.placement, cur.model, new_pl, regen, cur.bundle
        )
        moves = state_moves(plan, cur.model, self._state_sizes(app))
        plan, checked = self._with_state_check(app, plan)
        old_bundle = await store.read(store.bundle, cur.bundle) or b""
        await asyncio.wrap_future(store.put_bundle(bundle_hash, bundle))
        run = cn.CanaryRun(app, pe, share, new, bundle_hash, cur.version, max_errors, promote_after)
        job = await self._apply(
            plan,
            bundle_hash,
            bundle,
            # the commit records the canary with the placement (_commit)
            {**_placement_intent(cur, new_pl), "canary": run.to_record()},
            tr.Fallback.RESTART,
            t0,
            more_bundles={cur.bundle: old_bundle},
        )
        outcome = Outcome(
            app, cur.version, cur.version, change, plan, True, job.latency_ms, checked
        )
        outcome.moves = moves
        outcome.handed = handed_over(job.handed)
        log.info("app %r: canary of PE %r on %.1f%% started", app, pe, share / 100)
        return outcome

    async def promote_canary(self, app: str, why: str = "promoted by hand") -> Outcome:
        """Upgrade ``app`` to the canary's version: the remaining keys move to the
        new code, with their state."""
        self._held(app)
        run, cur = self._canary(app)
        store = self._store()
        bundle = await store.read(store.bundle, run.bundle)
        if bundle is None:
            raise Refused(grpc.StatusCode.INTERNAL, f"app {app!r}: the canary's bundle is gone")
        run.outcome, run.why = "promoted", why
        # The new instances take the old code's keys as their state and the
        # canary's while they run (Adopt); a new class without merge() is refused
        # in prepare, and then every key's state comes in before they run.
        for adopt in (run.model.pe(run.pe).keyed, False):
            try:
                outcome = await self.change(
                    app,
                    cur.version + 1,
                    "upgrade",
                    cur.model,
                    cur.placement,
                    run.model,
                    bundle,
                    run.bundle,
                    recorded={"canary": run.to_dict()},
                    adopt_canary=adopt,
                )
            except Refused as e:
                if adopt and _adopt_refused(e) and self.canaries.get(app) is run:
                    log.info("app %r: %s; the promote hands every key over first", app, e)
                    continue
                if app in self.canaries:  # still running: the promote changed nothing
                    run.outcome, run.why = "", ""
                raise
            except BaseException:
                if app in self.canaries:
                    run.outcome, run.why = "", ""
                raise
            if adopt:
                log.info(
                    "app %r: canary of PE %r promoted; the new instances took the canary's "
                    "keys in while they ran",
                    app,
                    run.pe,
                )
            return outcome
        raise AssertionError("unreachable")

    async def abort_canary(self, app: str, why: str = "aborted by hand") -> None:
        """Move the canary's keys back to the running code, with their state.

        A keyed PE's old-code instances keep running and take the canary's keys
        in (``planner.plan_canary_abort``); when a worker refuses that in prepare
        (the PE cannot merge state: a class without ``merge``), nothing changed
        and every instance of the PE is replaced instead, as in an upgrade."""
        self._held(app)
        run, cur = self._canary(app)
        if cur.model.pe(run.pe).keyed:
            try:
                await self._abort_canary_in_place(app, run, cur, why)
                return
            except Refused as e:
                if not _adopt_refused(e) or self.canaries.get(app) is not run:
                    raise  # it switched (and restarted), or failed otherwise
                log.info(
                    "app %r: the canary of PE %r cannot go back in place (%s); "
                    "replacing the PE's instances",
                    app,
                    run.pe,
                    e,
                )
        await self._abort_canary_regenerating(app, run, cur, why)

    async def _abort_canary_in_place(
        self, app: str, run: cn.CanaryRun, cur: AppState, why: str
    ) -> None:
        store = self._store()
        t0 = time.perf_counter()
        epoch = cur.epoch + 1
        plan = plan_canary_abort(app, epoch, cur.model, cur.placement, run.pe)
        new_pl = canary_abort_placement(cur.placement, run.pe)
        bundle = await store.read(store.bundle, cur.bundle) or b""
        run.outcome, run.why = "aborted", why
        intent = {
            **_placement_intent(cur, new_pl),
            "canary_end": {"outcome": "aborted", "why": why},
        }
        try:
            await self._apply(plan, cur.bundle, bundle, intent, tr.Fallback.RESTART, t0)
        except BaseException:
            if app in self.canaries:
                run.outcome, run.why = "", ""
            raise
        log.warning(
            "app %r: canary of PE %r aborted (its keys moved back to the running instances): %s",
            app,
            run.pe,
            why,
        )

    async def _abort_canary_regenerating(
        self, app: str, run: cn.CanaryRun, cur: AppState, why: str
    ) -> None:
        store = self._store()
        epoch = cur.epoch + 1
        change = ChangeSet(regenerated=(run.pe,))
        try:
            new_pl = schedule(
                cur.model, cur.placement, change, self.free_slots(app), epoch, cur.bundle
            )
        except SchedulingError as e:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from e
        plan = plan_upgrade(
            app, epoch, cur.model, cur.placement, cur.model, new_pl, change, cur.bundle
        )
        bundle = await store.read(store.bundle, cur.bundle) or b""
        run.outcome, run.why = "aborted", why
        intent = {
            **_placement_intent(cur, new_pl),
            "canary_end": {"outcome": "aborted", "why": why},
        }
        try:
            await self._apply(plan, cur.bundle, bundle, intent, tr.Fallback.RESTART)
        except BaseException:
            if app in self.canaries:
                run.outcome, run.why = "", ""
            raise
        log.warning("app %r: canary of PE %r aborted: %s", app, run.pe, why)

    def _canary(self, app: str) -> tuple[cn.CanaryRun, AppState]:
        cur = self.running(app)
        run = self.canaries.get(app)
        if cur is None or run is None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"app {app!r} runs no canary")
        return run, cur

    def _end_canary(self, app: str, outcome: str, why: str) -> cn.CanaryRun | None:
        """End ``app``'s canary (with ``outcome`` unless one was set); the caller
        stores the run it returns."""
        run = self.canaries.pop(app, None)
        if run is None:
            return None
        if not run.outcome:
            run.outcome, run.why = outcome, why
        run.ended = time.time()
        return run

    async def move(self, app: str, pes: Collection[str]) -> None:
        """Place the instances of ``pes`` anew (off draining workers) with the upgrade
        protocol: state handed over, no record lost or duplicated."""
        self._held(app)
        store = self._store()
        st = self.apps[app]
        epoch = st.epoch + 1
        change = ChangeSet(regenerated=tuple(sorted(pes)))
        new_pl = schedule(st.model, st.placement, change, self.free_slots(app), epoch, st.bundle)
        plan = plan_upgrade(app, epoch, st.model, st.placement, st.model, new_pl, change, st.bundle)
        # No user waits for a drain: an instance whose server is down waits for it.
        plan = Plan(
            app,
            epoch,
            {
                w: tuple(
                    replace(i, wait_for_servers=True) if isinstance(i, StartInstance) else i
                    for i in ins
                )
                for w, ins in plan.prepare.items()
            },
            plan.switch,
        )
        bundle = await store.read(store.bundle, st.bundle) or b""
        intent = _placement_intent(st, new_pl)
        await self._apply(plan, st.bundle, bundle, intent, tr.Fallback.RESTART)

    async def kill(self, app: str) -> int:
        """Stop every instance of ``app``; return the version it ran."""
        self._held(app)
        store = self._store()
        cur = self.running(app)
        if cur is None:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"app {app!r} is not running")
        stops = plan_stop(app, cur.epoch, cur.placement)
        ms = self.membership
        await asyncio.gather(
            *(
                ms.send(w, pb.STOP, app, cur.epoch, [to_pb(i) for i in ins], timeout=30)
                for w, ins in stops.items()
                if ms.alive(w)
            ),
            return_exceptions=True,
        )
        cur.state = "killed"
        await asyncio.wrap_future(store.set_state(app, "killed"))
        if (run := self._end_canary(app, "aborted", "the app was killed")) is not None:
            await asyncio.wrap_future(store.put_canary(run.row()))
        return cur.version

    async def interrupted(self) -> list[Interrupted]:
        """The transitions a crashed master left in the store."""
        store = self._store()
        return [
            Interrupted(app, epoch, phase, unpackb(blob))
            for app, epoch, phase, blob in await store.read(store.inflight)
        ]

    async def finish(self, it: Interrupted) -> None:
        """Undo (crash in prepare) or finish (crash in switch) an interrupted transition."""
        self._held(it.app)
        rec = it.record
        job = _Job(it.app, it.epoch, it.workers, rec, b"")
        if it.phase == "switch":
            job.switch = {w: [to_pb(from_wire(i)) for i in ins] for w, ins in rec["switch"].items()}
        fallback = tr.Fallback.RESTART if self.running(it.app) else tr.Fallback.STOP
        await self._run(tr.Transition(it.app, it.workers, fallback, resume=it.phase), job)

    # ------------------------------------------------------------------
    # Carrying out a transition's actions
    # ------------------------------------------------------------------
    async def _apply(
        self,
        plan: Plan,
        bundle_hash: str,
        bundle: bytes,
        intent: dict[str, Any],
        fallback: tr.Fallback,
        started: float | None = None,
        more_bundles: dict[str, bytes] | None = None,
        model: LogicalModel | None = None,
        placement: Placement | None = None,
    ) -> _Job:
        """Run ``plan`` through the transition's steps; raise unless it committed.

        ``model`` and ``placement``, if given, are what ``intent["model"]`` and
        ``intent["placement"]`` record."""
        record = {
            **intent,
            "prepare_workers": sorted(plan.workers),
            "switch": {w: [to_wire(i) for i in ins] for w, ins in plan.switch.items()},
        }
        job = _Job(
            plan.app,
            plan.version,
            sorted(plan.workers),
            intent,
            msgpack.packb(record, use_bin_type=True),
            # Every worker in the plan prepares, even with no instruction of its own:
            # it loads the new bundle there (a kept sender may route by a new key).
            prepare={w: [to_pb(i) for i in plan.prepare.get(w, ())] for w in plan.workers},
            switch={w: [to_pb(i) for i in ins] for w, ins in plan.switch.items()},
            bundles={bundle_hash: bundle, **(more_bundles or {})},
            plan_lines=plan.describe(),
            model=model,
            placement=placement,
        )
        if started is not None:
            job.started = started
            log.debug(
                "app %r: planned (diff, placement, plan, state sample) in %.1f ms",
                plan.app,
                (time.perf_counter() - started) * 1000,
            )
        self.on_begin(plan.app)  # no checkpoint may cut across it
        await self._run(tr.Transition(plan.app, job.workers, fallback), job)
        return job

    async def _run(self, t: tr.Transition, job: _Job) -> None:
        """Drive ``t`` until it replies; raise :class:`Refused` unless it committed."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tr.Event] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()
        timer: asyncio.TimerHandle | None = None

        async def perform(action: tr.Action) -> None:
            events.put_nowait(await self._perform(action, job))

        clock = self.metrics.clock(t.app)
        progress = self.progress[t.app] = TransitionProgress.of_plan(
            t.app,
            int(job.intent.get("version", 0)),
            str(job.intent.get("action", "placement")),
            job.epoch,
            job.plan_lines,
        )
        self.on_progress(t.app)
        # the actions' tasks (created below) log with the app and transition too
        with log_context(app=t.app, transition=job.epoch):
            try:
                actions = t.start()
                while True:
                    for a in actions:
                        clock.saw(a)
                        if progress.enter(clock.phase):
                            self.on_progress(t.app)
                        if isinstance(a, tr.Reply):
                            progress.finish(a.result.value)
                            self.on_progress(t.app)
                            self.metrics.transition_done(
                                t.app,
                                job.intent.get("action", "placement"),
                                a.result.value,
                                job.latency_ms / 1000,
                            )
                            self._raise_unless_committed(t, a)
                            return
                        if isinstance(a, tr.StartTimer):
                            if timer is not None:
                                timer.cancel()
                            timer = loop.call_later(
                                self._phase_timeout(a.phase) + self.timer_margin,
                                events.put_nowait,
                                tr.TimedOut(a.phase),
                            )
                            continue
                        task = loop.create_task(perform(a))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                    actions = t.handle(await events.get())
            finally:
                if not progress.outcome:  # ended by an exception or a cancel
                    progress.finish("interrupted")
                    self.on_progress(t.app)
                if timer is not None:
                    timer.cancel()
                for task in tasks:
                    task.cancel()  # answers no step waits for any more
                await asyncio.gather(*tasks, return_exceptions=True)

    def _phase_timeout(self, phase: tr.Phase) -> float:
        if phase is tr.Phase.SWITCH:
            return self.switch_timeout + self.switch_grace
        if phase is tr.Phase.ABORT:
            return self.abort_timeout
        return self.prepare_timeout

    async def _perform(self, a: tr.Action, job: _Job) -> tr.Event:
        """Carry out one action; what happened, as the event the machine expects."""
        store = self._store()
        ms = self.membership
        app = job.app
        if isinstance(a, tr.SendPrepare | tr.SendSwitch):
            prepare = isinstance(a, tr.SendPrepare)
            try:
                if prepare:
                    ack = await ms.send(
                        a.worker,
                        pb.PREPARE,
                        app,
                        job.epoch,
                        job.prepare.get(a.worker, []),
                        job.bundles,
                        timeout=self.prepare_timeout,
                    )
                else:
                    ack = await ms.send(
                        a.worker,
                        pb.SWITCH,
                        app,
                        job.epoch,
                        job.switch.get(a.worker, []),
                        timeout=self.switch_timeout + self.switch_grace,
                        phase_timeout=self.switch_timeout,
                    )
                log.debug(
                    "app %r: %s %s in %.1f ms",
                    app,
                    a.worker,
                    "prepared" if prepare else "switched",
                    ack.elapsed_ms,
                )
                error = "" if ack.ok else ack.error or "refused without a reason"
                if not prepare and ack.ok:
                    job.handed[a.worker] = list(ack.handed)
            except Exception as e:
                error = str(e) or type(e).__name__
            if prepare:
                return tr.PrepareRefused(a.worker, error) if error else tr.Prepared(a.worker)
            return tr.SwitchRefused(a.worker, error) if error else tr.Switched(a.worker)
        if isinstance(a, tr.SendAbort):
            if ms.alive(a.worker):
                try:
                    await ms.send(
                        a.worker, pb.ABORT, app, job.epoch, [], timeout=self.abort_timeout
                    )
                except Exception as e:
                    log.debug("app %r: %s did not take the abort: %s", app, a.worker, e)
            return tr.AbortDone(a.worker)
        if isinstance(a, tr.RestartFromCheckpoint | tr.StopEverywhere):
            try:
                if isinstance(a, tr.RestartFromCheckpoint):
                    await self.restart(app, "a switch did not finish")
                else:
                    await self._stop_everywhere(app)
            except Exception as e:
                log.exception("app %r: the recovery from a failed switch failed", app)
                return tr.RecoveryDone(str(e) or type(e).__name__)
            return tr.RecoveryDone()
        if not isinstance(a, tr.StoreIntent | tr.ClearIntent | tr.StoreCommit):
            raise TypeError(f"the transition engine cannot carry out {a!r}")
        try:
            if isinstance(a, tr.StoreIntent):
                write = store.begin_transition(app, job.epoch, a.phase, job.record)
            elif isinstance(a, tr.ClearIntent):
                write = store.end_transition(app)
            else:
                job.latency_ms = (time.perf_counter() - job.started) * 1000
                if "changes" in job.intent:  # a version: its record keeps what moved
                    job.intent["changes"]["handed_over"] = handed_over(job.handed)
                write = self._commit(
                    job.intent, job.epoch, job.latency_ms, job.model, job.placement
                )
            await asyncio.wrap_future(write)
        except Exception as e:
            log.error("app %r: the store did not record %s: %s", app, type(a).__name__, e)
            return tr.StoreFailed(a.write, str(e) or type(e).__name__)
        return tr.Stored(a.write)

    async def _stop_everywhere(self, app: str) -> None:
        ms = self.membership
        await asyncio.gather(
            *(
                ms.send(w, pb.STOP, app, 0, [], timeout=10)
                for w in sorted(ms.workers)
                if ms.alive(w)
            ),
            return_exceptions=True,
        )

    def _commit(
        self,
        intent: dict[str, Any],
        epoch: int,
        latency_ms: float,
        model: LogicalModel | None = None,
        placement: Placement | None = None,
    ) -> Future[None]:
        """Record a finished transition: a new version, or new placement of the same one.

        The app's state changes at once; the store's write is queued, and the
        returned future says when it is durable (the reply waits for it). ``model``
        and ``placement`` are what ``intent["model"]`` and ``intent["placement"]``
        record, already built (the intent's forms are what is stored).
        """
        store = self._store()
        if model is None:
            model = self._intent_model(intent)
        if placement is None:
            placement = placement_from_dict(intent["placement"])
        canary = self._commit_canary(intent, model.app, placement)
        if intent["kind"] == "version":
            written = store.commit_version(
                model.app,
                intent["version"],
                intent["action"],
                intent["model"],
                intent["bundle"],
                placement,
                intent["changes"],
                latency_ms,
                epoch,
                rolled_back_to=intent["rolled_back_to"],
                canary=canary,
                placement_dict=intent["placement"],
            )
        else:
            written = store.update_placement(
                model.app, intent["version"], placement, epoch, canary=canary
            )
        self.apps[model.app] = AppState(
            model.app, intent["version"], "running", model, intent["bundle"], placement, epoch
        )
        self.on_commit(model.app)
        return written

    def _commit_canary(
        self, intent: dict[str, Any], app: str, placement: Placement
    ) -> tuple[str, float, dict[str, Any]] | None:
        """The canary a commit starts (``intent["canary"]``, from :meth:`start_canary`)
        or ends (any placement without a canary split), as the row the commit stores
        with it; None when it does neither. An intent a restarted master finishes
        says how the canary ended (``canary_end``, or the promote's record)."""
        if any(pl.canary for pl in placement.values()):
            if (record := intent.get("canary")) is None:
                return None
            run = cn.CanaryRun.from_record(record)
            run.started = time.time()
            self.canaries[app] = run
            self.canary_log.append(run)
            return run.row()
        end = intent.get("canary_end") or (intent.get("changes") or {}).get("canary") or {}
        outcome = end.get("outcome") if end.get("outcome") in ("promoted", "aborted") else ""
        ended = self._end_canary(
            app, outcome or "aborted", end.get("why") or "the app was restarted or its PE moved"
        )
        return None if ended is None else ended.row()

    def _raise_unless_committed(self, t: tr.Transition, r: tr.Reply) -> None:
        if r.result is tr.Result.COMMITTED:
            return
        app = t.app
        cur = self.running(app)
        version = cur.version if cur is not None else 0
        why = f"app {app!r}: {r.error}"
        if r.result is tr.Result.ABORTED:
            raise Refused(grpc.StatusCode.ABORTED, why)
        if r.result is tr.Result.RESTARTED:
            raise Refused(
                grpc.StatusCode.ABORTED,
                f"{why}; version {version} was restarted from its last checkpoint",
            )
        if r.result is tr.Result.STOPPED:
            raise Refused(grpc.StatusCode.INTERNAL, f"{why}; the new app was stopped")
        if r.recovery_error and t.fallback is tr.Fallback.STOP:
            raise Refused(
                grpc.StatusCode.INTERNAL,
                f"{why}; stopping the new app failed too: {r.recovery_error}",
            )
        if r.recovery_error:
            raise Refused(
                grpc.StatusCode.INTERNAL,
                f"{why}; restarting version {version} from its last checkpoint failed too: "
                f"{r.recovery_error}",
            )
        raise SwitchFailed(grpc.StatusCode.INTERNAL, why)

    def _state_sizes(self, app: str) -> dict[str, int]:
        """Bytes of every instance's state (msgpack) in the last complete checkpoint
        of ``app`` (0 for an instance without state); empty when there is none."""
        ck = self._store().checkpoint(app)
        if ck is None:
            return {}
        raw: dict[str, bytes] = unpackb(ck[2])
        return {iid: 0 if data in (b"", b"\xc0") else len(data) for iid, data in raw.items()}

    def _check_removals(
        self,
        app: str,
        action: str,
        old: LogicalModel,
        change: ChangeSet,
        drop_state: Collection[str],
    ) -> None:
        """Refuse an upgrade that removes a PE of a stateful kind (its state would be
        lost) unless ``drop_state`` names it, and a ``drop_state`` naming a PE the
        upgrade does not remove. A rollback returns to a version the user had and
        is not checked."""
        removed = set(change.pes_removed)
        if stray := sorted(set(drop_state) - removed):
            names = ", ".join(repr(pe) for pe in stray)
            gone = ", ".join(repr(pe) for pe in sorted(removed)) or "no PE"
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"app {app!r}: --drop-state {names}: the upgrade does not remove "
                f"{'that PE' if len(stray) == 1 else 'those PEs'} (it removes {gone}); "
                "nothing was changed",
            )
        if action != "upgrade":
            return
        held = [
            pe
            for pe in sorted(removed)
            if old.pe(pe).kind in STATEFUL_KINDS and pe not in drop_state
        ]
        if not held:
            return
        sizes = self._state_sizes(app)
        cur = self.apps.get(app)

        def holds(pe: str) -> str:
            pl = cur.placement.get(pe) if cur is not None else None
            if pl is None:
                return f"PE {pe!r}"
            ids = [pl.instance(pe, i) for i in range(pl.parallelism)]
            if all(i in sizes for i in ids):
                size = f"{sum(sizes[i] for i in ids)} bytes of state at the last checkpoint"
            else:
                size = "state of unknown size (no checkpoint of its instances yet)"
            return f"PE {pe!r} ({old.pe(pe).kind}, {pl.parallelism} instance(s), {size})"

        flags = " ".join(f"--drop-state {pe}" for pe in held)
        raise Refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"app {app!r}: the upgrade removes {', '.join(holds(pe) for pe in held)}, and its "
            "state would be lost; nothing was changed. If the PE was renamed, declare it "
            f"with renamed_from=...; to drop the state, upgrade with {flags}",
        )

    def _checkpoint_states(self, app: str) -> dict[str, Any]:
        """The last complete checkpoint of ``app``: every instance's state in one cut."""
        ck = self._store().checkpoint(app)
        if ck is None:
            return {}
        _cid, _epoch, blob = ck
        raw: dict[str, bytes] = unpackb(blob)
        return {iid: unpackb(data) for iid, data in raw.items()}


def _placement_intent(st: AppState, placement: Placement) -> dict[str, Any]:
    """What to commit when instances move: the same version, a new placement."""
    return {
        "kind": "placement",
        "version": st.version,
        "model": st.model.to_json(),
        "bundle": st.bundle,
        "placement": placement_to_dict(placement),
    }


def _applied(plan: Plan, moves: list[StateMove]) -> dict[str, Any]:
    """What a version's record keeps of its plan: instruction counts and state moves."""
    by_type: dict[str, int] = {}
    for batches in (plan.prepare, plan.switch):
        for ins in batches.values():
            for i in ins:
                by_type[type(i).__name__] = by_type.get(type(i).__name__, 0) + 1
    return {
        "plan": {
            "instructions": plan.count(),
            "prepare": sum(len(v) for v in plan.prepare.values()),
            "switch": sum(len(v) for v in plan.switch.values()),
            "workers": len(plan.workers),
            "by_type": dict(sorted(by_type.items())),
        },
        "state": [m.to_dict() for m in moves],
    }
