"""The one msgpack dialect hotwire uses for records, state and checkpoints.

Records and keyed state are user values: maps with integer (or other
non-string) keys are ordinary Python and must survive a trip between workers
and through the master's checkpoint store exactly as they survive a hand-off
on one worker. msgpack refuses such maps by default (``strict_map_key``), which
made a frame undecodable; every decoder goes through :func:`unpackb`.
"""

from __future__ import annotations

from typing import Any

import msgpack

_packer = msgpack.Packer(use_bin_type=True)


def packb(obj: Any) -> bytes:
    """Serialise ``obj`` (raises TypeError for values msgpack cannot carry)."""
    return _packer.pack(obj)


def hashable_key(k: Any) -> Any:
    """A key as it was before a msgpack trip: sequences come back as lists, which
    cannot be dict keys, so they become tuples again (partitioning packs both alike)."""
    if isinstance(k, list):
        return tuple(hashable_key(x) for x in k)
    return k


def unpackb(data: bytes) -> Any:
    """Deserialise what :func:`packb` made, map keys of any msgpack type included."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False)
