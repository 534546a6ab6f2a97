"""Output channels and routing: how an instance's output batches reach its downstreams.

Two channel implementations share one interface: :class:`LocalChannel` hands the
batch object to a same-worker instance's inbox without serialising it, and
:class:`RemoteChannel` writes a BATCH frame on the link to the peer worker. Both
are credit-based: a sender holds at most :data:`CREDITS` unacknowledged batches
per channel, and the receiver returns a credit when it has processed a batch. A
receiver that holds a channel (the gating rule) returns no credit, so its sender
stops instead of growing memory.
"""

from __future__ import annotations

import asyncio
import copy
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hotwire.plan import Route, pack_key
from hotwire.worker.transport import CREDITS, Frame, Link, encode

if TYPE_CHECKING:
    from hotwire.worker.instance import Instance

__all__ = ["CREDITS", "LocalChannel", "OutChannel", "RemoteChannel", "RouteState", "emit_all"]

# Inbox item kinds.
BATCH, END, STATE, CONTROL, EPOCH, BARRIER = 0, 1, 2, 3, 4, 5


class OutChannel:
    """The sending end of one channel."""

    __slots__ = ("_waiter", "app", "channel", "credit", "ended")

    def __init__(self, app: str, channel: str):
        self.app = app
        self.channel = channel
        self.credit = CREDITS
        self.ended = False
        self._waiter: asyncio.Future[None] | None = None

    def grant(self, app: str, channel: str, n: int) -> None:
        """Return ``n`` credits (called by the receiver's side); never above :data:`CREDITS`."""
        self.credit = min(self.credit + n, CREDITS)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _take_credit(self) -> None:
        while self.credit <= 0:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        self.credit -= 1

    async def send(self, records: list[Any]) -> None:
        raise NotImplementedError

    async def end(self) -> None:
        raise NotImplementedError

    async def epoch(self, version: int) -> None:
        """Send the epoch marker of ``version`` (in order with the batches)."""
        raise NotImplementedError

    async def barrier(self, checkpoint: int) -> None:
        """Send a checkpoint barrier (in order with the batches)."""
        raise NotImplementedError


class LocalChannel(OutChannel):
    __slots__ = ("dst",)

    def __init__(self, app: str, channel: str, dst: Instance):
        super().__init__(app, channel)
        self.dst = dst

    async def send(self, records: list[Any]) -> None:
        if self.credit <= 0:
            await self._take_credit()
        else:
            self.credit -= 1
        self.dst.inbox.put_nowait((BATCH, self.channel, records, self))

    async def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.dst.inbox.put_nowait((END, self.channel, None, None))

    async def epoch(self, version: int) -> None:
        self.dst.inbox.put_nowait((EPOCH, self.channel, version, None))

    async def barrier(self, checkpoint: int) -> None:
        if not self.ended:
            self.dst.inbox.put_nowait((BARRIER, self.channel, checkpoint, None))


class RemoteChannel(OutChannel):
    __slots__ = ("link", "link_factory")

    def __init__(self, app: str, channel: str, link_factory: Callable[[], Any]):
        super().__init__(app, channel)
        self.link: Link | None = None
        self.link_factory = link_factory

    async def _link(self) -> Link:
        link = self.link
        if link is None or link.closed:
            link = self.link = await self.link_factory()
        return link

    async def connect(self) -> None:
        await self._link()

    async def send(self, records: list[Any]) -> None:
        if self.credit <= 0:
            await self._take_credit()
        else:
            self.credit -= 1
        link = await self._link()
        link.write(encode(Frame.BATCH, self.app, self.channel, records))
        await link.drain_if_needed()

    async def end(self) -> None:
        if not self.ended:
            self.ended = True
            link = await self._link()
            link.write(encode(Frame.END, self.app, self.channel))

    async def epoch(self, version: int) -> None:
        link = await self._link()
        link.write(encode(Frame.EPOCH, self.app, self.channel, version))

    async def barrier(self, checkpoint: int) -> None:
        if not self.ended:
            link = await self._link()
            link.write(encode(Frame.BARRIER, self.app, self.channel, checkpoint))


class RouteState:
    """One output stream of an instance: partitioning over its target channels."""

    __slots__ = ("channels", "dst_pe", "key_fn", "local", "n", "next", "partition", "route")

    def __init__(
        self, route: Route, channels: list[OutChannel], key_fn: Callable[[Any], Any] | None
    ):
        self.route = route
        self.dst_pe = route.dst_pe
        self.partition = route.partition
        self.channels = channels
        self.n = len(channels)
        self.key_fn = key_fn
        self.next = 0
        # Whether records reach a same-worker instance as objects (not serialised).
        self.local = any(isinstance(c, LocalChannel) for c in channels)

    async def emit(self, records: list[Any]) -> None:
        """Send one batch of output records along this stream."""
        p = self.partition
        if p == "shuffle":
            # Deal whole batches round-robin: one channel per batch.
            ch = self.channels[self.next]
            self.next = (self.next + 1) % self.n
            await ch.send(records)
        elif p == "key":
            n = self.n
            if n == 1:
                await self.channels[0].send(records)
                return
            key_fn = self.key_fn
            assert key_fn is not None
            parts: list[list[Any]] = [[] for _ in range(n)]
            pack, crc = pack_key, zlib.crc32  # key_partition(), inlined on the record path
            for r in records:
                parts[crc(pack(key_fn(r))) % n].append(r)
            for ch, part in zip(self.channels, parts, strict=True):
                if part:
                    await ch.send(part)
        elif p == "broadcast":
            # Same-worker receivers get objects: each after the first gets its own copy.
            shared = False
            for ch in self.channels:
                if isinstance(ch, LocalChannel):
                    await ch.send(fan_out_copy(records) if shared else records)
                    shared = True
                else:
                    await ch.send(records)
        else:  # forward
            await self.channels[0].send(records)


async def emit_all(routes: dict[str, RouteState], records: list[Any]) -> None:
    """Send one output batch along every output stream of an instance.

    Records reach same-worker PEs as objects; when several streams (branches)
    would receive the same objects, every local one after the first gets a deep
    copy, so a PE that mutates its input cannot change what a sibling branch sees,
    just as when the branches run on other workers.
    """
    if len(routes) == 1:
        for route in routes.values():
            await route.emit(records)
        return
    shared = False
    for route in list(routes.values()):
        if route.local:
            await route.emit(fan_out_copy(records) if shared else records)
            shared = True
        else:
            await route.emit(records)


def fan_out_copy(records: list[Any]) -> list[Any]:
    return copy.deepcopy(records)
