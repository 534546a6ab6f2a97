"""The worker daemon: registers with the master, heartbeats, and performs instruction batches.

The data plane runs on its own: if the master goes away the instances keep
moving records, and the daemon re-registers (reporting what it runs) when the
master is back.

Heartbeats do not depend on the event loop: user code runs on the loop and a
long synchronous call blocks it, so a dedicated thread sends them over its own
synchronous channel, reporting the last snapshot of the running instances the
loop made.
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
import msgpack

from hotwire.codec import unpackb
from hotwire.node import Node, add_health, grpc_options, split_addr
from hotwire.plan import from_wire
from hotwire.proto import hotwire_pb2 as pb
from hotwire.proto import hotwire_pb2_grpc as pb_grpc
from hotwire.worker.runtime import SWITCH_TIMEOUT_S, Runtime

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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._call: Any = None  # the Control call of the current session
        # Shared with the heartbeat thread; each is replaced whole, never mutated.
        self._hb_session = ""  # the session heartbeats report; "" outside a session
        self._running_snapshot: tuple[pb.RunningInstance, ...] = ()
        self._hb_stop = threading.Event()
        self._hb_channel: grpc.Channel | None = None
        self._hb_thread: threading.Thread | None = None

    @property
    def data_address(self) -> str:
        return self.runtime.dataplane.address

    async def _start(self) -> None:
        host, port = split_addr(self.listen)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        await self.runtime.dataplane.start(host, port)
        self._grpc = grpc.aio.server(options=grpc_options(("grpc.so_reuseport", 0)))
        add_health(self._grpc, self.health)
        hport = self._grpc.add_insecure_port(f"{host}:0")
        await self._grpc.start()
        self.health_address = f"{host}:{hport}"
        self._loop = asyncio.get_running_loop()
        self._hb_channel = grpc.insecure_channel(self.master, options=grpc_options())
        self._hb_thread = threading.Thread(
            target=self._heartbeat_thread, name=f"hotwire-heartbeat-{self.name}", daemon=True
        )
        self._hb_thread.start()
        self.spawn(self._session_loop(), name=f"worker-{self.name}-session")
        await self.registered.wait()

    async def _close(self) -> None:
        self._hb_stop.set()
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
        async with grpc.aio.insecure_channel(self.master, options=grpc_options()) as channel:
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
            async with grpc.aio.insecure_channel(self.master, options=grpc_options()) as channel:
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
            # Only the call was cancelled (the master forgot this session, e.g. another
            # registration under this name won): return, and the session loop registers again.
        finally:
            if self._call is call:
                self._call = None
                self._hb_session = ""
            call.cancel()

    # ------------------------------------------------------------------
    # Heartbeats: a thread of their own
    # ------------------------------------------------------------------
    def _refresh_running(self, done: threading.Event | None = None) -> None:
        """On the loop: snapshot what runs here for the heartbeat thread."""
        self._running_snapshot = tuple(self._running())
        if done is not None:
            done.set()

    def _session_lost(self, session: str) -> None:
        """On the loop: the master does not know ``session``; end it to register again."""
        if session != self.session or self._call is None:
            return  # an answer about an older session
        log.info("worker %s: master forgot this session; registering again", self.name)
        self._hb_session = ""
        self._call.cancel()

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
        """Send a heartbeat every interval while a session is open, whatever the loop does.

        The running counters come from a snapshot the loop refreshes when asked; a
        loop blocked by user code leaves the last one, which still goes out.
        """
        assert self._hb_channel is not None
        stub = pb_grpc.WorkerControlStub(self._hb_channel)
        while not self._hb_stop.wait(self.heartbeat_interval):
            session = self._hb_session
            if not session:
                continue
            fresh = threading.Event()
            if self._to_loop(self._refresh_running, fresh):
                fresh.wait(min(0.1, self.heartbeat_interval / 4))
            try:
                stub.Heartbeat(
                    pb.HeartbeatRequest(
                        name=self.name,
                        session=session,
                        running=self._running_snapshot,
                        sent_unix=time.time(),
                    ),
                    timeout=max(self.heartbeat_interval * 3, 2),
                )
            except Exception as e:  # an RPC error, or the channel closed by _close
                if self._hb_stop.is_set():
                    return
                code = e.code() if isinstance(e, grpc.Call) else None
                if code == grpc.StatusCode.NOT_FOUND:
                    self._to_loop(self._session_lost, session)
                elif code is not None:
                    log.debug("worker %s: heartbeat failed: %s", self.name, code.name)
                else:
                    log.exception("worker %s: heartbeat failed", self.name)

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
                await rt.switch(
                    batch.app, batch.version, instructions, batch.timeout_s or SWITCH_TIMEOUT_S
                )
            elif batch.phase == pb.ABORT:
                await rt.abort(batch.app, batch.version)
            elif batch.phase == pb.STOP:
                await rt.stop(batch.app)
            elif batch.phase == pb.CHECKPOINT:
                rt.checkpoint(batch.app, batch.version)
            elif batch.phase == pb.COMMITTED:
                rt.checkpoint_done(batch.app, batch.version)
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
