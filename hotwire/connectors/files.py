"""Files: a source that tails a directory of JSON-lines (or text) files, and the
transactional JSON-lines sink.

``app.source("src", FileSource("/data/in", pattern="*.jsonl"))`` reads every
file matching ``pattern`` in the directory, partition = file name, position =
byte offset after the last complete line read. It tails: lines appended later
and files created later are read as they appear; a line is read only once it
ends with a newline. Files must only grow (no truncation, no rewrite in place:
write a new file and rename it in instead).

The position log (see :mod:`hotwire.connectors.base`) lives in
``<dir>/.hotwire/<app>.<pe>.<instance>-of-<parallelism>.jsonl`` unless
``state_dir`` says otherwise; a restart or an upgrade resumes every file from
its byte offset at the last checkpoint (or handover). A rescale (another
parallelism) merges the old instances' logs: see :class:`PartitionedSource`.

:class:`~hotwire.sinks.JsonlSink` is the exactly-once file sink.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hotwire.connectors.base import PartitionedSource, check_options
from hotwire.sinks import JsonlSink, read_committed

__all__ = ["FileSource", "JsonlSink", "read_committed"]

OPTIONS = {
    "pattern": "glob of the files to read in the directory (default '*.jsonl')",
    "format": "'jsonl' (each line parsed as JSON, the default) or 'lines' (str)",
    "state_dir": "where the position log is kept (default <dir>/.hotwire)",
    "poll_interval": "seconds between looks for new data when there is none (0.1)",
    "batch": "lines read from one file at a time (500)",
}
READ_BYTES = 1 << 20


class FileSource(PartitionedSource):
    """Tail the files of ``directory``; see the module docstring."""

    def __init__(self, directory: str | os.PathLike[str], **options: Any):
        problems = check_options("FileSource", options, OPTIONS)
        if not isinstance(directory, str | os.PathLike) or not str(directory):
            problems.append(f"FileSource: the directory must be a path, got {directory!r}")
        fmt = options.get("format", "jsonl")
        if fmt not in ("jsonl", "lines"):
            problems.append(f"FileSource: format {fmt!r} is not 'jsonl' or 'lines'")
        pattern = options.get("pattern", "*.jsonl")
        if not isinstance(pattern, str) or "/" in pattern or not pattern:
            problems.append(f"FileSource: pattern {pattern!r} must be a glob of file names")
        for k in ("poll_interval", "batch"):
            v = options.get(k, 1)
            if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
                problems.append(f"FileSource: {k} must be a positive number, got {v!r}")
        if problems:
            raise ValueError("; ".join(problems))
        self.directory = str(directory)
        self.pattern = pattern
        self.format = fmt
        self.state_dir = str(options.get("state_dir") or Path(self.directory) / ".hotwire")
        self.poll_interval = float(options.get("poll_interval", 0.1))
        self.batch = int(options.get("batch", 500))

    def __repr__(self) -> str:
        return f"FileSource({self.directory!r}, pattern={self.pattern!r})"

    def partitions(self) -> list[str]:
        d = Path(self.directory)
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.glob(self.pattern) if p.is_file())

    def read(self, partition: str, position: Any, limit: int) -> tuple[list[Any], Any]:
        path = Path(self.directory) / partition
        records: list[Any] = []
        offset = int(position)
        with open(path, "rb") as f:
            f.seek(offset)
            while len(records) < limit:
                chunk = f.read(READ_BYTES)
                if not chunk:
                    break
                lines = chunk.split(b"\n")
                if len(lines) == 1:  # no newline in a whole chunk: a line longer than it
                    if len(chunk) < READ_BYTES:
                        break  # the line is not complete yet
                    msg = f"{path}: a line at byte {offset} is longer than {READ_BYTES} bytes"
                    raise ValueError(msg)
                for line in lines[:-1]:
                    offset += len(line) + 1
                    if line.strip():  # blank lines are skipped
                        records.append(self._parse(line, path, offset))
                    if len(records) == limit:
                        break
                f.seek(offset)
        return records, offset

    def _parse(self, line: bytes, path: Path, end: int) -> Any:
        text = line.decode("utf-8")
        if self.format == "lines":
            return text
        try:
            return json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: the line ending at byte {end} is not JSON ({e})") from e

    def log_path(self, ctx: Any) -> Path:
        name = f"{ctx.app}.{ctx.pe}.{ctx.instance}-of-{ctx.parallelism}.jsonl"
        return Path(self.state_dir) / name
