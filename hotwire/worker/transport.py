"""The data plane between workers: one link per worker pair, kept up over TCP connections.

Frames are a 4-byte big-endian length followed by a msgpack array whose first
item is a :class:`Frame` kind::

    HELLO    [HELLO, worker, incarnation]            first frame each way on a connection
    BATCH    [BATCH, app, channel, seq, records]          or with the source time:
             [BATCH, app, channel, seq, records, t]       t: float, see Stamp
    END      [END, app, channel, seq]                 end marker: the channel is done
    EPOCH    [EPOCH, app, channel, seq, version]      the upgrade cut on a kept channel
    BARRIER  [BARRIER, app, channel, seq, checkpoint] a checkpoint's cut
    STATE    [STATE, app, ">" + dst, seq, src, state, unprocessed records]  a handover
    ACK      [ACK, app, stream, received, processed, app, stream, received, processed, ...]

**Streams.** Every frame but HELLO and ACK belongs to a stream of one app: a
channel (named ``"src>dst"``), or the state handovers to one instance (named
``">" + dst``). Each stream numbers its frames 1, 2, 3, ... (``seq``). The
sender keeps every frame until the receiver acknowledges it; the receiver takes a
frame only if its ``seq`` is the next one, drops a duplicate (a resent frame it
has), and so delivers each frame once and in order per stream.

**Acknowledgements and credits.** An ACK item says, for one stream, the highest
``seq`` received and how many of its batches the receiving instance has
processed. Both are cumulative, so an ACK that is lost costs nothing: the next one
says it all again. The receiver sends one ACK frame per link per turn of the
event loop for the streams that changed: when an instance processed batches
(their credit) and when a marker or handover arrived. A sender may have
:data:`CREDITS` batches per channel that the receiver has not processed; its
credit is ``CREDITS - (batches sent - batches processed)``, so it is bounded and
what it keeps for a resend is too. Batches are acknowledged with their credit, so
a held channel (the gating rule) keeps its at most :data:`CREDITS` batches at the
sender too.

**Connections.** Either worker dials when it has streams with the other and no
connection. After the HELLOs each side resends on the new connection every frame
not yet acknowledged and sends a full ACK (every stream it receives), which
resynchronises credits lost with the old connection. If both dialled at once, both
keep the connection dialled by the worker whose name sorts first and close the
other. A lost connection is dialled again with backoff (:data:`REDIAL_MIN_S`
doubling to :data:`REDIAL_MAX_S`); a link that stays down for
``link_timeout`` seconds while streams need it is reported (:meth:`DataPlane.lost_links`:
the worker's heartbeat tells the master, which restarts the apps concerned from
their last checkpoint).

**Bad input.** A frame that cannot be decoded is logged, counted and dropped; a
length that cannot be trusted (over :data:`MAX_FRAME`) closes that connection
only; a frame out of sequence or past the sender's credits is counted and dropped.
Nothing a peer sends can crash the worker.

**Who may connect.** With TLS (a worker started with a certificate), a connection
is accepted as plain TCP and then upgraded to TLS, which asks the peer for a
worker certificate of the cluster CA; a failed handshake is counted
(``tls_refused``) and closed. The HELLO must name the worker in the peer's
certificate, and a dialled peer must show the certificate of the worker it was
dialled as; otherwise the connection is counted (``bad_identity``) and closed
before any frame of it is read.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import socket
import ssl
import struct
from collections import Counter, deque
from typing import Any, NamedTuple, Protocol

import msgpack

from hotwire.codec import unpackb
from hotwire.security.tls import TlsFiles, ssl_peer

log = logging.getLogger(__name__)

MAX_FRAME = 64 * 1024 * 1024
CREDITS = 4  # batches (of up to SOURCE_BATCH records) per channel a sender may have unprocessed
HELLO_TIMEOUT = 10.0
DIAL_TIMEOUT_S = 5.0  # to connect and exchange HELLOs
CONNECT_TIMEOUT_S = 5.0  # a prepare waits this long for a link to a new instance's peer
REDIAL_MIN_S = 0.05
REDIAL_MAX_S = 1.0
LINK_TIMEOUT_S = 15.0  # down this long while needed: reported to the master (--link-timeout)
# The kernel gives up on a connection whose data nobody acks after the link timeout
# (within these bounds): a peer cut off while data flows is noticed then, and the
# link is reported after as long again. Acks come from the peer's kernel, so a busy
# or stopped peer process does not trip it.
TCP_USER_TIMEOUT_BOUNDS_MS = (2_000, 30_000)
STATE_PREFIX = ">"  # stream name of the handovers to an instance: ">" + instance id
_LEN = struct.Struct(">I")


class Frame(enum.IntEnum):
    HELLO = 0  # [HELLO, worker_name, incarnation]
    BATCH = 1  # [BATCH, app, channel, seq, records] or [..., records, source time]
    END = 2  # [END, app, channel, seq]
    ACK = 3  # [ACK, (app, stream, received seq, processed batches) * n]
    STATE = 4  # [STATE, app, ">" + dst_instance, seq, src_instance, state, unprocessed records]
    EPOCH = 5  # [EPOCH, app, channel, seq, version]: the upgrade cut on a kept channel
    BARRIER = 6  # [BARRIER, app, channel, seq, checkpoint_id]: a checkpoint's cut


class Stamp:
    """The source time of a batch (``time.time()`` when a source emitted the batch it
    comes from), travelling with the batch's credit return (``ret``) through the inbox
    and whatever the instance's state machine holds. Only stamped batches carry one
    (a worker with ``--metrics`` stamps its sources' batches): the records and the
    batch list are the user's, untouched, and an unstamped batch carries nothing."""

    __slots__ = ("ret", "t")

    def __init__(self, ret: Any, t: float):
        self.ret = ret
        self.t = t

    def grant(self, app: str, channel: str, n: int) -> None:
        self.ret.grant(app, channel, n)


class Receiver(Protocol):
    """What the data plane hands decoded frames to (the worker runtime).

    ``ret`` of :meth:`on_batch` is the batch's stream (in a :class:`Stamp` when the
    frame carried a source time): the receiving instance calls
    ``ret.grant(app, channel, 1)`` when it has processed the batch (its credit)."""

    def on_batch(
        self, app: str, channel: str, records: list[Any], ret: InStream | Stamp
    ) -> bool: ...
    def on_end(self, app: str, channel: str) -> bool: ...
    def on_state(
        self, app: str, dst: str, src: str, state: Any, pending: list[Any] | None = None
    ) -> bool: ...
    def on_epoch(self, app: str, channel: str, version: int) -> bool: ...
    def on_barrier(self, app: str, channel: str, checkpoint: int) -> bool: ...


class LostLink(NamedTuple):
    """A link down longer than the data plane's ``link_timeout`` while streams need it."""

    peer: str
    apps: list[str]
    down_s: float
    error: str


_pack = msgpack.Packer(use_bin_type=True).pack


def encode(*items: Any) -> bytes:
    body = _pack(list(items))
    return _LEN.pack(len(body)) + body


class Conn:
    """One TCP connection to a peer worker (after the HELLOs)."""

    __slots__ = ("_closed", "dialer", "incarnation", "peer", "reader", "writer")

    def __init__(
        self,
        peer: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        dialer: str,
        incarnation: str,
    ):
        self.peer = peer
        self.reader = reader
        self.writer = writer
        self.dialer = dialer  # the worker that dialled it
        self.incarnation = incarnation  # of the peer's process
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed or self.writer.is_closing()

    def write(self, data: bytes) -> None:
        # A frame written to a dead connection is not lost: its stream resends it.
        if not self.closed:
            self.writer.write(data)

    def close(self) -> None:
        self._closed = True
        self.writer.close()


class OutStream:
    """The sending end of a stream: numbers its frames and keeps them until acknowledged."""

    __slots__ = ("app", "batches", "buf", "link", "name", "owner", "processed", "seq")

    def __init__(self, link: Link, app: str, name: str):
        self.link = link
        self.app = app
        self.name = name
        self.seq = 0  # of the last frame pushed
        self.buf: deque[tuple[int, bytes]] = deque()  # (seq, frame) not yet acknowledged
        self.batches = 0  # BATCH frames pushed
        self.processed = 0  # of them processed by the receiver (acknowledged credit)
        self.owner: Any = None  # the RemoteChannel sending on it: told of returned credit

    def push(self, kind: Frame, *payload: Any) -> None:
        self.seq = seq = self.seq + 1
        data = encode(kind, self.app, self.name, seq, *payload)
        self.buf.append((seq, data))
        link = self.link
        link.frames_out += 1
        link.bytes_out += len(data)
        conn = link.conn
        if conn is not None:
            conn.write(data)
        else:
            link.plane.keep_up(link)

    def batch(self, records: list[Any], t: float | None = None) -> None:
        self.batches += 1
        if t is None:
            self.push(Frame.BATCH, records)
        else:
            self.push(Frame.BATCH, records, t)

    def acked(self, received: int, processed: int) -> None:
        buf = self.buf
        while buf and buf[0][0] <= received:
            buf.popleft()
        if processed > self.processed:
            self.processed = min(processed, self.batches)
            owner = self.owner
            if owner is not None:
                owner.window(CREDITS - (self.batches - self.processed))

    def release(self) -> None:
        """Its channel is gone without an end marker (its instance stopped or a prepare
        was undone): forget it if it never sent anything; else keep what the peer has
        not acknowledged (the app's stop forgets that)."""
        self.owner = None
        if self.seq == 0:
            self.link.outs.pop((self.app, self.name), None)


class InStream:
    """The receiving end of a stream: the last ``seq`` taken, and credit to return."""

    __slots__ = ("app", "batches", "ended", "link", "name", "processed", "received")

    def __init__(self, link: Link, app: str, name: str):
        self.link = link
        self.app = app
        self.name = name
        self.received = 0
        self.batches = 0  # batches delivered to the instance
        self.processed = 0  # of them processed (credit returned)
        self.ended = False  # an end marker (or a handover) came last: nothing more expected

    def grant(self, app: str, channel: str, n: int) -> None:
        """The instance processed ``n`` batches: return their credit (batched per link)."""
        self.processed += n
        self.link.mark(self)


class Link:
    """The link to one peer worker: its streams both ways and the connection in use."""

    def __init__(self, plane: DataPlane, peer: str):
        self.plane = plane
        self.peer = peer
        self.conn: Conn | None = None  # the connection frames go out on
        self.conns: set[Conn] = set()  # every attached connection (two, briefly, after a race)
        self.outs: dict[tuple[str, str], OutStream] = {}
        self.ins: dict[tuple[str, str], InStream] = {}
        self.incarnation = ""  # of the peer's process, from its HELLO
        self.up = asyncio.Event()
        self.dirty: set[InStream] = set()  # streams whose ACK is due
        self._flush: asyncio.Handle | None = None
        self.down_since: float | None = None  # loop time the link went down while needed
        self.error = ""  # why it went down, or why the last dial failed
        self.reported = False  # reported lost (down past the link timeout)
        self.keeper: asyncio.Task[None] | None = None  # redials while down
        self.connections = 0  # connections it has used
        # Counters (hotwire.metrics): frames pushed (resends apart) and read, their
        # bytes, and the frames from this peer the data plane dropped, by reason.
        self.frames_out = 0
        self.bytes_out = 0
        self.frames_in = 0
        self.bytes_in = 0
        self.drops: Counter[str] = Counter()

    def needed(self) -> bool:
        """Whether some stream needs the link: a channel open either way, or frames the
        peer has not acknowledged."""
        return any(s.owner is not None or s.buf for s in self.outs.values()) or any(
            not s.ended for s in self.ins.values()
        )

    def apps(self) -> list[str]:
        apps = {k[0] for k, s in self.outs.items() if s.owner is not None or s.buf}
        apps |= {k[0] for k, s in self.ins.items() if not s.ended}
        return sorted(apps)

    async def drain(self, high: int = 4 * 1024 * 1024) -> None:
        conn = self.conn
        if conn is not None and conn.writer.transport.get_write_buffer_size() > high:
            try:
                await conn.writer.drain()
            except (ConnectionError, OSError):
                pass  # the read loop sees the connection go; the stream resends

    async def wait_up(self, timeout: float = CONNECT_TIMEOUT_S) -> None:
        """Until a connection is up; ConnectionError after ``timeout``."""
        if self.conn is not None:
            return
        self.plane.keep_up(self)
        try:
            await asyncio.wait_for(self.up.wait(), timeout)
        except TimeoutError:
            addr = self.plane.peers.get(self.peer, "no known address")
            raise ConnectionError(
                f"cannot reach worker {self.peer!r} ({addr}) within {timeout:g} s"
                + (f": {self.error}" if self.error else "")
            ) from None

    # -- acknowledgements ----------------------------------------------------
    def mark(self, s: InStream) -> None:
        self.dirty.add(s)
        if self._flush is None:
            self._flush = self.plane.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush = None
        conn = self.conn
        if not self.dirty:
            return
        if conn is None or conn.closed:
            self.dirty.clear()  # the full ACK on the next connection says it all
            return
        items: list[Any] = [Frame.ACK]
        for s in self.dirty:
            items += (s.app, s.name, s.received, s.processed)
        self.dirty.clear()
        self._ack(conn, encode(*items))

    def _ack(self, conn: Conn, data: bytes) -> None:
        self.frames_out += 1
        self.bytes_out += len(data)
        conn.write(data)

    def full_ack(self, conn: Conn) -> None:
        items: list[Any] = [Frame.ACK]
        for s in self.ins.values():
            items += (s.app, s.name, s.received, s.processed)
        self.dirty.clear()
        self._ack(conn, encode(*items))


class DataPlane:
    """Accepts and dials worker-to-worker connections, keeps links up, decodes frames."""

    def __init__(self, name: str, receiver: Receiver, link_timeout: float = LINK_TIMEOUT_S):
        self.name = name
        self.receiver = receiver
        self.link_timeout = link_timeout
        low, high = TCP_USER_TIMEOUT_BOUNDS_MS
        self.user_timeout_ms = int(min(high, max(low, link_timeout * 1000)))
        self.incarnation = os.urandom(8).hex()  # tells peers this process from an earlier one
        self.peers: dict[str, str] = {}  # worker name -> "host:port"
        self.links: dict[str, Link] = {}
        self.drops: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()  # reconnects, resent frames, duplicates dropped
        self._server: asyncio.Server | None = None
        self._conn_tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.address = ""
        # mTLS: every peer shows a worker certificate of the cluster CA, and its HELLO
        # must name the worker in it. None: plaintext (loopback or --insecure).
        self.tls: TlsFiles | None = None
        self._server_ssl: ssl.SSLContext | None = None
        self._client_ssl: ssl.SSLContext | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def start(self, host: str, port: int) -> str:
        self._loop = asyncio.get_running_loop()
        if self.tls is not None:
            self._server_ssl = self.tls.server_context()
            self._server_ssl.sslobject_class = _counting_handshakes(self._tls_refused)
            self._client_ssl = self.tls.client_context()
        self._server = await asyncio.start_server(
            self._accept,
            host,
            port,
            ssl=self._server_ssl,
            ssl_handshake_timeout=HELLO_TIMEOUT if self._server_ssl else None,
        )
        sock = self._server.sockets[0].getsockname()
        self.address = f"{host}:{sock[1]}"
        return self.address

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        for link in self.links.values():
            if link.keeper is not None:
                link.keeper.cancel()
            for conn in list(link.conns):
                conn.close()
        # Closed sockets end the read loops; cancel only what does not end by itself.
        if self._conn_tasks:
            _, pending = await asyncio.wait(set(self._conn_tasks), timeout=2)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # -- streams (the runtime's side) -----------------------------------------
    def link(self, peer: str) -> Link:
        link = self.links.get(peer)
        if link is None:
            link = self.links[peer] = Link(self, peer)
        return link

    def open_stream(self, peer: str, app: str, name: str, owner: Any = None) -> OutStream:
        """The sending end of stream ``name`` of ``app`` to worker ``peer`` (``owner``:
        the channel sending on it); the link is dialled if it is down. A stream opened
        again (a channel routed again after it ended) goes on with its numbering."""
        link = self.link(peer)
        s = link.outs.get((app, name))
        if s is None:
            s = link.outs[(app, name)] = OutStream(link, app, name)
        if owner is not None:
            s.owner = owner
            self.keep_up(link)
        return s

    def send_state(
        self, peer: str, app: str, dst: str, src: str, state: Any, pending: list[Any]
    ) -> int:
        """Hand ``src``'s state to instance ``dst`` on ``peer``: kept until acknowledged.
        Return the bytes of the frame."""
        s = self.open_stream(peer, app, STATE_PREFIX + dst)
        s.push(Frame.STATE, src, state, pending)
        return len(s.buf[-1][1])  # the frame's bytes

    def close_in(self, app: str, channel: str) -> None:
        """Channel ``channel`` of ``app`` has no receiver here any more: the link no
        longer needs to be kept up for it (it still drops the channel's duplicates)."""
        for link in self.links.values():
            s = link.ins.get((app, channel))
            if s is not None:
                s.ended = True

    def forget_app(self, app: str) -> None:
        """``app`` stopped here: drop its streams both ways."""
        for link in self.links.values():
            for key in [k for k in link.outs if k[0] == app]:
                link.outs.pop(key).owner = None
            for key in [k for k in link.ins if k[0] == app]:
                link.dirty.discard(link.ins.pop(key))

    def lost_links(self) -> list[LostLink]:
        """Links down longer than ``link_timeout`` that streams still need."""
        now = self.loop.time()
        return [
            LostLink(link.peer, link.apps(), now - link.down_since, link.error)
            for link in self.links.values()
            if link.reported and link.conn is None and link.down_since is not None and link.needed()
        ]

    # -- connections ---------------------------------------------------------
    def keep_up(self, link: Link) -> None:
        """Dial ``link`` (with backoff, until it is up) if it is down and needed."""
        if link.conn is None and not self._closing and (link.keeper is None or link.keeper.done()):
            link.keeper = self._track(self._redial(link))

    def _track(self, coro: Any) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self._conn_tasks.add(task)
        task.add_done_callback(self._conn_tasks.discard)
        return task

    async def _redial(self, link: Link) -> None:
        loop = self.loop
        delay = REDIAL_MIN_S
        if link.connections and self.name > link.peer:
            # Both ends redial a lost link; the one whose name sorts first is the one
            # both keep if both get through, so the other gives it a head start.
            try:
                await asyncio.wait_for(link.up.wait(), REDIAL_MIN_S)
            except TimeoutError:
                pass
        while not self._closing and link.conn is None and link.needed():
            if link.down_since is None:
                link.down_since = loop.time()
            addr = self.peers.get(link.peer)
            if addr is not None:  # else wait for the peer to dial (it knows where we are)
                try:
                    await self._dial(link.peer, addr)
                except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as e:
                    link.error = f"dialling {addr}: {_why(e)}"
                except RuntimeError as e:  # uvloop: a write to a transport the peer closed
                    link.error = f"dialling {addr}: {_why(e)}"
            if link.conn is not None:
                return
            self._check_lost(link, loop.time())
            try:
                await asyncio.wait_for(link.up.wait(), delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, REDIAL_MAX_S)
        if link.conn is None and not link.needed():
            link.down_since = None
            link.reported = False

    def _check_lost(self, link: Link, now: float) -> None:
        if link.reported or link.down_since is None or link.peer not in self.peers:
            return
        down = now - link.down_since
        if down >= self.link_timeout:
            link.reported = True
            log.error(
                "data link to worker %s down for %.1f s (%s): reporting it to the master, "
                "which restarts %s from the last checkpoint",
                link.peer,
                down,
                link.error or "no answer",
                ", ".join(repr(a) for a in link.apps()) or "nothing",
            )

    async def _dial(self, peer: str, addr: str) -> None:
        host, _, port = addr.rpartition(":")
        tls = {"ssl": self._client_ssl, "server_hostname": peer} if self._client_ssl else {}
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, int(port), **tls), DIAL_TIMEOUT_S
        )
        try:
            _tune(writer, self.user_timeout_ms)
            if self._client_ssl is not None:
                who = ssl_peer(writer.get_extra_info("peercert"))
                if who != ("worker", peer):
                    self.drops["bad_identity"] += 1
                    raise ValueError(f"its certificate is not worker {peer!r}'s but {who}")
            writer.write(encode(Frame.HELLO, self.name, self.incarnation))
            name, incarnation = await _read_hello(reader, DIAL_TIMEOUT_S)
            if name != peer:
                raise ValueError(f"it answered as worker {name!r}, not {peer!r}")
        except BaseException:
            writer.close()
            raise
        conn = Conn(peer, reader, writer, self.name, incarnation)
        if self._attach(conn):
            self._track(self._read_loop(conn))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _tune(writer, self.user_timeout_ms)
        task = asyncio.current_task()
        if task is not None:
            self._conn_tasks.add(task)
            task.add_done_callback(self._conn_tasks.discard)
        peer_addr = writer.get_extra_info("peername")
        certified: tuple[str, str] | None = None
        if self._server_ssl is not None:
            # Past the TLS handshake: the peer's certificate is one of the cluster CA.
            certified = ssl_peer(writer.get_extra_info("peercert"))
        try:
            name, incarnation = await _read_hello(reader, HELLO_TIMEOUT)
            if name == self.name:
                raise ValueError("it says it is this worker")
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        except Exception as e:
            self.drops["bad_hello"] += 1
            log.warning("data plane: dropped connection from %s: %s", peer_addr, e)
            writer.close()
            return
        if self._server_ssl is not None and certified != ("worker", name):
            # Nothing of it is read past the HELLO: no frame it sent reaches an instance.
            self.drops["bad_identity"] += 1
            log.warning(
                "data plane: refused a connection from %s: its HELLO names worker %r but its "
                "certificate is %s",
                peer_addr,
                name,
                certified,
            )
            writer.transport.abort()
            return
        if self._closing:
            writer.close()
            return
        writer.write(encode(Frame.HELLO, self.name, self.incarnation))
        conn = Conn(name, reader, writer, name, incarnation)
        if self._attach(conn):
            await self._read_loop(conn)

    def _tls_refused(self, e: ssl.SSLError) -> None:
        self.drops["tls_refused"] += 1
        log.warning("data plane: refused a connection: TLS handshake: %s", e.reason or e)

    def _attach(self, conn: Conn) -> bool:
        """Take a connection into use; False if it is a duplicate that was closed."""
        link = self.link(conn.peer)
        if conn.incarnation != link.incarnation:
            if link.incarnation:
                log.warning(
                    "worker %s restarted: dropping what this worker received from its "
                    "earlier process",
                    conn.peer,
                )
                link.ins.clear()
                link.dirty.clear()
                for old in list(link.conns):
                    old.close()
            link.incarnation = conn.incarnation
        cur = link.conn
        if cur is not None and not cur.closed:
            first = min(self.name, conn.peer)
            if cur.dialer == first and conn.dialer != first:
                conn.close()  # both dialled at once: keep the one the first name dialled
                # An empty ACK probes the kept one: if the peer dialled because it lost
                # it without this side noticing, its reset ends it here at once.
                cur.write(encode(Frame.ACK))
                return False
            cur.close()  # the peer dialled again: it has lost the current one
        link.conns.add(conn)
        self._activate(link, conn)
        return True

    def _activate(self, link: Link, conn: Conn) -> None:
        """Send on ``conn`` from now on: first every frame not yet acknowledged, then a
        full ACK (so credits lost with an earlier connection come back)."""
        was_down = link.conn is None
        link.conn = conn
        link.connections += 1
        resent = states = 0
        for s in link.outs.values():
            for _, data in s.buf:
                conn.write(data)
            resent += len(s.buf)
            if s.name.startswith(STATE_PREFIX):
                states += len(s.buf)
        link.full_ack(conn)
        self.stats["resent"] += resent
        if link.connections > 1 and was_down:
            self.stats["reconnects"] += 1
            down = self.loop.time() - link.down_since if link.down_since is not None else 0.0
            log.info(
                "data link to worker %s up again after %.2f s (connection %d, dialled by %s); "
                "resent %d frames (%d state handovers)",
                link.peer,
                down,
                link.connections,
                conn.dialer,
                resent,
                states,
            )
        link.down_since = None
        link.error = ""
        link.reported = False
        link.up.set()

    def _detach(self, conn: Conn, why: str) -> None:
        link = self.links.get(conn.peer)
        if link is None:
            return
        link.conns.discard(conn)
        if link.conn is not conn:
            return
        link.conn = None
        others = [c for c in link.conns if not c.closed]
        if others:
            self._activate(link, others[-1])
            return
        link.up.clear()
        if self._closing or not link.needed():
            return
        link.down_since = self.loop.time()
        link.error = why
        log.warning("data link to worker %s lost (%s); dialling it again", link.peer, why)
        self.keep_up(link)

    # -- reading ---------------------------------------------------------
    async def _read_loop(self, conn: Conn) -> None:
        unpack = msgpack.unpackb
        link = self.link(conn.peer)
        why = "closed by the peer"
        try:
            while True:
                body = await _read_frame(conn.reader)
                if body is None:
                    self.drops["oversized_frame"] += 1
                    link.drops["oversized_frame"] += 1
                    log.warning("data plane: oversized frame from %s; closing", conn.peer)
                    why = "oversized frame"
                    break
                link.frames_in += 1
                link.bytes_in += len(body) + _LEN.size
                try:
                    msg = unpack(body, raw=False, strict_map_key=False)
                    self._dispatch(msg, link)
                except Exception as e:
                    self.drops["bad_frame"] += 1
                    link.drops["bad_frame"] += 1
                    if self.drops["bad_frame"] % 1000 == 1:  # the first, then every 1000th
                        log.warning(
                            "data plane: dropped a bad frame from %s: %s (%d such drops)",
                            conn.peer,
                            e,
                            self.drops["bad_frame"],
                        )
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            why = _why(e)
        finally:
            conn.close()
            self._detach(conn, why)

    def _dispatch(self, msg: Any, link: Link) -> None:
        kind = msg[0]
        if kind == Frame.ACK:
            outs = link.outs
            for i in range(1, len(msg) - 3, 4):
                s = outs.get((msg[i], msg[i + 1]))
                if s is not None:
                    s.acked(int(msg[i + 2]), int(msg[i + 3]))
            return
        app, name, seq = msg[1], msg[2], msg[3]
        if type(seq) is not int:
            raise ValueError(f"sequence number {seq!r} is not an integer")
        key = (app, name)
        s = link.ins.get(key)
        new = s is None
        if s is None:
            if seq != 1:
                self._out_of_sequence(link, name, seq, 0)
                return
            s = InStream(link, app, name)
        elif seq != s.received + 1:
            if seq <= s.received:
                self.stats["duplicates"] += 1  # resent after a reconnection: we have it
            else:
                self._out_of_sequence(link, name, seq, s.received)
            return
        rcv = self.receiver
        if kind == Frame.BATCH:
            if s.batches - s.processed >= CREDITS:
                self.drops["over_credit"] += 1
                link.drops["over_credit"] += 1
                if self.drops["over_credit"] % 1000 == 1:
                    log.warning(
                        "data plane: dropped a batch from %s on channel %s: the sender "
                        "ignores its credits (%d such drops)",
                        link.peer,
                        name,
                        self.drops["over_credit"],
                    )
                return
            # A source time that is not a finite float is ignored: the batch is good
            # without it (the comparison is False for NaN and the infinities).
            t = msg[5] if len(msg) > 5 else None
            if type(t) is float and -1e18 < t < 1e18:
                ok = rcv.on_batch(app, name, msg[4], Stamp(s, t))
            else:
                ok = rcv.on_batch(app, name, msg[4], s)
            if ok:
                s.batches += 1
            s.ended = False
        elif kind == Frame.END:
            ok = rcv.on_end(app, name)
            s.ended = True
            link.mark(s)
        elif kind == Frame.BARRIER:
            ok = rcv.on_barrier(app, name, int(msg[4]))
            s.ended = False
            link.mark(s)
        elif kind == Frame.EPOCH:
            ok = rcv.on_epoch(app, name, int(msg[4]))
            s.ended = False
            link.mark(s)
        elif kind == Frame.STATE:
            ok = rcv.on_state(app, name[len(STATE_PREFIX) :], msg[4], msg[5], msg[6])
            s.ended = True  # a handover needs no link after it
            link.mark(s)
        else:
            raise ValueError(f"unknown frame kind {kind!r}")
        if not ok:
            self.drops["unknown_channel"] += 1
            link.drops["unknown_channel"] += 1
            if new:
                return  # keep nothing for a stream no instance here receives
        s.received = seq
        if new:
            link.ins[key] = s

    def _out_of_sequence(self, link: Link, name: str, seq: int, expected: int) -> None:
        self.drops["out_of_sequence"] += 1
        link.drops["out_of_sequence"] += 1
        if self.drops["out_of_sequence"] % 1000 == 1:
            log.warning(
                "data plane: dropped frame %d of stream %s from %s: expected %d (%d such drops)",
                seq,
                name,
                link.peer,
                expected + 1,
                self.drops["out_of_sequence"],
            )


