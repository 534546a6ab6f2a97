"""hotwire's container image (Containerfile, scripts/build-image.sh), built and run with
podman: a master and two workers as containers run an app and an online upgrade.

The image is built from wheels with no network inside the build. Its base is
``$HOTWIRE_TEST_BASE_IMAGE`` if set, else python:3.11-slim-bookworm when a registry
answers, else a Debian bookworm made here with debootstrap (python3, venv) and kept
as ``localhost/hotwire/python-base:bookworm`` for the next run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotwire.testing.cluster import poll_for, write_app

ROOT = Path(__file__).resolve().parent.parent
LOCAL_BASE = "localhost/hotwire/python-base:bookworm"
SLIM = "docker.io/library/python:3.11-slim-bookworm"


def _why_not() -> str | None:
    if shutil.which("podman") is None:
        return "podman is not installed (scripts/setup.sh --full)"
    if os.geteuid() != 0:
        return "the image test runs podman as root"
    return None


WHY = _why_not()
if WHY is not None:
    if os.environ.get("CI"):
        raise RuntimeError(f"CI needs the container test's tools: {WHY}")
    pytest.skip(WHY, allow_module_level=True)

from hotwire.jobs.backends.podman import PodmanBackend, ulimit_args  # noqa: E402

GLOBAL = PodmanBackend().global_args


def _podman(
    *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["podman", *GLOBAL, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} failed: {r.stderr.strip()[-2000:]}")
    return r


def _base() -> str:
    given = os.environ.get("HOTWIRE_TEST_BASE_IMAGE")
    if given:
        return given
    if _podman("image", "exists", LOCAL_BASE, check=False).returncode == 0:
        return LOCAL_BASE
    if _podman("pull", "-q", SLIM, check=False, timeout=120).returncode == 0:
        return SLIM
    if shutil.which("debootstrap") is None:
        raise RuntimeError(
            f"no base image: {SLIM} cannot be pulled and debootstrap is not installed "
            "(scripts/setup.sh --full)"
        )
    with tempfile.TemporaryDirectory(prefix="hotwire-rootfs-") as d:
        subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3,python3-venv",
             "bookworm", d, "http://deb.debian.org/debian"],
            check=True, capture_output=True, timeout=900,
        )  # fmt: skip
        tar = subprocess.Popen(["tar", "-C", d, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["podman", *GLOBAL, "import", "-", LOCAL_BASE],
            stdin=tar.stdout, check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        tar.wait(60)
    return LOCAL_BASE


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    tag = f"localhost/hotwire:test-{os.getpid()}"
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-image.sh"), tag, _base()],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    yield tag
    _podman("rmi", "-f", tag, check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Containers:
    def __init__(self, image: str) -> None:
        self.image = image
        self.names: list[str] = []

    def run(self, name: str, health: str, *args: str, volumes: tuple[str, ...] = ()) -> str:
        full = f"hotwire-test-{os.getpid()}-{name}"
        _podman(
            "run", "-d", "--name", full, "--network", "host", *ulimit_args(),
            "--health-interval", "disable", "--env", f"HOTWIRE_HEALTH={health}",
            *(f"--volume={v}" for v in volumes), self.image, *args,
        )  # fmt: skip
        self.names.append(full)
        return full

    def logs(self, name: str) -> str:
        r = _podman("logs", name, check=False)
        return r.stdout + r.stderr

    def healthy(self, name: str) -> bool:
        return _podman("healthcheck", "run", name, check=False).returncode == 0

    def close(self) -> None:
        for n in reversed(self.names):
            _podman("stop", "-t", "10", n, check=False)
            _podman("rm", "-f", n, check=False)


APP = """
from hotwire import Topology
from hotwire.testing import counter, file_sink

app = Topology("boxed")
src = app.source("src", counter(n={n}, rate=2000.0, keys=8))
src.map("tag", lambda r: {{**r, "v": {v}}}, parallelism=2).sink("out", file_sink("/out/out.jsonl"))
"""


def _streamctl(master: str, *args: str) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run(
        [sys.executable, "-m", "hotwire.cli", "--master", master, *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _rows(out: Path) -> list[dict[str, object]]:
    p = out / "out.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.endswith("}")]


def test_master_and_workers_in_containers_run_an_app_and_an_upgrade(
    image: str, tmp_path: Path
) -> None:
    n = 8000
    out, store = tmp_path / "out", tmp_path / "store"
    for d in (out, store):
        d.mkdir()
        d.chmod(0o777)  # the containers run as uid 10001
    mport = _free_port()
    master = f"127.0.0.1:{mport}"
    boxes = _Containers(image)
    try:
        m = boxes.run(
            "master", master, "master", "--listen", master, "--data-dir", "/var/lib/hotwire/data",
            volumes=(f"{store}:/var/lib/hotwire/data",),
        )  # fmt: skip
        poll_for(lambda: "master listening on" in boxes.logs(m), 60, what="the master")
        workers = []
        for w in ("c1", "c2"):
            hport = _free_port()
            args = ["--master", master, "worker", "--name", w, "--health-port", str(hport)]
            workers.append(boxes.run(w, f"127.0.0.1:{hport}", *args, volumes=(f"{out}:/out",)))
        poll_for(
            lambda: _streamctl(master, "workers").stdout.count("alive") == 2,
            60,
            what="two workers in containers",
        )
        for name in (m, *workers):
            assert boxes.healthy(name), boxes.logs(name)[-2000:]
            uid = _podman("exec", name, "id", "-u").stdout.strip()
            assert uid == "10001", f"{name} runs as uid {uid}"
        v1 = write_app(tmp_path, "v1.py", APP.format(n=n, v=1))
        v2 = write_app(tmp_path, "v2.py", APP.format(n=n, v=2))
        r = _streamctl(master, "submit", v1)
        assert r.returncode == 0, r.stderr
        poll_for(lambda: len(_rows(out)) > 1000, 60, what="records from the containers")
        r = _streamctl(master, "upgrade", v2)
        assert r.returncode == 0, r.stderr
        poll_for(lambda: len(_rows(out)) >= n, 120, what="every record")
        store_files = {p.name for p in store.iterdir()}
    finally:
        boxes.close()
    rows = _rows(out)
    seqs = Counter(r["seq"] for r in rows)
    assert set(seqs) == set(range(n)) and max(seqs.values()) == 1
    assert {r["v"] for r in rows} == {1, 2}
    assert "hotwire.db" in store_files, store_files  # the master's store is on the volume
