"""The wire between a DL PE and its job's program: msgpack maps on a stream socket.

Addresses are ``unix:/path/to/socket`` or ``tcp://host:port``; the PE listens,
the program (:func:`hotwire.jobs.serve`) connects. Each job has a random secret
of its own, given to its program in ``HOTWIRE_JOBS_SECRET``; the PE closes a
connection whose hello does not carry it (see :func:`secret_matches`), so only
the job's own processes can take its batches or answer them. Messages, in order:

* program -> PE ``{"t": "hello", "rank": int, "pid": int, "secret": str}``
* PE -> program ``{"t": "batch", "seq": int, "records": [...]}``
* program -> PE ``{"t": "result", "seq": int, "results": [...]}`` (one per record, same order)
  or ``{"t": "error", "seq": int, "error": str, "type": str, "traceback": str}``
* PE -> program ``{"t": "stop"}``: the program's ``serve`` returns.
"""

from __future__ import annotations

import hmac
import secrets
import socket
from typing import Any

import msgpack

ADDRESS_ENV = "HOTWIRE_JOBS_ADDRESS"
SECRET_ENV = "HOTWIRE_JOBS_SECRET"


def new_secret() -> str:
    """A fresh secret for one job (256 random bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def secret_matches(hello: Any, secret: str) -> bool:
    """Whether ``hello`` is a hello message carrying ``secret`` (compared in constant time)."""
    if not isinstance(hello, dict) or hello.get("t") != "hello":
        return False
    given = hello.get("secret")
    if not isinstance(given, str) or not secret:
        return False
    return hmac.compare_digest(given.encode(), secret.encode())


class ConnectionClosed(ConnectionError):
    """The peer closed the connection."""


def parse_address(address: str) -> tuple[int, Any]:
    if address.startswith("unix:"):
        return socket.AF_UNIX, address[len("unix:") :]
    if address.startswith("tcp://"):
        host, _, port = address[len("tcp://") :].rpartition(":")
        return socket.AF_INET, (host.strip("[]"), int(port))
    raise ValueError(f"address {address!r} is neither unix:/path nor tcp://host:port")


def connect(address: str, timeout: float | None = 30.0) -> socket.socket:
    family, addr = parse_address(address)
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(addr)
    except OSError:
        s.close()
        raise
    s.settimeout(None)
    return s


def listen(address: str) -> tuple[socket.socket, str]:
    """A listening socket and its address (``tcp://host:0`` gets a real port)."""
    family, addr = parse_address(address)
    s = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(addr)
    s.listen(16)
    if family == socket.AF_INET:
        port = s.getsockname()[1]
        address = f"tcp://{addr[0]}:{port}"
    return s, address


class Channel:
    """Framed msgpack messages over a connected stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=1 << 30)

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.sendall(msgpack.packb(msg, use_bin_type=True))

    def recv(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next message; ``None`` when ``timeout`` passed; raises :class:`ConnectionClosed`."""
        for msg in self._unpacker:
            return msg  # type: ignore[no-any-return]
        self.sock.settimeout(timeout)
        try:
            while True:
                try:
                    data = self.sock.recv(1 << 20)
                except TimeoutError:
                    return None
                if not data:
                    raise ConnectionClosed("the peer closed the connection")
                self._unpacker.feed(data)
                for msg in self._unpacker:
                    return msg  # type: ignore[no-any-return]
        finally:
            self.sock.settimeout(None)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
