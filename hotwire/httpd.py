"""A small HTTP/1.1 server on the running event loop: the master's dashboard and a
worker's metrics endpoint.

Asyncio streams and no thread: a handler reads the process's state on the loop,
between two of its steps, and its answer goes out through the loop's transport as
the client reads it (a thread that shares the interpreter with a busy loop waits
up to a switch interval, 5 ms, for each step it takes).

One request per connection, then the connection closes. With TLS (``context``) a
client that does not start with a TLS handshake record (plain HTTP) is answered
in plain text with a 400 that says the endpoint is HTTPS only. A malformed
request gets a 4xx and a line of text, a handler's exception a 500; the loop
never sees either.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024  # request line and headers
READ_TIMEOUT_S = 10.0  # the TLS handshake, and the request's head
MAX_CONNECTIONS = 64  # open at once; more are answered 503 (plain HTTP) or closed
REASONS = {
    200: "OK",
    303: "See Other",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

__all__ = ["HttpError", "LoopServer", "Request", "read_request", "response"]


class HttpError(Exception):
    def __init__(self, status: int, text: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(text)
        self.status = status
        self.headers = headers


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    cookies: dict[str, str] = field(default_factory=dict)
    started: float = 0.0  # time.perf_counter() when its connection was accepted
    read_at: float = 0.0  # and when its head had been read

    def arg(self, name: str) -> str:
        values = self.query.get(name)
        return values[-1] if values else ""


async def read_request(
    reader: asyncio.StreamReader, methods: tuple[str, ...] = ("GET",), refused: str = ""
) -> Request:
    """One request's head; :class:`HttpError` (4xx) if it is not well formed, or its
    method is not one of ``methods`` (405, with ``refused`` as the reason)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise HttpError(431, f"the request's head is longer than {MAX_HEAD // 1024} KiB") from None
    except asyncio.IncompleteReadError:
        raise ConnectionResetError("the client went before its request ended") from None
    try:
        text = head.decode("latin-1")
        line, *rest = text.split("\r\n")
        method, target, version = line.split(" ")
    except ValueError:
        raise HttpError(400, "malformed request line: expected 'GET /path HTTP/1.1'") from None
    if not version.startswith("HTTP/1."):
        raise HttpError(400, f"unsupported protocol {version[:20]!r}: HTTP/1.0 or 1.1")
    if method not in methods:
        allowed = ", ".join(methods)
        reason = refused or f"only {allowed}"
        raise HttpError(405, f"method {method[:20]!r}: {reason}", (("Allow", allowed),))
    if not target.startswith("/"):
        raise HttpError(400, "the request target must be a path starting with '/'")
    if len(target) > 4096:
        raise HttpError(414, "the request target is longer than 4096 characters")
    headers: dict[str, str] = {}
    for h in rest:
        if not h:
            continue
        name, sep, value = h.partition(":")
        if not sep or not name.strip() or name != name.strip():
            raise HttpError(400, f"malformed header line {h[:40]!r}")
        headers[name.lower()] = value.strip()
    parts = urllib.parse.urlsplit(target)
    try:
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, errors="strict")
        path = urllib.parse.unquote(parts.path, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "the request target is not valid UTF-8 once decoded") from None
    cookies: dict[str, str] = {}
    for item in headers.get("cookie", "").split(";"):
        k, sep, v = item.strip().partition("=")
        if sep:
            cookies[k] = v
    return Request(method, path, query, headers, cookies)


def response(
    status: int,
    body: bytes,
    ctype: str,
    headers: tuple[tuple[str, str], ...] = (),
    head_only: bool = False,
) -> bytes:
    """Status line, headers and (unless ``head_only``) body, in one buffer."""
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
        f"Content-Type: {ctype}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
        "Connection: close",
        *(f"{k}: {v}" for k, v in headers),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


Handler = Callable[[Request, asyncio.StreamWriter], Awaitable[None]]


