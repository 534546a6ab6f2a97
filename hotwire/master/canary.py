"""Canary upgrades: the checks, the placement and the verdict. Pure.

A canary of PE ``P`` regenerates ``P`` into one placement whose instances
``0..n-1`` run the running version's code and whose instance ``n`` runs the new
version's (:class:`hotwire.plan.Canary`). Senders route keys whose bucket falls
in the canary's share to the new instance and the others by the old partition,
so the old-code instances own exactly the keys they owned before; the retiring
instances hand every key's state to its new owner (a rescale's handover). A
promote is the upgrade to the new version from that placement, an abort a
regeneration of ``P`` with the running code: both hand the state over by key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from hotwire.master.diff import ChangeSet
from hotwire.model import LogicalModel
from hotwire.plan import CANARY_BUCKETS, Canary, PEPlacement, Placement

__all__ = [
    "CANARY_BUCKETS",
    "CanaryError",
    "CanaryRun",
    "check",
    "parse_share",
    "placement",
    "verdict",
]


class CanaryError(ValueError):
    """A canary the request cannot start (the message says why and what to do)."""


@dataclass
class CanaryRun:
    """A canary in progress: what it tries, and when it is promoted or aborted."""

    app: str
    pe: str
    share: int  # basis points
    model: LogicalModel  # the new version's model
    bundle: str  # the new version's bundle hash
    from_version: int
    max_errors: float = -1.0  # highest error rate of the canary (errors/records in); <0: none
    promote_after: float = 0.0  # seconds within the threshold before promoting; 0: by hand
    started: float = field(default_factory=time.time)
    outcome: str = ""  # promoted | aborted | rolled back (when it ended)
    why: str = ""
    ended: float = 0.0
    stats: dict[str, dict[str, float]] = field(default_factory=dict)  # by "old"/"canary"

    def to_dict(self) -> dict[str, Any]:
        return {
            "pe": self.pe,
            "share_percent": self.share / 100,
            "from_version": self.from_version,
            "to_version": self.from_version + 1,
            "max_error_rate": None if self.max_errors < 0 else self.max_errors,
            "promote_after_s": self.promote_after or None,
            "started_unix": self.started,
            "ended_unix": self.ended or None,
            "outcome": self.outcome or "running",
            "why": self.why,
            "stats": self.stats,
        }

    def to_record(self) -> dict[str, Any]:
        """Everything a restarted master needs to resume the canary (JSON-ready)."""
        return {
            "app": self.app,
            "pe": self.pe,
            "share": self.share,
            "model": self.model.to_json(),
            "bundle": self.bundle,
            "from_version": self.from_version,
            "max_errors": self.max_errors,
            "promote_after": self.promote_after,
            "started": self.started,
            "outcome": self.outcome,
            "why": self.why,
            "ended": self.ended,
            "stats": self.stats,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> CanaryRun:
        """The canary :meth:`to_record` wrote."""
        return cls(
            app=rec["app"],
            pe=rec["pe"],
            share=int(rec["share"]),
            model=LogicalModel.from_json(rec["model"]),
            bundle=rec["bundle"],
            from_version=int(rec["from_version"]),
            max_errors=float(rec["max_errors"]),
            promote_after=float(rec["promote_after"]),
            started=float(rec["started"]),
            outcome=rec.get("outcome", ""),
            why=rec.get("why", ""),
            ended=float(rec.get("ended", 0.0)),
            stats=rec.get("stats") or {},
        )

    def row(self) -> tuple[str, float, dict[str, Any]]:
        """The canary as the master's store keeps it (``Store.put_canary``)."""
        return (self.app, self.started, self.to_record())


def parse_share(text: str) -> tuple[str, int]:
    """``"PE=10%"`` (or ``PE=0.1``) -> (PE, basis points); CanaryError if malformed."""
    pe, sep, amount = text.partition("=")
    if not sep or not pe or not amount:
        raise CanaryError(f"--canary {text!r}: expected PE=SHARE, e.g. count=10%")
    try:
        share = float(amount[:-1]) / 100 if amount.endswith("%") else float(amount)
    except ValueError as e:
        raise CanaryError(f"--canary {text!r}: {amount!r} is not a share like 10%") from e
    bp = round(share * CANARY_BUCKETS)
    if not 0 < bp < CANARY_BUCKETS:
        raise CanaryError(f"--canary {text!r}: the share must lie strictly between 0% and 100%")
    return pe, bp


