"""The local backend's per-job supervisor: ``python _supervisor.py JOB_DIR``.

Run as a script (standard library only, so it starts fast and does not depend on
the rest of hotwire being importable). It starts every replica listed in
``JOB_DIR/replicas.json`` as a process in its own session, with the replica's
command, environment, working directory and limits, logs to
``JOB_DIR/logs/<pod>.log``, and keeps ``JOB_DIR/status.json`` up to date.

Semantics are those of a Kubernetes Indexed Job with ``backoffLimit: 0``: the
job succeeds when every non-daemon replica exits 0, fails as soon as one exits
non-zero (the others are stopped), and daemon replicas (TensorFlow ps tasks) are
stopped once the others have ended. SIGTERM stops the job; so does the death
of the process that started it, when its pid is given as a second argument. Replicas die with
the supervisor (``PR_SET_PDEATHSIG``), so a killed supervisor leaves no orphans.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

POLL = 0.05
GRACE = 5.0


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _own_cgroup_v1(controller: str) -> Path | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrls, path = line.split(":", 2)
            if controller in ctrls.split(","):
                base = Path(f"/sys/fs/cgroup/{controller}") / path.lstrip("/")
                return base if (base / "cgroup.procs").exists() else None
    except OSError:
        return None
    return None


def _own_cgroup_v2() -> Path | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                root = Path("/sys/fs/cgroup")
                if not (root / "cgroup.controllers").exists():
                    return None  # hybrid or v1 host: the unified tree has no controllers here
                base = root / line[3:].lstrip("/")
                ctrls = (base / "cgroup.subtree_control").read_text().split()
                return base if "memory" in ctrls else None
    except OSError:
        return None
    return None


def make_cgroup(name: str, memory: int | None) -> tuple[Path | None, str]:
    """A memory cgroup for one replica, or (None, reason). Never raises."""
    if memory is None:
        return None, "none"
    try:
        v2 = _own_cgroup_v2()
        if v2 is not None:
            cg = v2 / name
            cg.mkdir(exist_ok=True)
            (cg / "memory.max").write_text(str(memory))
            with contextlib.suppress(OSError):
                (cg / "memory.swap.max").write_text("0")
            return cg, "cgroup-v2"
        v1 = _own_cgroup_v1("memory")
        if v1 is not None:
            cg = v1 / name
            cg.mkdir(exist_ok=True)
            (cg / "memory.limit_in_bytes").write_text(str(memory))
            return cg, "cgroup-v1"
    except OSError as e:
        return None, f"rlimit-as (no cgroup: {e.strerror})"
    return None, "rlimit-as (no writable memory cgroup)"


def _preexec(cgroup: Path | None, memory: int | None, cpus: list[int] | None):
    def run() -> None:
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))
        elif memory is not None:
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            lim = memory if hard == resource.RLIM_INFINITY else min(memory, hard)
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        if cpus:
            os.sched_setaffinity(0, cpus)
        # no core files from a crashing replica
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return run


class Supervisor:
    def __init__(self, job_dir: Path, parent: int | None = None) -> None:
        self.dir = job_dir
        self.parent = parent
        spec = json.loads((job_dir / "replicas.json").read_text())
        self.replicas: list[dict[str, Any]] = spec["replicas"]
        self.deadline = spec.get("timeout")
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * len(self.replicas)
        self.states = ["pending"] * len(self.replicas)
        self.codes: list[int | None] = [None] * len(self.replicas)
        self.cgroups: list[Path | None] = [None] * len(self.replicas)
        self.limits: list[str] = ["none"] * len(self.replicas)
        self.state = "pending"
        self.message = ""
        self.started = time.time()
        self.finished: float | None = None
        self.stopping = False

    def write(self) -> None:
        _write_json(
            self.dir / "status.json",
            {
                "state": self.state,
                "message": self.message,
                "started": self.started,
                "finished": self.finished,
                "supervisor_pid": os.getpid(),
                "replicas": [
                    {
                        "pod": r["pod"],
                        "pid": p.pid if p else None,
                        "state": s,
                        "exit_code": c,
                        "daemon": r.get("daemon", False),
                        "memory_limit": lim,
                    }
                    for r, p, s, c, lim in zip(
                        self.replicas, self.procs, self.states, self.codes, self.limits, strict=True
                    )
                ],
            },
        )

    def start(self) -> None:
        all_cpus = sorted(os.sched_getaffinity(0))
        (self.dir / "logs").mkdir(exist_ok=True)
        for i, r in enumerate(self.replicas):
            env = dict(os.environ)
            env.pop("HOTWIRE_SUPERVISOR", None)
            env.update(r["env"])
            cpus = None
            if r.get("cpu"):
                k = min(len(all_cpus), max(1, math.ceil(r["cpu"])))
                cpus = [all_cpus[(i * k + j) % len(all_cpus)] for j in range(k)]
                env.setdefault("OMP_NUM_THREADS", str(k))
            cg, how = make_cgroup(f"hotwire-{r['pod']}-{os.getpid()}", r.get("memory"))
            self.cgroups[i], self.limits[i] = cg, how
            log = open(self.dir / "logs" / f"{r['pod']}.log", "ab")
            try:
                self.procs[i] = subprocess.Popen(
                    r["command"],
                    env=env,
                    cwd=r.get("cwd") or None,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_preexec(cg, r.get("memory"), cpus),
                )
                self.states[i] = "running"
            except (OSError, subprocess.SubprocessError) as e:
                self.states[i] = "failed"
                self.codes[i] = 127
                log.write(f"hotwire: cannot start {r['command'][0]!r}: {e}\n".encode())
                self.message = f"replica {r['pod']} could not start: {e}"
            finally:
                log.close()
        self.state = "failed" if "failed" in self.states else "running"
        self.write()

    def terminate_all(self, why: str) -> None:
        live = [(i, p) for i, p in enumerate(self.procs) if p is not None and p.poll() is None]
        for _, p in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        end = time.monotonic() + GRACE
        for _, p in live:
            try:
                p.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for i, p in live:
            self.codes[i] = p.returncode
            self.states[i] = why
        # whatever the replicas left in their sessions goes too
        for p in self.procs:
            if p is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self.start()
        if self.state == "failed":
            self.terminate_all("stopped")
            self.finished = time.time()
        while self.state == "running":
            changed = False
            for i, p in enumerate(self.procs):
                if p is not None and self.states[i] == "running" and p.poll() is not None:
                    self.codes[i] = p.returncode
                    self.states[i] = "succeeded" if p.returncode == 0 else "failed"
                    changed = True
            if "failed" in self.states:
                bad = [
                    r["pod"]
                    for r, s in zip(self.replicas, self.states, strict=True)
                    if s == "failed"
                ]
                self.terminate_all("stopped")
                self.state, self.message = "failed", f"replica {', '.join(bad)} failed"
            elif all(
                s == "succeeded"
                for r, s in zip(self.replicas, self.states, strict=True)
                if not r.get("daemon")
            ):
                self.terminate_all("stopped")
                self.state = "succeeded"
            elif self.stopping:
                self.terminate_all("stopped")
                self.state, self.message = "stopped", "stopped on request"
            elif self.parent is not None and os.getppid() != self.parent:
                self.terminate_all("stopped")
                self.state = "failed"
                self.message = f"the process that started the job (pid {self.parent}) is gone"
            elif self.deadline and time.time() - self.started > self.deadline:
                self.terminate_all("stopped")
                self.state = "failed"
                self.message = f"DeadlineExceeded: ran longer than {self.deadline:g}s"
            if self.state != "running":
                self.finished = time.time()
                changed = True
            if changed:
                self.write()
            time.sleep(POLL)
        for cg in self.cgroups:
            if cg is not None:
                with contextlib.suppress(OSError):
                    cg.rmdir()
        self.write()
        return 0 if self.state == "succeeded" else 1

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True


if __name__ == "__main__":
    parent = int(sys.argv[2]) if len(sys.argv) > 2 else None
    sys.exit(Supervisor(Path(sys.argv[1]), parent).run())
