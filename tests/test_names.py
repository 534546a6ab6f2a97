"""App and PE names: one rule, checked by the master on submit, upgrade and
rollback (and by the SDK before sending), and paths built from names confined
to their directory.

One cluster serves the module: no refused request may deploy or change anything."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from hotwire.client import load
from hotwire.jobs.backends.local import LocalBackend
from hotwire.jobs.errors import JobNotFound
from hotwire.model import LogicalModel, check_structure
from hotwire.names import NAME_RULE, PathEscape, confined, is_valid_name, name_problem, shown
from hotwire.proto import hotwire_pb2 as pb
from hotwire.sdk.bundle import unload_bundle
from hotwire.sdk.errors import ValidationError
from hotwire.sinks import JsonlSink
from hotwire.testing.cluster import LocalCluster, watched, write_app

BAD_NAMES = ["../../etc", "a/b", "..", " ", "x" * 200, "a\nb", "/abs", ".hidden", "a b"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with watched(
        LocalCluster(workers=2, data_dir=tmp_path_factory.mktemp("names"), heartbeat_timeout=3.0)
    ) as c:
        yield c


@pytest.fixture(scope="module")
def app_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("names-app")
    return write_app(
        d,
        "app.py",
        f"""
        from hotwire import Topology
        from hotwire.testing import counter, file_sink

        app = Topology("names-ok")
        app.source("src", counter(n=100, rate=200)).sink("out", file_sink({str(d / "out.jsonl")!r}))
        """,
    )


@pytest.fixture(scope="module")
def request_parts(app_file: str) -> tuple[dict[str, Any], bytes, str]:
    model, bundle = load(app_file)
    return model.to_dict(), bundle.data, bundle.hash


def _renamed(model: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """``model`` with PE ``old`` called ``new``."""
    m = json.loads(json.dumps(model))
    for pe in m["pes"]:
        pe["name"] = new if pe["name"] == old else pe["name"]
    for st in m["streams"]:
        st["src"] = new if st["src"] == old else st["src"]
        st["dst"] = new if st["dst"] == old else st["dst"]
    return m


def _apps(cluster: LocalCluster) -> list[str]:
    return [a.app for a in cluster.client.status().apps]


def _refused(call: Any, *needles: str) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call()
    details = e.value.details()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), details)
    assert "\n" not in details and "the name is not allowed" in details, details
    for needle in needles:
        assert needle in details, (needle, details)
    return details


# ---------------------------------------------------------------------------
# The master refuses bad names, changing nothing
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_a_bad_name_override_is_refused_on_submit_and_upgrade(
    cluster: LocalCluster, request_parts: tuple[dict[str, Any], bytes, str], bad: str
) -> None:
    model, data, h = request_parts
    stub = cluster.client.stub
    req = {"model_json": json.dumps(model), "bundle": data, "bundle_hash": h, "name": bad}
    details = _refused(lambda: stub.Submit(pb.SubmitRequest(**req), timeout=10), shown(bad))
    assert len(details) < 300, details  # a 200-character name is cut short in the message
    _refused(lambda: stub.Upgrade(pb.UpgradeRequest(**req), timeout=10), shown(bad))
    _refused(lambda: stub.Rollback(pb.RollbackRequest(app=bad), timeout=10), shown(bad))
    assert "names-ok" not in _apps(cluster) and bad not in _apps(cluster)


@pytest.mark.parametrize("bad", ["a/b", "../out", "x" * 64, ""], ids=repr)
def test_a_bad_pe_or_app_name_in_the_model_is_refused(
    cluster: LocalCluster, request_parts: tuple[dict[str, Any], bytes, str], bad: str
) -> None:
    model, data, h = request_parts
    stub = cluster.client.stub
    pe_model = _renamed(model, "out", bad)
    req = {"model_json": json.dumps(pe_model), "bundle": data, "bundle_hash": h}
    _refused(
        lambda: stub.Submit(pb.SubmitRequest(**req), timeout=10),
        f"PE {shown(bad)} of app 'names-ok'",
    )
    if bad:
        app_model = {**model, "app": bad}
        req = {"model_json": json.dumps(app_model), "bundle": data, "bundle_hash": h}
        _refused(lambda: stub.Submit(pb.SubmitRequest(**req), timeout=10), f"app {shown(bad)}")
    assert _apps(cluster) == []


# ---------------------------------------------------------------------------
# The client refuses them before sending
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["submit", "upgrade"])
def test_streamctl_name_override_is_refused_in_one_line(
    cluster: LocalCluster, app_file: str, command: str
) -> None:
    res = cluster.streamctl(command, "--name", "../x", app_file)
    assert res.returncode == 1, res
    err = res.stderr.strip()
    assert res.stdout == "" and len(err.splitlines()) == 1, err
    assert err == f"streamctl: app '../x': the name is not allowed; {NAME_RULE}", err
    assert not {"../x", "x", "names-ok"} & set(_apps(cluster))


def test_the_client_library_refuses_before_sending(app_file: str) -> None:
    from hotwire.client import Client

    with Client("127.0.0.1:1") as c:  # nothing listens there: refused before any call
        for call in (c.submit, c.upgrade):
            with pytest.raises(ValidationError, match=re.escape("app 'a/b': the name")):
                call(app_file, name="a/b")
        with pytest.raises(ValidationError, match=re.escape("app '..': the name")):
            c.rollback("..")


def test_a_running_app_is_unchanged_by_a_refused_upgrade(
    cluster: LocalCluster, app_file: str, request_parts: tuple[dict[str, Any], bytes, str]
) -> None:
    model, data, h = request_parts
    r = cluster.client.submit(app_file)
    try:
        assert (r.app, r.version) == ("names-ok", 1)
        renamed = _renamed(model, "src", "../src")
        req = {"model_json": json.dumps(renamed), "bundle": data, "bundle_hash": h}
        _refused(lambda: cluster.client.stub.Upgrade(pb.UpgradeRequest(**req), timeout=10))
        req = {"model_json": json.dumps(model), "bundle": data, "bundle_hash": h}
        _refused(
            lambda: cluster.client.stub.Upgrade(
                pb.UpgradeRequest(**req, name="names-ok/../names-ok"), timeout=10
            )
        )
        (st,) = cluster.client.status().apps
        assert (st.app, st.version, st.state) == ("names-ok", 1, "running")
        assert sorted(p.name for p in st.pes) == ["out", "src"]
        assert len(cluster.client.history("names-ok").versions) == 1
    finally:
        cluster.client.kill("names-ok")


# ---------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "Z", "0", "w1", "my-app_2.v3", "a..b", "9" * 63])
def test_names_that_follow_the_rule(name: str) -> None:
    assert is_valid_name(name) and name_problem(name, "x") is None


@pytest.mark.parametrize(
    "name", [*BAD_NAMES, "", "-a", "_a", "a\\b", "a\x00b", "café", "a\n", "9" * 64, None, 7]
)
def test_names_that_break_it(name: Any) -> None:
    assert not is_valid_name(name)
    assert name_problem(name, f"app {shown(name)}") == (
        f"app {shown(name)}: the name is not allowed; {NAME_RULE}"
    )


def test_check_structure_names_the_bad_pe_and_app() -> None:
    m = LogicalModel.from_dict(
        {
            "app": "../a",
            "pes": [
                {"name": "s", "kind": "source"},
                {"name": "o/x", "kind": "sink"},
            ],
            "streams": [{"src": "s", "dst": "o/x"}],
        }
    )
    problems = check_structure(m)
    assert problems == [
        f"app '../a': the name is not allowed; {NAME_RULE}",
        f"PE 'o/x' of app '../a': the name is not allowed; {NAME_RULE}",
    ]


def test_a_stream_to_an_undeclared_pe_is_a_problem_not_a_crash() -> None:
    m = LogicalModel.from_dict(
        {
            "app": "a",
            "pes": [{"name": "s", "kind": "source"}],
            "streams": [{"src": "s", "dst": "z"}],
        }
    )
    assert check_structure(m) == ["a stream names PE 'z', which the model lacks"]


# ---------------------------------------------------------------------------
# Paths built from names stay in their directory
# ---------------------------------------------------------------------------


def test_confined_paths_inside_the_base(tmp_path: Path) -> None:
    base = tmp_path / "dead-letter"  # need not exist yet
    assert confined(base, "app.pe.jsonl") == base.resolve() / "app.pe.jsonl"
    assert confined(base, "sub", "f") == base.resolve() / "sub" / "f"
    assert confined(str(base), "a..b.jsonl") == base.resolve() / "a..b.jsonl"


@pytest.mark.parametrize(
    "parts",
    [("..",), ("../x",), ("a/../../x",), ("/etc/passwd",), ("",), (".",), ("a", ".."), ()],
    ids=repr,
)
def test_confined_refuses_what_leads_out(tmp_path: Path, parts: tuple[str, ...]) -> None:
    with pytest.raises(PathEscape, match="not into"):
        confined(tmp_path / "base", *parts)


def test_confined_refuses_nul_bytes_and_links_out(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "out").symlink_to(tmp_path)
    with pytest.raises(PathEscape):
        confined(base, "out", "x")
    with pytest.raises(PathEscape, match="not a usable path"):
        confined(base, "a\x00b")


def test_a_jsonl_sink_writes_only_in_its_directory(tmp_path: Path) -> None:
    sink = JsonlSink()
    sink.setup(type("Ctx", (), {"config": {"dir": str(tmp_path / "out")}, "pe": "out"})())
    sink.begin("x/../../../escaped")
    with pytest.raises(PathEscape):
        sink.write({"a": 1})
    with pytest.raises(PathEscape):
        sink.commit("../escaped")
    assert not list(tmp_path.rglob("*escaped*"))


def test_unloading_a_bundle_never_removes_outside_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "bundles"
    cache.mkdir()
    keep = tmp_path / "keep"
    keep.mkdir()
    for bad in ("../keep", "..", ""):
        with pytest.raises(PathEscape):
            unload_bundle(bad, cache)
    assert keep.is_dir() and cache.is_dir()


def test_a_local_job_name_that_leads_out_names_no_job(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "state")
    (tmp_path / "replicas.json").write_text("{}")  # what ../ would find
    for bad in ("..", "../state", "a/../../x"):
        with pytest.raises(JobNotFound, match="no job named"):
            b.status(bad)
    assert os.path.exists(tmp_path / "replicas.json")
