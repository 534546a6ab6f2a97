"""Container-scheduler backends: ``local`` (default), ``podman``, ``kubernetes``."""

from __future__ import annotations

import os
from typing import Any

from hotwire.jobs.backends.base import Backend, BackendError, JobStatus, ReplicaStatus
from hotwire.jobs.errors import BackendUnavailable
from hotwire.jobs.request import BACKENDS

BACKEND_ENV = "HOTWIRE_JOBS_BACKEND"


def backend_class(name: str) -> type[Backend]:
    if name == "local":
        from hotwire.jobs.backends.local import LocalBackend

        return LocalBackend
    if name == "podman":
        from hotwire.jobs.backends.podman import PodmanBackend

        return PodmanBackend
    if name == "kubernetes":
        from hotwire.jobs.backends.kubernetes import KubernetesBackend

        return KubernetesBackend
    raise BackendUnavailable(f"unknown backend {name!r}; backends: {', '.join(BACKENDS)}")


def default_backend() -> str:
    return os.environ.get(BACKEND_ENV) or "local"


def get_backend(name: str | None = None, **options: Any) -> Backend:
    """A backend ready to use, or :class:`BackendUnavailable` saying plainly why not."""
    name = name or default_backend()
    cls = backend_class(name)
    why = cls.unavailable()
    if why:
        raise BackendUnavailable(f"backend {name!r} is not available on this machine: {why}")
    return cls(**options)


__all__ = [
    "BACKEND_ENV",
    "Backend",
    "BackendError",
    "JobStatus",
    "ReplicaStatus",
    "backend_class",
    "default_backend",
    "get_backend",
]
