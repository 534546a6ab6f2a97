"""The master: gRPC services for clients and workers.

The master never runs user code. It checks the logical model and bundle it
receives and hands the change to its transition engine
(:mod:`hotwire.master.engine`), which diffs it against the running version,
places new instances, plans the instructions and drives the two phases (prepare
everywhere, then switch) over the workers' instruction streams, committing a
version only when every worker acknowledged its switch.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import grpc

from hotwire.master import canary as cn
from hotwire.master.access import Access, AccessInterceptor, AccessService
from hotwire.master.diff import diff
from hotwire.master.engine import AppState, Outcome, Refused, TransitionEngine
from hotwire.master.membership import Membership, SessionRefused, WorkerGone, stale_instances
from hotwire.master.progress import plan_by_phase
from hotwire.master.recovery import Recovery
from hotwire.master.store import Store
from hotwire.model import LogicalModel, check_structure
from hotwire.names import name_problem, shown
from hotwire.node import Node, add_health, grpc_options
from hotwire.proto import hotwire_pb2 as pb
from hotwire.proto import hotwire_pb2_grpc as pb_grpc
from hotwire.security.tls import InsecureRefused, TlsFiles, is_loopback

log = logging.getLogger(__name__)


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
        tls: TlsFiles | None = None,
        insecure: bool = False,
        metrics: str | None = None,
        dashboard: str | None = None,
    ):
        super().__init__()
        self.metrics = metrics  # HOST:PORT of the Prometheus endpoint; None: off
        self.dashboard = dashboard  # HOST:PORT of the web dashboard; None: off
        self.dashboard_address = ""  # where it listens
        self._dashboard: Any = None  # its hotwire.master.dashboard.Dashboard
        # The last dry run of an upgrade or rollback of each app (the dashboard's preview).
        self.previews: dict[str, dict[str, Any]] = {}
        self.metrics_address = ""  # where it listens (the port bound when 0 was asked)
        self._metrics: Any = None  # its hotwire.metrics.MetricsServer
        if tls is None and not insecure and not is_loopback(listen):
            raise InsecureRefused(
                f"the master would listen on {listen} without TLS: give it a certificate "
                "(streamctl init) or, knowing anyone who reaches the port can run code on "
                "every worker, --insecure"
            )
        self.tls = tls  # None: plaintext, no tokens (loopback or --insecure)
        self.access: Access | None = None
        self.listen = listen
        self.data_dir = Path(data_dir)
        # Several heartbeats fit in the timeout, so one late heartbeat is not a death.
        interval = heartbeat_interval or min(1.0, heartbeat_timeout / 4)
        self.membership = Membership(interval, heartbeat_timeout)
        # The apps, their locks and the store; every change to an app goes through it.
        self.engine = TransitionEngine(self.membership, switch_timeout)
        self.recovery = Recovery(self.engine, self.membership, self.spawn, checkpoint_interval)
        self.membership.on_report = self.recovery.on_report
        self.server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def apps(self) -> dict[str, AppState]:
        """The committed state of every app (the engine's: read it, change it through it)."""
        return self.engine.apps

    @property
    def store(self) -> Store | None:
        return self.engine.store

    @property
    def address(self) -> str:
        host = self.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    async def _start(self) -> None:
        store = await asyncio.to_thread(Store, self.data_dir / "hotwire.db")
        # Session epochs keep growing across restarts: a fencing token is never reused.
        self.membership.epochs.update(await store.read(store.worker_epochs))
        await self.engine.load(store)  # the apps as the store recorded them
        interceptors = []
        if self.tls is not None:
            self.access = Access(store)
            await self.access.load()
            interceptors.append(AccessInterceptor(self.access))
        # so_reuseport off: a second master on a taken port must fail
        self.server = grpc.aio.server(
            options=grpc_options(("grpc.so_reuseport", 0)), interceptors=interceptors
        )
        pb_grpc.add_MasterServicer_to_server(ClientService(self), self.server)
        pb_grpc.add_WorkerControlServicer_to_server(WorkerService(self), self.server)
        add_health(self.server, self.health)
        if self.access is not None and self.tls is not None:
            pb_grpc.add_AccessServicer_to_server(AccessService(self.access), self.server)
            self.port = self.server.add_secure_port(self.listen, self.tls.server_credentials())
        else:
            if not is_loopback(self.listen):
                log.warning(
                    "INSECURE: the master listens on %s without TLS or tokens: anyone who "
                    "reaches it can run code on every worker",
                    self.listen,
                )
            self.port = self.server.add_insecure_port(self.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.listen}")
        await self.server.start()
        if self.metrics:
            await self._serve_metrics(self.metrics)
        if self.dashboard:
            from hotwire.master.dashboard import Dashboard

            self._dashboard = Dashboard(self)
            self.dashboard_address = await self._dashboard.start(self.dashboard)
        self.recovery.start()
        self.spawn(self._watch_canaries(), name="canaries")
        log.info("master listening on %s (data in %s)", self.address, self.data_dir)

    async def _serve_metrics(self, addr: str) -> None:
        from prometheus_client import make_wsgi_app

        from hotwire.metrics import MetricsServer, OnLoop, master_families

        on_loop = OnLoop(asyncio.get_running_loop())
        metrics = self.engine.metrics

        def families() -> Any:
            return master_families(self, metrics)

        metrics.scrape = lambda: on_loop(families, [])
        # With TLS, over HTTPS with the master's certificate (scrapers check it with the CA).
        self._metrics = await asyncio.to_thread(
            MetricsServer, addr, make_wsgi_app(metrics.registry), self.tls
        )
        self.metrics_address = self._metrics.address
        log.info(
            "master: Prometheus metrics at %s://%s/metrics",
            self._metrics.scheme,
            self.metrics_address,
        )

    async def _close(self) -> None:
        if self._dashboard is not None:
            await self._dashboard.close()
        if self._metrics is not None:
            await asyncio.to_thread(self._metrics.close)
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
            model.app = name  # checked with the model's PE names, by check_structure
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
        async with self.engine.claim(app, "a submit"):
            version = (cur.version + 1) if cur is not None else 1
            empty = LogicalModel.build(app, [], [])
            return await self.engine.change(
                app, version, "submit", empty, {}, model, bundle, bundle_hash
            )

    async def upgrade(
        self,
        model_json: str,
        bundle: bytes,
        bundle_hash: str,
        name: str,
        dry_run: bool,
        action: str = "upgrade",
        rolled_back_to: int = 0,
        drop_state: Collection[str] = (),
        canary: tuple[str, int, float, float] | None = None,
    ) -> Outcome:
        """Upgrade (or roll back) an app; with ``canary`` = (PE, share in basis
        points, max error rate, seconds before promoting), start a canary instead."""
        model = self._check_model(model_json, name)
        self._check_bundle(bundle, bundle_hash)
        app = model.app
        cur = self.apps.get(app)
        if cur is None or cur.state != "running":
            raise Refused(
                grpc.StatusCode.NOT_FOUND,
                f"app {app!r} is not running; deploy it with 'streamctl submit'",
            )
        if (run := self.engine.canaries.get(app)) is not None:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"app {app!r}: a canary of PE {run.pe!r} is running; "
                f"'streamctl canary promote {app}' or 'streamctl canary abort {app}' first",
            )
        if canary is not None:
            pe, share, max_errors, promote_after = canary
            if dry_run or drop_state:
                raise Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "--canary cannot be combined with --dry-run or --drop-state",
                )
            if not 0 < share < cn.CANARY_BUCKETS:
                raise Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"--canary {pe}: the share must lie strictly between 0% and 100%",
                )
            async with self.engine.claim(app, f"a canary of PE {pe!r}"):
                self.engine.preload(app, bundle_hash, bundle)
                return await self.engine.start_canary(
                    app, model, bundle, bundle_hash, pe, share, max_errors, promote_after
                )
        async with self.engine.claim(app, f"an upgrade to version {cur.version + 1}"):
            if not dry_run:
                self.engine.preload(app, bundle_hash, bundle)
            outcome = await self.engine.change(
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
                drop_state,
            )
        if dry_run:
            self.previews[app] = _preview(outcome, model, action)
        return outcome

    async def rollback(self, app: str, to_version: int, dry_run: bool) -> Outcome:
        assert self.store is not None
        if bad := name_problem(app, f"app {shown(app)}"):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, bad)
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

    async def canary(self, app: str, action: str) -> pb.CanaryReply:
        """Promote or abort ``app``'s canary by hand."""
        if action not in ("promote", "abort"):
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT, f"canary action {action!r}: promote or abort"
            )
        run = self.engine.canaries.get(app)
        if run is None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"app {app!r} runs no canary")
        t0 = time.perf_counter()
        async with self.engine.claim(app, f"a canary {action}"):
            if action == "promote":
                await self.engine.promote_canary(app)
            else:
                await self.engine.abort_canary(app)
        return pb.CanaryReply(
            app=app,
            action=action,
            version=self.apps[app].version,
            pe=run.pe,
            latency_ms=(time.perf_counter() - t0) * 1000,
        )

    def _canary_stats(self, run: cn.CanaryRun) -> dict[str, dict[str, float]]:
        """Records in and out, errors, failed instances and time in the PE's code of
        the canary's PE, by ``"old"`` (the running code) and ``"canary"`` (the new
        code), with the error rate and the milliseconds per record."""
        st = self.apps.get(run.app)
        pl = st.placement.get(run.pe) if st is not None else None
        out: dict[str, dict[str, float]] = {
            k: {
                "instances": 0,
                "records_in": 0,
                "records_out": 0,
                "errors": 0,
                "failed": 0,
                "process_ms": 0.0,
            }
            for k in ("old", "canary")
        }
        if pl is None or pl.canary is None:
            return out
        ids = {
            pl.instance(run.pe, i): ("canary" if i >= pl.canary.first else "old")
            for i in range(pl.parallelism)
        }
        for k in ids.values():
            out[k]["instances"] += 1
        for w in self.membership.workers.values():
            for r in w.running:
                if r.app == run.app and r.instance in ids:
                    o = out[ids[r.instance]]
                    o["records_in"] += r.records_in
                    o["records_out"] += r.records_out
                    o["errors"] += r.errors
                    o["failed"] += bool(r.failed)
                    o["process_ms"] += r.process_ms
        for o in out.values():
            seen = o["records_in"]
            o["error_rate"] = round(o["errors"] / seen, 6) if seen else 0.0
            o["ms_per_record"] = round(o["process_ms"] / seen, 6) if seen else 0.0
            o["process_ms"] = round(o["process_ms"], 3)
        return out

    async def _watch_canaries(self, every: float = 0.5) -> None:
        """Promote a canary that stayed within its limits for its time, and abort
        (roll back online) one that did not."""
        while True:
            await asyncio.sleep(every)
            for app, run in list(self.engine.canaries.items()):
                run.stats = self._canary_stats(run)
                action = cn.verdict(run, time.time())
                if not action or self.engine.busy(app):
                    continue
                c = run.stats["canary"]
                why = (
                    f"automatically: {c['errors']} error(s) in {c['records_in']} record(s)"
                    f"{', an instance failed' if c['failed'] else ''}"
                )
                try:
                    async with self.engine.claim(app, f"a canary {action}"):
                        if self.engine.canaries.get(app) is not run:
                            continue
                        if action == "promote":
                            await self.engine.promote_canary(app, why)
                        else:
                            await self.engine.abort_canary(app, f"rolled back {why}")
                except Exception as e:
                    log.warning("app %r: canary %s failed: %s", app, action, e)

    async def kill(self, app: str) -> int:
        if self.engine.running(app) is None:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"app {app!r} is not running")
        async with self.engine.claim(app, "a kill"):
            return await self.engine.kill(app)

    # ------------------------------------------------------------------
    # Reading
    # ------------------------------------------------------------------
    def app_status(self, app: str) -> pb.StatusReply:
        if app and app not in self.apps:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"no app named {app!r}")
        stats: dict[tuple[str, str], tuple[Any, tuple[float, float]]] = {}
        blocked: dict[tuple[str, str], float] = {}
        for w in self.membership.workers.values():
            for r in w.running:
                stats[(r.app, r.instance)] = (r, w.rates.get((r.app, r.instance), (0.0, 0.0)))
            blocked.update(w.blocked)
        checkpoints = self.engine.metrics.last_checkpoint  # app -> time.time() of the last
        now = time.time()
        reply = pb.StatusReply()
        for st in sorted(self.apps.values(), key=lambda a: a.name):
            if app and st.name != app:
                continue
            state = "upgrading" if self.engine.busy(st.name) else st.state
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
                checkpoint_age_s=max(0.0, now - checkpoints[st.name])
                if st.name in checkpoints
                else -1.0,
            )
            progress = self.engine.progress.get(st.name)
            if progress is not None:
                a.progress_json = json.dumps(progress.to_dict())
            if st.state != "running":
                continue
            run = self.engine.canaries.get(st.name)
            if run is not None:
                run.stats = self._canary_stats(run)
                a.canary_json = json.dumps(run.to_dict())
            for spec in st.model.pes:
                pl = st.placement[spec.name]
                p = a.pes.add(
                    name=spec.name,
                    kind=spec.kind,
                    parallelism=pl.parallelism,
                    gen=pl.gen,
                    canary_share=pl.canary.share if pl.canary is not None else 0,
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
                        process_ms=r.process_ms if r else 0.0,
                        waiting=r.waiting if r else "",
                        waiting_s=r.waiting_s if r else 0.0,
                        queued=r.queued if r else 0,
                        late_dropped=r.late_dropped if r else 0,
                        batches=r.batches if r else 0,
                        chained=r.chained if r else 0,
                        blocked=blocked.get((st.name, pl.instance(spec.name, i)), 0.0),
                        version=st.version + 1
                        if pl.canary is not None and i >= pl.canary.first
                        else st.version,
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
        reply.canaries_json = json.dumps(
            [r.to_dict() for r in self.engine.canary_log if r.app == app]
        )
        return reply

    async def diff_versions(self, app: str, v1: int, v2: int) -> pb.DiffReply:
        """The change set from stored version ``v1`` of ``app`` to ``v2`` (any two)."""
        models = await self.version_models(app, v1, v2)
        change = diff(models[0], models[1])
        return pb.DiffReply(
            app=app,
            from_version=v1,
            to_version=v2,
            changes_json=json.dumps(change.to_dict()),
            change_lines=change.describe(),
        )

    async def version_models(self, app: str, *versions: int) -> list[LogicalModel]:
        """The logical models of stored ``versions`` of ``app`` (NOT_FOUND if one is not)."""
        store = self.store
        assert store is not None
        if app not in self.apps:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"no app named {app!r}")
        models = []
        for v in versions:
            rec = await store.read(store.version, app, v)
            if rec is None:
                raise Refused(
                    grpc.StatusCode.NOT_FOUND,
                    f"app {app!r} has no version {v}; 'streamctl history {app}' lists them",
                )
            models.append(rec.model)
        return models

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
                data_plane=w.data_plane,
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


