"""One lifecycle for the master and the worker.

A :class:`Node` has a status, one :meth:`Node.start` that runs the subclass's
``_start`` under a timeout and closes cleanly when it fails, ``async with``
support, and a graceful :meth:`Node.close` that first sets the standard gRPC
health service to NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 * 1024 * 1024
"""The largest gRPC message any hotwire channel or server sends or receives.

App bundles travel inside gRPC messages (client -> master -> workers), so every
hop must accept the same size: see :func:`grpc_options`.
"""


def grpc_options(*extra: tuple[str, Any]) -> list[tuple[str, Any]]:
    """Options for every gRPC channel and server of hotwire: the :data:`MAX_MESSAGE` limits."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        *extra,
    ]


class Status(enum.Enum):
    init = "init"
    starting = "starting"
    running = "running"
    closing = "closing"
    closed = "closed"
    failed = "failed"


def split_addr(addr: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``; raises ValueError with the bad text."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {addr!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class Node:
    """Base of long-running servers: start, close, health."""

    service_name = ""

    def __init__(self) -> None:
        self.status = Status.init
        self.health = health.aio.HealthServicer()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def _start(self) -> None:
        raise NotImplementedError

    async def _close(self) -> None:
        raise NotImplementedError

    async def start(self, timeout: float = 30) -> Node:
        if self.status is Status.running:
            return self
        self.status = Status.starting
        try:
            await asyncio.wait_for(self._start(), timeout)
        except BaseException:
            self.status = Status.failed
            await self._close_quietly()
            raise
        self.status = Status.running
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        if self.service_name:
            await self.health.set(self.service_name, health_pb2.HealthCheckResponse.SERVING)
        return self

    async def close(self) -> None:
        if self.status in (Status.closing, Status.closed):
            return
        self.status = Status.closing
        await self.health.enter_graceful_shutdown()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._close_quietly()
        self.status = Status.closed

    async def _close_quietly(self) -> None:
        try:
            await self._close()
        except Exception:
            log.exception("error while closing %s", type(self).__name__)

    def spawn(self, coro: Any, name: str | None = None) -> asyncio.Task[Any]:
        """Run a background task owned by this node; it is cancelled on close."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)
        return task

    async def __aenter__(self) -> Any:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("task %s failed", task.get_name(), exc_info=task.exception())


def add_health(server: grpc.aio.Server, servicer: health.aio.HealthServicer) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)


def install_uvloop() -> None:
    """Use uvloop where the platform has it."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platform without uvloop
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


GC_THRESHOLDS = (100_000, 50, 100)
"""Allocations between young collections, and collections between older ones, in a
master or worker process (Python's default is 700, 10, 10)."""


def tune_gc() -> None:
    """Run Python's cyclic garbage collector less often in a master or worker.

    A snapshot, a state handover or a checkpoint's decoding allocates tens of
    thousands of small containers at once (the ``[key, state]`` pairs of keyed
    state); with the default thresholds each one sets off collections that walk
    the heap while the event loop and its records wait. bench/upgrade.py
    ``migrate_state`` (50,000 keys) measured the gap of an upgrade at p50 51, 92
    and 124 ms in three runs with the default thresholds and 20, 24 and 26 ms
    with these. What start-up allocated (imports, the gRPC stack) is frozen out
    of the collector's way. Reference cycles are still collected, less often.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
