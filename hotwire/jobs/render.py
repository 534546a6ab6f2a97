"""Rendering: a request + a template + an image -> the job-description file.

Every template renders Kubernetes objects (a batch/v1 Job, Indexed, plus a
headless Service for distributed modes). The same file drives every backend:
``kubernetes`` submits it as is, ``podman`` and ``local`` run its pod template
once per completion index (see :mod:`hotwire.jobs.podspec`). What differs per
backend is computed here, in Python, and handed to the template as variables:
the image reference or local interpreter, where the program lives, and the
addresses replicas use to find each other.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml

from hotwire.jobs.catalog import Catalog, Image, Selection, Template
from hotwire.jobs.errors import RenderError, RequestError
from hotwire.jobs.request import BACKENDS, JobRequest, cpu_quantity, memory_quantity

COMPLETION_INDEX_PATH = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
CONTAINER_PROGRAM_DIR = "/workspace/program"
CONTAINER_DATA_DIR = "/workspace/data"
DDP_PORT = 29500
TF_PORT = 2222
IMAGE_PREFIX = "image:"  # "image:/app/x.py": a path inside the image, nothing mounted

MANAGED_BY = {"app.kubernetes.io/managed-by": "hotwire"}
JOB_LABEL = "hotwire.io/job"
DAEMON_ANNOTATION = "hotwire.io/daemon"  # "true": the job ends when the other Jobs end


@dataclass(frozen=True)
class Volume:
    name: str
    host_path: str
    mount_path: str
    read_only: bool = False


@dataclass(frozen=True)
class RenderedJob:
    """The job-description file and what it was rendered from."""

    name: str
    backend: str
    request: JobRequest
    template: Template
    image: Image
    text: str
    documents: tuple[dict[str, Any], ...] = field(hash=False)

    def jobs(self) -> list[dict[str, Any]]:
        return [d for d in self.documents if d.get("kind") == "Job"]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports free on ``host`` right now (for local rendezvous)."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def local_python(image: Image) -> str:
    """The interpreter an image stands for on the ``local`` backend."""
    real = image.backends.get("local") or {}
    if real.get("venv"):
        return str(Path(real["venv"]) / "bin" / "python")
    py = real.get("python", "current")
    return sys.executable if py == "current" else str(py)


def _resources(r: JobRequest) -> dict[str, Any] | None:
    req: dict[str, str] = {}
    lim: dict[str, Any] = {}
    if r.resources.cpu is not None:
        req["cpu"] = lim["cpu"] = cpu_quantity(r.resources.cpu)
    if r.resources.memory is not None:
        req["memory"] = lim["memory"] = memory_quantity(r.resources.memory)
    if r.resources.gpu:
        lim["nvidia.com/gpu"] = str(r.resources.gpu)  # a quantity is a string
    if not req and not lim:
        return None
    out: dict[str, Any] = {}
    if req:
        out["requests"] = req
    if lim:
        out["limits"] = lim
    return out


def render_context(
    request: JobRequest,
    selection: Selection,
    backend: str,
    *,
    extra_env: Mapping[str, str] | None = None,
    extra_volumes: Sequence[Volume] = (),
) -> dict[str, Any]:
    """The variables a template sees. Pure but for picking free ports on ``local``."""
    r, image, template = request, selection.image, selection.template
    name = r.name
    in_container = backend != "local"
    real = image.backends.get(backend, {})
    python = str(real.get("python", "python3")) if in_container else local_python(image)
    image_ref = str(real.get("image") or f"hotwire.local/{image.id}:{image.version}")

    problems: list[tuple[str, str]] = []
    volumes: list[Volume] = []
    program_path = working_dir = None
    if r.program:
        if r.program.startswith(IMAGE_PREFIX):
            if not in_container:
                problems.append(
                    (
                        "program",
                        f"{r.program!r} names a path inside an image; the "
                        "local backend needs a local path",
                    )
                )
            program_path = r.program[len(IMAGE_PREFIX) :]
            working_dir = str(Path(program_path).parent)
        else:
            p = Path(r.program).expanduser().resolve()
            if backend != "kubernetes" and not p.exists():
                problems.append(("program", f"{p} does not exist on this machine"))
            host_dir = p if p.is_dir() else p.parent
            if in_container:
                volumes.append(Volume("program", str(host_dir), CONTAINER_PROGRAM_DIR, True))
                working_dir = CONTAINER_PROGRAM_DIR
                program_path = None if p.is_dir() else f"{CONTAINER_PROGRAM_DIR}/{p.name}"
            else:
                working_dir = str(host_dir)
                program_path = None if p.is_dir() else str(p)
    data_path = None
    if r.data:
        if r.data.startswith(IMAGE_PREFIX) or "://" in r.data:
            data_path = r.data.removeprefix(IMAGE_PREFIX)
        elif in_container:
            volumes.append(
                Volume("data", str(Path(r.data).expanduser().resolve()), CONTAINER_DATA_DIR)
            )
            data_path = CONTAINER_DATA_DIR
        else:
            data_path = str(Path(r.data).expanduser().resolve())
    if r.working_dir:
        working_dir = r.working_dir
    if r.command:
        main = [*r.command, *r.args]
    elif program_path:
        main = [python, program_path, *r.args]
    else:
        main = []
        problems.append(("command", "the program is a directory: give command to say what to run"))
    if problems:
        raise RequestError(problems, f"job request {name!r}")
    volumes += list(extra_volumes)

    env = [
        {
            "name": "JOB_COMPLETION_INDEX",
            "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX_PATH}},
        }
    ]
    env += [
        {"name": "HOTWIRE_JOB_NAME", "value": name},
        {"name": "HOTWIRE_REPLICA", "value": "$(JOB_COMPLETION_INDEX)"},
        {"name": "HOTWIRE_REPLICAS", "value": str(r.replicas)},
    ]
    if data_path:
        env.append({"name": "HOTWIRE_DATA", "value": data_path})
    env += [{"name": k, "value": v} for k, v in sorted((extra_env or {}).items())]
    env += [{"name": k, "value": v} for k, v in r.env]

    if backend == "kubernetes":
        master_addr, master_port = f"{name}-0.{name}", DDP_PORT
        ps_hosts = [f"{name}-ps-{i}.{name}:{TF_PORT}" for i in range(r.ps_replicas)]
        worker_hosts = [f"{name}-worker-{i}.{name}:{TF_PORT}" for i in range(r.replicas)]
    else:  # local processes and podman containers share the host network
        ports = free_ports(1 + r.ps_replicas + r.replicas)
        master_addr, master_port = "127.0.0.1", ports[0]
        ps_hosts = [f"127.0.0.1:{p}" for p in ports[1 : 1 + r.ps_replicas]]
        worker_hosts = [f"127.0.0.1:{p}" for p in ports[1 + r.ps_replicas :]]

    labels = {
        **MANAGED_BY,
        JOB_LABEL: name,
        "hotwire.io/template": template.id,
        "hotwire.io/image": image.id,
    }
    return {
        "name": name,
        "namespace": r.namespace,
        "backend": backend,
        "labels": labels,
        "replicas": r.replicas,
        "procs_per_replica": r.procs_per_replica,
        "ps_replicas": r.ps_replicas,
        "image_ref": image_ref,
        "image": image.summary(),
        "python": python,
        "program_path": program_path,
        "command": list(r.command),
        "args": list(r.args),
        "main": main,
        "working_dir": working_dir,
        "env": env,
        "resources": _resources(r),
        "gpu": r.resources.gpu,
        "volumes": [
            {"name": v.name, "hostPath": {"path": v.host_path, "type": "Directory"}}
            for v in volumes
        ],
        "volume_mounts": [
            {"name": v.name, "mountPath": v.mount_path, "readOnly": v.read_only} for v in volumes
        ],
        "timeout": int(r.timeout) if r.timeout else None,
        "master_addr": master_addr,
        "master_port": master_port,
        "ps_hosts": ps_hosts,
        "worker_hosts": worker_hosts,
        "completion_index_path": COMPLETION_INDEX_PATH,
        "daemon_annotation": DAEMON_ANNOTATION,
    }


def render(
    request: JobRequest,
    catalog: Catalog,
    backend: str = "local",
    *,
    extra_env: Mapping[str, str] | None = None,
    extra_volumes: Sequence[Volume] = (),
) -> RenderedJob:
    """Select a template and an image for ``request`` and render the job-description file."""
    if backend not in BACKENDS:
        raise RenderError(f"unknown backend {backend!r}; backends: {', '.join(BACKENDS)}")
    selection = catalog.select(request, backend)
    ctx = render_context(
        request, selection, backend, extra_env=extra_env, extra_volumes=extra_volumes
    )
    t = selection.template
    try:
        text = catalog.jinja_template(t).render(**ctx)
    except jinja2.TemplateError as e:
        raise RenderError(f"template {t.id} ({t.path}) failed to render: {e}") from None
    text = text.lstrip("\n")
    try:
        docs = tuple(d for d in yaml.safe_load_all(text) if d is not None)
    except yaml.YAMLError as e:
        raise RenderError(f"template {t.id} ({t.path}) rendered invalid YAML: {e}") from None
    check_structure(docs, t)
    return RenderedJob(
        name=request.name,
        backend=backend,
        request=request,
        template=t,
        image=selection.image,
        text=text,
        documents=docs,
    )


def check_structure(docs: Sequence[Any], t: Template) -> None:
    """The minimum every backend relies on: Jobs with a pod template with containers."""
    where = f"template {t.id} ({t.path})"
    if not docs:
        raise RenderError(f"{where} rendered no documents")
    jobs = 0
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
            raise RenderError(f"{where} rendered a document without kind/apiVersion")
        if d["kind"] == "Job":
            jobs += 1
            try:
                containers = d["spec"]["template"]["spec"]["containers"]
                d["metadata"]["name"]
            except (KeyError, TypeError):
                raise RenderError(
                    f"{where}: Job lacks metadata.name or spec.template.spec.containers"
                ) from None
            if not containers:
                raise RenderError(f"{where}: Job has no containers")
    if not jobs:
        raise RenderError(f"{where} rendered no batch/v1 Job")
