"""The DL PE: ``stream.dl_job(name, request=..., parallelism=k)``.

Each instance runs its own job: in :meth:`DLJobPE.setup` it validates the
request, renders it for its backend, starts the job and waits for the job's
program (which calls :func:`hotwire.jobs.serve`) to connect to a socket the
instance listens on (a Unix socket for the local and podman backends, TCP for
Kubernetes). Each start of a job gets a random secret, given to the job in its
environment (``HOTWIRE_JOBS_SECRET``); a connection whose hello does not carry
it is closed, logged and counted in ``refused``, and never gets or answers a
batch. :meth:`DLJobPE.process_batch` sends a batch and returns
one result per record, in order; :meth:`DLJobPE.teardown` stops the job.

In the worker, a batch's exchange with the job (socket I/O, and backend status
calls while it waits) runs on a thread, so a slow job never blocks the worker's
event loop; ``setup`` and ``teardown`` already run on threads.

An upgrade to another request (image, template, ...) is an ordinary PE change:
the new generation's instances start their own jobs during prepare, the
switch moves the stream to them, and retiring the old instances stops the old
jobs. Job names carry a per-instance suffix, so old and new jobs coexist.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any

from hotwire.jobs.backends import Backend, default_backend, get_backend
from hotwire.jobs.catalog import Catalog
from hotwire.jobs.errors import JobError
from hotwire.jobs.protocol import (
    ADDRESS_ENV,
    SECRET_ENV,
    Channel,
    ConnectionClosed,
    listen,
    new_secret,
    secret_matches,
)
from hotwire.jobs.render import RenderedJob, Volume, render
from hotwire.jobs.request import MAX_NAME_LEN, JobRequest, parse_request
from hotwire.sdk.pe import ProcessPE

CONTAINER_SOCKET_DIR = "/run/hotwire"
ADVERTISE_ENV = "HOTWIRE_JOBS_ADVERTISE_HOST"
HELLO_TIMEOUT = 10.0  # seconds a new connection has to say hello
_PEERCRED = getattr(socket, "SO_PEERCRED", 17)  # Linux
_log = logging.getLogger(__name__)


def _dns_label(text: str) -> str:
    s = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return s or "job"


def instance_job_name(base: str, app: str, pe: str, instance: str) -> str:
    """A job name unique to one PE instance (and one start of it), within DNS-label limits."""
    digest = hashlib.sha1(f"{app}/{pe}/{instance}/{os.getpid()}/{time.time_ns()}".encode())
    suffix = digest.hexdigest()[:8]
    head = _dns_label(base)[: MAX_NAME_LEN - len(suffix) - 1].rstrip("-")
    return f"{head}-{suffix}"


def _peer(sock: socket.socket) -> str:
    """Who is at the other end of ``sock``, for a log line."""
    try:
        if sock.family == socket.AF_UNIX:
            size = struct.calcsize("3i")
            pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, _PEERCRED, size))
            return f"process {pid} (uid {uid})"
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, struct.error, TypeError):
        return "a peer that already left"


class DLJobPE(ProcessPE):
    """A PE whose records are scored by a job running in containers (or processes).

    ``ctx.config["request"]`` is the job request (a mapping; see
    :func:`hotwire.jobs.parse_request`). Optional keys of ``ctx.config``:
    ``backend``, ``catalog`` (a list of catalog directories),
    ``connect_timeout`` (seconds the job has to start serving, default 300) and
    ``batch_timeout`` (seconds one batch may take, default none).
    """

    def __init__(self) -> None:
        self.ctx: Any = None
        self.request: JobRequest | None = None
        self.job: RenderedJob | None = None
        self.backend: Backend | None = None
        self._listener: socket.socket | None = None
        self._chan: Channel | None = None
        self._others: list[Channel] = []
        self._sock_dir: str | None = None
        self._seq = 0
        self._secret = ""
        self.refused = 0  # connections closed for a missing or wrong secret

    # -- naming for errors ------------------------------------------------------------

    def _who(self) -> str:
        c = self.ctx
        return (
            f"dl_job PE {getattr(c, 'pe', '?')!r} (app {getattr(c, 'app', '?')!r}, "
            f"instance {getattr(c, 'instance', '?')})"
        )

    # -- lifecycle --------------------------------------------------------------------

    def setup(self, ctx: Any) -> None:
        self.ctx = ctx
        config = dict(getattr(ctx, "config", None) or {})
        raw = config.get("request")
        if raw is None:
            raise JobError(
                f"{self._who()}: config has no 'request'; use stream.dl_job(name, request={{...}})"
            )
        data = raw.to_dict() if isinstance(raw, JobRequest) else dict(raw)
        base = data.get("name") or getattr(ctx, "pe", "dl-job")
        data["name"] = instance_job_name(
            str(base),
            str(getattr(ctx, "app", "")),
            str(getattr(ctx, "pe", "")),
            str(getattr(ctx, "instance", "")),
        )
        request = parse_request(data, source=f"request of {self._who()}")
        backend_name = config.get("backend") or request.backend or default_backend()
        # a local job ends with the worker process that runs this instance
        opts = {"bind_to_parent": True} if backend_name == "local" else {}
        self.backend = get_backend(backend_name, **opts)
        catalog = Catalog.load(config.get("catalog") or ())
        try:
            self._listen(backend_name)
            extra_volumes: list[Volume] = []
            if backend_name == "podman" and self._sock_dir:
                extra_volumes.append(Volume("hotwire-socket", self._sock_dir, CONTAINER_SOCKET_DIR))
            self._secret = new_secret()
            self.job = render(
                request,
                catalog,
                backend_name,
                extra_env={ADDRESS_ENV: self._job_address(backend_name), SECRET_ENV: self._secret},
                extra_volumes=extra_volumes,
            )
            self.request = request
            self.backend.submit(self.job)
            self._accept(float(config.get("connect_timeout", 300.0)))
        except BaseException:
            self.teardown()
            raise
        _log.info(
            "%s: job %s (%s, %s) serving on %s",
            self._who(),
            request.name,
            self.job.template.id,
            self.job.image.id,
            backend_name,
        )

    def _listen(self, backend: str) -> None:
        if backend in ("local", "podman"):
            self._sock_dir = tempfile.mkdtemp(prefix="hotwire-dl-")
            os.chmod(self._sock_dir, 0o755)
            self._listener, self._address = listen(f"unix:{self._sock_dir}/pe.sock")
            os.chmod(f"{self._sock_dir}/pe.sock", 0o777)
        else:
            self._listener, self._address = listen("tcp://0.0.0.0:0")

    def _job_address(self, backend: str) -> str:
        if backend == "local":
            return self._address
        if backend == "podman":
            return f"unix:{CONTAINER_SOCKET_DIR}/pe.sock"
        port = self._address.rsplit(":", 1)[1]
        host = os.environ.get(ADVERTISE_ENV) or socket.gethostbyname(socket.gethostname())
        return f"tcp://{host}:{port}"

    def _failure(self, what: str) -> JobError:
        assert self.backend is not None and self.request is not None
        name = self.request.name
        try:
            st = self.backend.wait(name, timeout=3)  # let the backend notice an exit
            logs = self.backend.logs(name)
        except JobError as e:
            return JobError(f"{self._who()}: {what}; job {name}: {e}")
        tail = " | ".join(
            f"{k}: {' '.join(v.strip().splitlines()[-5:])}" for k, v in logs.items() if v.strip()
        )
        return JobError(
            f"{self._who()}: {what}; job {name} is {st.state}"
            f"{': ' + st.message if st.message else ''}"
            f"{'; last output: ' + tail[-1500:] if tail else ''}"
        )

    def _check_alive(self) -> None:
        assert self.backend is not None and self.request is not None
        st = self.backend.status(self.request.name)
        if st.done:
            raise self._failure("the job ended before it served")

    def _accept(self, timeout: float) -> None:
        assert self._listener is not None
        self._listener.settimeout(0.2)
        end = time.monotonic() + timeout
        last_check = 0.0
        while self._chan is None:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                conn = None
            if conn is not None:
                conn.setblocking(True)
                ch = Channel(conn)
                try:
                    hello = ch.recv(timeout=HELLO_TIMEOUT)
                except (ConnectionClosed, OSError, ValueError):
                    hello = None  # closed, reset, or not msgpack
                if not secret_matches(hello, self._secret):
                    self._refuse(ch, hello)
                elif int(hello.get("rank", 0)) == 0:  # type: ignore[union-attr]
                    self._chan = ch
                else:
                    self._others.append(ch)  # kept open; replica 0 gets the batches
                continue
            now = time.monotonic()
            if now - last_check > 0.5:
                last_check = now
                self._check_alive()
            if now > end:
                raise self._failure(
                    f"the job's program did not call hotwire.jobs.serve() within {timeout:g}s"
                )

    def _refuse(self, ch: Channel, hello: Any) -> None:
        """Close a connection that did not prove it is this instance's job."""
        peer = _peer(ch.sock)
        ch.close()
        self.refused += 1
        if not isinstance(hello, dict) or hello.get("t") != "hello":
            said = "it sent no hello"
        elif not hello.get("secret"):
            said = "its hello carries no secret"
        else:
            said = "its hello carries a wrong secret"
        _log.warning(
            "%s: refused a connection from %s to the job's socket: %s (%d refused so far)",
            self._who(),
            peer,
            said,
            self.refused,
        )

    def process_batch(self, records: Sequence[Any]) -> list[Any] | Awaitable[list[Any]]:
        """Score a batch: one result per record, in order.

        Called with an event loop running in this thread (the worker's runtime), it
        returns an awaitable that does the exchange on a thread, so the loop goes on
        while the job works; called without one (a script, a test), it returns the
        results.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._exchange(records)
        return asyncio.to_thread(self._exchange, list(records))

    def _exchange(self, records: Sequence[Any]) -> list[Any]:
        """Send a batch to the job and wait for its results (blocking)."""
        chan = self._chan
        if chan is None:
            raise JobError(f"{self._who()}: not set up (or already torn down)")
        records = list(records)
        if not records:
            return []
        self._seq += 1
        seq = self._seq
        try:
            chan.send({"t": "batch", "seq": seq, "records": records})
        except (OSError, TypeError, ValueError) as e:
            if isinstance(e, OSError):
                raise self._failure(f"cannot send a batch ({e})") from None
            raise JobError(
                f"{self._who()}: records must be msgpack data (dict, list, str, "
                f"bytes, numbers, None): {e}"
            ) from None
        limit = (self.ctx.config or {}).get("batch_timeout") if self.ctx else None
        end = None if limit is None else time.monotonic() + float(limit)
        while True:
            try:
                msg = chan.recv(timeout=1.0)
            except (ConnectionClosed, OSError):
                self._check_not_torn_down(chan)
                raise self._failure("the job closed the connection mid-batch") from None
            if msg is None:
                self._check_not_torn_down(chan)
                self._check_alive()
                if end is not None and time.monotonic() > end:
                    raise self._failure(f"a batch took longer than batch_timeout={limit}s")
                continue
            if msg.get("seq") != seq:
                continue  # a late answer to an earlier, abandoned batch
            if msg.get("t") == "error":
                raise JobError(
                    f"{self._who()}: the job's handler failed on a batch of "
                    f"{len(records)} records: {msg.get('error')}\n"
                    f"{msg.get('traceback', '')}".rstrip()
                )
            results = list(msg.get("results") or [])
            if len(results) != len(records):
                raise JobError(
                    f"{self._who()}: the job returned {len(results)} results for "
                    f"{len(records)} records"
                )
            return results

    def _check_not_torn_down(self, chan: Channel) -> None:
        if self._chan is not chan:  # teardown ran while this batch was in flight
            raise JobError(f"{self._who()}: torn down while a batch was in flight")

    def process(self, record: Any) -> Iterable[Any]:
        # Per-record calls (a keyed dl_job) are synchronous in the runtime.
        return self._exchange([record])

    def snapshot(self) -> Any:
        return None  # the PE keeps no state; the job's model is the job's business

    def restore(self, state: Any) -> None:
        pass

    def teardown(self) -> None:
        for ch in [self._chan, *self._others]:
            if ch is not None:
                with contextlib.suppress(OSError):
                    ch.send({"t": "stop"})
                ch.close()
        self._chan, self._others, self._secret = None, [], ""
        if self.backend is not None and self.request is not None:
            name = self.request.name
            with contextlib.suppress(JobError):
                st = self.backend.wait(name, timeout=5)
                if not st.done:
                    self.backend.stop(name)
                self.backend.delete(name)
        self.request = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._sock_dir:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None
