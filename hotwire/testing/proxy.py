"""A TCP proxy a test controls: put it in front of a worker's data port and cut its links.

A worker started with ``--advertise PROXY`` gives the proxy's address to the other
workers, so every data-plane connection they dial to it passes through the proxy.
:meth:`TcpProxy.cut` resets every connection that passes through it (both ends
get a TCP reset, and bytes the proxy has read but not yet forwarded are lost, as
in a real network failure); :meth:`TcpProxy.block` also resets every new
connection until :meth:`TcpProxy.unblock`, so the worker behind it is
unreachable for the other workers while its heartbeats to the master go on.
``delay`` holds every chunk that long before forwarding it (a long link), so a
cut loses what was in flight. :meth:`TcpProxy.cut_on` arms a cut for the moment
given bytes pass (say, a frame of a kind the test wants lost): the chunk that
carries them is dropped and every connection is reset.

The proxy runs an event loop on a thread of its own; every method is called
from the test's thread.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from typing import Any

__all__ = ["TcpProxy"]


class _Pair:
    """One proxied connection: the dialler's side and the target's side."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter):
        self.writers = (client, upstream)
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        for t in self.tasks:
            t.cancel()
        for w in self.writers:
            _reset(w)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), not an orderly FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class TcpProxy:
    """Forwards TCP connections from ``address`` to ``target`` ("host:port").

    ``target`` may be set after :meth:`start` (a worker's port is known only once
    it runs); until then connections are reset.
    """

    def __init__(self, target: str | None = None, listen: str = "127.0.0.1:0", delay: float = 0):
        self.target = target
        self.delay = delay
        self._listen = listen
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="proxy")
        self._server: asyncio.Server | None = None
        self._pairs: set[_Pair] = set()
        self._blocked = False
        self.address = ""
        self.accepted = 0  # connections accepted and forwarded
        self.refused = 0  # connections reset at once (blocked, or no target)
        self.cuts = 0  # connections reset by cut(), block() or a cut_on() pattern
        self.pattern_cuts = 0  # times an armed cut_on() pattern went by and was cut
        self._pattern = b""

    # -- control (from the test's thread) ----------------------------------
    def start(self) -> TcpProxy:
        self._thread.start()
        host, _, port = self._listen.rpartition(":")
        self._server = self._call(asyncio.start_server(self._handle, host, int(port)))
        self.address = f"{host}:{self._server.sockets[0].getsockname()[1]}"
        return self

    @property
    def connections(self) -> int:
        """Connections open through the proxy now."""
        return self._call(self._count())

    def cut(self) -> int:
        """Reset every open connection; return how many there were."""
        return self._call(self._cut())

    def block(self) -> int:
        """Reset every open connection and every new one until :meth:`unblock`."""
        self._blocked = True
        return self.cut()

    def unblock(self) -> None:
        self._blocked = False

    def cut_on(self, pattern: bytes) -> None:
        """Cut everything (once) when ``pattern`` passes in either direction; the
        chunk carrying it is not forwarded. :attr:`pattern_cuts` counts the cuts."""
        self._pattern = pattern

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._blocked = True
        self.cut()
        if self._server is not None:  # on its own loop: Server.close() is not thread-safe
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # -- on the proxy's loop -----------------------------------------------
    async def _count(self) -> int:
        return len(self._pairs)

    async def _cut(self) -> int:
        return self._cut_all()

    def _cut_all(self) -> int:
        pairs = list(self._pairs)
        self._pairs.clear()
        for p in pairs:
            p.abort()
        self.cuts += len(pairs)
        return len(pairs)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target = self.target
        if self._blocked or not target:
            self.refused += 1
            _reset(writer)
            return
        host, _, port = target.rpartition(":")
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            self.refused += 1
            _reset(writer)
            return
        if self._blocked:  # blocked while dialling
            self.refused += 1
            _reset(writer)
            _reset(up_writer)
            return
        self.accepted += 1
        pair = _Pair(writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(
                self._pipe(pair, reader, up_writer), self._pipe(pair, up_reader, writer)
            )
        finally:
            self._pairs.discard(pair)

    async def _pipe(
        self, pair: _Pair, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        late: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward_late() -> None:
            while True:
                due, data = await late.get()
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                if not data:
                    return
                writer.write(data)
                await writer.drain()

        forwarder = loop.create_task(forward_late()) if self.delay > 0 else None
        if forwarder is not None:
            pair.tasks.append(forwarder)
        tail = b""  # the end of the last chunk: a pattern may straddle two
        try:
            while True:
                data = await reader.read(65536)
                pattern = self._pattern
                if pattern and pattern in tail + data:
                    self._pattern = b""
                    self.pattern_cuts += 1
                    self._cut_all()
                    break
                if pattern:
                    tail = data[-len(pattern) + 1 :] if len(pattern) > 1 else b""
                if forwarder is not None:
                    late.put_nowait((loop.time() + self.delay, data))
                    if not data:
                        await forwarder  # what is in flight still arrives
                elif data:
                    writer.write(data)
                    await writer.drain()
                if not data:
                    break
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        # One side ended or failed: end the whole connection, as a broken link would.
        if pair in self._pairs:
            self._pairs.discard(pair)
            for w in pair.writers:
                w.close()
