"""streamctl status shows the age of the last checkpoint, errors per PE and the PEs
blocked on credit (backpressure); streamctl upgrade shows its phases as they pass on
a terminal (a real pseudo-terminal), and prints nothing of them to a pipe."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path
from typing import Any

from hotwire.testing.cluster import LocalCluster, poll_for, write_app

APP = """
import asyncio

from hotwire import Topology
from hotwire.testing.sources import counter

def check(r):
    if r["seq"] % 50 == 7:
        raise ValueError("seq ends in 7")  # skipped and counted
    return r

async def slow(r):
    await asyncio.sleep(0.005)  # about half the source's rate: the PEs before it block

app = Topology("st")
src = app.source("src", counter(rate=400))
m = src.map("check", check, config={{"on_error": "skip"}})
m.key_by(lambda r: r["key"]).reduce("count", lambda a, r: (a or 0) + 1, parallelism={p}).sink(
    "out", slow
)
"""


def _status(c: LocalCluster) -> dict[str, Any]:
    r = c.streamctl("status", "st", "--json")
    r.check_returncode()
    doc: dict[str, Any] = json.loads(r.stdout)
    return doc


def _on_a_terminal(c: LocalCluster, *args: str) -> tuple[int, str, str]:
    """streamctl ARGS with stderr on a pseudo-terminal: (exit status, stdout, what
    the terminal showed)."""
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen(
            [sys.executable, "-m", "hotwire.cli", "--master", c.address, *args],
            stdout=subprocess.PIPE,
            stderr=slave,
            stdin=subprocess.DEVNULL,
        )
        os.close(slave)
        shown = b""
        while True:
            ready, _, _ = select.select([master], [], [], 120)
            if not ready:
                p.kill()
                raise TimeoutError("streamctl wrote nothing for 120 s")
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed its side
                break
            if not chunk:
                break
            shown += chunk
        out = p.stdout.read().decode() if p.stdout else ""
        return p.wait(30), out, shown.decode()
    finally:
        os.close(master)


def test_status_and_upgrade_phases(cluster: LocalCluster, tmp_path: Path) -> None:
    v1 = write_app(tmp_path, "v1.py", APP.format(p=2))
    cluster.streamctl("submit", v1).check_returncode()

    def noted() -> dict[str, Any] | None:
        doc = _status(cluster)
        pes = {p["name"]: p for p in doc["pes"]}
        ok = (
            doc["checkpoint_age_s"] is not None
            and pes["check"]["errors"] > 0
            and pes["count"]["blocked"] > 0.5  # waits for credit from the slow sink
        )
        return doc if ok else None

    doc = poll_for(noted, 30, 0.5, what="a checkpoint, errors and a blocked PE in status")
    assert 0 <= doc["checkpoint_age_s"] < 30
    pes = {p["name"]: p for p in doc["pes"]}
    assert pes["check"]["errors"] == sum(i["errors"] for i in pes["check"]["instances"])
    assert pes["count"]["blocked"] == max(i["blocked"] for i in pes["count"]["instances"])
    assert all(0 <= i["blocked"] <= 1 for p in doc["pes"] for i in p["instances"])
    human = cluster.streamctl("status", "st").stdout
    first = human.splitlines()[0]
    assert first.startswith("app 'st' version 1 running, last checkpoint "), first
    assert first.endswith(" s ago"), first
    [check] = [line for line in human.splitlines() if line.strip().startswith("check ")]
    assert " errors" in check, human
    [count] = [line for line in human.splitlines() if line.strip().startswith("count ")]
    assert "blocked " in count and count.endswith("%"), human

    # On a terminal the upgrade's phases show as they pass, each with its duration.
    # (An app without the slow sink: behind its backlog a switch waits for the old
    # instances' queued output to drain, which can take longer than the switch timeout.)
    cluster.streamctl("kill", "st").check_returncode()
    fast = APP.replace('Topology("st")', 'Topology("fast")').replace(
        "await asyncio.sleep(0.005)", "pass"
    )
    f1, f2, f3 = (write_app(tmp_path, f"f{p}.py", fast.format(p=p)) for p in (1, 2, 3))
    cluster.streamctl("submit", f1).check_returncode()
    code, out, shown = _on_a_terminal(cluster, "upgrade", f2)
    assert code == 0, (out, shown)
    assert "version 2 is live" in out
    lines = [line.split("\r")[-1].strip() for line in shown.splitlines()]
    assert lines[0] == "upgrade of 'fast' to version 2:", shown
    phases = [line.split()[0] for line in lines[1:] if line.endswith(" ms")]
    assert phases == ["prepare", "switch", "commit"], shown
    for line in lines[1:]:
        if line.endswith(" ms"):
            assert float(line.split()[1]) >= 0, line
    # To a pipe (no terminal) nothing of them: stdout and stderr as before.
    r = cluster.streamctl("upgrade", f3)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", r.stderr
    assert "version 3 is live" in r.stdout
