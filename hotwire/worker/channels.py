"""Output channels and routing: how an instance's output batches reach its downstreams.

Two channel implementations share one interface: :class:`LocalChannel` hands the
batch object to a same-worker instance without serialising it (carried through
that instance in the sender's task when it is idle, else into its inbox), and
:class:`RemoteChannel` sends a BATCH frame on the data plane's link to the peer
worker, numbered and kept until acknowledged. Both are credit-based: a sender
holds at most :data:`CREDITS` batches per channel that the receiver has not
processed, and the receiver returns a credit when it has processed a batch. A
receiver that holds a channel (the gating rule) returns no credit, so its sender
stops instead of growing memory.
"""

from __future__ import annotations

import asyncio
import copy
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from hotwire.plan import CANARY_BUCKETS, Route, canary_index, pack_key
from hotwire.worker.transport import CREDITS, Frame, Stamp

if TYPE_CHECKING:
    from hotwire.worker.instance import Instance
    from hotwire.worker.transport import DataPlane

__all__ = [
    "CREDITS",
    "LocalChannel",
    "OutChannel",
    "RemoteChannel",
    "RouteState",
    "Stamp",
    "emit_all",
]

# Inbox item kinds.
BATCH, END, STATE, CONTROL, EPOCH, BARRIER = 0, 1, 2, 3, 4, 5


# (app, sending instance) -> seconds it waited for credit (backpressure), added on the
# slow path only (no credit left); hotwire.metrics reads it and forgets stopped instances.
BLOCKED_S: dict[tuple[str, str], float] = {}


class OutChannel:
    """The sending end of one channel."""

    __slots__ = ("_waiter", "app", "channel", "credit", "ended")
    local = False  # whether records reach the receiver as objects (same worker)

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
        t0 = time.perf_counter()
        while self.credit <= 0:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        self.credit -= 1
        key = (self.app, self.channel.partition(">")[0])
        BLOCKED_S[key] = BLOCKED_S.get(key, 0.0) + time.perf_counter() - t0

    async def send(self, records: list[Any], t: float | None = None) -> None:
        """Send one batch; ``t``: its source time (:class:`Stamp`), None if unstamped."""
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
    local = True

    def __init__(self, app: str, channel: str, dst: Instance):
        super().__init__(app, channel)
        self.dst = dst

    async def send(self, records: list[Any], t: float | None = None) -> None:
        if self.credit <= 0:
            await self._take_credit()
        else:
            self.credit -= 1
        ret = self if t is None else Stamp(self, t)
        dst = self.dst
        if dst.can_take_inline():
            await dst.take_inline(self.channel, records, ret)
        else:
            dst.inbox.put_nowait((BATCH, self.channel, records, ret))

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
    """A channel to an instance on another worker, over the data plane's link to it.

    Its frames go on a sequenced stream (:class:`hotwire.worker.transport.OutStream`)
    that keeps them until the receiver acknowledges them and resends them after a
    lost connection; sending never fails while the link is down, it waits for
    credit like any other. The receiver's acknowledgements carry how many batches it
    has processed: the credit is :data:`CREDITS` minus the batches not processed.
    """

    __slots__ = ("stream",)

    def __init__(self, app: str, channel: str, dataplane: DataPlane, worker: str):
        super().__init__(app, channel)
        self.stream = dataplane.open_stream(worker, app, channel, owner=self)
        # A channel routed again after it ended goes on with the stream's accounting.
        self.credit = CREDITS - (self.stream.batches - self.stream.processed)

    def window(self, credit: int) -> None:
        """The receiver's acknowledgement: ``credit`` batches may be sent now."""
        self.credit = credit
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def connect(self) -> None:
        """Wait until the link is up (a prepare checks that the peer can be reached)."""
        await self.stream.link.wait_up()

    def release(self) -> None:
        """The sending instance is gone without ending the channel."""
        self.stream.release()

    async def send(self, records: list[Any], t: float | None = None) -> None:
        if self.credit <= 0:
            await self._take_credit()
        else:
            self.credit -= 1
        stream = self.stream
        stream.batch(records, t)
        await stream.link.drain()

    async def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.stream.push(Frame.END)
            self.stream.owner = None

    async def epoch(self, version: int) -> None:
        self.stream.push(Frame.EPOCH, version)

    async def barrier(self, checkpoint: int) -> None:
        if not self.ended:
            self.stream.push(Frame.BARRIER, checkpoint)


# Keys' hashes (zlib.crc32 of their msgpack form) for the key split: str keys of at
# most _MEMO_STR characters and int keys, up to about _MEMO_KEYS of them (all dropped
# when there are more; a split fills it again).
_KEY_HASH: dict[str | int, int] = {}
_MEMO_KEYS = 1 << 17
_MEMO_STR = 64


