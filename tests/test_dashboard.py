"""The master's web dashboard on a real cluster: the page in a real headless
chromium follows an online upgrade without a reload (the new PE, its colour as
added, the new version), shows a dry run's preview; tokens and HTTPS on a TLS
master; malformed requests get a 4xx and the master goes on."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import shutil
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotwire.testing.cluster import LocalCluster, poll_for, write_app

APP = """
import time

from hotwire import Topology
from hotwire.sdk import ProcessPE
from hotwire.testing.sources import counter

class Tag(ProcessPE):
    def setup(self, ctx):
        time.sleep(2.0)  # a slow start: the upgrade stays in its prepare phase a while

    def process(self, record):
        return [{{**record, "t": 1}}]

app = Topology("dash")
src = app.source("src", counter(rate=200))
m = src.map("double", lambda r: {{**r, "v": r["seq"] * 2}}, parallelism=2)
{extra}m.sink("out", lambda r: None)
"""
V2 = 'm = m.process("tag", Tag)\n'


def _apps(tmp: Path) -> tuple[str, str]:
    return (
        write_app(tmp, "dash_v1.py", APP.format(extra="")),
        write_app(tmp, "dash_v2.py", APP.format(extra=V2)),
    )


def _need_browser() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    problem = ""
    if chromium is None or driver is None:
        problem = "chromium and chromedriver are not installed (apt: chromium chromium-driver)"
    else:
        try:
            import selenium  # noqa: F401
        except ImportError:
            problem = "selenium is not installed (pip install -e '.[test]')"
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {problem}")
        pytest.skip(problem)
    assert chromium is not None and driver is not None
    return chromium, driver


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless Debian chromium driven by selenium; quit afterwards."""
    chromium, driver = _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    d = webdriver.Chrome(options=options, service=Service(driver))
    try:
        yield d
    finally:
        d.quit()


def _js(d: Any, script: str) -> Any:
    return d.execute_script(script)


def _node(d: Any, pe: str) -> dict[str, Any] | None:
    """The graph node of ``pe`` as the page draws it: its classes and texts."""
    result: dict[str, Any] | None = _js(
        d,
        f"""const g = document.querySelector('#graph g.pe[data-pe={json.dumps(pe)}]');
        return g ? {{cls: g.getAttribute('class'), status: g.dataset.status,
                     text: g.textContent}} : null;""",
    )
    return result


