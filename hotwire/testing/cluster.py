"""A real local cluster for tests and benchmarks: a master and workers as processes.

Every process binds port 0 on loopback and reports its address; the cluster
stops every process it started. Faults are real: :meth:`LocalCluster.kill_worker`
sends SIGKILL, :meth:`LocalCluster.pause_worker` and :meth:`LocalCluster.resume_worker`
send SIGSTOP and SIGCONT (a worker frozen for a while, as by a long pause of its
host), :meth:`LocalCluster.partition_worker` and :meth:`LocalCluster.heal_worker`
cut and restore a worker's connections to the master (with ``control_proxy=True``
each worker reaches the master through a TCP proxy of its own; the data plane
between workers is not cut), :meth:`LocalCluster.restart_master` stops and starts
the master on the same data directory and port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hotwire.client import Client
from hotwire.testing.proxy import TcpProxy

__all__ = ["LocalCluster", "poll_for", "streamctl", "write_app"]


def poll_for(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> Any:
    """Wait until ``predicate()`` is truthy and return it; raise TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        time.sleep(interval)


async def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition"
) -> Any:
    """:func:`poll_for` for code on an event loop: the loop runs while it waits."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.02)


def write_app(directory: str | Path, name: str, body: str) -> str:
    """Write an app file (dedented) into ``directory`` and return its path."""
    import textwrap

    path = Path(directory) / name
    path.write_text(textwrap.dedent(body).lstrip())
    return str(path)


def upgrade_under_load(client: Client, app: str, out: str | Path, n: int) -> Any:
    """Upgrade to ``app`` once a quarter of the ``n`` records an app writes to the
    sink file ``out`` are there; check that it applied while records still flowed.
    The reply; the caller waits for the rest of the records."""
    from hotwire.testing.sources import count_lines

    poll_for(lambda: count_lines(out) > n // 4, 20, what="records before the upgrade")
    r = client.upgrade(app)
    assert r.applied, r
    assert count_lines(out) < n, "the upgrade must happen while records flow"
    return r


def scrape_metrics(addr: str, timeout: float = 5) -> dict[str, Any]:
    """The metric families a node's plain-HTTP endpoint at ``addr`` (``HOST:PORT``)
    serves, by name, parsed by prometheus_client's parser."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def streamctl(
    *args: str, master: str | None = None, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real ``streamctl`` command line (``python -m hotwire.cli``)."""
    cmd = [sys.executable, "-m", "hotwire.cli"]
    if master:
        cmd += ["--master", master]
    return subprocess.run(
        [*cmd, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


class _Proc:
    def __init__(self, label: str, args: list[str], log_path: Path, pattern: str):
        self.label = label
        self.args = args
        self.log_path = log_path
        self.pattern = re.compile(pattern)
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.address = ""
        self.paused = False

    def wait_address(self, timeout: float = 30) -> str:
        def found() -> str | None:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.label} exited with {self.proc.returncode}:\n"
                    f"{self.log_path.read_text()[-3000:]}"
                )
            m = self.pattern.search(self.log_path.read_text(errors="replace"))
            return m.group(1) if m else None

        self.address = poll_for(found, timeout, what=f"{self.label} to start")
        return self.address

    def pause(self) -> None:
        """SIGSTOP: every thread of the process stands still until :meth:`resume`."""
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            if self.paused and sig != signal.SIGKILL:
                self.resume()  # a stopped process acts on the signal once it runs again
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


class LocalCluster:
    """Master + N workers as real processes on loopback ports."""

    def __init__(
        self,
        workers: int = 2,
        slots: int = 16,
        data_dir: str | Path | None = None,
        heartbeat_timeout: float = 5.0,
        log_level: str = "info",
        switch_timeout: float = 30.0,
        proxy_data: bool = False,
        data_delay: float = 0.0,
        link_timeout: float | None = None,
        checkpoint_interval: float = 2.0,
        control_proxy: bool = False,
        secure: bool = False,
        metrics: bool = False,
        log_format: str = "text",
        dashboard: bool = False,
    ):
        self._tmp = (
            tempfile.TemporaryDirectory(prefix="hotwire-cluster-") if data_dir is None else None
        )
        self.dir = Path(data_dir or (self._tmp.name if self._tmp else "."))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n_workers = workers
        self.slots = slots
        self.heartbeat_timeout = heartbeat_timeout
        self.switch_timeout = switch_timeout
        self.checkpoint_interval = checkpoint_interval
        self.log_level = log_level
        self.master: _Proc | None = None
        self.workers: list[_Proc] = []
        self._client: Client | None = None
        self._restarts = 0
        # proxy_data: each worker's data port sits behind a TcpProxy the test controls
        # (the worker advertises the proxy), so links between workers can be cut.
        self.proxy_data = proxy_data
        self.data_delay = data_delay
        self.link_timeout = link_timeout
        self.data_proxies: dict[str, TcpProxy] = {}
        # each worker reaches the master through a TcpProxy the test can block
        self.control_proxy = control_proxy
        self.proxies: dict[str, TcpProxy] = {}
        # secure: a cluster CA, mTLS everywhere, and the client holds an admin token
        self.secure = secure
        self.admin: Any = None  # hotwire.master.access.Bootstrap when secure
        # metrics: master and workers serve Prometheus metrics on a free port each
        # (metrics_addresses: process label -> HOST:PORT); log_format: "text" or "json"
        self.metrics = metrics
        self.log_format = log_format
        self.metrics_addresses: dict[str, str] = {}
        # dashboard: the master serves its web dashboard on a free port (dashboard_address)
        self.dashboard = dashboard
        self.dashboard_address = ""

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> LocalCluster:
        try:
            if self.secure and self.admin is None:
                from hotwire.master.access import bootstrap

                self.admin = bootstrap(self.dir / "master")
            self._start_master("127.0.0.1:0")
            for i in range(self.n_workers):
                self.add_worker(f"w{i + 1}")
            poll_for(lambda: self.live_workers() >= self.n_workers, 30, what="workers to register")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_master(self, listen: str) -> None:
        self._restarts += 1
        self.master = _Proc(
            "master",
            self._process_args(
                "master",
                [
                    sys.executable,
                    "-m",
                    "hotwire.cli",
                    "master",
                    "--listen",
                    listen,
                    "--data-dir",
                    str(self.dir / "master"),
                    "--log-level",
                    self.log_level,
                    "--heartbeat-timeout",
                    str(self.heartbeat_timeout),
                    "--switch-timeout",
                    str(self.switch_timeout),
                    "--checkpoint-interval",
                    str(self.checkpoint_interval),
                    *self._observability_args(),
                    *(["--dashboard", "127.0.0.1:0"] if self.dashboard else []),
                ],
            ),
            self.dir / f"master.{self._restarts}.log",
            r"master listening on ([^\s\"]+)",
        )
        self.master.wait_address()
        self._wait_metrics(self.master, r"master metrics on ([^\s\"]+)")
        if self.dashboard:
            found = re.compile(r"master dashboard on ([^\s\"]+)")
            log = self.master.log_path

            def dashboard() -> str | None:
                m = found.search(log.read_text(errors="replace"))
                return m.group(1) if m else None

            self.dashboard_address = poll_for(dashboard, 30, what="the master's dashboard")
        if self._client is not None:
            self._client.close()
        self._client = Client(self.address, self.credentials())

    def _observability_args(self) -> list[str]:
        out = ["--log-format", self.log_format] if self.log_format != "text" else []
        return [*out, "--metrics", "127.0.0.1:0"] if self.metrics else out

    def _wait_metrics(self, p: _Proc, pattern: str) -> None:
        """With ``metrics``: wait for ``p`` to log its metrics address."""
        if not self.metrics:
            return
        found = re.compile(pattern)

        def address() -> str | None:
            m = found.search(p.log_path.read_text(errors="replace"))
            return m.group(1) if m else None

        self.metrics_addresses[p.label] = poll_for(address, 30, what=f"{p.label}'s metrics")

    def _process_args(self, host: str, args: list[str]) -> list[str]:
        """The command line of the master (``host`` "master") or a worker; a subclass
        may run it elsewhere (:class:`hotwire.testing.netns.NetnsCluster`)."""
        return args

    def credentials(self, token: str | None = None) -> Any:
        """Client credentials for this cluster: the admin's (or ``token``) when secure."""
        from hotwire.security.tls import ClientCredentials, TlsFiles

        if self.admin is None:
            return ClientCredentials()
        files = TlsFiles.of(self.admin.ca, self.admin.client_cert, self.admin.client_key)
        return ClientCredentials(files, self.admin.token if token is None else token)

    def worker_tls(self, name: str) -> list[str]:
        """streamctl arguments giving worker ``name`` a certificate (when secure)."""
        if self.admin is None:
            return []
        from hotwire.security import pki

        issued = pki.issue(self.admin.tls_dir, "worker", name, self.dir / "certs")
        return ["--worker-cert", str(issued.cert), "--worker-key", str(issued.key)]

    def add_worker(self, name: str) -> _Proc:
        extra: list[str] = []
        proxy = None
        if self.proxy_data:
            proxy = self.data_proxies[name] = TcpProxy(delay=self.data_delay).start()
            extra += ["--advertise", proxy.address]
        if self.link_timeout is not None:
            extra += ["--link-timeout", str(self.link_timeout)]
        master = self.address
        if self.control_proxy:
            control = self.proxies[name] = TcpProxy(self.address).start()
            master = control.address
        p = _Proc(
            name,
            self._process_args(
                name,
                [
                    sys.executable,
                    "-m",
                    "hotwire.cli",
                    "--master",
                    master,
                    *(["--ca", str(self.admin.ca)] if self.admin is not None else []),
                    "worker",
                    "--name",
                    name,
                    *self.worker_tls(name),
                    "--slots",
                    str(self.slots),
                    "--log-level",
                    self.log_level,
                    "--data-dir",
                    str(self.dir / name),
                    *self._observability_args(),
                    *extra,
                ],
            ),
            self.dir / f"{name}.log",
            r"data plane on ([^\s\"]+)",
        )
        self.workers.append(p)
        p.wait_address()
        self._wait_metrics(p, r"metrics on ([^\s\"]+)")
        if proxy is not None:
            proxy.target = p.address
        return p

    def stop(self) -> None:
        # The master first: a worker stopping then does not try to drain to the others.
        if self.master is not None:
            self.master.stop()
        for w in self.workers:
            w.stop()
        for dp in self.data_proxies.values():
            dp.stop()
        for proxy in self.proxies.values():
            proxy.stop()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults ------------------------------------------------------------
    def kill_worker(self, name: str) -> None:
        for w in self.workers:
            if w.label == name:
                w.stop(signal.SIGKILL)

    def worker(self, name: str) -> _Proc:
        """The process of the worker called ``name``."""
        for w in self.workers:
            if w.label == name:
                return w
        raise KeyError(f"no worker named {name!r} in this cluster")

    def pause_worker(self, name: str) -> None:
        """Freeze a worker with SIGSTOP: no heartbeat, no record, no answer until resumed."""
        self.worker(name).pause()

    def resume_worker(self, name: str) -> None:
        """SIGCONT a worker frozen by :meth:`pause_worker`."""
        self.worker(name).resume()

    def partition_worker(self, name: str) -> None:
        """Cut ``name`` off the master (needs ``control_proxy=True``); its data plane stays."""
        self.proxies[name].block()

    def heal_worker(self, name: str) -> None:
        """End a :meth:`partition_worker`: the worker reaches the master again."""
        self.proxies[name].unblock()

    def cut_links(self) -> int:
        """Reset every data-plane connection between workers (needs ``proxy_data``);
        return how many were open."""
        return sum(dp.cut() for dp in self.data_proxies.values())

    def block_links(self) -> int:
        """Cut the links and keep the workers from reaching each other until
        :meth:`unblock_links`; their heartbeats to the master go on."""
        return sum(dp.block() for dp in self.data_proxies.values())

    def unblock_links(self) -> None:
        for dp in self.data_proxies.values():
            dp.unblock()

    def restart_master(self, down_s: float = 0.0) -> None:
        assert self.master is not None
        addr = self.address
        self.master.stop()
        time.sleep(down_s)
        self._start_master(addr)

    def stop_master(self) -> None:
        assert self.master is not None
        self.master.stop()

    def kill_master(self) -> None:
        """SIGKILL the master (no clean shutdown); :meth:`restart_master` starts it again."""
        assert self.master is not None
        self.master.stop(signal.SIGKILL)

    def restart_worker(self, name: str) -> _Proc:
        """Start worker ``name`` again after it was killed (or died): a new process with
        the same name and data directory, behind new proxies if the cluster has them.
        The log of its earlier run is kept as ``{name}.{k}.log``."""
        old = [w for w in self.workers if w.label == name]
        if not old:
            raise KeyError(f"no worker named {name!r} in this cluster")
        running = [w.proc.pid for w in old if w.proc.poll() is None]
        if running:
            raise RuntimeError(f"worker {name!r} still runs (pid {running[0]}); kill it first")
        for w in old:
            w.stop()  # closes its log
        self.workers = [w for w in self.workers if w.label != name]
        data_proxy = getattr(self, "data_proxies", {}).pop(name, None)  # with proxy_data
        if data_proxy is not None:
            data_proxy.stop()
        control = self.proxies.pop(name, None)
        if control is not None:
            control.stop()
        log = self.dir / f"{name}.log"
        if log.exists():  # the new process must not find the old one's address in it
            log.rename(self.dir / f"{name}.{len(list(self.dir.glob(f'{name}.*.log'))) + 1}.log")
        return self.add_worker(name)

    # -- access ------------------------------------------------------------
    @property
    def address(self) -> str:
        assert self.master is not None
        return self.master.address

    @property
    def client(self) -> Client:
        assert self._client is not None
        return self._client

    def live_workers(self) -> int:
        try:
            return sum(w.alive for w in self.client.workers().workers)
        except Exception:
            return 0

    def streamctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return streamctl(*args, master=self.address, timeout=timeout)

    def logs(self) -> str:
        out = []
        for p in sorted(self.dir.glob("*.log")):
            out.append(f"==== {p.name}\n{p.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)


@contextlib.contextmanager
def watched(c: LocalCluster) -> Iterator[LocalCluster]:
    """Start ``c``, yield it, stop it; fail if one of its processes died meanwhile
    (for a cluster shared by the tests of a module)."""
    c.start()
    try:
        yield c
    finally:
        died = [
            p.label for p in [c.master, *c.workers] if p is not None and p.proc.poll() is not None
        ]
        c.stop()
        assert not died, f"processes died during the tests: {died}"
