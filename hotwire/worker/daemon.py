"""The worker daemon: registers with the master, heartbeats, and performs instruction batches.

The data plane runs on its own: if the master goes away the instances keep
moving records, and the daemon re-registers (reporting what it runs) when the
master is back.

Heartbeats do not depend on the event loop: user code runs on the loop and a
long synchronous call blocks it, so a dedicated thread sends them over its own
synchronous channel, reporting the last snapshot of the running instances the
loop made. The same thread keeps the worker's clock: it notices when the whole
process stood still (SIGSTOP, a paused host) and holds the output of sources
and sinks until the master answers (``hotwire.worker.fence``).

Fencing. A session the master refuses as fenced (it declared the worker dead,
or a later registration replaced it) ends: sources and sinks hold their output,
the worker registers again, stops every instance the registration names as
stale (the master no longer places it here), and only then opens its new
session and lets output flow. A master that cannot be reached fences nothing:
the instances keep running and output flows.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from hotwire.logs import log_context
from hotwire.node import Node, add_health, grpc_options, split_addr
from hotwire.plan_wire import from_pb
from hotwire.proto import hotwire_pb2 as pb
from hotwire.proto import hotwire_pb2_grpc as pb_grpc
from hotwire.security.pki import PkiError
from hotwire.security.tls import (
    ClientCredentials,
    InsecureRefused,
    TlsFiles,
    dial,
    dial_aio,
    is_loopback,
)
from hotwire.worker.channels import BLOCKED_S
from hotwire.worker.fence import TICK_S
from hotwire.worker.runtime import KEEP_LOADED, SWITCH_TIMEOUT_S, Runtime
from hotwire.worker.transport import LINK_TIMEOUT_S

log = logging.getLogger(__name__)


class Worker(Node):
    service_name = "hotwire.Worker"

    def __init__(
        self,
        master: str = "127.0.0.1:7600",
        listen: str = "127.0.0.1:0",
        name: str | None = None,
        slots: int = 16,
        data_dir: str | Path | None = None,
        advertise: str | None = None,
        link_timeout: float = LINK_TIMEOUT_S,
        tls: TlsFiles | None = None,
        insecure: bool = False,
        health_port: int = 0,
        metrics: str | None = None,
    ):
        super().__init__()
        self.metrics = metrics  # HOST:PORT of the Prometheus endpoint; None: off
        self.metrics_address = ""  # where it listens (the port bound when 0 was asked)
        self._metrics: Any = None  # its hotwire.metrics.WorkerMetricsServer
        self.health_port = health_port  # the gRPC health service's port; 0: any free one
        self.master = master
        self.listen = listen
        self.advertise = advertise  # the data address other workers dial, if not the listen one
        self.tls = tls  # mTLS to the master and on the data plane; None: plaintext
        if tls is not None:
            # A worker is who its certificate says: it registers under that name only.
            kind, certified = tls.identity()
            if kind != "worker":
                raise PkiError(
                    f"{tls.cert} is a {kind or 'non-hotwire'} certificate, not a worker's"
                )
            if name and name != certified:
                raise PkiError(
                    f"--name {name!r} is not the name in the certificate ({certified!r})"
                )
            name = certified
        elif not insecure and not is_loopback(listen):
            raise InsecureRefused(
                f"the worker would listen on {listen} without TLS: give it a certificate "
                "(streamctl cert worker) or, knowing anyone who reaches the port can inject "
                "records, --insecure"
            )
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.slots = slots
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"hotwire-worker-{self.name}-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir)
        # link_timeout: a data link to a peer down this long is reported to the master.
        self.runtime = Runtime(self.name, self.data_dir / "bundles", link_timeout)
        self.runtime.dataplane.tls = tls
        self.runtime.stamp = bool(metrics)  # sources stamp batches for the e2e latency
        self.session = ""
        self.epoch = 0  # the number of the current session (fencing epoch)
        self._rejoin_now = False  # the master refused the session: register again at once
        self._dropping: set[tuple[str, str]] = set()  # stale instances being stopped
        self.registered = asyncio.Event()
        self.heartbeat_interval = 1.0
        self._grpc: grpc.aio.Server | None = None
        self.health_address = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._call: Any = None  # the Control call of the current session
        # Shared with the heartbeat thread; each is replaced whole, never mutated.
        self._hb_session = ""  # the session heartbeats report; "" outside a session
        self._running_snapshot: tuple[pb.RunningInstance, ...] = ()
        self._lost_snapshot: tuple[pb.LostLink, ...] = ()  # data links down past the bound
        self._counters_snapshot: dict[str, int] = {}  # the data plane's drops and link stats
        self._hb_stop = threading.Event()
        self._hb_wake = threading.Event()  # wakes the heartbeat thread before its next tick
        self._hb_now = False  # send a heartbeat at once (output is on hold)
        self._hb_channel: grpc.Channel | None = None
        self._hb_thread: threading.Thread | None = None

    @property
    def data_address(self) -> str:
        """The data-plane address given to the other workers (``advertise`` if set)."""
        return self.advertise or self.runtime.dataplane.address

    async def _start(self) -> None:
        host, port = split_addr(self.listen)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        await self.runtime.dataplane.start(host, port)
        self._grpc = grpc.aio.server(options=grpc_options(("grpc.so_reuseport", 0)))
        add_health(self._grpc, self.health)
        if self.tls is not None:
            hport = self._grpc.add_secure_port(
                f"{host}:{self.health_port}", self.tls.server_credentials()
            )
        else:
            hport = self._grpc.add_insecure_port(f"{host}:{self.health_port}")
        await self._grpc.start()
        self.health_address = f"{host}:{hport}"
        self._loop = asyncio.get_running_loop()
        self.runtime.hold.on_hold = self._heartbeat_now
        if self.metrics:
            await self._serve_metrics(self.metrics)
        self._hb_channel = self._dial(sync=True)
        self._hb_thread = threading.Thread(
            target=self._heartbeat_thread, name=f"hotwire-heartbeat-{self.name}", daemon=True
        )
        self._hb_thread.start()
        self.spawn(self._session_loop(), name=f"worker-{self.name}-session")
        await self.registered.wait()

    async def _serve_metrics(self, addr: str) -> None:
        from hotwire.metrics import WorkerMetricsServer

        # With TLS, over HTTPS with the worker's certificate (scrapers check it with the CA).
        self._metrics = WorkerMetricsServer(self, self.tls)
        self.metrics_address = addr = await self._metrics.start(addr)
        log.info(
            "worker %s: Prometheus metrics at %s://%s/metrics",
            self.name,
            self._metrics.scheme,
            addr,
        )

    async def _close(self) -> None:
        if self._metrics is not None:
            await self._metrics.close()
        self._hb_stop.set()
        self._hb_wake.set()
        if self._hb_channel is not None:
            self._hb_channel.close()  # ends a heartbeat in flight at once
        if self._hb_thread is not None:
            await asyncio.to_thread(self._hb_thread.join, 10)
            if self._hb_thread.is_alive():
                log.warning("worker %s: the heartbeat thread did not stop", self.name)
        await self.runtime.close()
        if self._grpc is not None:
            await self._grpc.stop(grace=0.5)
        if self._tmp is not None:
            self._tmp.cleanup()

    async def drain(self, timeout: float = 120) -> int:
        """Ask the master to move this worker's instances elsewhere (before a stop)."""
        async with self._dial(options=grpc_options()) as channel:
            stub = pb_grpc.WorkerControlStub(channel)
            reply = await stub.Drain(
                pb.DrainRequest(name=self.name, session=self.session), timeout=timeout
            )
            return int(reply.moved)

    def _dial(self, sync: bool = False, options: list[tuple[str, Any]] | None = None) -> Any:
        """A channel to the master: mTLS with this worker's certificate, if it has one."""
        opts = options if options is not None else _reconnect_fast()
        if sync:
            return dial(self.master, ClientCredentials(self.tls), opts)
        return dial_aio(self.master, self.tls, opts)

    # ------------------------------------------------------------------
    # Session with the master
    # ------------------------------------------------------------------
    def _running(self) -> list[pb.RunningInstance]:
        waiting = self.runtime.waiting()
        return [
            pb.RunningInstance(
                app=a,
                instance=i,
                records_in=ri,
                records_out=ro,
                errors=e,
                failed=f,
                dead_letters=d,
                process_ms=s * 1000,
                waiting=waiting.get((a, i), ("", 0.0, 0))[0],
                waiting_s=waiting.get((a, i), ("", 0.0, 0))[1],
                queued=waiting.get((a, i), ("", 0.0, 0))[2],
                blocked_s=BLOCKED_S.get((a, i), 0.0),
                late_dropped=late,
                batches=batches,
                chained=chained,
            )
            for a, i, ri, ro, e, f, d, s, late, batches, chained in self.runtime.running()
        ]

    async def _session_loop(self) -> None:
        backoff = 0.1
        hold = self.runtime.hold
        while True:
            async with self._dial() as channel:
                stub = pb_grpc.WorkerControlStub(channel)
                registered = False
                try:
                    await self._register(stub)
                    registered = True
                    backoff = 0.1
                    await self._serve_session(stub)
                except grpc.aio.AioRpcError as e:
                    code = e.code()
                    if registered and code in _REFUSED:
                        # The master ended the control stream: it refuses the session.
                        self._session_refused(
                            self.session,
                            e.details() or "",
                            code == grpc.StatusCode.FAILED_PRECONDITION,
                        )
                    else:
                        log.info(
                            "worker %s: master %s unavailable (%s); retrying",
                            self.name,
                            self.master,
                            code.name,
                        )
                        if hold.reason and not hold.fenced:
                            hold.release(f"the master cannot be reached ({code.name}); {_DOWN}")
            if self._rejoin_now:
                self._rejoin_now = False
                continue
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _register(self, stub: pb_grpc.WorkerControlStub) -> None:
        """Open a new session: report what runs here, stop what the master names stale."""
        reply = await stub.Register(
            pb.RegisterRequest(
                name=self.name,
                data_address=self.data_address,
                health_address=self.health_address,
                slots=self.slots,
                running=self._running(),
            ),
            timeout=5,
        )
        hold = self.runtime.hold
        if reply.heartbeat_timeout_s > 0:
            hold.limit = reply.heartbeat_timeout_s / 2
        if reply.fenced:
            log.warning(
                "worker %s: the master had fenced its previous session: %s",
                self.name,
                reply.fenced,
            )
        if reply.stale:
            # Before the new session opens: its old instances never run beside the
            # ones that replaced them.
            await self._drop_stale(list(reply.stale), "its previous session was fenced")
        self.session = reply.session
        self.epoch = reply.epoch
        self.heartbeat_interval = reply.heartbeat_interval_s or 1.0
        hold.release(f"registered again (session {reply.epoch})")
        self.registered.set()
        log.info(
            "worker %s registered with master %s (session %d)", self.name, self.master, self.epoch
        )

    async def _drop_stale(self, refs: list[pb.InstanceRef], why: str) -> None:
        """Stop instances the master no longer places on this worker (each once, even
        when heartbeats name it again while it is still stopping)."""
        by_app: dict[str, list[str]] = {}
        for r in refs:
            if (r.app, r.instance) not in self._dropping:
                by_app.setdefault(r.app, []).append(r.instance)
        for app, iids in sorted(by_app.items()):
            keys = {(app, i) for i in iids}
            self._dropping |= keys
            try:
                n = await self.runtime.drop(app, iids)
            except Exception:
                log.exception(
                    "worker %s: stopping stale instances of app %r failed; the master names "
                    "them again with the next heartbeat",
                    self.name,
                    app,
                )
                continue
            finally:
                self._dropping -= keys
            if n:
                log.warning(
                    "worker %s: stopped %d instance(s) of app %r that the master no longer "
                    "places here (%s): %s",
                    self.name,
                    n,
                    app,
                    why,
                    ", ".join(sorted(iids)),
                )

    async def _serve_session(self, stub: pb_grpc.WorkerControlStub) -> None:
        outbox: asyncio.Queue[pb.WorkerMessage] = asyncio.Queue()
        outbox.put_nowait(pb.WorkerMessage(hello=pb.Hello(name=self.name, session=self.session)))

        async def send(call: Any) -> None:
            # Written by a task of ours rather than handed to gRPC as a request iterator:
            # an iterator's consumer task is left pending (and logged as destroyed) when
            # the call ends under it, as when the master dies.
            try:
                while True:
                    await call.write(await outbox.get())
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                return  # the call ended: the reading side sees why

        def report(app: str, cid: int, iid: str, data: bytes) -> None:
            outbox.put_nowait(
                pb.WorkerMessage(
                    report=pb.CheckpointReport(app=app, checkpoint=cid, instance=iid, state=data)
                )
            )

        self.runtime.on_checkpoint = report
        call = stub.Control()
        sender = asyncio.get_running_loop().create_task(send(call))
        self._call = call
        self._refresh_running()
        self._hb_session = self.session  # the heartbeat thread starts reporting it
        handlers: set[asyncio.Task[None]] = set()
        try:
            async for msg in call:
                if msg.HasField("batch"):
                    t = asyncio.get_running_loop().create_task(self._handle(msg.batch, outbox))
                    handlers.add(t)
                    t.add_done_callback(handlers.discard)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the worker is stopping
            # Only the call was cancelled (the master refused this session: it fenced it
            # or forgot it): return, and the session loop registers again.
        finally:
            if self._call is call:
                self._call = None
                self._hb_session = ""
            call.cancel()
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    # ------------------------------------------------------------------
    # Heartbeats: a thread of their own
    # ------------------------------------------------------------------
    def _refresh_running(self, done: threading.Event | None = None) -> None:
        """On the loop: snapshot what runs here for the heartbeat thread."""
        self._running_snapshot = tuple(self._running())
        self._lost_snapshot = tuple(
            pb.LostLink(peer=x.peer, apps=x.apps, down_s=x.down_s, error=x.error)
            for x in self.runtime.dataplane.lost_links()
        )
        dp = self.runtime.dataplane
        self._counters_snapshot = {**dp.stats, **dp.drops}
        if done is not None:
            done.set()

    def _session_refused(self, session: str, why: str, fenced: bool) -> None:
        """On the loop: the master refused ``session``; end it to register again.

        ``fenced``: the master fenced it (declared this worker dead, or another
        registration replaced it): output holds until the worker registered again
        and stopped what the master no longer places here. Otherwise the master
        does not know the session (it restarted): a hold in place lasts until then too.
        """
        if session != self.session or not session:
            return  # an answer about an older session
        hold = self.runtime.hold
        if fenced:
            if not hold.fenced:
                log.warning(
                    "worker %s: the master fenced session %d (%s); sources and sinks hold "
                    "their output, and it stops what the master no longer places on it "
                    "before it registers again",
                    self.name,
                    self.epoch,
                    why,
                )
            hold.fence(why)
        else:
            if hold.reason:
                hold.fence(why)
            log.info("worker %s: master forgot this session; registering again", self.name)
        self._hb_session = ""
        self._rejoin_now = True
        if self._call is not None:
            self._call.cancel()

    def _heartbeat_answered(
        self, session: str, sent_at: float, stale: list[pb.InstanceRef]
    ) -> None:
        """On the loop: the master took a heartbeat of ``session`` sent at ``sent_at``."""
        if session != self.session:
            return
        self.runtime.hold.release(f"the master answered: session {self.epoch} is current", sent_at)
        if stale:
            self.spawn(
                self._drop_stale(stale, "the master reconciled this worker's report"),
                name=f"worker-{self.name}-stale",
            )

    def _master_unreachable(self, session: str, sent_at: float, code: str) -> None:
        """On the loop: a heartbeat sent at ``sent_at`` found no master."""
        hold = self.runtime.hold
        if session == self.session and hold.reason and not hold.fenced:
            hold.release(f"the master cannot be reached ({code}); {_DOWN}", sent_at)

    def _heartbeat_now(self) -> None:
        """Any thread: output is on hold; ask the master now, not at the next interval."""
        self._hb_now = True
        self._hb_wake.set()

    def _to_loop(self, fn: Any, *args: Any) -> bool:
        """From the heartbeat thread: run ``fn(*args)`` on the loop; False once it is closed."""
        loop = self._loop
        if loop is None:
            return False
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed
            return False
        return True

    def _heartbeat_thread(self) -> None:
        """Keep the worker's clock, and send a heartbeat every interval while a session
        is open, whatever the loop does.

        The thread wakes every ``TICK_S``: a tick long after the previous one means the
        whole process stood still, and output holds (``OutputHold.tick``) while a
        heartbeat goes out at once. One heartbeat is in flight at a time, as a future,
        so a master that does not answer never stops the clock. The running counters
        come from a snapshot the loop refreshes when asked; a loop blocked by user code
        leaves the last one, which still goes out.
        """
        assert self._hb_channel is not None
        stub = pb_grpc.WorkerControlStub(self._hb_channel)
        hold = self.runtime.hold
        call: Any = None  # the heartbeat in flight
        sent: tuple[str, float] = ("", 0.0)  # its session, and when it was sent
        next_at = 0.0
        while True:
            self._hb_wake.wait(TICK_S)
            self._hb_wake.clear()
            if self._hb_stop.is_set():
                return
            hold.tick()
            if call is not None:
                if not call.done():
                    continue
                self._heartbeat_result(call, *sent)
                call = None
            session = self._hb_session
            now = time.monotonic()
            if not session or (now < next_at and not self._hb_now):
                continue
            self._hb_now = False
            next_at = now + self.heartbeat_interval
            fresh = threading.Event()
            if self._to_loop(self._refresh_running, fresh):
                fresh.wait(min(0.1, self.heartbeat_interval / 4))
            sent = (session, time.monotonic())
            try:
                call = stub.Heartbeat.future(
                    pb.HeartbeatRequest(
                        name=self.name,
                        session=session,
                        running=self._running_snapshot,
                        lost_links=self._lost_snapshot,
                        data_plane=self._counters_snapshot,
                        sent_unix=time.time(),
                    ),
                    timeout=max(self.heartbeat_interval * 3, 2),
                )
            except Exception:  # the channel closed by _close
                if self._hb_stop.is_set():
                    return
                log.exception("worker %s: heartbeat failed", self.name)
                continue
            call.add_done_callback(lambda _f: self._hb_wake.set())

    def _heartbeat_result(self, call: Any, session: str, sent_at: float) -> None:
        """On the heartbeat thread: hand a finished heartbeat's answer to the loop."""
        try:
            reply = call.result()
        except Exception as e:  # an RPC error, or the channel closed by _close
            if self._hb_stop.is_set():
                return
            code = e.code() if isinstance(e, grpc.Call) else None
            if code in _REFUSED:
                fenced = code == grpc.StatusCode.FAILED_PRECONDITION
                details = e.details() or ""  # type: ignore[union-attr]
                self._to_loop(self._session_refused, session, details, fenced)
            elif code is not None:
                log.debug("worker %s: heartbeat failed: %s", self.name, code.name)
                self._to_loop(self._master_unreachable, session, sent_at, code.name)
            else:
                log.exception("worker %s: heartbeat failed", self.name)
            return
        self._to_loop(self._heartbeat_answered, session, sent_at, list(reply.stale))

    async def _handle(self, batch: pb.InstructionBatch, outbox: asyncio.Queue[Any]) -> None:
        with log_context(app=batch.app or None, transition=batch.version or None):
            await self._handle_batch(batch, outbox)

    async def _handle_batch(self, batch: pb.InstructionBatch, outbox: asyncio.Queue[Any]) -> None:
        t0 = time.perf_counter()
        ack = pb.Ack(batch_id=batch.batch_id, ok=True)
        try:
            rt = self.runtime
            rt.dataplane.peers.update(dict(batch.peers))
            for h, data in batch.bundles.items():
                rt.add_bundle(h, data)
            instructions = [from_pb(i) for i in batch.instructions]
            if batch.phase == pb.PREPARE:
                for h in batch.bundles:
                    # Import errors surface here, before anything switches. The import
                    # runs in a thread so the instances on this worker keep running.
                    await asyncio.to_thread(rt.load, h)
                await rt.prepare(batch.app, batch.version, instructions)
            elif batch.phase == pb.SWITCH:
                handed = await rt.switch(
                    batch.app, batch.version, instructions, batch.timeout_s or SWITCH_TIMEOUT_S
                )
                ack.handed.extend(
                    pb.HandedOver(
                        pe=h.pe,
                        keys=h.keys,
                        bytes=h.bytes,
                        handovers=h.handovers,
                        local=h.local,
                        held=h.held,
                    )
                    for h in handed
                )
            elif batch.phase == pb.ABORT:
                await rt.abort(batch.app, batch.version)
            elif batch.phase == pb.STOP:
                await rt.stop(batch.app)
            elif batch.phase == pb.CHECKPOINT:
                rt.checkpoint(batch.app, batch.version)
            elif batch.phase == pb.COMMITTED:
                rt.checkpoint_done(batch.app, batch.version)
            elif batch.phase == pb.LOAD:
                # The master sends an upgrade's bundle as it starts planning: the
                # import (a large app.py compiles for milliseconds) overlaps the plan.
                # Its prepare sends the bundle again, so nothing depends on this one.
                for h in batch.bundles:
                    await asyncio.to_thread(rt.load, h)
                    log.info(
                        "worker %s: app %r: bundle %s loaded ahead of its prepare in %.1f ms",
                        self.name,
                        batch.app,
                        h[:12],
                        (time.perf_counter() - t0) * 1000,
                    )
                rt.evict_bundles(KEEP_LOADED)  # refused upgrades' bundles do not pile up
            elif batch.phase == pb.CHECK_STATE:
                for h in batch.bundles:
                    await asyncio.to_thread(rt.load, h)
                await rt.check_state(batch.app, instructions)
            else:
                raise ValueError(f"unknown phase {batch.phase}")
        except Exception as e:
            log.warning(
                "worker %s: batch %d (%s v%d) failed: %s",
                self.name,
                batch.batch_id,
                batch.app,
                batch.version,
                e,
            )
            ack.ok = False
            ack.error = str(e) or type(e).__name__
        ack.elapsed_ms = (time.perf_counter() - t0) * 1000
        outbox.put_nowait(pb.WorkerMessage(ack=ack))


_REFUSED = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)
_DOWN = "a master that is down does not stop the flow"


def _reconnect_fast() -> list[tuple[str, Any]]:
    """gRPC options for the worker's channels to the master: after an outage the
    channel tries again within a second (gRPC's default backoff grows to minutes),
    so a worker that was cut off learns soon whether it was fenced."""
    return grpc_options(
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
    )
