"""The master: gRPC services for clients and workers, and upgrade coordination.

The master never runs user code. It checks the logical model it receives, diffs
it against the running version, places new instances, plans the instructions
and drives the two phases (prepare everywhere, then switch) over the workers'
instruction streams, committing a version only when every worker acknowledged
its switch.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import msgpack

from hotwire.master.diff import ChangeSet, diff
from hotwire.master.locks import AppLocks
from hotwire.master.membership import Membership, SessionRefused, WorkerGone, stale_instances
from hotwire.master.planner import plan_stop, plan_upgrade
from hotwire.master.recovery import Recovery
from hotwire.master.scheduler import SchedulingError, schedule
from hotwire.master.store import Store
from hotwire.model import LogicalModel, check_structure
from hotwire.node import Node, add_health, grpc_options
from hotwire.plan import Placement, Plan, placement_from_dict, placement_to_dict, to_wire
from hotwire.plan_wire import to_pb
from hotwire.proto import hotwire_pb2 as pb
from hotwire.proto import hotwire_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class Refused(Exception):
    """A request the master turns down: carries the gRPC status code and a reason."""

    def __init__(self, code: grpc.StatusCode, reason: str):
        super().__init__(reason)
        self.code = code


class SwitchFailed(Refused):
    """A switch did not finish on every worker: the app is half switched."""


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


class Master(Node):
    service_name = "hotwire.Master"

    def __init__(
        self,
        listen: str = "127.0.0.1:7600",
        data_dir: str | Path = "hotwire-data",
        heartbeat_interval: float | None = None,
        heartbeat_timeout: float = 5.0,
        checkpoint_interval: float = 2.0,
        switch_timeout: float = 30.0,
    ):
        super().__init__()
        self.switch_timeout = switch_timeout  # longest a worker waits for a switch to settle
        self.listen = listen
        self.data_dir = Path(data_dir)
        # Several heartbeats fit in the timeout, so one late heartbeat is not a death.
        interval = heartbeat_interval or min(1.0, heartbeat_timeout / 4)
        self.membership = Membership(interval, heartbeat_timeout)
        self.recovery = Recovery(self, checkpoint_interval)
        self.membership.on_report = self.recovery.on_report
        self.apps: dict[str, AppState] = {}
        self.locks = AppLocks()  # one transition at a time per app
        self.store: Store | None = None
        self.server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        host = self.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    async def _start(self) -> None:
        store = self.store = await asyncio.to_thread(Store, self.data_dir / "hotwire.db")
        # Session epochs keep growing across restarts: a fencing token is never reused.
        self.membership.epochs.update(await store.read(store.worker_epochs))
        for name, version, state, epoch in await store.read(store.apps):
            rec = await store.read(store.version, name, version)
            if rec is not None:
                self.apps[name] = AppState(
                    name, version, state, rec.model, rec.bundle_hash, rec.placement, epoch
                )
        # so_reuseport off: a second master on a taken port must fail
        self.server = grpc.aio.server(options=grpc_options(("grpc.so_reuseport", 0)))
        pb_grpc.add_MasterServicer_to_server(ClientService(self), self.server)
        pb_grpc.add_WorkerControlServicer_to_server(WorkerService(self), self.server)
        add_health(self.server, self.health)
        self.port = self.server.add_insecure_port(self.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.listen}")
        await self.server.start()
        self.recovery.start()
        log.info("master listening on %s (data in %s)", self.address, self.data_dir)

    async def _close(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=1.0)
        if self.store is not None:
            await asyncio.to_thread(self.store.close)

    # ------------------------------------------------------------------
    # Deploy, upgrade, rollback, kill
    # ------------------------------------------------------------------
    def _check_model(self, model_json: str, name: str) -> LogicalModel:
        try:
            model = LogicalModel.from_json(model_json)
        except Exception as e:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"malformed logical model: {e}") from e
        if name:
            model.app = name
        problems = check_structure(model)
        if problems:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
        return model

    def _check_bundle(self, data: bytes, h: str) -> None:
        if not data:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "the request carries no app bundle")
        if hashlib.sha256(data).hexdigest() != h:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the app bundle does not match its hash; resend it",
            )

    def _lock(self, app: str, what: str) -> None:
        if not self.locks.take(app, what):
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"app {app!r}: {self.locks.holder(app)} is in progress; "
                "wait for it to finish and try again",
            )

    def _free_slots(self, app: str) -> dict[str, int]:
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
            if n not in self.recovery.draining
        }

    async def submit(self, model_json: str, bundle: bytes, bundle_hash: str, name: str) -> Outcome:
        model = self._check_model(model_json, name)
        self._check_bundle(bundle, bundle_hash)
        app = model.app
        cur = self.apps.get(app)
        if cur is not None and cur.state == "running":
            raise Refused(
                grpc.StatusCode.ALREADY_EXISTS,
                f"app {app!r} is already running at version {cur.version}; "
                "use 'streamctl upgrade' to change it",
            )
        self._lock(app, "a submit")
        try:
            version = (cur.version + 1) if cur is not None else 1
            empty = LogicalModel.build(app, [], [])
            return await self._transition(
                app, version, "submit", empty, {}, model, bundle, bundle_hash, dry_run=False
            )
        finally:
            self.locks.release(app)

    async def upgrade(
        self,
        model_json: str,
        bundle: bytes,
        bundle_hash: str,
        name: str,
        dry_run: bool,
        action: str = "upgrade",
        rolled_back_to: int = 0,
    ) -> Outcome:
        model = self._check_model(model_json, name)
        self._check_bundle(bundle, bundle_hash)
        app = model.app
        cur = self.apps.get(app)
        if cur is None or cur.state != "running":
            raise Refused(
                grpc.StatusCode.NOT_FOUND,
                f"app {app!r} is not running; deploy it with 'streamctl submit'",
            )
        self._lock(app, f"an upgrade to version {cur.version + 1}")
        try:
            return await self._transition(
                app,
                cur.version + 1,
                action,
                cur.model,
                cur.placement,
                model,
                bundle,
                bundle_hash,
                dry_run,
                rolled_back_to,
            )
        finally:
            self.locks.release(app)

    async def rollback(self, app: str, to_version: int, dry_run: bool) -> Outcome:
        assert self.store is not None
        cur = self.apps.get(app)
        if cur is None or cur.state != "running":
            raise Refused(grpc.StatusCode.NOT_FOUND, f"app {app!r} is not running")
        target = to_version or cur.version - 1
        if target < 1 or target >= cur.version:
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"app {app!r} is at version {cur.version}; roll back to a version "
                f"between 1 and {cur.version - 1}",
            )
        store = self.store
        rec = await store.read(store.version, app, target)
        data = await store.read(store.bundle, rec.bundle_hash) if rec is not None else None
        if rec is None or data is None:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"app {app!r} has no version {target}")
        return await self.upgrade(
            rec.model.to_json(),
            data,
            rec.bundle_hash,
            app,
            dry_run,
            action="rollback",
            rolled_back_to=target,
        )

    def _next_epoch(self, app: str) -> int:
        cur = self.apps.get(app)
        return (cur.epoch if cur is not None else 0) + 1

    async def _transition(
        self,
        app: str,
        version: int,
        action: str,
        old: LogicalModel,
        old_pl: Placement,
        new: LogicalModel,
        bundle: bytes,
        bundle_hash: str,
        dry_run: bool,
        rolled_back_to: int = 0,
    ) -> Outcome:
        assert self.store is not None
        t0 = time.perf_counter()
        change = diff(old, new)
        cur_version = version - 1
        epoch = self._next_epoch(app)
        try:
            new_pl = schedule(new, old_pl, change, self._free_slots(app), epoch, bundle_hash)
        except SchedulingError as e:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from e
        plan = plan_upgrade(app, epoch, old, old_pl, new, new_pl, change, bundle_hash)
        if change.is_empty and action != "submit":
            return Outcome(app, cur_version, cur_version, change, plan, False, 0.0)
        outcome = Outcome(app, cur_version, version, change, plan, False, 0.0)
        if dry_run:
            return outcome
        await asyncio.wrap_future(self.store.put_bundle(bundle_hash, bundle))
        intent = {
            "kind": "version",
            "version": version,
            "action": action,
            "model": new.to_json(),
            "bundle": bundle_hash,
            "placement": placement_to_dict(new_pl),
            "changes": change.to_dict(),
            "rolled_back_to": rolled_back_to,
        }
        try:
            await self._apply(plan, bundle_hash, bundle, intent)
        except SwitchFailed as e:
            raise await self._after_failed_switch(app, e) from e
        latency = (time.perf_counter() - t0) * 1000
        await asyncio.wrap_future(self._commit(intent, epoch, latency))  # before the reply
        outcome.applied = True
        outcome.latency_ms = latency
        log.info(
            "app %r: %s to version %d in %.1f ms (%d instructions)",
            app,
            action,
            version,
            latency,
            plan.count(),
        )
        return outcome

    async def _after_failed_switch(self, app: str, e: SwitchFailed) -> Refused:
        """A half-done switch must not stay: restart the running version from its last
        checkpoint at once (a new app is stopped instead). Returns the error to report."""
        assert self.store is not None
        await asyncio.wrap_future(self.store.end_transition(app))
        cur = self.apps.get(app)
        if cur is None or cur.state != "running":
            await asyncio.gather(
                *(
                    self.membership.send(w, pb.STOP, app, 0, [], timeout=10)
                    for w in self.membership.workers
                    if self.membership.alive(w)
                ),
                return_exceptions=True,
            )
            return Refused(e.code, f"{e}; the new app was stopped")
        try:
            await self.recovery.restart(app, "a switch did not finish")
        except Exception as re:
            log.exception("app %r: restart after a failed switch failed", app)
            return Refused(
                e.code,
                f"{e}; restarting version {cur.version} from its last checkpoint failed too: {re}",
            )
        return Refused(
            grpc.StatusCode.ABORTED,
            f"{e}; version {cur.version} was restarted from its last checkpoint",
        )

    def _commit(self, intent: dict[str, Any], epoch: int, latency_ms: float) -> Future[None]:
        """Record a finished transition: a new version, or new placement of the same one.

        The app's state changes at once; the store's write is queued, and the
        returned future says when it is durable (await it before replying).
        """
        assert self.store is not None
        app = LogicalModel.from_json(intent["model"])
        placement = placement_from_dict(intent["placement"])
        if intent["kind"] == "version":
            written = self.store.commit_version(
                app.app,
                intent["version"],
                intent["action"],
                app,
                intent["bundle"],
                placement,
                intent["changes"],
                latency_ms,
                epoch,
                rolled_back_to=intent["rolled_back_to"],
            )
        else:
            written = self.store.update_placement(app.app, intent["version"], placement, epoch)
        self.apps[app.app] = AppState(
            app.app, intent["version"], "running", app, intent["bundle"], placement, epoch
        )
        self.recovery.checkpoint_soon(app.app)
        return written

    async def _apply(
        self, plan: Plan, bundle_hash: str, bundle: bytes, intent: dict[str, Any]
    ) -> None:
        """Prepare everywhere, then switch; a failed prepare is aborted everywhere.

        The intent and the phase are stored first, so a master that crashes midway
        undoes the transition (crash in prepare) or finishes it (crash in switch)
        when it starts again.
        """
        assert self.store is not None
        self.recovery.abandon_checkpoint(plan.app)
        m = self.membership
        record = {
            **intent,
            "prepare_workers": sorted(plan.workers),
            "switch": {w: [to_wire(i) for i in ins] for w, ins in plan.switch.items()},
        }
        # Durable before any worker acts on it.
        await asyncio.wrap_future(
            self.store.begin_transition(
                plan.app, plan.version, "prepare", msgpack.packb(record, use_bin_type=True)
            )
        )
        # Every worker in the plan prepares, even with no instruction of its own: it
        # loads the new bundle there (a kept sender may route by a new key function).
        prep_workers = sorted(plan.workers)

        wire = to_pb

        async def prepare(w: str) -> None:
            items = plan.prepare.get(w, ())
            ack = await m.send(
                w,
                pb.PREPARE,
                plan.app,
                plan.version,
                [wire(i) for i in items],
                {bundle_hash: bundle},
            )
            log.debug("app %r: %s prepared in %.1f ms", plan.app, w, ack.elapsed_ms)
            if not ack.ok:
                raise RuntimeError(ack.error)

        results = await asyncio.gather(*(prepare(w) for w in prep_workers), return_exceptions=True)
        errors = [f"{r}" for r in results if isinstance(r, BaseException)]
        if errors:
            await asyncio.gather(
                *(
                    m.send(w, pb.ABORT, plan.app, plan.version, [], timeout=10)
                    for w in prep_workers
                    if m.alive(w)
                ),
                return_exceptions=True,
            )
            await asyncio.wrap_future(self.store.end_transition(plan.app))
            raise Refused(
                grpc.StatusCode.ABORTED,
                f"app {plan.app!r}: the change failed in prepare and was undone; "
                f"the running version is unchanged: {errors[0]}",
            )

        await asyncio.wrap_future(
            self.store.begin_transition(
                plan.app, plan.version, "switch", msgpack.packb(record, use_bin_type=True)
            )
        )
        await self.switch_all(
            plan.app,
            plan.version,
            sorted(plan.workers),
            {w: [wire(i) for i in ins] for w, ins in plan.switch.items()},
        )

    async def switch_all(
        self,
        app: str,
        epoch: int,
        workers: list[str],
        batches: dict[str, list[pb.Instruction]],
    ) -> None:
        """Send the switch phase to every worker of a plan and wait for all of them."""

        async def switch(w: str) -> None:
            ack = await self.membership.send(
                w,
                pb.SWITCH,
                app,
                epoch,
                batches.get(w, []),
                timeout=self.switch_timeout + 10,
                phase_timeout=self.switch_timeout,
            )
            log.debug("app %r: %s switched in %.1f ms", app, w, ack.elapsed_ms)
            if not ack.ok:
                raise RuntimeError(ack.error)

        results = await asyncio.gather(*(switch(w) for w in workers), return_exceptions=True)
        errors = [f"{r}" for r in results if isinstance(r, BaseException)]
        if errors:
            raise SwitchFailed(grpc.StatusCode.INTERNAL, f"app {app!r}: switch failed: {errors[0]}")

    async def kill(self, app: str) -> int:
        assert self.store is not None
        cur = self.apps.get(app)
        if cur is None or cur.state != "running":
            raise Refused(grpc.StatusCode.NOT_FOUND, f"app {app!r} is not running")
        self._lock(app, "a kill")
        try:
            stops = plan_stop(app, cur.epoch, cur.placement)
            await asyncio.gather(
                *(
                    self.membership.send(
                        w,
                        pb.STOP,
                        app,
                        cur.epoch,
                        [to_pb(i) for i in ins],
                        timeout=30,
                    )
                    for w, ins in stops.items()
                    if self.membership.alive(w)
                ),
                return_exceptions=True,
            )
            cur.state = "killed"
            await asyncio.wrap_future(self.store.set_state(app, "killed"))
            return cur.version
        finally:
            self.locks.release(app)

    # ------------------------------------------------------------------
    # Reading
    # ------------------------------------------------------------------
    def app_status(self, app: str) -> pb.StatusReply:
        if app and app not in self.apps:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"no app named {app!r}")
        stats: dict[tuple[str, str], tuple[Any, tuple[float, float]]] = {}
        for w in self.membership.workers.values():
            for r in w.running:
                stats[(r.app, r.instance)] = (r, w.rates.get((r.app, r.instance), (0.0, 0.0)))
        reply = pb.StatusReply()
        for st in sorted(self.apps.values(), key=lambda a: a.name):
            if app and st.name != app:
                continue
            state = "upgrading" if st.name in self.locks else st.state
            ck = self.store.checkpoint(st.name) if self.store is not None else None
            a = reply.apps.add(
                app=st.name,
                version=st.version,
                state=state,
                last_checkpoint=ck[0] if ck is not None and ck[1] == st.epoch else 0,
                recoveries=sum(
                    1
                    for e in self.recovery.events
                    if e["app"] == st.name and e["event"] == "recovery"
                ),
                last_recovery=next(
                    (
                        e["why"]
                        for e in reversed(self.recovery.events)
                        if e["app"] == st.name and e["event"] == "recovery"
                    ),
                    "",
                ),
            )
            if st.state != "running":
                continue
            for spec in st.model.pes:
                pl = st.placement[spec.name]
                p = a.pes.add(
                    name=spec.name, kind=spec.kind, parallelism=pl.parallelism, gen=pl.gen
                )
                for i, w in enumerate(pl.workers):
                    r, rates = stats.get((st.name, pl.instance(spec.name, i)), (None, (0.0, 0.0)))
                    rate = rates[1] if spec.kind == "source" else rates[0]
                    p.instances.add(
                        index=i,
                        worker=w,
                        rate_in=rate,
                        records_in=r.records_in if r else 0,
                        records_out=r.records_out if r else 0,
                        errors=r.errors if r else 0,
                        failed=bool(r and r.failed),
                        error=r.failed if r else "",
                        dead_letters=r.dead_letters if r else 0,
                    )
                p.failed = any(i.failed for i in p.instances)
        return reply

    async def history(self, app: str) -> pb.HistoryReply:
        store = self.store
        assert store is not None
        if app not in self.apps:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"no app named {app!r}")
        reply = pb.HistoryReply(app=app, current=self.apps[app].version)
        for rec in await store.read(store.versions, app):
            reply.versions.add(
                version=rec.version,
                created_unix=rec.created,
                action=rec.action,
                changes_json=json.dumps(rec.changes),
                latency_ms=rec.latency_ms,
                rolled_back_to=rec.rolled_back_to,
            )
        return reply

    def workers(self) -> pb.ListWorkersReply:
        reply = pb.ListWorkersReply()
        now = time.monotonic()
        for name in sorted(self.membership.workers):
            w = self.membership.workers[name]
            reply.workers.add(
                name=name,
                data_address=w.data_address,
                health_address=w.health_address,
                slots=w.slots,
                alive=self.membership.alive(name),
                last_heartbeat_age_s=now - w.last_seen,
                instances=[f"{r.app}/{r.instance}" for r in w.running],
                epoch=w.epoch,
                fenced=w.fenced,
            )
        return reply

    def reconcile(
        self, worker: str, running: list[pb.RunningInstance], registering: bool
    ) -> list[pb.InstanceRef]:
        """What ``worker`` reports running that must stop (``membership.stale_instances``).

        At registration, the instances of an app whose recovery is pending from a
        worker it still places instances on are stale too: that recovery restarts
        all of the app from its checkpoint, so they would only run beside it."""
        doomed = self.recovery.doomed() if registering else set()
        return stale_instances(worker, running, self.apps, doomed)


def _upgrade_reply(o: Outcome) -> pb.UpgradeReply:
    return pb.UpgradeReply(
        app=o.app,
        from_version=o.from_version,
        to_version=o.to_version,
        changes_json=json.dumps(o.change.to_dict()),
        change_lines=o.change.describe(),
        plan_lines=o.plan.describe(),
        instructions=o.plan.count(),
        applied=o.applied,
        latency_ms=o.latency_ms,
    )


async def _guard(context: grpc.aio.ServicerContext, coro: Any) -> Any:
    """Run a handler; a refusal or an unexpected error becomes a gRPC status."""
    try:
        return await coro
    except Refused as e:
        await context.abort(e.code, str(e))
    except WorkerGone as e:
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
    except (grpc.aio.AbortError, asyncio.CancelledError):
        raise
    except Exception as e:
        log.exception("request failed")
        await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")


async def _sync(fn: Any, *args: Any) -> Any:
    return fn(*args)


class ClientService(pb_grpc.MasterServicer):
    def __init__(self, master: Master):
        self.m = master

    async def Submit(self, request: Any, context: Any) -> pb.SubmitReply:
        o = await _guard(
            context,
            self.m.submit(request.model_json, request.bundle, request.bundle_hash, request.name),
        )
        n = sum(pl.parallelism for pl in self.m.apps[o.app].placement.values())
        return pb.SubmitReply(app=o.app, version=o.to_version, instances=n, latency_ms=o.latency_ms)

    async def Upgrade(self, request: Any, context: Any) -> pb.UpgradeReply:
        o = await _guard(
            context,
            self.m.upgrade(
                request.model_json,
                request.bundle,
                request.bundle_hash,
                request.name,
                request.dry_run,
            ),
        )
        return _upgrade_reply(o)

    async def Rollback(self, request: Any, context: Any) -> pb.UpgradeReply:
        o = await _guard(context, self.m.rollback(request.app, request.to_version, request.dry_run))
        return _upgrade_reply(o)

    async def Status(self, request: Any, context: Any) -> pb.StatusReply:
        return await _guard(context, _sync(self.m.app_status, request.app))

    async def History(self, request: Any, context: Any) -> pb.HistoryReply:
        return await _guard(context, self.m.history(request.app))

    async def Kill(self, request: Any, context: Any) -> pb.KillReply:
        v = await _guard(context, self.m.kill(request.app))
        return pb.KillReply(app=request.app, version=v)

    async def ListWorkers(self, request: Any, context: Any) -> pb.ListWorkersReply:
        return await _guard(context, _sync(self.m.workers))


class WorkerService(pb_grpc.WorkerControlServicer):
    def __init__(self, master: Master):
        self.m = master

    async def Register(self, request: Any, context: Any) -> pb.RegisterReply:
        if not request.name or not request.data_address:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "a worker must register with a name and a data address",
            )
        ms = self.m.membership
        epoch = ms.next_epoch(request.name)
        if self.m.store is not None:
            # Durable before the worker uses it: epochs never repeat, even after a crash.
            await asyncio.wrap_future(self.m.store.put_worker_epoch(request.name, epoch))
        w, fenced = ms.register(request, epoch)
        # A worker that restarted before it was declared dead lost what it ran.
        self.m.recovery.recover_lost(w.name, self.m.recovery.lost_apps(w.name, request.running))
        # Reconcile what it runs with the placements: what they no longer put on this
        # worker (its apps restarted elsewhere while it was away) stops before it rejoins.
        stale = self.m.reconcile(w.name, list(request.running), registering=True)
        gone = {(r.app, r.instance) for r in stale}
        w.running = [r for r in request.running if (r.app, r.instance) not in gone]
        self.m.recovery.on_register(w.name)
        log.info(
            "worker %s registered, session %d (data %s, %d slots, %d instances running%s)",
            w.name,
            w.epoch,
            w.data_address,
            w.slots,
            len(w.running),
            f"; its previous session was fenced: {fenced}" if fenced else "",
        )
        if stale:
            log.warning(
                "worker %s runs %d instance(s) the master no longer places on it (%s); "
                "it stops them before it rejoins",
                w.name,
                len(stale),
                _names(stale),
            )
        return pb.RegisterReply(
            session=w.session,
            heartbeat_interval_s=ms.heartbeat_interval,
            heartbeat_timeout_s=ms.heartbeat_timeout,
            epoch=w.epoch,
            stale=stale,
            fenced=fenced,
        )

    async def Heartbeat(self, request: Any, context: Any) -> pb.HeartbeatReply:
        try:
            w = self.m.membership.heartbeat(request)
        except SessionRefused as e:
            await context.abort(e.code, str(e))
        stale = self.m.reconcile(w.name, list(request.running), registering=False)
        if stale:
            log.warning(
                "worker %s runs %d instance(s) the master does not place on it (%s); "
                "told to stop them",
                w.name,
                len(stale),
                _names(stale),
            )
        if request.lost_links:
            self.m.recovery.on_lost_links(w.name, list(request.lost_links))
        return pb.HeartbeatReply(stale=stale)

    async def Control(self, request_iterator: Any, context: Any) -> None:
        await self.m.membership.serve_control(context)

    async def Drain(self, request: Any, context: Any) -> pb.DrainReply:
        try:
            self.m.membership.check(request.name, request.session)
        except SessionRefused as e:
            await context.abort(e.code, str(e))
        moved = await _guard(context, self.m.recovery.drain(request.name))
        if self.m.store is not None:
            await self.m.store.flush()  # the new placements are recorded before the reply
        return pb.DrainReply(moved=moved)


def _names(refs: list[pb.InstanceRef], most: int = 5) -> str:
    names = [f"{r.app}/{r.instance}" for r in refs[:most]]
    return ", ".join(names) + (f" and {len(refs) - most} more" if len(refs) > most else "")
