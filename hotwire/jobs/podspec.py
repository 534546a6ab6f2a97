"""From a rendered job-description file to the replicas a backend runs.

Kubernetes runs an Indexed Job's pod template once per completion index and
fills in what the pod spec leaves to it: the completion index (through the
downward API), ``$(VAR)`` references in env values, command and args. The
``local`` and ``podman`` backends do the same here, so that one rendered file
means the same thing on every backend.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hotwire.jobs.errors import RenderError
from hotwire.jobs.request import parse_cpu, parse_memory

_COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
_REF_RE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


@dataclass(frozen=True)
class ReplicaSpec:
    """One replica: what a backend starts for completion ``index`` of Job ``job``."""

    job: str
    index: int
    image: str
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    working_dir: str | None = None
    cpu: float | None = None
    memory: int | None = None
    gpu: int = 0
    volumes: tuple[tuple[str, str, bool], ...] = ()  # (host path, mount path, read only)
    daemon: bool = False  # ends when the job's other replicas have ended (TF ps tasks)
    labels: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)

    @property
    def pod_name(self) -> str:
        return f"{self.job}-{self.index}"

    @property
    def env_dict(self) -> dict[str, str]:
        return dict(self.env)


def expand_refs(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined names are replaced, ``$$`` is ``$``,
    unknown references stay as written."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _REF_RE.sub(sub, text)


def _field_ref(path: str, job: str, index: int, namespace: str) -> str:
    if path == _COMPLETION_INDEX:
        return str(index)
    if path == "metadata.name":
        return f"{job}-{index}"
    if path == "metadata.namespace":
        return namespace
    if path in ("status.podIP", "status.hostIP"):
        return "127.0.0.1"
    raise RenderError(f"Job {job}: env fieldRef {path!r} is not supported outside Kubernetes")


def replicas_of(documents: Sequence[dict[str, Any]]) -> list[ReplicaSpec]:
    """Every replica of every Job in ``documents``, in document then index order."""
    out: list[ReplicaSpec] = []
    for d in documents:
        if d.get("kind") != "Job":
            continue
        meta = d.get("metadata") or {}
        job = meta["name"]
        namespace = meta.get("namespace", "default")
        daemon = (meta.get("annotations") or {}).get("hotwire.io/daemon") == "true"
        spec = d["spec"]
        n = int(spec.get("completions", 1))
        pod = spec["template"]["spec"]
        containers = pod["containers"]
        if len(containers) != 1:
            raise RenderError(
                f"Job {job}: outside Kubernetes a pod must have exactly one "
                f"container, it has {len(containers)}"
            )
        c = containers[0]
        mounts = {v["name"]: v for v in c.get("volumeMounts") or []}
        volumes = []
        for v in pod.get("volumes") or []:
            if v["name"] in mounts and "hostPath" in v:
                m = mounts[v["name"]]
                volumes.append((v["hostPath"]["path"], m["mountPath"], bool(m.get("readOnly"))))
        limits = (c.get("resources") or {}).get("limits") or {}
        cpu = parse_cpu(limits["cpu"]) if "cpu" in limits else None
        memory = parse_memory(limits["memory"]) if "memory" in limits else None
        gpu = int(limits.get("nvidia.com/gpu", 0))
        for i in range(n):
            env: dict[str, str] = {}
            for e in c.get("env") or []:
                if "value" in e:
                    env[e["name"]] = expand_refs(str(e["value"]), env)
                elif "fieldRef" in (e.get("valueFrom") or {}):
                    env[e["name"]] = _field_ref(
                        e["valueFrom"]["fieldRef"]["fieldPath"], job, i, namespace
                    )
                else:
                    raise RenderError(
                        f"Job {job}: env {e['name']} uses a valueFrom source that "
                        "only Kubernetes provides"
                    )
            argv = [*(c.get("command") or []), *(c.get("args") or [])]
            if not argv:
                raise RenderError(
                    f"Job {job}: the container has no command; outside Kubernetes "
                    "the image's entrypoint is not known"
                )
            out.append(
                ReplicaSpec(
                    job=job,
                    index=i,
                    image=c.get("image", ""),
                    command=tuple(expand_refs(str(a), env) for a in argv),
                    env=tuple(env.items()),
                    working_dir=c.get("workingDir"),
                    cpu=cpu,
                    memory=memory,
                    gpu=gpu,
                    volumes=tuple(volumes),
                    daemon=daemon,
                    labels=dict(meta.get("labels") or {}),
                )
            )
    return out
