"""The ``local`` backend: each replica a process on this machine.

A job lives in a directory under the state directory (``$HOTWIRE_JOBS_STATE``,
else ``$XDG_STATE_HOME/hotwire/jobs``, else ``~/.local/state/hotwire/jobs``):
``job.yaml`` (the rendered file), ``replicas.json`` (what to run),
``status.json`` and ``logs/``. A detached supervisor process
(:mod:`hotwire.jobs.backends._supervisor`) runs the replicas, so a job outlives
the command that submitted it and ``streamctl jobs status|stop`` work from
another shell.

Limits: ``resources.memory`` becomes a memory cgroup per replica where one can
be created (cgroup v2 with the memory controller delegated, or cgroup v1),
else ``RLIMIT_AS`` (address space, a rougher bound); ``resources.cpu`` becomes
a CPU affinity of ceil(cpu) cores and ``OMP_NUM_THREADS``; ``timeout`` becomes
a deadline. GPUs are not isolated.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from hotwire.jobs.backends.base import (
    Backend,
    BackendError,
    JobStatus,
    ReplicaStatus,
    state_path,
)
from hotwire.jobs.errors import JobNotFound
from hotwire.jobs.podspec import replicas_of
from hotwire.jobs.render import RenderedJob
from hotwire.names import PathEscape, confined

SUPERVISOR = Path(__file__).with_name("_supervisor.py")
STATE_ENV = "HOTWIRE_JOBS_STATE"


def default_state_dir() -> Path:
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "hotwire" / "jobs"


def _alive(pid: int | None, marker: str) -> bool:
    """Whether ``pid`` is a live (not zombie) process whose command line holds ``marker``."""
    if not pid:
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return marker in cmd and stat.rsplit(")", 1)[1].split()[0] != "Z"


class LocalBackend(Backend):
    name = "local"

    def __init__(self, state_dir: str | Path | None = None, bind_to_parent: bool = False) -> None:
        """``bind_to_parent``: the job ends when this process ends (what a DL PE wants;
        not what ``streamctl jobs submit`` wants)."""
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.bind_to_parent = bind_to_parent
        # supervisors this object started: reaped here so they do not linger as zombies
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    @classmethod
    def unavailable(cls) -> str | None:
        if not sys.platform.startswith("linux"):
            return f"the local backend needs Linux (/proc, process groups); this is {sys.platform}"
        return None

    def _dir(self, name: str) -> Path:
        return state_path(self.state_dir, name)

    def submit(self, job: RenderedJob) -> JobStatus:
        d = self._dir(job.name)
        if d.exists():
            with contextlib.suppress(JobNotFound):
                if not self.status(job.name).done:
                    raise BackendError(
                        f"local job {job.name!r} is already running; stop it first "
                        f"(streamctl jobs stop {job.name})"
                    )
            shutil.rmtree(d)
        d.mkdir(parents=True, mode=0o700)  # job.yaml holds the job's secret
        replicas = [
            {
                "pod": r.pod_name,
                "command": list(r.command),
                "env": r.env_dict,
                "cwd": r.working_dir,
                "cpu": r.cpu,
                "memory": r.memory,
                "daemon": r.daemon,
            }
            for r in replicas_of(job.documents)
        ]
        for r in replicas:  # the supervisor writes logs/<pod>.log
            try:
                confined(d / "logs", f"{r['pod']}.log")
            except PathEscape as e:
                raise BackendError(f"local job {job.name!r}: replica {r['pod']!r}: {e}") from None
        (d / "job.yaml").write_text(job.text)
        (d / "replicas.json").write_text(
            json.dumps(
                {"name": job.name, "timeout": job.request.timeout, "replicas": replicas}, indent=1
            )
        )
        log = open(d / "supervisor.log", "ab")
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(SUPERVISOR),
                    str(d),
                    *([str(os.getpid())] if self.bind_to_parent else []),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            log.close()
        self._children[job.name] = proc
        (d / "supervisor.pid").write_text(str(proc.pid))
        end = time.monotonic() + 30
        while not (d / "status.json").exists():
            if proc.poll() is not None:
                out = (d / "supervisor.log").read_text()[-2000:]
                raise BackendError(f"local job {job.name!r}: the supervisor exited at once: {out}")
            if time.monotonic() > end:
                raise BackendError(f"local job {job.name!r}: the supervisor did not start in 30s")
            time.sleep(0.02)
        return self.status(job.name)

    def _read(self, name: str) -> dict | None:
        try:
            return json.loads((self._dir(name) / "status.json").read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # being replaced: read again

    def status(self, name: str) -> JobStatus:
        d = self._dir(name)
        if not (d / "replicas.json").exists():
            raise JobNotFound(
                f"no local job {name!r} under {self.state_dir}; "
                "see 'streamctl jobs status' for the jobs there"
            )
        child = self._children.get(name)
        if child is not None and child.poll() is not None:
            self._children.pop(name, None)
        st = None
        for _ in range(20):
            st = self._read(name)
            if st is not None:
                break
            time.sleep(0.01)
        if st is None:
            return JobStatus(name, self.name, "pending")
        state, message = st["state"], st.get("message", "")
        if state in ("pending", "running") and not _alive(st.get("supervisor_pid"), str(d)):
            st = self._read(name) or st  # it may have just finished
            state, message = st["state"], st.get("message", "")
            if state in ("pending", "running"):
                state, message = "failed", "the supervisor process is gone (killed?)"
        reps = tuple(
            ReplicaStatus(r["pod"], r["state"], r.get("exit_code")) for r in st.get("replicas", [])
        )
        extra = {
            "started": st.get("started"),
            "finished": st.get("finished"),
            "dir": str(d),
            "limits": {r["pod"]: r.get("memory_limit") for r in st.get("replicas", [])},
        }
        return JobStatus(name, self.name, state, reps, message, extra)

    def list(self) -> list[JobStatus]:
        if not self.state_dir.is_dir():
            return []
        out = []
        for d in sorted(self.state_dir.iterdir()):
            if (d / "replicas.json").exists():
                with contextlib.suppress(JobNotFound):
                    out.append(self.status(d.name))
        return out

    def stop(self, name: str, timeout: float = 15.0) -> JobStatus:
        d = self._dir(name)
        st = self.status(name)
        if st.done:
            self._reap(name)
            return st
        pid = int((d / "supervisor.pid").read_text())
        if _alive(pid, str(d)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + timeout
        while _alive(pid, str(d)) and time.monotonic() < end:
            time.sleep(0.02)
        if _alive(pid, str(d)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # replicas die with it (PDEATHSIG)
        self._reap(name)
        raw = self._read(name) or {}
        for r in raw.get("replicas", []):  # belt and braces: nothing of the job survives
            if r.get("pid"):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(r["pid"], signal.SIGKILL)
        return self.status(name)

    def _reap(self, name: str) -> None:
        child = self._children.pop(name, None)
        if child is not None:
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def logs(self, name: str) -> dict[str, str]:
        self.status(name)
        logs = self._dir(name) / "logs"
        return {p.stem: p.read_text(errors="replace") for p in sorted(logs.glob("*.log"))}

    def delete(self, name: str) -> None:
        st = self.status(name)
        if not st.done:
            st = self.stop(name)
        shutil.rmtree(self._dir(name), ignore_errors=True)
