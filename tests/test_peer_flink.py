"""bench/peer_flink.py's pure parts: the cluster's configuration, the job's arguments, and
what it reads from the Flink CLI's output; and its one-line skip when PyFlink is absent.

No Flink runs here: the Flink peer is an optional benchmark (``hotwire[flink]``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import peer_flink  # noqa: E402

# the lines `flink run -d -py ...` and `flink stop --savepointPath ...` print (Flink 2.3.0)
RUN_OUT = """\
Job has been submitted with JobID 353dcb7740512101277978715422aa6b
"""
STOP_OUT = """\
Suspending job "a17b130feb6845277384dd12b919f61a" with a CANONICAL savepoint.
Triggering stop-with-savepoint for job a17b130feb6845277384dd12b919f61a.
Waiting for response...
Savepoint completed. Path: file:/tmp/hotwire-flink-x/savepoints/savepoint-a17b13-5f0c2a7e9b11
"""


def test_job_id_and_savepoint_are_read_from_the_cli_output() -> None:
    assert peer_flink.parse_job_id(RUN_OUT) == "353dcb7740512101277978715422aa6b"
    assert (
        peer_flink.parse_savepoint(STOP_OUT)
        == "file:/tmp/hotwire-flink-x/savepoints/savepoint-a17b13-5f0c2a7e9b11"
    )


def test_cli_output_without_the_answer_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match="flink run printed no JobID: 'Waiting for response"):
        peer_flink.parse_job_id("Waiting for response...\n")
    with pytest.raises(ValueError, match="flink stop printed no savepoint path: 'Suspending"):
        peer_flink.parse_savepoint(STOP_OUT.rsplit("Savepoint", 1)[0])


def test_job_args_start_with_a_word_and_carry_the_version() -> None:
    args = peer_flink.job_args(out=Path("/x/o.jsonl"), n=10, rate=1000, keys=5, code=2, ver=2)
    assert args[0] == "job"  # the CLI stops reading its own options at a word
    assert json.loads(args[1]) == {
        "out": "/x/o.jsonl",
        "n": 10,
        "rate": 1000.0,
        "keys": 5,
        "code": 2,
        "count_p": 2,
        "ver": 2,
    }


def test_config_is_yaml_with_the_ports_thread_mode_and_checkpoints(tmp_path: Path) -> None:
    text = peer_flink.flink_config(
        work=tmp_path,
        rpc_port=40001,
        rest_port=40002,
        python="/venv/bin/python",
        java_opts="--add-opens=java.base/java.lang=ALL-UNNAMED",
    )
    conf = yaml.safe_load(text)
    assert conf["jobmanager.rpc.port"] == 40001
    assert conf["rest.port"] == 40002
    assert conf["rest.bind-address"] == conf["taskmanager.host"] == "localhost"
    assert conf["python.execution-mode"] == "thread"
    assert conf["python.executable"] == "/venv/bin/python"
    assert conf["state.backend.type"] == "hashmap"
    assert conf["execution.checkpointing.interval"] == "1 s"
    assert conf["execution.checkpointing.savepoint-dir"] == (tmp_path / "savepoints").as_uri()
    assert conf["env.java.opts.all"] == "--add-opens=java.base/java.lang=ALL-UNNAMED"


def test_java_opts_are_taken_from_the_distribution_config() -> None:
    dist = (
        "env:\n  java:\n    opts:\n      all: --add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED"
        " --add-opens=java.base/java.lang=ALL-UNNAMED\njobmanager:\n  bind-host: localhost\n"
    )
    assert peer_flink._java_opts(dist) == (
        "--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED "
        "--add-opens=java.base/java.lang=ALL-UNNAMED"
    )
    assert peer_flink._java_opts("jobmanager:\n  bind-host: localhost\n") == ""


def test_without_pyflink_the_benchmark_says_so_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-python"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "peer_flink.py"),
            "--flink-python",
            str(missing),
            "--out",
            str(tmp_path / "f.json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("peer_flink: skipped: ")
    assert str(missing) in lines[0] or "java" in lines[0]
    assert not (tmp_path / "f.json").exists()
