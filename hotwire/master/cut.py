"""Which checkpointed state each instance of a restarted app starts from.

A checkpoint is one cut through the app: every instance's state and every
source's position after the same barrier. A restart must restore exactly that
cut, whatever happened since: an upgrade may have replaced a PE's code (a new
generation), rescaled it or replaced a source. State therefore maps by PE name
and key, never by instance generation, the way an online upgrade hands it over:

* the same parallelism: instance ``i`` gets what instance ``i`` had;
* a keyed PE at another parallelism: each ``[key, value]`` pair goes to the
  instance that owns the key (:func:`hotwire.plan.key_partition`);
* anything else at another parallelism: old instance ``j`` goes to ``j % n``;
* a PE that is not in the cut (inserted later) starts empty, and one no
  longer in the app is dropped.

Pure: no I/O, testable on its own.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from hotwire.codec import hashable_key
from hotwire.plan import key_partition, parse_instance_id


def states_for_restart(
    cut: dict[str, Any], parallelism: dict[str, int], keyed: dict[str, bool]
) -> dict[tuple[str, int], list[Any]]:
    """Map a checkpoint's ``{instance id: state}`` onto the PEs' new instances.

    ``parallelism`` and ``keyed`` give, per PE of the app being started, its
    number of instances and whether its input is key-partitioned. Returns the
    list of states each ``(pe, index)`` restores (absent: start empty).
    """
    by_pe: dict[str, dict[int, Any]] = defaultdict(dict)
    for iid, state in cut.items():
        pe, _gen, index = parse_instance_id(iid)
        by_pe[pe][index] = state
    out: dict[tuple[str, int], list[Any]] = {}
    for pe, old in by_pe.items():
        n = parallelism.get(pe)
        if n is None:
            continue  # the PE is gone
        if len(old) == n:
            for i, state in old.items():
                if state is not None:
                    out[(pe, i)] = [state]
            continue
        if keyed.get(pe) and all(_pairs(s) for s in old.values()):
            parts: list[list[Any]] = [[] for _ in range(n)]
            for i in sorted(old):
                for pair in old[i] or ():
                    parts[key_partition(hashable_key(pair[0]), n)].append(pair)
            for i, part in enumerate(parts):
                if part:
                    out[(pe, i)] = [part]
            continue
        for j in sorted(old):
            if old[j] is not None:
                out.setdefault((pe, j % n), []).append(old[j])
    return out


def _pairs(state: Any) -> bool:
    return state is None or (
        isinstance(state, list) and all(isinstance(p, list) and len(p) == 2 for p in state)
    )
