"""The worker daemon: registers with the master, heartbeats, and performs instruction batches.

The data plane runs on its own: if the master goes away the instances keep
moving records, and the daemon re-registers (reporting what it runs) when the
master is back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import msgpack

from hotwire.codec import unpackb
from hotwire.node import Node, add_health, split_addr
from hotwire.plan import from_wire
from hotwire.proto import hotwire_pb2 as pb
from hotwire.proto import hotwire_pb2_grpc as pb_grpc
from hotwire.worker.runtime import Runtime

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
    ):
        super().__init__()
        self.master = master
        self.listen = listen
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.slots = slots
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"hotwire-worker-{self.name}-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir)
        self.runtime = Runtime(self.name, self.data_dir / "bundles")
        self.session = ""
        self.registered = asyncio.Event()
        self.heartbeat_interval = 1.0
        self._grpc: grpc.aio.Server | None = None
        self.health_address = ""

    @property
    def data_address(self) -> str:
        return self.runtime.dataplane.address

    async def _start(self) -> None:
        host, port = split_addr(self.listen)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        await self.runtime.dataplane.start(host, port)
        self._grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        add_health(self._grpc, self.health)
        hport = self._grpc.add_insecure_port(f"{host}:0")
        await self._grpc.start()
        self.health_address = f"{host}:{hport}"
        self.spawn(self._session_loop(), name=f"worker-{self.name}-session")
        await self.registered.wait()

    async def _close(self) -> None:
        await self.runtime.close()
        if self._grpc is not None:
            await self._grpc.stop(grace=0.5)
        if self._tmp is not None:
            self._tmp.cleanup()

    async def drain(self, timeout: float = 120) -> int:
        """Ask the master to move this worker's instances elsewhere (before a stop)."""
        async with grpc.aio.insecure_channel(self.master) as channel:
            stub = pb_grpc.WorkerControlStub(channel)
            reply = await stub.Drain(
                pb.DrainRequest(name=self.name, session=self.session), timeout=timeout
            )
            return int(reply.moved)

    # ------------------------------------------------------------------
    # Session with the master
    # ------------------------------------------------------------------
    def _running(self) -> list[pb.RunningInstance]:
        return [
            pb.RunningInstance(
                app=a, instance=i, records_in=ri, records_out=ro, errors=e, failed=f, dead_letters=d
            )
            for a, i, ri, ro, e, f, d in self.runtime.running()
        ]

    async def _session_loop(self) -> None:
        backoff = 0.1
        while True:
            async with grpc.aio.insecure_channel(self.master) as channel:
                stub = pb_grpc.WorkerControlStub(channel)
                try:
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
                    self.session = reply.session
                    self.heartbeat_interval = reply.heartbeat_interval_s or 1.0
                    self.registered.set()
                    backoff = 0.1
                    log.info("worker %s registered with master %s", self.name, self.master)
                    await self._serve_session(stub)
                except grpc.aio.AioRpcError as e:
                    log.info(
                        "worker %s: master %s unavailable (%s); retrying",
                        self.name,
                        self.master,
                        e.code().name,
                    )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _serve_session(self, stub: pb_grpc.WorkerControlStub) -> None:
        outbox: asyncio.Queue[pb.WorkerMessage] = asyncio.Queue()
        outbox.put_nowait(pb.WorkerMessage(hello=pb.Hello(name=self.name, session=self.session)))

        async def outgoing() -> Any:
            while True:
                yield await outbox.get()

        def report(app: str, cid: int, iid: str, state: Any) -> None:
            try:
                data = msgpack.packb(state, use_bin_type=True)
            except Exception as e:
                log.error(
                    "app %r instance %s: checkpoint state is not msgpack-able: %s", app, iid, e
                )
                return
            outbox.put_nowait(
                pb.WorkerMessage(
                    report=pb.CheckpointReport(app=app, checkpoint=cid, instance=iid, state=data)
                )
            )

        self.runtime.on_checkpoint = report
        call = stub.Control(outgoing())
        hb = asyncio.get_running_loop().create_task(self._heartbeats(stub, call))
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
            # Only the call was cancelled (the master forgot this session, e.g. another
            # registration under this name won): return, and the session loop registers again.
        finally:
            hb.cancel()
            call.cancel()
            await asyncio.gather(hb, return_exceptions=True)

    async def _heartbeats(self, stub: pb_grpc.WorkerControlStub, call: Any) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await stub.Heartbeat(
                    pb.HeartbeatRequest(
                        name=self.name,
                        session=self.session,
                        running=self._running(),
                        sent_unix=time.time(),
                    ),
                    timeout=max(self.heartbeat_interval * 3, 2),
                )
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    log.info("worker %s: master forgot this session; registering again", self.name)
                    call.cancel()
                    return

    async def _handle(self, batch: pb.InstructionBatch, outbox: asyncio.Queue[Any]) -> None:
        t0 = time.perf_counter()
        ack = pb.Ack(batch_id=batch.batch_id, ok=True)
        try:
            rt = self.runtime
            rt.dataplane.peers.update(dict(batch.peers))
            for h, data in batch.bundles.items():
                rt.add_bundle(h, data)
            instructions = [from_wire(unpackb(b)) for b in batch.instructions]
            if batch.phase == pb.PREPARE:
                for h in batch.bundles:
                    # Import errors surface here, before anything switches. The import
                    # runs in a thread so the instances on this worker keep running.
                    await asyncio.to_thread(rt.load, h)
                await rt.prepare(batch.app, batch.version, instructions)
            elif batch.phase == pb.SWITCH:
                await rt.switch(batch.app, batch.version, instructions)
            elif batch.phase == pb.ABORT:
                await rt.abort(batch.app, batch.version)
            elif batch.phase == pb.STOP:
                await rt.stop(batch.app)
            elif batch.phase == pb.CHECKPOINT:
                rt.checkpoint(batch.app, batch.version)
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
