"""Window kinds for :meth:`hotwire.sdk.KeyedStream.window`.

Sizes, slides and gaps are in the unit of the stream's timestamps (seconds,
milliseconds: whatever the timestamp function returns). A window is
``[start, end)``; tumbling and sliding windows are aligned to multiples of the
size (of the slide) from 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Session", "Sliding", "Tumbling"]


@dataclass(frozen=True)
class Tumbling:
    """Fixed windows of ``size`` that do not overlap: ``[k*size, (k+1)*size)``."""

    size: float

    def to_config(self) -> dict[str, Any]:
        return {"kind": "tumbling", "size": self.size}


@dataclass(frozen=True)
class Sliding:
    """Windows of ``size`` starting every ``slide`` (hopping windows): a record is
    in ``size / slide`` of them. ``slide`` may not exceed ``size``."""

    size: float
    slide: float

    def to_config(self) -> dict[str, Any]:
        return {"kind": "sliding", "size": self.size, "slide": self.slide}


@dataclass(frozen=True)
class Session:
    """Per key, records less than ``gap`` apart share a window; it ends ``gap``
    after its last record. Sessions that a record bridges merge into one."""

    gap: float

    def to_config(self) -> dict[str, Any]:
        return {"kind": "session", "gap": self.gap}
