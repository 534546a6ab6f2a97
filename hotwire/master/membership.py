"""Worker membership: registration, heartbeats, liveness, fencing, and the instruction stream.

Fencing. Every registration opens a session with an epoch, a number that grows
with every registration under the worker's name (kept in the master's store, so
it keeps growing across master restarts). A session ends fenced when the master
declares the worker dead (no heartbeat within the timeout: its apps restart on
the live workers) or when a later registration under the same name replaces it.
Everything a fenced session sends is refused: heartbeats, the control stream and
drain requests get FAILED_PRECONDITION with the reason, and acks and checkpoint
reports already on their way are dropped, so a stale report never completes a
checkpoint. The worker must register again; the registration names every
instance it reports that the master no longer places on it (:func:`stale_instances`),
and the worker stops those before it opens its new session.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc

from hotwire.plan import parse_instance_id
from hotwire.proto import hotwire_pb2 as pb

log = logging.getLogger(__name__)


class WorkerGone(Exception):
    """The worker disconnected or stopped answering before it acknowledged a batch."""


class SessionRefused(Exception):
    """A request under a session the master does not accept: the gRPC code and why."""

    def __init__(self, code: grpc.StatusCode, reason: str):
        super().__init__(reason)
        self.code = code


@dataclass
class WorkerConn:
    name: str
    data_address: str
    health_address: str
    slots: int
    session: str
    epoch: int = 0  # the session's number for this worker name
    fenced: str = ""  # why the session was fenced; "" while it is current
    last_seen: float = field(default_factory=time.monotonic)
    outbox: asyncio.Queue[pb.MasterMessage | None] | None = None  # None ends the stream
    pending: dict[int, asyncio.Future[pb.Ack]] = field(default_factory=dict)
    running: list[pb.RunningInstance] = field(default_factory=list)
    stats_at: float = 0.0
    rates: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)  # in, out
    # share of the last heartbeat interval each instance waited for credit (backpressure)
    blocked: dict[tuple[str, str], float] = field(default_factory=dict)
    data_plane: dict[str, int] = field(default_factory=dict)  # its drops and link counters
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    def fail_pending(self, reason: str) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(WorkerGone(reason))
        self.pending.clear()


class Membership:
    def __init__(self, heartbeat_interval: float = 1.0, heartbeat_timeout: float = 5.0):
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        # The latest session of every worker name, fenced or not.
        self.workers: dict[str, WorkerConn] = {}
        self.epochs: dict[str, int] = {}  # the last epoch given to each worker name
        self._batch_ids = itertools.count(1)
        self.on_report: Any = lambda report: None  # checkpoint reports from workers

    # -- registration ----------------------------------------------------
    def next_epoch(self, name: str) -> int:
        """The epoch of the next session of ``name``, reserved now (never given twice)."""
        epoch = self.epochs[name] = self.epochs.get(name, 0) + 1
        return epoch

    def register(self, req: pb.RegisterRequest, epoch: int) -> tuple[WorkerConn, str]:
        """Open a new session for ``req.name``; returns it and why the previous one was
        fenced ("" if there was none or it was still current: it is fenced now)."""
        old = self.workers.get(req.name)
        before = ""
        if old is not None:
            before = old.fenced
            self.fence(req.name, f"replaced by its registration as session {epoch}")
        w = WorkerConn(
            name=req.name,
            data_address=req.data_address,
            health_address=req.health_address,
            slots=req.slots,
            session=uuid.uuid4().hex,
            epoch=epoch,
            running=list(req.running),
        )
        self.workers[req.name] = w
        return w, before

    def fence(self, name: str, why: str) -> bool:
        """End ``name``'s current session: whatever it sends from now on is refused.

        Batches waiting for its acks fail, and its control stream (if open) ends
        with FAILED_PRECONDITION. Returns False if there was no session to fence."""
        w = self.workers.get(name)
        if w is None or w.fenced:
            return False
        w.fenced = why
        w.connected.clear()
        w.fail_pending(f"worker {name!r} was fenced: {why}")
        if w.outbox is not None:
            w.outbox.put_nowait(None)
        log.warning(
            "worker %s: session %d fenced (%s); the master refuses anything it sends under "
            "it until it registers again",
            name,
            w.epoch,
            why,
        )
        return True

    def check(self, name: str, session: str) -> WorkerConn:
        """The current session ``session`` of worker ``name``, or :class:`SessionRefused`."""
        w = self.workers.get(name)
        if w is None:
            raise SessionRefused(
                grpc.StatusCode.NOT_FOUND,
                f"worker {name!r} is not registered with this master (it may have restarted); "
                "register again",
            )
        if w.session != session:
            raise SessionRefused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"worker {name!r}: session {session[:8]!r} is fenced: worker {name!r} "
                f"registered again since (its session is now {w.epoch}); stop the instances "
                "the master no longer places on it and register again",
            )
        if w.fenced:
            raise SessionRefused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"worker {name!r}: session {w.epoch} is fenced: {w.fenced}; stop the instances "
                "the master no longer places on it and register again",
            )
        return w

    def heartbeat(self, req: pb.HeartbeatRequest) -> WorkerConn:
        """Record a heartbeat of a current session; :class:`SessionRefused` otherwise."""
        w = self.check(req.name, req.session)
        now = time.monotonic()
        dt = now - w.stats_at if w.stats_at else 0.0
        if dt > 0:
            before = {
                (r.app, r.instance): (r.records_in, r.records_out, r.blocked_s) for r in w.running
            }
            w.rates, w.blocked = {}, {}
            for r in req.running:
                b_in, b_out, b_blocked = before.get((r.app, r.instance), (0, 0, 0.0))
                w.rates[(r.app, r.instance)] = (
                    max(0.0, (r.records_in - b_in) / dt),
                    max(0.0, (r.records_out - b_out) / dt),
                )
                w.blocked[(r.app, r.instance)] = min(1.0, max(0.0, (r.blocked_s - b_blocked) / dt))
        w.stats_at = now
        w.running = list(req.running)
        w.data_plane = dict(req.data_plane)
        # Liveness uses the master's own monotonic clock; the worker's wall clock
        # (sent_unix) may jump and is not trusted.
        w.last_seen = now
        return w

    def alive(self, name: str) -> bool:
        w = self.workers.get(name)
        return (
            w is not None
            and not w.fenced
            and time.monotonic() - w.last_seen <= self.heartbeat_timeout
        )

    def connected(self, name: str) -> bool:
        """Whether ``name`` has an instruction stream open now."""
        w = self.workers.get(name)
        return w is not None and w.connected.is_set()

    def live(self) -> dict[str, WorkerConn]:
        return {n: w for n, w in self.workers.items() if self.alive(n)}

    def peers(self) -> dict[str, str]:
        """Data addresses of the workers with a current session (not a fenced one's)."""
        return {n: w.data_address for n, w in self.workers.items() if not w.fenced}

    def accept(self, w: WorkerConn, msg: pb.WorkerMessage) -> bool:
        """Take an ack or a checkpoint report that came on ``w``'s control stream;
        False (and dropped) when ``w``'s session is no longer current."""
        if w.fenced or self.workers.get(w.name) is not w:
            log.info(
                "worker %s: dropped a %s from fenced session %d",
                w.name,
                msg.WhichOneof("body"),
                w.epoch,
            )
            return False
        if msg.HasField("ack"):
            fut = w.pending.get(msg.ack.batch_id)
            if fut is not None and not fut.done():
                fut.set_result(msg.ack)
        elif msg.HasField("report"):
            self.on_report(msg.report)
        return True

    # -- instruction stream ----------------------------------------------
    async def send(
        self,
        worker: str,
        phase: int,
        app: str,
        version: int,
        instructions: list[pb.Instruction],
        bundles: dict[str, bytes] | None = None,
        timeout: float = 60.0,
        phase_timeout: float = 0.0,
    ) -> pb.Ack:
        """Send one instruction batch and wait up to ``timeout`` for its ack;
        ``phase_timeout`` tells the worker how long to wait for the phase to settle."""
        w = self.workers.get(worker)
        if w is None:
            raise WorkerGone(f"worker {worker!r} is not registered")
        if w.fenced:
            raise WorkerGone(f"worker {worker!r} was fenced ({w.fenced}); it must register again")
        try:
            await asyncio.wait_for(w.connected.wait(), min(timeout, 10.0))
        except TimeoutError as e:
            raise WorkerGone(f"worker {worker!r} has no open instruction stream") from e
        assert w.outbox is not None
        batch_id = next(self._batch_ids)
        fut: asyncio.Future[pb.Ack] = asyncio.get_running_loop().create_future()
        w.pending[batch_id] = fut
        w.outbox.put_nowait(
            pb.MasterMessage(
                batch=pb.InstructionBatch(
                    batch_id=batch_id,
                    app=app,
                    version=version,
                    phase=phase,  # type: ignore[arg-type]
                    instructions=instructions,
                    peers=self.peers(),
                    bundles=bundles or {},
                    timeout_s=phase_timeout,
                )
            )
        )
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError as e:
            raise WorkerGone(f"worker {worker!r} did not answer within {timeout:.0f}s") from e
        finally:
            w.pending.pop(batch_id, None)

    async def serve_control(self, context: Any) -> None:
        """Body of the Control RPC: hello, then push batches and collect acks."""
        first = await context.read()
        if first is None or not first.HasField("hello"):
            return
        try:
            w = self.check(first.hello.name, first.hello.session)
        except SessionRefused as e:
            await context.abort(e.code, str(e))
            return
        outbox: asyncio.Queue[pb.MasterMessage | None] = asyncio.Queue()
        w.outbox = outbox
        w.connected.set()

        async def reader() -> None:
            while True:
                msg = await context.read()
                if msg is None or msg is _EOF:
                    return
                self.accept(w, msg)

        read_task = asyncio.get_running_loop().create_task(reader())
        write_task: asyncio.Task[Any] | None = None
        try:
            while not read_task.done():
                write_task = asyncio.get_running_loop().create_task(outbox.get())
                done, _ = await asyncio.wait(
                    {read_task, write_task}, return_when=asyncio.FIRST_COMPLETED
                )
                if write_task in done:
                    out = write_task.result()
                    write_task = None
                    if out is None:  # the session was fenced
                        await context.abort(
                            grpc.StatusCode.FAILED_PRECONDITION,
                            f"worker {w.name!r}: session {w.epoch} is fenced: {w.fenced}; "
                            "stop the instances the master no longer places on it and "
                            "register again",
                        )
                    await context.write(out)
        finally:
            if write_task is not None:
                write_task.cancel()
            read_task.cancel()
            if w.outbox is outbox:
                w.outbox = None
                w.connected.clear()
                w.fail_pending(f"worker {w.name!r} disconnected")


def stale_instances(
    worker: str,
    running: Iterable[pb.RunningInstance],
    apps: dict[str, Any],
    doomed: Collection[str] = (),
) -> list[pb.InstanceRef]:
    """The instances in ``running`` (reported by ``worker``) that must stop there.

    ``apps`` maps app names to their committed state (``AppState``: ``state``,
    ``epoch``, ``placement``). An instance is stale when its generation is not
    newer than the app's last transition (``epoch``) and the app was killed or the
    placement does not put it on ``worker`` (replaced, moved elsewhere, or its app
    is in ``doomed``: a recovery will restart all of it). Instances of a newer
    generation belong to a transition in flight, which commits or aborts them
    (the submit of a killed app's name again, too); instances of apps the master
    does not know are left alone.
    """
    out: list[pb.InstanceRef] = []
    for r in running:
        st = apps.get(r.app)
        if st is None:
            continue
        try:
            pe, gen, index = parse_instance_id(r.instance)
        except ValueError:
            continue
        if gen > st.epoch:
            continue
        if st.state == "running":
            pl = st.placement.get(pe)
            placed = (
                pl is not None
                and pl.gen == gen
                and index < pl.parallelism
                and pl.workers[index] == worker
            )
            if placed and r.app not in doomed:
                continue
        out.append(pb.InstanceRef(app=r.app, instance=r.instance))
    return out


try:
    from grpc.aio import EOF as _EOF
except ImportError:  # pragma: no cover
    _EOF = object()
