"""Connectors: sources and sinks that talk to systems outside hotwire.

A *source* reads from partitions (a file, a stream shard, a topic
partition) and keeps one position per partition in its checkpointed
state, so a restart or an online upgrade resumes from the position of the
last completed checkpoint and replays from there.  A *sink* is either
transactional (pre-commit at the checkpoint barrier, commit when the
checkpoint completes; see :class:`hotwire.sinks.TransactionalSink`) or
writes idempotently (upserts keyed by the result's key).

Connector modules import their client libraries (psycopg, redis, nats)
lazily, so ``import hotwire.connectors`` never needs an optional extra.
See docs/connectors.md.
"""

from hotwire.connectors.base import PartitionedSource, PositionLog, check_options
from hotwire.connectors.files import FileSource
from hotwire.connectors.postgres import PostgresSink
from hotwire.sinks import JsonlSink, TransactionalSink, read_committed

__all__ = [
    "FileSource",
    "JsonlSink",
    "PartitionedSource",
    "PositionLog",
    "PostgresSink",
    "TransactionalSink",
    "check_options",
    "read_committed",
]