class RouteState:
    """One output stream of an instance: partitioning over its target channels."""

    __slots__ = (
        "canary",
        "channels",
        "dealt",
        "dst_pe",
        "key_fn",
        "local",
        "n",
        "next",
        "next_canary",
        "partition",
        "route",
    )

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
        self.canary = route.canary
        self.dealt = 0  # shuffle into a canary: batches dealt so far
        self.next_canary = 0
        # Whether records reach a same-worker instance as objects (not serialised).
        self.local = any(c.local for c in channels)

    async def emit(self, records: list[Any], t: float | None = None) -> None:
        """Send one batch of output records along this stream (``t``: its source
        time, which every part of it keeps; None if unstamped)."""
        p = self.partition
        if self.canary is not None and p in ("shuffle", "key"):
            await self._emit_canary(records, t)
        elif p == "shuffle":
            # Deal whole batches round-robin: one channel per batch.
            ch = self.channels[self.next]
            self.next = (self.next + 1) % self.n
            await ch.send(records, t)
        elif p == "key":
            n = self.n
            if n == 1:
                await self.channels[0].send(records, t)
                return
            key_fn = self.key_fn
            assert key_fn is not None
            parts: list[list[Any]] = [[] for _ in range(n)]
            # key_partition(), inlined on the record path, with the hashes of short str
            # and int keys kept (only those two exact types go in, so 1.0 or True never
            # finds 1's hash: they pack differently).
            pack, crc, memo = pack_key, zlib.crc32, _KEY_HASH
            get = memo.get
            for r in records:
                k = key_fn(r)
                kt = type(k)
                if kt is int or (kt is str and len(k) <= _MEMO_STR):
                    h = get(k)
                    if h is None:
                        h = memo[k] = crc(pack(k))
                else:
                    h = crc(pack(k))
                parts[h % n].append(r)
            if len(memo) > _MEMO_KEYS:
                memo.clear()
            for ch, part in zip(self.channels, parts, strict=True):
                if part:
                    await ch.send(part, t)
        elif p == "broadcast":
            await _fan_out([(c.local, c.send) for c in self.channels], records, t)
        else:  # forward
            await self.channels[0].send(records, t)

    async def _emit_canary(self, records: list[Any], t: float | None) -> None:
        """Send a batch into a PE in a canary (``Route.canary``)."""
        c = self.canary
        assert c is not None
        if self.partition == "shuffle":
            # Batch b goes to the canary when floor(b * share / buckets) steps up:
            # exactly share/buckets of the batches, evenly spread.
            b = self.dealt
            self.dealt += 1
            if (b + 1) * c.share // CANARY_BUCKETS > b * c.share // CANARY_BUCKETS:
                ch = self.channels[c.first + self.next_canary]
                self.next_canary = (self.next_canary + 1) % (self.n - c.first)
            else:
                ch = self.channels[self.next]
                self.next = (self.next + 1) % c.first
            await ch.send(records, t)
            return
        key_fn = self.key_fn
        assert key_fn is not None
        n = self.n
        parts: list[list[Any]] = [[] for _ in range(n)]
        for r in records:
            parts[canary_index(zlib.crc32(pack_key(key_fn(r))), n, c)].append(r)
        for ch, part in zip(self.channels, parts, strict=True):
            if part:
                await ch.send(part, t)


async def emit_all(
    routes: dict[str, RouteState], records: list[Any], t: float | None = None
) -> None:
    """Send one output batch along every output stream of an instance (``t``: the
    source time of the input batch it came from, see :class:`Stamp`).

    Records reach same-worker PEs as objects; when several streams (branches)
    would receive the same objects, every local one but one gets a deep copy
    (:func:`_fan_out`), so a PE that mutates its input cannot change what a sibling
    branch sees, just as when the branches run on other workers.
    """
    if len(routes) == 1:
        for route in routes.values():
            await route.emit(records, t)
        return
    await _fan_out([(r.local, r.emit) for r in routes.values()], records, t)


Send = Callable[[list[Any], float | None], Awaitable[None]]


async def _fan_out(targets: list[tuple[bool, Send]], records: list[Any], t: float | None) -> None:
    """Send the same ``records`` to each of ``targets`` (whether it is on this
    worker, and its channel's ``send`` or its route's ``emit``).

    Remote receivers get them serialised as they are sent. Same-worker receivers get
    the objects, and may process them at once, in this task
    (:meth:`Instance.take_inline`): so each of them but the last gets a deep copy
    made before anything is sent, and the last gets the originals after the remote
    sends. A receiver that mutates its input changes nothing another one sees.
    """
    mine = [send for local, send in targets if local]
    parts = [*(fan_out_copy(records) for _ in mine[1:]), records] if mine else []
    for local, send in targets:
        if not local:
            await send(records, t)
    for send, part in zip(mine, parts, strict=True):
        await send(part, t)


def fan_out_copy(records: list[Any]) -> list[Any]:
    return copy.deepcopy(records)
