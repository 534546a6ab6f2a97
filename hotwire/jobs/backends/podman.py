"""The ``podman`` backend: each replica a daemonless container (``podman run``).

The rendered Job's pod template is run once per completion index with
``podman run -d``: its image, command (as the entrypoint), environment,
working directory, hostPath volumes (bind mounts), cpu and memory limits and
GPUs (CDI ``nvidia.com/gpu=all``). Replicas share the host network, so
distributed jobs rendezvous on 127.0.0.1 at ports picked at render time.

Hosts differ: without systemd podman must use the cgroupfs manager and file
events; on hosts with cgroup v1 or hybrid hierarchies crun is unreliable, so
runc is selected; and podman's default ulimits (nofile 1048576) exceed the hard
limits of many sandboxes, so ulimits are set within the current hard limits.

Containers carry the label ``hotwire.io/job``; a small record per job under
the state directory remembers its replicas, deadline and whether it was
stopped on request.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from hotwire.jobs.backends.base import (
    Backend,
    BackendError,
    JobStatus,
    ReplicaStatus,
    state_path,
)
from hotwire.jobs.backends.local import default_state_dir
from hotwire.jobs.errors import JobNotFound
from hotwire.jobs.podspec import replicas_of
from hotwire.jobs.render import RenderedJob

JOB_LABEL = "hotwire.io/job"
# podman itself caps RLIMIT_NPROC for conmon at 32768; a container cannot get more.
PODMAN_NPROC_CAP = 32768
PODMAN_NOFILE_CAP = 1048576


def cgroup_layout() -> str:
    """``"v2"`` (unified), ``"hybrid"`` (v1 controllers plus a unified tree) or ``"v1"``."""
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():
        return "v2"
    if (root / "unified").is_dir():
        return "hybrid"
    return "v1"


def ulimit_args() -> list[str]:
    """``--ulimit`` flags within this process's hard limits (and podman's own caps)."""
    out = []
    for flag, res, cap in (
        ("nofile", resource.RLIMIT_NOFILE, PODMAN_NOFILE_CAP),
        ("nproc", resource.RLIMIT_NPROC, PODMAN_NPROC_CAP),
    ):
        _, hard = resource.getrlimit(res)
        n = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
        out += ["--ulimit", f"{flag}={n}:{n}"]
    return out


class PodmanBackend(Backend):
    name = "podman"

    def __init__(self, state_dir: str | Path | None = None, podman: str = "podman") -> None:
        self.podman = shutil.which(podman) or podman
        base = Path(state_dir) if state_dir else default_state_dir().parent / "podman"
        self.state_dir = base
        self.global_args = []
        if not Path("/run/systemd/system").is_dir():
            self.global_args += ["--cgroup-manager=cgroupfs", "--events-backend=file"]
        if cgroup_layout() != "v2":
            self.global_args += ["--runtime", shutil.which("runc") or "runc"]

    @classmethod
    def unavailable(cls) -> str | None:
        if not shutil.which("podman"):
            return "podman is not installed (apt-get install -y podman runc)"
        if cgroup_layout() != "v2" and not shutil.which("runc"):
            return (
                f"this host has {cgroup_layout()} cgroup hierarchies, where podman needs "
                "runc, and runc is not installed (apt-get install -y runc)"
            )
        return None

    # -- helpers -------------------------------------------------------------------------

    def _run(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        cmd = [self.podman, *self.global_args, *args]
        p = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if check and p.returncode != 0:
            err = " ".join((p.stderr or p.stdout).split())[-800:]
            raise BackendError(f"podman {args[0]} failed (exit {p.returncode}): {err}")
        return p

    def _record_path(self, name: str) -> Path:
        return state_path(self.state_dir, name, ".json")

    def _record(self, name: str) -> dict[str, Any]:
        try:
            return json.loads(self._record_path(name).read_text())  # type: ignore[no-any-return]
        except FileNotFoundError:
            raise JobNotFound(
                f"no podman job {name!r} started by hotwire (records in {self.state_dir})"
            ) from None

    def _write_record(self, name: str, rec: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._record_path(name).with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        os.replace(tmp, self._record_path(name))

    def _containers(self, name: str) -> dict[str, dict[str, Any]]:
        p = self._run("ps", "-a", "--filter", f"label={JOB_LABEL}={name}", "--format", "json")
        out = {}
        for c in json.loads(p.stdout or "[]"):
            names = c.get("Names") or []
            out[names[0] if names else c["Id"][:12]] = c
        return out

    # -- Backend -------------------------------------------------------------------------

    def run_args(self, job: RenderedJob) -> list[list[str]]:
        """The ``podman run`` argument lists of every replica (no I/O)."""
        runs = []
        for r in replicas_of(job.documents):
            a = [
                "run",
                "-d",
                "--name",
                r.pod_name,
                "--label",
                f"{JOB_LABEL}={job.name}",
                "--label",
                f"hotwire.io/replica={r.pod_name}",
                "--network",
                "host",
                *ulimit_args(),
            ]
            if r.memory:
                a += ["--memory", str(r.memory)]
            if r.cpu:
                a += ["--cpus", f"{r.cpu:g}"]
            if r.gpu:
                a += ["--device", "nvidia.com/gpu=all"]
            for k, v in r.env:
                a += ["--env", f"{k}={v}"]
            for host, mount, ro in r.volumes:
                a += ["--volume", f"{host}:{mount}{':ro' if ro else ''}"]
            if r.working_dir:
                a += ["--workdir", r.working_dir]
            a += ["--entrypoint", json.dumps(list(r.command)), r.image]
            runs.append(a)
        return runs

    def submit(self, job: RenderedJob) -> JobStatus:
        with contextlib.suppress(JobNotFound):
            if not self.status(job.name).done:
                raise BackendError(f"podman job {job.name!r} is already running; stop it first")
            self.delete(job.name)
        reps = replicas_of(job.documents)
        rec = {
            "name": job.name,
            "replicas": [r.pod_name for r in reps],
            "daemons": [r.pod_name for r in reps if r.daemon],
            "deadline": time.time() + job.request.timeout if job.request.timeout else None,
            "stopped": False,
            "message": "",
        }
        self._write_record(job.name, rec)
        for args in self.run_args(job):
            try:
                self._run(*args)
            except BackendError as e:
                rec["message"] = str(e)
                self._write_record(job.name, rec)
                self._stop_all(job.name)
                raise
        return self.status(job.name)

    def _stop_all(self, name: str, timeout: int = 5) -> None:
        cs = self._containers(name)
        live = [n for n, c in cs.items() if c.get("State") in ("running", "created", "paused")]
        if live:
            self._run("stop", "-t", str(timeout), *live, check=False, timeout=timeout + 60)

    def status(self, name: str) -> JobStatus:
        rec = self._record(name)
        cs = self._containers(name)
        reps = []
        for pod in rec["replicas"]:
            c = cs.get(pod)
            if c is None:
                reps.append(ReplicaStatus(pod, "unknown" if rec.get("message") else "pending"))
                continue
            state = c.get("State", "unknown")
            if state in ("running", "created", "configured", "initialized", "paused"):
                reps.append(ReplicaStatus(pod, "pending" if state != "running" else "running"))
            elif state in ("exited", "stopped"):
                code = int(c.get("ExitCode", -1))
                reps.append(ReplicaStatus(pod, "succeeded" if code == 0 else "failed", code))
            else:
                reps.append(ReplicaStatus(pod, "unknown"))
        main = [r for r in reps if r.name not in rec["daemons"]]
        state, message = "running", rec.get("message", "")
        if rec.get("stopped"):
            state, message = "stopped", "stopped on request"
        elif any(r.state == "failed" for r in main) or (message and not cs):
            bad = [r.name for r in main if r.state == "failed"]
            state = "failed"
            message = message or f"replica {', '.join(bad)} failed"
        elif main and all(r.state == "succeeded" for r in main):
            state = "succeeded"
        elif rec.get("deadline") and time.time() > rec["deadline"]:
            state, message = "failed", "DeadlineExceeded"
        elif all(r.state == "pending" for r in reps):
            state = "pending"
        if state in ("failed", "succeeded") and any(
            r.state in ("running", "pending") for r in reps
        ):
            self._stop_all(name)  # what the job no longer needs (peers, ps tasks)
            if state == "failed" and not rec.get("message"):
                rec["message"] = message
                self._write_record(name, rec)
            return self.status(name)
        return JobStatus(name, self.name, state, tuple(reps), message)

    def list(self) -> list[JobStatus]:
        if not self.state_dir.is_dir():
            return []
        out = []
        for p in sorted(self.state_dir.glob("*.json")):
            with contextlib.suppress(JobNotFound):
                out.append(self.status(p.stem))
        return out

    def stop(self, name: str) -> JobStatus:
        rec = self._record(name)
        if not self.status(name).done:
            rec["stopped"] = True
            self._write_record(name, rec)
        self._stop_all(name)
        return self.status(name)

    def logs(self, name: str) -> dict[str, str]:
        rec = self._record(name)
        out = {}
        for pod in rec["replicas"]:
            p = self._run("logs", pod, check=False)
            out[pod] = p.stdout + p.stderr
        return out

    def delete(self, name: str) -> None:
        self._record(name)
        cs = self._containers(name)
        if cs:
            self._run("rm", "-f", "-t", "5", *cs, check=False)
        self._record_path(name).unlink(missing_ok=True)
