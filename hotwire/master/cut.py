"""Which checkpointed state each instance of a restarted app starts from.

A checkpoint is one cut through the app: every instance's state and every
source's position after the same barrier. A restart must restore exactly that
cut, whatever happened since: an upgrade may have replaced a PE's code (a new
generation), rescaled it or replaced a source. State therefore maps by PE name
and key, never by instance generation, the way an online upgrade hands it over:

* the same parallelism: instance ``i`` gets what instance ``i`` had;
* a keyed PE at another parallelism: each ``[key, value]`` pair goes to the
  instance that owns the key (:func:`hotwire.plan.key_partition`);
* a source at another parallelism: every new instance gets every old
  instance's position (``{"position", "instance", "of"}``);
* anything else at another parallelism: old instance ``j`` goes to ``j % n``;
* a PE that is not in the cut (inserted later) starts empty, and one no
  longer in the app is dropped.

Keyed state is split inside its version envelope (``hotwire.pe.state``): each
part keeps the ``state_version`` of the code that wrote it.

Pure: no I/O, testable on its own.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from hotwire.codec import hashable_key
from hotwire.pe.state import unwrap, wrap
from hotwire.plan import instance_id, key_partition, parse_instance_id


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
        if old and all(isinstance(s, dict) and "of" in s for s in old.values()):
            # A source at another parallelism: each new instance gets every old
            # position (it keeps those of j % n; a partitioned source merges them all).
            for i in range(n):
                out[(pe, i)] = [old[j] for j in sorted(old)]
            continue
        bare = {i: unwrap(s) for i, s in old.items()}
        if keyed.get(pe) and all(_pairs(s) for s, _v in bare.values()):
            # Split inside the version envelope: each part keeps its writer's version.
            parts: list[dict[int, list[Any]]] = [defaultdict(list) for _ in range(n)]
            for i in sorted(bare):
                state, version = bare[i]
                for pair in state or ():
                    parts[key_partition(hashable_key(pair[0]), n)][version].append(pair)
            for i, by_version in enumerate(parts):
                if by_version:
                    out[(pe, i)] = [wrap(p, v) for v, p in sorted(by_version.items())]
            continue
        for j in sorted(old):
            if old[j] is not None:
                out.setdefault((pe, j % n), []).append(old[j])
    return out


def _pairs(state: Any) -> bool:
    return state is None or (
        isinstance(state, list) and all(isinstance(p, list) and len(p) == 2 for p in state)
    )


SAMPLE_KEYS = 1000  # keys per new instance whose state an upgrade's prepare tries


def state_samples(
    cut: dict[str, Any],
    takers: dict[str, tuple[frozenset[str], int, bool]],
    limit: int = SAMPLE_KEYS,
) -> dict[tuple[str, int], list[Any]]:
    """What each new instance of an upgrade tries its code on in prepare.

    ``takers`` gives, per new PE that takes over state, the PE names of its
    predecessors, its parallelism and whether it is keyed. Their states in the
    checkpoint ``cut`` map onto the new instances as a restart would map them
    (:func:`states_for_restart`); keyed state is then thinned to at most
    ``limit`` keys per part, spread evenly over the part, each part keeping its
    version envelope. Returns ``{(pe, index): states}`` (absent: nothing to try).
    """
    out: dict[tuple[str, int], list[Any]] = {}
    for pe, (old_pes, n, keyed) in takers.items():
        sub: dict[str, Any] = {}
        for iid, state in cut.items():
            old_pe, gen, index = parse_instance_id(iid)
            if old_pe in old_pes:
                sub[instance_id(pe, gen, index)] = state
        for where, states in states_for_restart(sub, {pe: n}, {pe: keyed}).items():
            out[where] = [_sample(s, limit) if keyed else s for s in states]
    return out


def _sample(s: Any, limit: int) -> Any:
    state, version = unwrap(s)
    if not _pairs(state) or state is None or len(state) <= limit:
        return s
    step = len(state) / limit
    return wrap([state[int(j * step)] for j in range(limit)], version)


def sampled_keys(states: list[Any], keyed: bool) -> int:
    """How many keys (or, not keyed, states) a sample from :func:`state_samples` holds."""
    n = 0
    for s in states:
        state, _v = unwrap(s)
        if keyed:
            n += len(state or ())
        else:
            n += int(state is not None)
    return n
