"""The progress of an app's transition, phase by phase, as the dashboard shows it.

The transition engine keeps one :class:`TransitionProgress` per app: the last
transition it started (submit, upgrade, rollback, restart, move, canary), the
phases it went through (the ones :class:`hotwire.metrics.TransitionClock` times:
prepare, switch, commit, then done; or abort, recover) with their start and
duration, and its plan's instruction lines by phase. Pure bookkeeping: no I/O.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

ENDED = ("done",)


def plan_by_phase(lines: list[str]) -> dict[str, list[str]]:
    """``Plan.describe()``'s lines ("prepare w1: start ...") by phase, then worker."""
    plan: dict[str, list[str]] = {"prepare": [], "switch": []}
    for line in lines:
        phase, _, rest = line.partition(" ")
        plan.setdefault(phase, []).append(rest.strip())
    return plan


@dataclass
class TransitionProgress:
    app: str
    version: int
    action: str  # submit | upgrade | rollback | canary | placement | ...
    epoch: int
    plan: dict[str, list[str]] = field(default_factory=dict)  # phase -> instruction lines
    started: float = field(default_factory=time.time)
    phase: str = "prepare"
    # [phase, wall-clock start, milliseconds in it (None while in it)]
    phases: list[list[Any]] = field(default_factory=list)
    outcome: str = ""  # "" while it runs; else committed, aborted, restarted, ...
    _since: float = field(default_factory=time.perf_counter, repr=False)

    def __post_init__(self) -> None:
        self.phases = [[self.phase, self.started, None]]

    @classmethod
    def of_plan(
        cls, app: str, version: int, action: str, epoch: int, lines: list[str]
    ) -> TransitionProgress:
        """One about to start, with ``Plan.describe()``'s lines split by phase."""
        return cls(app, version, action, epoch, plan_by_phase(lines))

    def enter(self, phase: str) -> bool:
        """The transition is now in ``phase``; False if it already was."""
        if phase == self.phase:
            return False
        now = time.perf_counter()
        self.phases[-1][2] = round((now - self._since) * 1000, 3)
        self.phase, self._since = phase, now
        if phase in ENDED:
            return True
        self.phases.append([phase, time.time(), None])
        return True

    def finish(self, outcome: str) -> None:
        self.enter("done")
        self.outcome = outcome

    def to_dict(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "version": self.version,
            "action": self.action,
            "epoch": self.epoch,
            "started": self.started,
            "phase": self.phase,
            "running": not self.outcome,
            "outcome": self.outcome,
            "phases": [{"phase": p, "started": t, "ms": ms} for p, t, ms in self.phases],
            "plan": self.plan,
        }