def _counting_handshakes(on_refused: Any) -> type[ssl.SSLObject]:
    """An ``SSLObject`` class that reports a TLS handshake the peer failed.

    The event loop runs the handshake of an accepted connection before the
    connection reaches :meth:`DataPlane._accept` and closes a failed one quietly;
    this is where such a refusal is seen, to be counted and logged.
    """

    class Counted(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLEOFError):
                raise  # more bytes to come, or the peer left: not a refusal
            except ssl.SSLError as e:
                on_refused(e)
                raise

    return Counted


async def _read_frame(reader: asyncio.StreamReader) -> bytes | None:
    head = await reader.readexactly(4)
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        return None
    return await reader.readexactly(n)


async def _read_hello(reader: asyncio.StreamReader, timeout: float) -> tuple[str, str]:
    """(worker name, incarnation) from a HELLO frame; ValueError if it is not one."""
    body = await asyncio.wait_for(_read_frame(reader), timeout)
    msg = unpackb(body) if body is not None else None
    if not (
        isinstance(msg, list)
        and len(msg) in (2, 3)
        and msg[0] == Frame.HELLO
        and isinstance(msg[1], str)
        and all(isinstance(x, str) for x in msg[2:])
    ):
        raise ValueError("first frame is not HELLO")
    return msg[1], msg[2] if len(msg) == 3 else ""


def _why(e: BaseException) -> str:
    if isinstance(e, asyncio.IncompleteReadError):
        return "connection closed"
    if isinstance(e, TimeoutError):
        return "timed out"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _tune(writer: asyncio.StreamWriter, user_timeout_ms: int) -> None:
    """No Nagle delay; keepalives and a user timeout, so a peer that vanished without
    a reset (a partition, a dead host) ends the connection within seconds."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    opts = [
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), 5),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), 2),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), 3),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_USER_TIMEOUT", None), user_timeout_ms),
    ]
    for level, opt, value in opts:
        if opt is None:
            continue
        try:
            sock.setsockopt(level, opt, value)
        except OSError:
            pass
