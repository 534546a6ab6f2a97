"""The data plane between workers: one TCP connection per worker pair.

Frames are a 4-byte big-endian length followed by a msgpack array whose first
item is a :class:`Frame` kind. A BATCH frame carries a batch of records for one
logical channel of one app; many channels share a connection. The first frame on
a connection must be HELLO with the dialling worker's name. A frame that cannot
be decoded is logged, counted and dropped; a length that cannot be trusted (over
:data:`MAX_FRAME`) closes that connection only. Nothing a peer sends can crash
the worker.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import struct
from collections import Counter
from typing import Any, Protocol

import msgpack

from hotwire.codec import unpackb

log = logging.getLogger(__name__)

MAX_FRAME = 64 * 1024 * 1024
CREDITS = 16  # unacknowledged batches a sender may have per channel
HELLO_TIMEOUT = 10.0
_LEN = struct.Struct(">I")


class Frame(enum.IntEnum):
    HELLO = 0  # [HELLO, worker_name]
    BATCH = 1  # [BATCH, app, channel, records]
    END = 2  # [END, app, channel]
    CREDIT = 3  # [CREDIT, app, channel, n]
    STATE = 4  # [STATE, app, dst_instance, src_instance, state, unprocessed records]
    EPOCH = 5  # [EPOCH, app, channel, version]: the upgrade cut on a kept channel
    BARRIER = 6  # [BARRIER, app, channel, checkpoint_id]: a checkpoint's cut


class Receiver(Protocol):
    """What the data plane hands decoded frames to (the worker runtime)."""

    def on_batch(self, app: str, channel: str, records: list[Any], link: Link) -> bool: ...
    def on_end(self, app: str, channel: str) -> bool: ...
    def on_credit(self, app: str, channel: str, n: int) -> bool: ...
    def on_state(
        self, app: str, dst: str, src: str, state: Any, pending: list[Any] | None = None
    ) -> bool: ...
    def on_epoch(self, app: str, channel: str, version: int) -> bool: ...
    def on_barrier(self, app: str, channel: str, checkpoint: int) -> bool: ...


_pack = msgpack.Packer(use_bin_type=True).pack


def encode(*items: Any) -> bytes:
    body = _pack(list(items))
    return _LEN.pack(len(body)) + body


class Link:
    """One TCP connection to a peer worker, used in both directions."""

    __slots__ = ("_closed", "peer", "reader", "unacked", "writer")

    def __init__(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.peer = peer
        self.reader = reader
        self.writer = writer
        self._closed = False
        # Batches received on this link and not yet credited back, per (app, channel):
        # a peer that ignores credits cannot grow a receiver's inbox past CREDITS.
        self.unacked: dict[tuple[str, str], int] = {}

    @property
    def closed(self) -> bool:
        return self._closed or self.writer.is_closing()

    def write(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionError(f"link to worker {self.peer!r} is closed")
        self.writer.write(data)

    async def drain_if_needed(self, high: int = 4 * 1024 * 1024) -> None:
        if self.writer.transport.get_write_buffer_size() > high:
            await self.writer.drain()

    def send_credit(self, app: str, channel: str, n: int) -> None:
        key = (app, channel)
        left = self.unacked.get(key, 0) - n
        if left > 0:
            self.unacked[key] = left
        else:
            self.unacked.pop(key, None)
        if not self.closed:
            self.writer.write(encode(Frame.CREDIT, app, channel, n))

    grant = send_credit  # a receiver returns credit the same way for local and remote senders

    def close(self) -> None:
        self._closed = True
        self.writer.close()


class DataPlane:
    """Accepts and dials worker-to-worker connections and decodes their frames."""

    def __init__(self, name: str, receiver: Receiver):
        self.name = name
        self.receiver = receiver
        self.peers: dict[str, str] = {}  # worker name -> "host:port"
        self.links: dict[str, Link] = {}
        self.drops: Counter[str] = Counter()
        self._dial_locks: dict[str, asyncio.Lock] = {}
        self._server: asyncio.Server | None = None
        self._conn_tasks: set[asyncio.Task[Any]] = set()
        self._all_links: set[Link] = set()
        self.address = ""

    async def start(self, host: str, port: int) -> str:
        self._server = await asyncio.start_server(self._accept, host, port)
        sock = self._server.sockets[0].getsockname()
        self.address = f"{host}:{sock[1]}"
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._all_links):
            link.close()
        # Closed sockets end the read loops; cancel only what does not end by itself.
        if self._conn_tasks:
            _, pending = await asyncio.wait(set(self._conn_tasks), timeout=2)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # -- connections -----------------------------------------------------
    async def link(self, peer: str) -> Link:
        """The connection to ``peer``, dialled if there is none yet."""
        link = self.links.get(peer)
        if link is not None and not link.closed:
            return link
        lock = self._dial_locks.setdefault(peer, asyncio.Lock())
        async with lock:
            link = self.links.get(peer)
            if link is not None and not link.closed:
                return link
            addr = self.peers.get(peer)
            if addr is None:
                raise ConnectionError(f"no data address known for worker {peer!r}")
            host, _, port = addr.rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            _nodelay(writer)
            writer.write(encode(Frame.HELLO, self.name))
            link = Link(peer, reader, writer)
            self.links[peer] = link
            self._track(self._read_loop(link))
            return link

    def _track(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._conn_tasks.add(task)
        task.add_done_callback(self._conn_tasks.discard)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _nodelay(writer)
        task = asyncio.current_task()
        if task is not None:
            self._conn_tasks.add(task)
            task.add_done_callback(self._conn_tasks.discard)
        peer_addr = writer.get_extra_info("peername")
        try:
            body = await asyncio.wait_for(_read_frame(reader), HELLO_TIMEOUT)
            msg = unpackb(body) if body is not None else None
            if not (
                isinstance(msg, list)
                and len(msg) == 2
                and msg[0] == Frame.HELLO
                and isinstance(msg[1], str)
            ):
                raise ValueError("first frame is not HELLO")
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        except Exception as e:
            self.drops["bad_hello"] += 1
            log.warning("data plane: dropped connection from %s: %s", peer_addr, e)
            writer.close()
            return
        link = Link(msg[1], reader, writer)
        if msg[1] not in self.links or self.links[msg[1]].closed:
            self.links[msg[1]] = link
        await self._read_loop(link)

    # -- reading ---------------------------------------------------------
    async def _read_loop(self, link: Link) -> None:
        unpack = msgpack.unpackb
        self._all_links.add(link)
        try:
            while True:
                body = await _read_frame(link.reader)
                if body is None:
                    self.drops["oversized_frame"] += 1
                    log.warning("data plane: oversized frame from %s; closing", link.peer)
                    break
                try:
                    msg = unpack(body, raw=False, strict_map_key=False)
                    self._dispatch(msg, link)
                except Exception as e:
                    self.drops["bad_frame"] += 1
                    log.warning("data plane: dropped a bad frame from %s: %s", link.peer, e)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            link.close()
            self._all_links.discard(link)
            if self.links.get(link.peer) is link:
                del self.links[link.peer]

    def _dispatch(self, msg: Any, link: Link) -> None:
        kind = msg[0]
        ok: bool
        if kind == Frame.BATCH:
            key = (msg[1], msg[2])
            n = link.unacked.get(key, 0)
            if n >= CREDITS:
                self.drops["over_credit"] += 1
                if self.drops["over_credit"] % 1000 == 1:
                    log.warning(
                        "data plane: dropped a batch from %s on channel %s: the sender "
                        "ignores its credits (%d such drops)",
                        link.peer,
                        msg[2],
                        self.drops["over_credit"],
                    )
                return
            ok = self.receiver.on_batch(msg[1], msg[2], msg[3], link)
            if ok:
                link.unacked[key] = n + 1
        elif kind == Frame.CREDIT:
            ok = self.receiver.on_credit(msg[1], msg[2], int(msg[3]))
        elif kind == Frame.END:
            ok = self.receiver.on_end(msg[1], msg[2])
        elif kind == Frame.STATE:
            ok = self.receiver.on_state(msg[1], msg[2], msg[3], msg[4], msg[5])
        elif kind == Frame.EPOCH:
            ok = self.receiver.on_epoch(msg[1], msg[2], int(msg[3]))
        elif kind == Frame.BARRIER:
            ok = self.receiver.on_barrier(msg[1], msg[2], int(msg[3]))
        else:
            raise ValueError(f"unknown frame kind {kind!r}")
        if not ok:
            self.drops["unknown_channel"] += 1


async def _read_frame(reader: asyncio.StreamReader) -> bytes | None:
    head = await reader.readexactly(4)
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        return None
    return await reader.readexactly(n)


def _nodelay(writer: asyncio.StreamWriter) -> None:
    import socket

    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
