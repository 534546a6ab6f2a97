"""Errors of the deep-learning-jobs part. Every message says what to do next."""

from __future__ import annotations


class JobError(Exception):
    """Base class of every error raised by ``hotwire.jobs``."""


class RequestError(JobError):
    """A job request is malformed; ``problems`` lists every bad field as ``(field, message)``."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "job request") -> None:
        self.problems = list(problems)
        self.source = source
        lines = "; ".join(f"{f}: {m}" for f, m in self.problems)
        n = len(self.problems)
        super().__init__(f"{source} has {n} bad field{'s' if n != 1 else ''}: {lines}")


class CatalogError(JobError):
    """A catalog entry (template or image) is malformed or missing."""


class SelectionError(JobError):
    """No (or more than one) template or image fits a request; ``candidates`` lists the ids seen."""

    def __init__(self, message: str, candidates: list[str]) -> None:
        self.candidates = list(candidates)
        super().__init__(message)


class RenderError(JobError):
    """A template failed to render, or rendered something that is not a valid job description."""


class BackendUnavailable(JobError):
    """The backend cannot run on this machine (missing tool, client library or config)."""


class JobNotFound(JobError):
    """No job of that name is known to the backend."""