def check(app: str, pe: str, old: LogicalModel, new: LogicalModel, change: ChangeSet) -> None:
    """Refuse a canary unless the upgrade changes PE ``pe``'s code or config and
    nothing else, and ``pe`` is fed by key-partitioned or shuffled streams."""
    if pe not in old.graph or pe not in new.graph:
        raise CanaryError(f"app {app!r}: --canary {pe!r}: no PE of that name in both versions")
    others = [
        k
        for k in ("pes_added", "pes_removed", "streams_added", "streams_removed", "streams_changed")
        if getattr(change, k)
    ]
    if others or change.pes_renamed or set(change.regenerated) != {pe}:
        raise CanaryError(
            f"app {app!r}: a canary upgrade may change PE {pe!r} only, but this one changes "
            f"{', '.join(change.describe()) or 'nothing'}; upgrade without --canary, or "
            "split the upgrade"
        )
    a, b = old.pe(pe), new.pe(pe)
    if a.kind != b.kind or a.keyed != b.keyed:
        raise CanaryError(
            f"app {app!r}: --canary {pe!r}: the PE's kind or keying changes; upgrade "
            "without --canary"
        )
    if b.config.get("on_error") == "fail":
        raise CanaryError(
            f"app {app!r}: --canary {pe!r}: the new code has on_error='fail', and a canary "
            "instance that stops holds its senders at their credit limit, so it could not "
            "be rolled back online; give the canary on_error 'skip' or 'dead_letter'"
        )
    inputs = new.inputs(pe)
    bad = sorted({s.partition for s in inputs} - {"key", "shuffle"})
    if not inputs or bad:
        raise CanaryError(
            f"app {app!r}: --canary {pe!r}: only a PE fed by key-partitioned or shuffled "
            f"streams can run a canary (it is fed {'by ' + ', '.join(bad) if bad else 'nothing'})"
        )


def placement(
    old_pl: Placement,
    pe: str,
    new: LogicalModel,
    share: int,
    bundle: str,
    epoch: int,
    free: dict[str, int],
) -> Placement:
    """``old_pl`` with ``pe`` regenerated at ``epoch``: its instances where they
    were, running their code, and one instance of the new code (``bundle``) on
    the worker with the most free slots. CanaryError when no worker has one."""
    load: dict[str, int] = {}
    for pl in old_pl.values():
        for w in pl.workers:
            load[w] = load.get(w, 0) + 1
    room = {w: n - load.get(w, 0) for w, n in free.items() if n - load.get(w, 0) > 0}
    if not room:
        raise CanaryError(
            f"PE {pe!r}: no live worker has a free slot for the canary's instance; "
            "start more workers or give them more --slots"
        )
    w = min(room, key=lambda x: (-room[x], x))
    old = old_pl[pe]
    canary = Canary(share, old.parallelism, bundle, dict(new.pe(pe).config))
    return {**old_pl, pe: PEPlacement(epoch, old.bundle, (*old.workers, w), canary)}


def verdict(run: CanaryRun, now: float, min_records: int = 20) -> str:
    """``"promote"``, ``"abort"`` or ``""`` (wait) for ``run`` given its stats.

    Aborts when a canary instance failed or, once it has seen ``min_records``
    records, its error rate is above ``max_errors``; promotes once it ran
    ``promote_after`` seconds within the threshold.
    """
    c = run.stats.get("canary", {})
    if c.get("failed"):
        return "abort"
    seen, errors = c.get("records_in", 0), c.get("errors", 0)
    if run.max_errors >= 0 and seen >= min_records and errors / seen > run.max_errors:
        return "abort"
    if run.promote_after > 0 and now - run.started >= run.promote_after:
        if run.max_errors >= 0 and seen and errors / seen > run.max_errors:
            return "abort"
        return "promote"
    return ""
