"""hotwire: a distributed stream-computing runtime that upgrades running apps online."""

from typing import Any

__all__ = ["Topology"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so the master (which never runs user code) does not import the SDK.
    if name == "Topology":
        from hotwire.sdk import Topology

        return Topology
    raise AttributeError(name)