def _preview(o: Outcome, model: LogicalModel, action: str) -> dict[str, Any]:
    """What the dashboard shows of a dry run: the model it would run, its change set
    and its plan by phase (nothing of it was applied)."""
    return {
        "app": o.app,
        "action": action,
        "from_version": o.from_version,
        "to_version": o.to_version,
        "created": time.time(),
        "model": model.to_dict(),
        "changes": o.change.to_dict(),
        "change_lines": o.change.describe(),
        "plan": plan_by_phase(o.plan.describe()),
        "instructions": o.plan.count(),
        "state_check": o.state_check,
        "state_check_failed": o.state_check_failed,
    }


def _upgrade_reply(o: Outcome) -> pb.UpgradeReply:
    return pb.UpgradeReply(
        app=o.app,
        from_version=o.from_version,
        to_version=o.to_version,
        changes_json=json.dumps(o.change.to_dict()),
        change_lines=o.change.describe(),
        plan_lines=o.plan.describe(),
        state_lines=[m.describe() for m in o.moves],
        state_json=json.dumps([m.to_dict() for m in o.moves]),
        handover_json=json.dumps(o.handed),
        instructions=o.plan.count(),
        applied=o.applied,
        latency_ms=o.latency_ms,
        state_check=o.state_check,
        state_check_failed=o.state_check_failed,
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
                drop_state=tuple(request.drop_state),
                canary=(
                    request.canary_pe,
                    request.canary_share,
                    request.canary_errors,
                    request.canary_for,
                )
                if request.canary_pe
                else None,
            ),
        )
        reply = _upgrade_reply(o)
        reply.canary = bool(request.canary_pe)
        return reply

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

    async def Canary(self, request: Any, context: Any) -> pb.CanaryReply:
        return await _guard(context, self.m.canary(request.app, request.action))

    async def Diff(self, request: Any, context: Any) -> pb.DiffReply:
        return await _guard(
            context,
            self.m.diff_versions(request.app, request.from_version, request.to_version),
        )


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
