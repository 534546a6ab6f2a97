"""The container-scheduler backend interface and job status."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from hotwire.jobs.errors import JobError, JobNotFound
from hotwire.jobs.render import RenderedJob
from hotwire.names import PathEscape, confined

TERMINAL = ("succeeded", "failed", "stopped")


def state_path(state_dir: Path, name: str, suffix: str = "") -> Path:
    """``state_dir/<name><suffix>``; a job name that would lead out of it names no job."""
    try:
        return confined(state_dir, f"{name}{suffix}")
    except PathEscape as e:
        raise JobNotFound(f"no job named {name!r}: {e}") from None


@dataclass(frozen=True)
class ReplicaStatus:
    name: str
    state: str  # pending | running | succeeded | failed | stopped | unknown
    exit_code: int | None = None


@dataclass(frozen=True)
class JobStatus:
    """Where a job is. ``state`` is one of pending, running, succeeded, failed,
    stopped, unknown; ``message`` says why when it failed."""

    name: str
    backend: str
    state: str
    replicas: tuple[ReplicaStatus, ...] = ()
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["replicas"] = [asdict(r) for r in self.replicas]
        return d


class Backend(ABC):
    """Turns a rendered job-description file into running replicas.

    A backend object is cheap; :func:`hotwire.jobs.backends.get_backend` makes
    one after checking :meth:`unavailable`.
    """

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def unavailable(cls) -> str | None:
        """``None`` when the backend can run here, else a sentence saying why not."""

    @abstractmethod
    def submit(self, job: RenderedJob) -> JobStatus:
        """Start the job; return once it was accepted (not when it finished)."""

    @abstractmethod
    def status(self, name: str) -> JobStatus:
        """The job's status; raises :class:`~hotwire.jobs.errors.JobNotFound`."""

    @abstractmethod
    def list(self) -> list[JobStatus]:
        """Every job this backend knows of (that hotwire started)."""

    @abstractmethod
    def stop(self, name: str) -> JobStatus:
        """Stop every replica of the job; idempotent. Returns the final status."""

    @abstractmethod
    def logs(self, name: str) -> dict[str, str]:
        """Each replica's output so far, by replica name."""

    def delete(self, name: str) -> None:  # noqa: B027 - optional
        """Forget a stopped job (its logs and records). Default: nothing to forget."""

    def wait(self, name: str, timeout: float | None = None, poll: float = 0.1) -> JobStatus:
        """Block until the job is done or ``timeout`` seconds passed; return its status."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            st = self.status(name)
            if st.done:
                return st
            if end is not None and time.monotonic() >= end:
                return st
            time.sleep(poll)


class BackendError(JobError):
    """The backend refused or failed an operation."""
