"""Errors the SDK raises: an invalid topology and an app file that cannot be loaded."""

from __future__ import annotations


class ValidationError(ValueError):
    """A topology is invalid. ``problems`` lists every problem, each naming the PE and app."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))

    def __str__(self) -> str:
        return "; ".join(self.problems)


class AppLoadError(Exception):
    """An app file or bundle could not be loaded; the message is one line naming file and line."""
