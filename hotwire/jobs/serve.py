"""The program side of a DL PE: ``hotwire.jobs.serve(handler)``.

A job started by a ``dl_job`` PE finds the PE's address in the environment
variable ``HOTWIRE_JOBS_ADDRESS`` and the job's secret in ``HOTWIRE_JOBS_SECRET``;
:func:`serve` connects there, proves it is the job with the secret, receives
batches of records, calls the handler and sends the results back, in order,
until the PE says stop (then it returns) or the connection closes.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from hotwire.jobs.protocol import ADDRESS_ENV, SECRET_ENV, Channel, ConnectionClosed, connect


def _rank() -> int:
    for var in ("RANK", "HOTWIRE_REPLICA", "JOB_COMPLETION_INDEX"):
        v = os.environ.get(var, "")
        if v.isdigit():
            return int(v)
    return 0


def serve(
    handler: Callable[[Any], Any] | Callable[[Sequence[Any]], Sequence[Any]],
    batch: bool = False,
    *,
    address: str | None = None,
    secret: str | None = None,
    connect_timeout: float = 60.0,
) -> int:
    """Serve ``handler`` to the DL PE that started this job; return the batches served.

    ``handler(record) -> result`` is called once per record; with ``batch=True``,
    ``handler(records) -> results`` is called once per batch and must return one
    result per record, in order. An exception in the handler (or results that
    cannot be sent) comes back to the PE as an error for that batch, and serving
    goes on. Records and results are msgpack data: None, bool, int, float, str,
    bytes, lists and dicts of those (tuples arrive as lists).

    ``address`` and ``secret`` default to the environment the PE gave the job.
    """
    address = address or os.environ.get(ADDRESS_ENV)
    secret = secret if secret is not None else os.environ.get(SECRET_ENV, "")
    if not address:
        raise RuntimeError(
            f"hotwire.jobs.serve() needs {ADDRESS_ENV}: run this program as a dl_job of a "
            "stream (stream.dl_job(name, request=...)), or set it to unix:/path or tcp://host:port"
        )
    end = time.monotonic() + connect_timeout
    while True:
        try:
            sock = connect(address)
            break
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)
    ch = Channel(sock)
    served = 0
    try:
        ch.send({"t": "hello", "rank": _rank(), "pid": os.getpid(), "secret": secret})
        while True:
            try:
                msg = ch.recv()
            except ConnectionClosed:
                return served
            if msg is None or msg.get("t") == "stop":
                return served
            if msg.get("t") != "batch":
                continue
            seq, records = msg["seq"], msg["records"]
            try:
                if batch:
                    results = list(handler(records))  # type: ignore[arg-type]
                    if len(results) != len(records):
                        raise ValueError(
                            f"the batch handler returned {len(results)} results for "
                            f"{len(records)} records; it must return one per record"
                        )
                else:
                    results = [handler(r) for r in records]
                ch.send({"t": "result", "seq": seq, "results": results})
            except Exception as e:
                ch.send(
                    {
                        "t": "error",
                        "seq": seq,
                        "error": f"{type(e).__name__}: {e}",
                        "type": type(e).__name__,
                        "traceback": traceback.format_exc(),
                    }
                )
            served += 1
    finally:
        ch.close()
