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
from collections.abc import Iterator
from typing import Any

import msgpack

from hotwire.codec import hashable_key, unpackb
from hotwire.pe.state import (
    REPLICATED_KEY,
    STATE_VERSION,
    keyed_pairs,
    split_replicated,
    unwrap,
    wrap,
)
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
        if keyed.get(pe):
            bare = {i: (keyed_pairs(s), v) for i, (s, v) in bare.items()}
        if keyed.get(pe) and all(_pairs(s) for s, _v in bare.values()):
            # Split inside the version envelope: each part keeps its writer's version.
            parts: list[dict[int, list[Any]]] = [defaultdict(list) for _ in range(n)]
            for i in sorted(bare):
                state, version = bare[i]
                for pair in state or ():
                    if pair[0] == REPLICATED_KEY:  # the instance's own entry: every part
                        own = split_replicated(pair[1], n, lambda k, n=n: key_partition(k, n))
                        for part, value in zip(parts, own, strict=True):
                            part[version].append([REPLICATED_KEY, value])
                        continue
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


def checkpoint_samples(
    blob: bytes,
    takers: dict[str, tuple[frozenset[str], int, bool]],
    limit: int = SAMPLE_KEYS,
) -> dict[tuple[str, int], list[Any]]:
    """:func:`state_samples` of a stored checkpoint (``blob``: ``{instance id: msgpack
    of its state}``), without decoding all of it.

    Only the states of the takers' predecessors are decoded, and a keyed
    predecessor's ``[key, value]`` pairs are read thinned (:func:`decode_thinned`),
    spread evenly over the instance: at the same parallelism instance ``i``'s part
    is instance ``i``'s state, so ``limit`` pairs are read; at another, ``2 * limit
    * new / old`` pairs per old instance, so each new instance's part still gets
    about ``2 * limit`` keys before :func:`state_samples` thins it to ``limit``.
    The pairs in between are skipped undecoded and never hashed.
    """
    raw: dict[str, bytes] = unpackb(blob)
    olds: dict[str, int] = defaultdict(int)
    for iid in raw:
        olds[parse_instance_id(iid)[0]] += 1
    cut: dict[str, Any] = {}
    for iid, data in raw.items():
        pe = parse_instance_id(iid)[0]
        uses = [
            (n, keyed, sum(olds[p] for p in preds))
            for preds, n, keyed in takers.values()
            if pe in preds
        ]
        if not uses:
            continue
        if all(keyed for _n, keyed, _old in uses):
            keep = max(limit if n == old else -(-2 * limit * n // old) for n, _k, old in uses)
            cut[iid] = decode_thinned(data, keep)
        else:
            cut[iid] = unpackb(data)
    return state_samples(cut, takers, limit)


def _is_array(b: int) -> bool:
    return 0x90 <= b <= 0x9F or b in (0xDC, 0xDD)


def _is_map(b: int) -> bool:
    return 0x80 <= b <= 0x8F or b in (0xDE, 0xDF)


def decode_thinned(data: bytes, keep: int) -> Any:
    """``unpackb(data)``, except that a keyed state (a list of ``[key, value]`` pairs
    or a dict, bare or in its version envelope) longer than ``keep`` comes back as
    ``keep`` pairs spread evenly over it: the others are skipped without being
    decoded. Anything else (or a list whose kept elements are not pairs) is decoded
    whole; a keyed dict comes back as pairs."""
    if not data or keep <= 0:
        return unpackb(data)
    try:
        unp = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(data))
        unp.feed(data)
        if _is_array(data[0]):
            out: Any = _thinned_pairs(unp, keep)
        elif _is_map(data[0]):
            count = unp.read_map_header()
            if count != 2:  # a keyed dict (keyed_wire), bare
                out = _thinned_map(unp, count, keep)
            else:
                out = {}
                for _ in range(2):
                    k = unp.unpack()
                    at = unp.tell()
                    if k == "state" and at < len(data) and _is_array(data[at]):
                        out[k] = _thinned_pairs(unp, keep)
                    elif k == "state" and at < len(data) and _is_map(data[at]):
                        out[k] = _thinned_map(unp, unp.read_map_header(), keep)
                    else:
                        out[k] = unp.unpack()
                if STATE_VERSION not in out or out["state"] is None:
                    return unpackb(data)
        else:
            return unpackb(data)
        if unp.tell() != len(data):
            return unpackb(data)
    except _NotPairs:
        return unpackb(data)
    return out


class _NotPairs(Exception):
    pass


def _kept(count: int, keep: int) -> Iterator[bool]:
    """For each of ``count`` elements, whether it is one of ``keep`` spread evenly."""
    if count <= keep:
        yield from (True for _ in range(count))
        return
    step = count / keep
    nxt, j = 0, 0
    for idx in range(count):
        if idx == nxt:
            j += 1
            nxt = int(j * step) if j < keep else count
            yield True
        else:
            yield False


def _thinned_pairs(unp: msgpack.Unpacker, keep: int) -> list[Any]:
    out = []
    for take in _kept(unp.read_array_header(), keep):
        if take:
            out.append(unp.unpack())
        else:
            unp.skip()
    if not all(isinstance(p, list) and len(p) == 2 for p in out):
        raise _NotPairs
    return out


def _thinned_map(unp: msgpack.Unpacker, count: int, keep: int) -> list[Any]:
    """A keyed dict's ``count`` entries (its map header read) as ``[key, value]`` pairs,
    ``keep`` of them spread evenly over it; the others skipped undecoded."""
    out = []
    for take in _kept(count, keep):
        if take:
            out.append([unp.unpack(), unp.unpack()])
        else:
            unp.skip()
            unp.skip()
    return out


def _sample(s: Any, limit: int) -> Any:
    state, version = unwrap(s)
    state = keyed_pairs(state)
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