def test_dashboard_follows_an_online_upgrade_in_a_browser(tmp_path: Path, browser: Any) -> None:
    v1, v2 = _apps(tmp_path)
    with LocalCluster(workers=2, data_dir=tmp_path / "c", dashboard=True) as c:
        c.client.submit(v1)
        d = browser
        d.get(f"http://{c.dashboard_address}/")
        _js(d, "window.__notReloaded = true;")

        # Version 1: its three PEs, live rates from the workers, the two workers alive.
        poll_for(lambda: _node(d, "out"), 20, 0.1, what="the graph of version 1")
        assert d.find_element("id", "app-version").text == "v1"
        assert _node(d, "tag") is None
        poll_for(
            lambda: (
                "rec/s" in (_node(d, "src") or {}).get("text", "")
                and not (_node(d, "src") or {})["text"].count(" 0 rec/s")
            ),
            20,
            0.2,
            what="a rate on the source's node",
        )
        workers = _js(
            d,
            "return [...document.querySelectorAll('#workers tbody tr')]"
            ".map(r => r.dataset.worker + ' ' + r.cells[1].textContent)",
        )
        assert sorted(workers) == ["w1 alive", "w2 alive"], workers

        # A dry run: the page shows its preview on the graph, marked as such.
        dry = c.streamctl("upgrade", v2, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        poll_for(
            lambda: (
                _js(d, "return document.getElementById('mode-title').dataset.mode") == "preview"
            ),
            20,
            0.1,
            what="the dry run's preview",
        )
        node = _node(d, "tag")
        assert node is not None and node["status"] == "added", node
        assert "PREVIEW" in d.find_element("id", "mode-title").text
        assert "start tag@" in d.find_element("id", "plan").text
        assert d.find_element("id", "app-version").text == "v1"  # nothing applied

        # The upgrade itself, online: the page follows it over /events, no reload,
        # phase by phase (the new PE's slow setup holds the prepare phase).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            upgrading = pool.submit(c.client.upgrade, v2)
            poll_for(
                lambda: (
                    _js(
                        d,
                        "const p = document.getElementById('phases');"
                        "const cur = document.querySelector('#phases .phase.current');"
                        "return p && p.dataset.running === '1' && cur && cur.dataset.phase;",
                    )
                    == "prepare"
                ),
                20,
                0.05,
                what="the page to show the upgrade in its prepare phase",
            )
            assert "upgrade to version 2" in d.find_element("id", "progress").text
            assert d.find_element("id", "outcome").text == "in prepare"
            reply = upgrading.result(60)
        assert reply.applied and reply.to_version == 2
        poll_for(
            lambda: d.find_element("id", "app-version").text == "v2",
            20,
            0.1,
            what="the page to show version 2",
        )
        poll_for(lambda: (_node(d, "tag") or {}).get("status") == "added", 20, 0.1)
        assert _js(d, "return document.getElementById('mode-title').dataset.mode") == "last"
        node = _node(d, "tag")
        assert node is not None and "status-added" in node["cls"], node
        assert (_node(d, "double") or {}).get("status") == "same"
        edge = _js(
            d,
            "const e = document.querySelector('#graph g.stream[data-stream=\"double->tag\"]');"
            "return e && e.getAttribute('class');",
        )
        assert edge is not None and "status-added" in edge, edge
        legend = d.find_element("id", "legend").text
        for word in ("added", "removed", "changed", "renamed", "rescaled"):
            assert word in legend
        assert "+ pe 'tag'" in d.find_element("id", "changes").text
        # The transition phase by phase, and the history with version 2 on top.
        poll_for(lambda: "committed" in d.find_element("id", "progress").text, 20, 0.1)
        phases = _js(
            d,
            "return [...document.querySelectorAll('#phases .phase')].map(p => p.dataset.phase)",
        )
        assert phases == ["prepare", "switch", "commit"], phases
        top = _js(d, "return document.querySelector('#history tbody tr').dataset.version")
        assert top == "2"
        # The new PE gets records: its rate shows on its node.
        poll_for(
            lambda: (
                "rec/s" in (_node(d, "tag") or {}).get("text", "")
                and " 0 rec/s" not in (_node(d, "tag") or {})["text"]
            ),
            20,
            0.2,
            what="a rate on the new PE",
        )
        assert _js(d, "return window.__notReloaded === true")
        assert c.master is not None
        assert "Traceback" not in c.master.log_path.read_text()


def _https(addr: str, ca: Path, path: str, headers: dict[str, str] | None = None) -> Any:
    ctx = ssl.create_default_context(cafile=str(ca))
    req = urllib.request.Request(f"https://{addr}{path}", headers=headers or {})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), NoRedirect())
    try:
        with opener.open(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_dashboard_on_a_tls_master_needs_a_token(tmp_path: Path) -> None:
    """HTTPS with the master's certificate (checked with the cluster CA); no token or
    a bad or revoked one: 401; a viewer token, as a header or once in the address
    (which sets an HttpOnly cookie): served."""
    with LocalCluster(workers=0, data_dir=tmp_path / "c", secure=True, dashboard=True) as c:
        addr, ca = c.dashboard_address, c.admin.ca
        for path in ("/", "/api/apps", "/events"):
            code, headers, body = _https(addr, ca, path)
            assert code == 401, (path, code, body)
            assert headers.get("WWW-Authenticate", "").startswith("Bearer")
            assert b"no token" in body
        code, _, body = _https(addr, ca, "/api/apps", {"Authorization": "Bearer hwt_x_nope"})
        assert code == 401 and b"not valid" in body
        code, _, _ = _https(addr, ca, "/api/apps", {"Authorization": "Basic abc"})
        assert code == 401

        viewer = c.client.create_token("viewer", "dashboard test")
        auth = {"Authorization": f"Bearer {viewer.token}"}
        code, _, body = _https(addr, ca, "/api/apps", auth)
        assert code == 200 and json.loads(body) == {"apps": []}
        code, _, body = _https(addr, ca, "/", auth)
        assert code == 200 and b"<svg" in body
        # ?token= once: a cookie (HttpOnly, Secure) and the page again without the token.
        code, headers, _ = _https(addr, ca, f"/?token={viewer.token}")
        assert code == 303 and headers["Location"] == "/"
        cookie = headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=Strict" in cookie
        jar = {"Cookie": cookie.split(";")[0]}
        code, _, body = _https(addr, ca, "/api/workers", jar)
        assert code == 200 and json.loads(body) == {"workers": []}
        # Revoked: refused, by header and by cookie.
        c.client.revoke_token(viewer.id)
        for h in (auth, jar):
            code, _, body = _https(addr, ca, "/api/apps", h)
            assert code == 401 and b"revoked" in body, body
        # An admin's token serves too.
        admin = {"Authorization": f"Bearer {c.admin.token}"}
        code, _, _ = _https(addr, ca, "/api/apps", admin)
        assert code == 200
        # Plain HTTP: a 400 that says to use HTTPS; a client of another CA fails its
        # handshake; a connection that sends nothing is closed. The dashboard goes on.
        answer = _raw(addr, b"GET /api/apps HTTP/1.1\r\n\r\n")
        assert _status(answer) == 400 and b"serves HTTPS only: https://" in answer, answer
        from hotwire.security import pki

        other = pki.make_ca(tmp_path / "other-ca")
        with pytest.raises(urllib.error.URLError) as e:
            _https(addr, other.cert, "/api/apps", admin)
        assert isinstance(e.value.reason, ssl.SSLCertVerificationError)
        assert _raw(addr, b"") == b""
        code, _, _ = _https(addr, ca, "/api/apps", admin)
        assert code == 200
        assert c.master is not None
        assert "Traceback" not in c.master.log_path.read_text()


def _raw(addr: str, data: bytes) -> bytes:
    """Send ``data`` as is and read the answer until the server closes."""
    host, _, port = addr.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_dashboard_answers_bad_requests_with_4xx(tmp_path: Path) -> None:
    v1, _ = _apps(tmp_path)
    with LocalCluster(workers=1, data_dir=tmp_path / "c", dashboard=True) as c:
        c.client.submit(v1)
        addr = c.dashboard_address
        cases = [
            (b"garbage\r\n\r\n", 400, b"malformed request line"),
            (b"GET /api/apps SPDY/3\r\n\r\n", 400, b"unsupported protocol"),
            (b"POST /api/apps HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 405, b"read-only"),
            (b"DELETE /api/apps/dash HTTP/1.1\r\n\r\n", 405, b"read-only"),
            (b"GET api/apps HTTP/1.1\r\n\r\n", 400, b"starting with '/'"),
            (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431, b"16 KiB"),
            (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400, b"malformed header"),
            (b"GET /nope HTTP/1.1\r\n\r\n", 404, b"no such page"),
            (b"GET /api/apps/nope HTTP/1.1\r\n\r\n", 404, b"no app named 'nope'"),
            (b"GET /api/apps/dash/diff?from=x&to=1 HTTP/1.1\r\n\r\n", 400, b"version number"),
            (b"GET /api/apps/dash/diff?from=1&to=7 HTTP/1.1\r\n\r\n", 404, b"no version 7"),
            (b"GET /api/apps/dash/preview HTTP/1.1\r\n\r\n", 404, b"no dry run"),
            (b"GET /api/apps/%ff%fe HTTP/1.1\r\n\r\n", 400, b"not valid UTF-8"),
            (b"GET /static/../../etc/passwd HTTP/1.1\r\n\r\n", 404, b"no such page"),
        ]
        for request, code, text in cases:
            answer = _raw(addr, request)
            assert _status(answer) == code, (request[:60], answer[:300])
            assert text in answer, (request[:60], answer[:300])
        # A request cut short, a connection that says nothing: the server goes on.
        assert _raw(addr, b"GET /api/ap") == b""
        host, _, port = addr.rpartition(":")
        socket.create_connection((host, int(port)), timeout=5).close()
        with urllib.request.urlopen(f"http://{addr}/api/apps/dash", timeout=5) as r:
            detail = json.loads(r.read())
        assert detail["version"] == 1
        assert [n["name"] for n in detail["diff"]["graph"]["nodes"]] == ["src", "double", "out"]
        assert c.client.status("dash").apps[0].state == "running"
        assert c.master is not None and c.master.proc.poll() is None
        assert "Traceback" not in c.master.log_path.read_text()


def test_graph_layers_and_change_set() -> None:
    """The graph the page draws, from two models and their diff: sources in the first
    layer, sinks in the last, a stream across layers routed through the layers between,
    and each PE and stream with its status (a renamed PE under its new name)."""
    from hotwire.master.dashboard import graph_view
    from hotwire.master.diff import diff
    from hotwire.model import LogicalModel, PESpec, StreamSpec

    def model(pes: list[tuple[str, str, int, str]], streams: list[tuple[str, str]]) -> Any:
        return LogicalModel.build(
            "g",
            [PESpec(n, k, parallelism=p, fingerprint=f) for n, k, p, f in pes],
            [StreamSpec(a, b) for a, b in streams],
        )

    old = model(
        [
            ("src", "source", 1, "s"),
            ("a", "map", 1, "a1"),
            ("b", "reduce", 2, "b"),
            ("old", "sink", 1, "o"),
        ],
        [("src", "a"), ("a", "b"), ("b", "old"), ("src", "old")],
    )
    new = model(
        [
            ("src", "source", 1, "s"),
            ("a", "map", 1, "a2"),
            ("b", "reduce", 3, "b"),
            ("c", "map", 1, "c"),
            ("out", "sink", 1, "o2"),
        ],
        [("src", "a"), ("a", "c"), ("c", "b"), ("b", "out")],
    )
    change = diff(old, new)
    view = graph_view([old, new], change)
    nodes = {n["name"]: n for n in view["nodes"]}
    assert {n: nodes[n]["status"] for n in nodes} == {
        "src": "same",
        "a": "changed",
        "b": "rescaled",
        "c": "added",
        "old": "removed",
        "out": "added",
    }
    layers = {n: nodes[n]["layer"] for n in nodes}
    assert layers["src"] == 0 and layers["a"] == 1 and layers["c"] == 2 and layers["b"] == 3
    assert layers["out"] == layers["old"] == 4  # sinks on the right
    xs = sorted({n["x"] for n in view["nodes"]})
    assert len(xs) == 5 and all(n["x"] + view["node_w"] <= view["width"] for n in view["nodes"])
    edges = {(e["src"], e["dst"]): e for e in view["edges"]}
    assert edges["a", "c"]["status"] == "added" and edges["a", "b"]["status"] == "removed"
    assert edges["src", "old"]["status"] == "removed" and edges["src", "a"]["status"] == "same"
    # src (layer 0) -> old (layer 4) passes through layers 1, 2 and 3, left to right
    assert [x for x, _ in edges["src", "old"]["via"]] == xs[1:4]
    assert edges["src", "a"]["via"] == []
    # no two slots of a layer overlap
    for x in xs:
        ys = sorted([n["y"] for n in view["nodes"] if n["x"] == x])
        ys += [y - view["node_h"] // 2 for e in view["edges"] for vx, y in e["via"] if vx == x]
        ys.sort()
        assert all(b - a >= view["node_h"] for a, b in itertools.pairwise(ys)), (x, ys)
    # A rename: drawn once, under its new name, marked renamed.
    renamed = model([("src", "source", 1, "s"), ("sum", "reduce", 1, "r")], [("src", "sum")])
    before = model([("src", "source", 1, "s"), ("total", "reduce", 1, "r")], [("src", "total")])
    view = graph_view([before, renamed], diff(before, renamed))
    assert [(n["name"], n["status"], n["renamed_from"]) for n in view["nodes"]] == [
        ("src", "same", ""),
        ("sum", "renamed", "total"),
    ]
