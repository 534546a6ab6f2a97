"""Versioned PE state: the envelope that carries a class PE's ``state_version``.

A class PE may declare ``state_version = N`` (default 1). State it snapshots at
a version other than 1 travels as ``{STATE_VERSION: N, "state": state}`` in
checkpoints and handovers, so the instance that restores it knows which version
wrote it and calls ``migrate(state, from_version)`` first when its own version
differs. State of version 1 travels bare, exactly as before versions existed.

Keyed state (a dict of key -> value) travels as the dict itself when each of its
keys comes back from msgpack as the same key (:func:`keyed_wire`), else as a list of
``[key, value]`` pairs: a tuple key packs as an array and would come back as a list,
which cannot be a dict key. Readers take either (:func:`keyed_pairs`).

Keyed state is split by key *inside* the envelope: :func:`unwrap`, split, and
:func:`wrap` each part with the same version (``hotwire.master.cut`` and the
retiring instance both do so). Pure: no I/O, no user code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hotwire.codec import hashable_key

STATE_VERSION = "__hotwire_state_version__"
DEFAULT_VERSION = 1
# A keyed state's entry that belongs to no key but to the instance (a windowed
# PE's watermark): a split by key gives it to every part.
REPLICATED_KEY = "__hotwire_replicated__"


def wrap(state: Any, version: int) -> Any:
    """``state`` as written by a PE at ``version``."""
    if version == DEFAULT_VERSION:
        return state
    return {STATE_VERSION: version, "state": state}


def unwrap(obj: Any) -> tuple[Any, int]:
    """``(state, the version that wrote it)`` of a state as it travels."""
    if isinstance(obj, dict) and STATE_VERSION in obj and len(obj) == 2 and "state" in obj:
        return obj["state"], int(obj[STATE_VERSION])
    return obj, DEFAULT_VERSION


# Key types msgpack gives back as equal keys of the same type (exact types: a str or
# int subclass comes back as the base type, a tuple as a list).
_MAP_KEY_TYPES = frozenset((str, int, float, bytes, bool, type(None)))


def keyed_wire(state: dict[Any, Any]) -> Any:
    """A keyed ``state`` as it is packed: the dict itself when every key is of a type
    msgpack gives back as the same key (packing a dict is about three times faster
    than building and packing pairs, and makes no objects), else ``[key, value]``
    pairs. A dict holding the envelope's :data:`STATE_VERSION` key goes as pairs too,
    so that :func:`unwrap` can never mistake it for an envelope."""
    if set(map(type, state)) <= _MAP_KEY_TYPES and STATE_VERSION not in state:
        return state
    return [[k, v] for k, v in state.items()]


def keyed_pairs(state: Any) -> Any:
    """A keyed state read back (:func:`keyed_wire`'s dict or pairs) as pairs; any other
    value as it is."""
    if isinstance(state, dict):
        return [[k, v] for k, v in state.items()]
    return state


def split_replicated(value: Any, n: int, part_of: Callable[[Any], int]) -> list[Any]:
    """The :data:`REPLICATED_KEY` entry of a keyed state for each of ``n`` parts of a
    split by key: a copy each (a watermark), except its ``timers`` (``[kind, key,
    t]`` each), which go to the part ``part_of(key)`` owns."""
    if not isinstance(value, dict) or not value.get("timers"):
        return [value] * n
    parts = [{**value, "timers": []} for _ in range(n)]
    for timer in value["timers"]:
        parts[part_of(hashable_key(timer[1]))]["timers"].append(timer)
    return parts
