"""The hotwire SDK: declare an app as a Topology of PEs joined by streams."""

from hotwire.sdk.errors import AppLoadError, ValidationError
from hotwire.sdk.pe import Context, ProcessPE
from hotwire.sdk.topology import KeyedStream, PEImpl, Stream, Topology

__all__ = [
    "AppLoadError",
    "Context",
    "KeyedStream",
    "PEImpl",
    "ProcessPE",
    "Stream",
    "Topology",
    "ValidationError",
]
