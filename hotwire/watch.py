"""A transition's progress on a terminal: ``streamctl upgrade`` and ``rollback`` show
each phase (prepare, switch, commit; abort or recover when it fails) as it passes.

:class:`PhaseWatcher` polls the master's status of the app on a thread of its own
while the upgrade's request is in flight, and writes to the terminal the phase the
transition is in (with the seconds so far, rewritten in place) and, when a phase
ends, its duration as the master measured it. It shows only a transition newer
than the one the app had when it started, so an earlier upgrade's phases never
show. A status that cannot be read is skipped: the upgrade's own answer is what
counts.
"""

from __future__ import annotations

import json
import threading
import time
from typing import IO, Any

import grpc

__all__ = ["PhaseWatcher"]

WIDTH = 32  # of a phase's line: a finished phase's line covers the one in progress


class PhaseWatcher:
    """Shows the phases of ``app``'s next transition on ``out`` (a terminal)."""

    def __init__(self, client: Any, app: str, out: IO[str], interval: float = 0.1):
        self.client = client
        self.app = app
        self.out = out
        self.interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._before = self._read()
        self._shown = 0  # phases whose end has been written
        self._header = False
        self._current: tuple[str, float] | None = None  # phase in progress, since (ours)
        self._thread = threading.Thread(target=self._run, name="hotwire-progress", daemon=True)

    def _read(self) -> dict[str, Any] | None:
        """The app's last transition (``TransitionProgress.to_dict()``), if any."""
        try:
            reply = self.client.status(self.app, timeout=2)
        except grpc.RpcError:
            return None
        for a in reply.apps:
            if a.app == self.app and a.progress_json:
                doc: dict[str, Any] = json.loads(a.progress_json)
                return doc
        return None

    def start(self) -> PhaseWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling; write the phases that ended since the last poll."""
        self._stop.set()
        self._thread.join(5)
        self._show(self._read())

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._show(self._read())

    def _show(self, p: dict[str, Any] | None) -> None:
        if p is None or (self._before is not None and p["epoch"] == self._before["epoch"]):
            return  # no transition yet, or still the one before ours
        with self._lock:
            w = self.out.write
            if not self._header:
                self._header = True
                w(f"{p['action']} of {p['app']!r} to version {p['version']}:\n")
            phases = p["phases"]
            for ph in phases[self._shown :]:
                if ph["phase"] == "done" or ph["ms"] is None:
                    break
                w("\r" + f"  {ph['phase']:<8} {ph['ms']:>10.1f} ms".ljust(WIDTH) + "\n")
                self._shown += 1
                self._current = None
            now = time.monotonic()
            if self._shown < len(phases) and phases[self._shown]["phase"] != "done":
                name = phases[self._shown]["phase"]
                if self._current is None or self._current[0] != name:
                    self._current = (name, now)
                w("\r" + f"  {name:<8} {now - self._current[1]:>8.1f} s ...".ljust(WIDTH))
            if p["outcome"]:
                self._shown = len(phases)
            self.out.flush()
