"""A real local cluster for tests and benchmarks: a master and workers as processes.

Every process binds port 0 on loopback and reports its address; the cluster
stops every process it started. Faults are real: :meth:`LocalCluster.kill_worker`
sends SIGKILL, :meth:`LocalCluster.restart_master` stops and starts the master
on the same data directory and port.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hotwire.client import Client

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


def write_app(directory: str | Path, name: str, body: str) -> str:
    """Write an app file (dedented) into ``directory`` and return its path."""
    import textwrap

    path = Path(directory) / name
    path.write_text(textwrap.dedent(body).lstrip())
    return str(path)


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

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
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
        checkpoint_interval: float = 2.0,
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

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> LocalCluster:
        try:
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
            ],
            self.dir / f"master.{self._restarts}.log",
            r"master listening on (\S+)",
        )
        self.master.wait_address()
        if self._client is not None:
            self._client.close()
        self._client = Client(self.address)

    def add_worker(self, name: str) -> _Proc:
        p = _Proc(
            name,
            [
                sys.executable,
                "-m",
                "hotwire.cli",
                "--master",
                self.address,
                "worker",
                "--name",
                name,
                "--slots",
                str(self.slots),
                "--log-level",
                self.log_level,
                "--data-dir",
                str(self.dir / name),
            ],
            self.dir / f"{name}.log",
            r"data plane on (\S+)",
        )
        self.workers.append(p)
        p.wait_address()
        return p

    def stop(self) -> None:
        # The master first: a worker stopping then does not try to drain to the others.
        if self.master is not None:
            self.master.stop()
        for w in self.workers:
            w.stop()
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

    def restart_master(self, down_s: float = 0.0) -> None:
        assert self.master is not None
        addr = self.address
        self.master.stop()
        time.sleep(down_s)
        self._start_master(addr)

    def stop_master(self) -> None:
        assert self.master is not None
        self.master.stop()

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
