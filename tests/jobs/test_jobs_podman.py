"""The podman backend runs real containers (skipped where podman is not installed).

The image is built here, from the static busybox on this machine (Debian's
busybox-static), with ``podman import``: no registry is needed.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from hotwire.jobs import Catalog, parse_request, render

pytestmark = pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed")

IMAGE = "localhost/hotwire/busybox:latest"


def _static_busybox() -> str | None:
    b = shutil.which("busybox")
    if not b:
        return None
    out = (
        subprocess.run(["file", "-L", b], capture_output=True, text=True, check=False).stdout
        if shutil.which("file")
        else ""
    )
    if out and "statically linked" not in out:
        return None
    return b


@pytest.fixture(scope="module")
def backend_and_catalog(tmp_path_factory: pytest.TempPathFactory):
    from hotwire.jobs.backends import get_backend

    b = get_backend("podman", state_dir=tmp_path_factory.mktemp("podman-state"))
    if b._run("image", "exists", IMAGE, check=False).returncode != 0:
        busybox = _static_busybox()
        if busybox is None:
            pytest.skip(
                "no static busybox to build the test image (apt-get install busybox-static)"
            )
        root = tmp_path_factory.mktemp("rootfs")
        tar = root.parent / "rootfs.tar"
        with tarfile.open(tar, "w") as t:
            info = t.gettarinfo(busybox, "bin/busybox")
            with open(busybox, "rb") as f:
                t.addfile(info, f)
            for tool in ("sh", "echo", "cat", "sleep", "env", "ls"):
                link = tarfile.TarInfo(f"bin/{tool}")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                t.addfile(link)
        b._run("import", str(tar), IMAGE)
    cat_dir = tmp_path_factory.mktemp("catalog")
    (cat_dir / "images.yaml").write_text(
        f"- id: busybox\n  framework: generic\n  version: '1'\n  accelerator: cpu\n"
        f"  backends: {{podman: {{image: '{IMAGE}', python: 'false'}}}}\n"
    )
    return b, Catalog.load([cat_dir], use_env=False)


@pytest.fixture
def podman(backend_and_catalog):
    b, cat = backend_and_catalog
    started: list[str] = []
    yield b, cat, started
    for name in started:
        b.delete(name)


def submit(b, cat, started, **kw):
    r = parse_request({"framework": "generic", "image": "busybox", **kw})
    job = render(r, cat, "podman")
    started.append(job.name)
    b.submit(job)
    return job.name


def test_podman_runs_replicas_in_real_containers(podman, tmp_path: Path) -> None:
    b, cat, started = podman
    script = (
        "echo replica $HOTWIRE_REPLICA of $HOTWIRE_REPLICAS $GREETING; "
        "echo $HOTWIRE_REPLICA > /workspace/data/out-$HOTWIRE_REPLICA; "
        "cat /proc/self/cgroup | grep -c . > /dev/null; ulimit -n"
    )
    name = submit(
        b,
        cat,
        started,
        name="pm-ok",
        replicas=2,
        command=["sh", "-c", script],
        env={"GREETING": "hi"},
        data=str(tmp_path),
        resources={"memory": "64Mi"},
    )
    st = b.wait(name, 60, poll=0.3)
    assert st.state == "succeeded", b.logs(name)
    logs = b.logs(name)
    assert "replica 0 of 2 hi" in logs["pm-ok-0"] and "replica 1 of 2 hi" in logs["pm-ok-1"]
    assert sorted(p.name for p in tmp_path.glob("out-*")) == ["out-0", "out-1"]


def test_podman_failure_and_stop(podman) -> None:
    b, cat, started = podman
    name = submit(
        b,
        cat,
        started,
        name="pm-fail",
        replicas=2,
        command=["sh", "-c", "if [ $HOTWIRE_REPLICA = 1 ]; then exit 3; fi; sleep 60"],
    )
    st = b.wait(name, 60, poll=0.3)
    assert st.state == "failed" and st.message == "replica pm-fail-1 failed"
    assert [r.exit_code for r in st.replicas][1] == 3
    name = submit(b, cat, started, name="pm-stop", command=["sleep", "60"])
    assert b.status(name).state in ("pending", "running")
    assert b.stop(name).state == "stopped"
    assert all(r.state != "running" for r in b.status(name).replicas)
