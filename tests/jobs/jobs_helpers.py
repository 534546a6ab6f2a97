"""Helpers of the jobs tests, importable as ``jobs_helpers`` (tests/jobs is on sys.path)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Live processes whose command line or environment's job dir mentions ``text``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if text in cmd and stat.rsplit(")", 1)[1].split()[0] != "Z":
            out.append((int(d.name), cmd))
    return out


def poll_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Wait until ``predicate()`` is truthy; return it, or fail the test."""
    end = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() > end:
            pytest.fail(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)
