"""streamctl: --master after the command, and a clean Ctrl-C of `streamctl up`.

Everything runs the real command line against real master and worker processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from hotwire.cli import main
from hotwire.testing.cluster import LocalCluster, poll_for, streamctl

ROOT = Path(__file__).resolve().parents[1]
# Nothing listens on port 1: a command sent there fails with "cannot reach the master".
NOWHERE = "127.0.0.1:1"


@pytest.fixture
def master_only(tmp_path: Path) -> Iterator[LocalCluster]:
    """A real master on a loopback port, no workers."""
    c = LocalCluster(workers=0, data_dir=tmp_path / "cluster", heartbeat_timeout=3.0)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def _worker_names(c: LocalCluster) -> set[str]:
    return {w.name for w in c.client.workers().workers if w.alive}


def test_worker_takes_master_after_the_command(master_only: LocalCluster, tmp_path: Path) -> None:
    log = tmp_path / "wx.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "hotwire.cli"),
                *("worker", "--master", master_only.address, "--name", "wX"),
                *("--data-dir", str(tmp_path / "wx"), "--log-level", "warning"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # $HOTWIRE_MASTER is the default only: the option wins over it.
            env={**os.environ, "HOTWIRE_MASTER": NOWHERE},
        )
    try:
        poll_for(
            lambda: "wX" in _worker_names(master_only) or proc.poll() is not None,
            30,
            what="worker wX to register",
        )
        assert proc.poll() is None, log.read_text()
        r = streamctl("workers", "--master", master_only.address, "--json")
        assert r.returncode == 0, r.stderr
        assert [w["name"] for w in json.loads(r.stdout)["workers"]] == ["wX"]
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
    assert rc == 0, log.read_text()
    assert "could not drain" not in log.read_text()


def test_master_after_the_command_wins_over_before_and_the_environment(
    master_only: LocalCluster,
) -> None:
    addr = master_only.address
    master_only.client.workers()  # the master answers
    # After the command only; before the command pointing nowhere; $HOTWIRE_MASTER nowhere.
    for args in (
        ("status", "--master", addr, "--json"),
        ("--master", NOWHERE, "status", "--master", addr, "--json"),
    ):
        r = streamctl(*args, env={"HOTWIRE_MASTER": NOWHERE})
        assert r.returncode == 0, (args, r.stderr)
        assert json.loads(r.stdout) == {"apps": []}
    # $HOTWIRE_MASTER is still the default when no --master is given anywhere.
    r = streamctl("status", "--json", env={"HOTWIRE_MASTER": addr})
    assert r.returncode == 0, r.stderr
    # And the option after the command is the one used, even against a good one before it.
    r = streamctl("--master", addr, "history", "nosuchapp", "--master", NOWHERE)
    assert r.returncode == 1
    assert r.stderr.startswith("streamctl: cannot reach the master") and NOWHERE in r.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["worker"],
        ["submit", "APP"],
        ["upgrade", "APP"],
        ["status"],
        ["history", "x"],
        ["rollback", "x"],
        ["kill", "x"],
        ["workers"],
        ["jobs", "templates"],
        ["jobs", "status"],
    ],
)
def test_every_command_that_uses_a_master_accepts_the_option(command: list[str]) -> None:
    args = [str(ROOT / "examples" / "wordcount.py") if a == "APP" else a for a in command]
    r = CliRunner().invoke(main, [*args, "--master", NOWHERE, "--help"])
    assert r.exit_code == 0, r.output
    assert "--master HOST:PORT" in r.output


def test_commands_that_run_the_master_refuse_master_after_the_command() -> None:
    # `master` and `up` take --listen: a --master there would be silently ignored.
    for command in (["master"], ["up"]):
        r = CliRunner().invoke(main, [*command, "--master", NOWHERE])
        assert r.exit_code == 2, r.output
        assert "No such option '--master'" in r.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _processes_mentioning(text: str) -> list[tuple[int, str]]:
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append((int(d.name), cmd))
    return found


def test_ctrl_c_stops_up_cleanly(tmp_path: Path) -> None:
    addr = f"127.0.0.1:{_free_port()}"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "hotwire.cli", "up", str(ROOT / "examples" / "wordcount.py")),
            *("--workers", "2", "--listen", addr, "--data-dir", str(tmp_path / "up")),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    out: list[str] = []
    err: list[str] = []
    app_output = threading.Event()

    def read(stream: object, lines: list[str], watch: bool) -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.append(line)
            if watch and re.match(r"^\[w\d\] [a-z]+ \d+$", line.rstrip()):
                app_output.set()  # the wordcount sink printed "word count"

    readers = [
        threading.Thread(target=read, args=(proc.stdout, out, True), daemon=True),
        threading.Thread(target=read, args=(proc.stderr, err, False), daemon=True),
    ]
    for t in readers:
        t.start()
    try:
        assert app_output.wait(60), f"no app output:\n{''.join(out)}{''.join(err)}"
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends to `up`
        rc = proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
        for t in readers:
            t.join(5)
        left = _processes_mentioning(addr)
        for pid, _ in left:
            os.kill(pid, signal.SIGKILL)
    text = "".join(out) + "".join(err)
    assert rc == 0, text
    assert not left, f"cluster processes left running: {left}"
    for bad in ("could not drain", "CANCELLED", "Traceback", "Error", "error"):
        assert bad not in text, text
    assert "".join(err) == ""
    assert "stopping the local cluster\n" in out and out[-1] == "local cluster stopped\n", text


def test_a_stale_profile_for_the_port_is_named_in_the_error(
    master_only: LocalCluster, tmp_path: Path
) -> None:
    """A profile left by a secure cluster that ran on this port before: the plaintext
    master now there cannot be reached with its TLS files, and the one line says which
    profile to delete. Without the profile the same command works."""
    from hotwire.master.access import bootstrap
    from hotwire.security.tls import profile_dir, write_profile

    gone = bootstrap(tmp_path / "gone")
    d = write_profile(master_only.address, gone.ca, gone.client_cert, gone.client_key, gone.token)
    assert d == profile_dir(master_only.address)
    r = master_only.streamctl("workers", timeout=60)
    assert r.returncode == 1, r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("streamctl: cannot reach the master:"), r.stderr
    assert f"TLS credentials from the profile in {d}" in last, r.stderr
    import shutil

    shutil.rmtree(d)
    r = master_only.streamctl("workers", timeout=60)
    assert r.returncode == 0, r.stderr
