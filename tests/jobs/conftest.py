"""Fixtures of the jobs tests: a private state directory and a leak check.

Every job a test starts lives under ``tmp_path``; at the end every job still
running is stopped and the test fails if any process of it is left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jobs_helpers import processes_mentioning

from hotwire.jobs.backends.local import LocalBackend

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "dl"


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """HOTWIRE_JOBS_STATE under tmp_path; afterwards no job of the test survives."""
    d = tmp_path / "state"
    monkeypatch.setenv("HOTWIRE_JOBS_STATE", str(d))
    monkeypatch.delenv("HOTWIRE_JOBS_BACKEND", raising=False)
    monkeypatch.delenv("HOTWIRE_JOBS_CATALOG", raising=False)
    yield d
    b = LocalBackend(d)
    for st in b.list():
        if not st.done:
            b.stop(st.name)
    end = time.monotonic() + 10
    while (left := processes_mentioning(str(tmp_path))) and time.monotonic() < end:
        time.sleep(0.05)
    for pid, _ in left:  # stop them anyway, then fail
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind by the test: {left}"


@pytest.fixture
def local(state_dir: Path) -> LocalBackend:
    return LocalBackend(state_dir)


@pytest.fixture
def torch_examples(tmp_path: Path) -> Path:
    """A copy of examples/dl in tmp_path (so the leak check sees its processes)."""
    pytest.importorskip("torch")
    dst = tmp_path / "dl"
    shutil.copytree(EXAMPLES, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst
