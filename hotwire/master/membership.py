"""Worker membership: registration, heartbeats, liveness, and the instruction stream."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from hotwire.proto import hotwire_pb2 as pb

log = logging.getLogger(__name__)


class WorkerGone(Exception):
    """The worker disconnected or stopped answering before it acknowledged a batch."""


@dataclass
class WorkerConn:
    name: str
    data_address: str
    health_address: str
    slots: int
    session: str
    last_seen: float = field(default_factory=time.monotonic)
    outbox: asyncio.Queue[pb.MasterMessage] | None = None
    pending: dict[int, asyncio.Future[pb.Ack]] = field(default_factory=dict)
    running: list[pb.RunningInstance] = field(default_factory=list)
    stats_at: float = 0.0
    rates: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)  # in, out
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
        self.workers: dict[str, WorkerConn] = {}
        self._batch_ids = itertools.count(1)
        self.on_report: Any = lambda report: None  # checkpoint reports from workers

    # -- registration ----------------------------------------------------
    def register(self, req: pb.RegisterRequest) -> WorkerConn:
        old = self.workers.get(req.name)
        if old is not None:
            old.fail_pending(f"worker {req.name!r} registered again")
        w = WorkerConn(
            name=req.name,
            data_address=req.data_address,
            health_address=req.health_address,
            slots=req.slots,
            session=uuid.uuid4().hex,
            running=list(req.running),
        )
        self.workers[req.name] = w
        return w

    def heartbeat(self, req: pb.HeartbeatRequest) -> WorkerConn | None:
        w = self.workers.get(req.name)
        if w is None or w.session != req.session:
            return None
        now = time.monotonic()
        dt = now - w.stats_at if w.stats_at else 0.0
        if dt > 0:
            before = {(r.app, r.instance): (r.records_in, r.records_out) for r in w.running}
            w.rates = {}
            for r in req.running:
                b_in, b_out = before.get((r.app, r.instance), (0, 0))
                w.rates[(r.app, r.instance)] = (
                    max(0.0, (r.records_in - b_in) / dt),
                    max(0.0, (r.records_out - b_out) / dt),
                )
        w.stats_at = now
        w.running = list(req.running)
        # Liveness uses the master's own monotonic clock; the worker's wall clock
        # (sent_unix) may jump and is not trusted.
        w.last_seen = now
        return w

    def alive(self, name: str) -> bool:
        w = self.workers.get(name)
        return w is not None and time.monotonic() - w.last_seen <= self.heartbeat_timeout

    def live(self) -> dict[str, WorkerConn]:
        return {n: w for n, w in self.workers.items() if self.alive(n)}

    def peers(self) -> dict[str, str]:
        return {n: w.data_address for n, w in self.workers.items()}

    # -- instruction stream ----------------------------------------------
    async def send(
        self,
        worker: str,
        phase: int,
        app: str,
        version: int,
        instructions: list[bytes],
        bundles: dict[str, bytes] | None = None,
        timeout: float = 60.0,
        phase_timeout: float = 0.0,
    ) -> pb.Ack:
        """Send one instruction batch and wait up to ``timeout`` for its ack;
        ``phase_timeout`` tells the worker how long to wait for the phase to settle."""
        w = self.workers.get(worker)
        if w is None:
            raise WorkerGone(f"worker {worker!r} is not registered")
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
        w = self.workers.get(first.hello.name)
        if w is None or w.session != first.hello.session:
            import grpc

            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"worker {first.hello.name!r} has no session {first.hello.session!r}; "
                "register first",
            )
            return
        outbox: asyncio.Queue[pb.MasterMessage] = asyncio.Queue()
        w.outbox = outbox
        w.connected.set()

        async def reader() -> None:
            while True:
                msg = await context.read()
                if msg is None or msg is _EOF:
                    return
                if msg.HasField("ack"):
                    fut = w.pending.get(msg.ack.batch_id)
                    if fut is not None and not fut.done():
                        fut.set_result(msg.ack)
                elif msg.HasField("report"):
                    self.on_report(msg.report)

        read_task = asyncio.get_running_loop().create_task(reader())
        write_task: asyncio.Task[Any] | None = None
        try:
            while not read_task.done():
                write_task = asyncio.get_running_loop().create_task(outbox.get())
                done, _ = await asyncio.wait(
                    {read_task, write_task}, return_when=asyncio.FIRST_COMPLETED
                )
                if write_task in done:
                    await context.write(write_task.result())
                    write_task = None
        finally:
            if write_task is not None:
                write_task.cancel()
            read_task.cancel()
            if w.outbox is outbox:
                w.outbox = None
                w.connected.clear()
                w.fail_pending(f"worker {w.name!r} disconnected")


try:
    from grpc.aio import EOF as _EOF
except ImportError:  # pragma: no cover
    _EOF = object()