class LoopServer:
    """Accepts connections on ``host:port`` (port 0: a free one) and answers each
    one's request with ``handle(request, writer)``; a request whose method is not in
    ``methods`` gets a 405 that says ``refused``. With ``context``, HTTPS, and
    plain HTTP gets a 400 with ``https_only`` (a line of text) and ``{address}``
    in it replaced by this server's.

    At most ``max_connections`` are open at once (each lives at most
    :data:`READ_TIMEOUT_S` before its request is read): one more is answered 503 at
    once on plain HTTP, or closed on HTTPS, and counted in :attr:`refused_count`, so
    idle or slow clients cannot pile up descriptors and tasks in the process."""

    def __init__(
        self,
        handle: Handler,
        *,
        context: ssl.SSLContext | None = None,
        methods: tuple[str, ...] = ("GET",),
        refused: str = "",
        https_only: str = "this endpoint serves HTTPS only",
        name: str = "http",
        max_connections: int = MAX_CONNECTIONS,
    ):
        self.handle = handle
        self.max_connections = max_connections
        self.refused_count = 0  # connections turned away over max_connections
        self._warned = 0.0
        self.context = context
        self.methods = methods
        self.refused = refused
        self.https_only = https_only
        self.name = name  # for log lines
        self.address = ""
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self.conns: set[asyncio.Task[None]] = set()

    @property
    def scheme(self) -> str:
        return "https" if self.context is not None else "http"

    async def start(self, host: str, port: int) -> str:
        """Listen; ``HOST:PORT`` with the port taken. OSError if it cannot."""
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
            sock.listen(64)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self.address = f"{host}:{sock.getsockname()[1]}"
        self._accepting = asyncio.get_running_loop().create_task(self._accept(sock))
        return self.address

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
        for task in list(self.conns):
            task.cancel()
        await asyncio.gather(*self.conns, return_exceptions=True)

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as e:  # out of descriptors, say: the next one may do
                log.warning("%s: accept failed: %s", self.name, e)
                await asyncio.sleep(0.1)
                continue
            if len(self.conns) >= self.max_connections:
                self._turn_away(conn)
                continue
            task = loop.create_task(self._connection(conn))
            self.conns.add(task)
            task.add_done_callback(self.conns.discard)

    def _turn_away(self, conn: socket.socket) -> None:
        """Close ``conn`` at once, over :attr:`max_connections`: with a 503 that says
        so on plain HTTP (a send that fits the socket's buffer, never waited on)."""
        self.refused_count += 1
        if self.context is None:
            text = f"{self.max_connections} connections are open already; try again\n"
            with contextlib.suppress(OSError):
                conn.setblocking(False)
                conn.send(response(503, text.encode(), "text/plain; charset=utf-8"))
        conn.close()
        now = time.monotonic()
        if now - self._warned > 10.0:
            self._warned = now
            log.warning(
                "%s: %d connection(s) are open, the most it keeps; turned one away (%d so far)",
                self.name,
                len(self.conns),
                self.refused_count,
            )

    async def _connection(self, conn: socket.socket) -> None:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        try:
            context = self.context
            if context is not None:
                first = await asyncio.wait_for(_peek(conn), READ_TIMEOUT_S)
                if not first:
                    conn.close()
                    return
                if first != b"\x16":  # not a TLS handshake record
                    context = None
            reader = asyncio.StreamReader(limit=MAX_HEAD)
            protocol = asyncio.StreamReaderProtocol(reader)
            transport, _ = await asyncio.wait_for(
                loop.connect_accepted_socket(lambda: protocol, conn, ssl=context),
                READ_TIMEOUT_S,
            )
        except (OSError, TimeoutError, ssl.SSLError):
            conn.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        plain_on_tls = self.context is not None and context is None
        await self._serve(reader, writer, plain_on_tls, started)

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        plain_on_tls: bool,
        started: float,
    ) -> None:
        try:
            try:
                req = await asyncio.wait_for(
                    read_request(reader, self.methods, self.refused), READ_TIMEOUT_S
                )
                req.started, req.read_at = started, time.perf_counter()
                if plain_on_tls:
                    raise HttpError(400, self.https_only.replace("{address}", self.address))
                await self.handle(req, writer)
            except HttpError as e:
                body = (str(e) + "\n").encode()
                writer.write(response(e.status, body, "text/plain; charset=utf-8", e.headers))
                await writer.drain()
        except (TimeoutError, ConnectionError, ssl.SSLError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("%s: a request failed", self.name)
            with contextlib.suppress(Exception):
                writer.write(response(500, b"internal error\n", "text/plain; charset=utf-8"))
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _peek(conn: socket.socket) -> bytes:
    """The first byte ``conn`` received, left in its buffer (b"": closed)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return conn.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            ready = loop.create_future()
            loop.add_reader(conn.fileno(), _set_once, ready)
            try:
                await ready
            finally:
                loop.remove_reader(conn.fileno())
