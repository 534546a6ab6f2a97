"""hotwire: a distributed stream-computing runtime that upgrades running apps online."""

from hotwire.sdk import Topology

__all__ = ["Topology"]
__version__ = "0.1.0"
