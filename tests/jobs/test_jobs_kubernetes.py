"""The kubernetes backend's client code, against a stand-in API server on loopback.

No real Kubernetes API is involved: the stand-in stores what the official
client sends (after checking the body is the rendered document) and answers
list/get/delete the way the API does, with Job status set by the test.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from hotwire.jobs import Catalog, JobNotFound, parse_request, render

pytest.importorskip("kubernetes")

PATHS = {
    "jobs": re.compile(r"^/apis/batch/v1/namespaces/([^/]+)/jobs(?:/([^/]+))?$"),
    "services": re.compile(r"^/api/v1/namespaces/([^/]+)/services(?:/([^/]+))?$"),
    "pods": re.compile(r"^/api/v1/namespaces/([^/]+)/pods$"),
}


class FakeAPI:
    def __init__(self) -> None:
        self.objects: dict[str, dict[tuple[str, str], dict]] = {"jobs": {}, "services": {}}
        self.requests: list[tuple[str, str]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self):
                u = urlparse(self.path)
                api.requests.append((self.command, u.path))
                for kind, rx in PATHS.items():
                    m = rx.match(u.path)
                    if m:
                        return kind, m.group(1), m.group(2), parse_qs(u.query)
                return None, None, None, {}

            def do_POST(self) -> None:
                kind, ns, _, _ = self._route()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = (ns, body["metadata"]["name"])
                if key in api.objects[kind]:
                    return self._send(
                        409, {"kind": "Status", "code": 409, "reason": "AlreadyExists"}
                    )
                body.setdefault("status", {})
                api.objects[kind][key] = body
                self._send(201, body)

            def do_GET(self) -> None:
                kind, ns, _, q = self._route()
                if kind == "pods":
                    return self._send(200, {"kind": "PodList", "items": []})
                sel = q.get("labelSelector", [""])[0]
                k, _, v = sel.partition("=")
                items = [
                    o
                    for (n, _), o in api.objects[kind].items()
                    if n == ns and (not k or o["metadata"].get("labels", {}).get(k) == v)
                ]
                self._send(200, {"kind": "List", "metadata": {}, "items": items})

            def do_DELETE(self) -> None:
                kind, ns, name, _ = self._route()
                gone = api.objects[kind].pop((ns, name), None)
                if gone is None:
                    return self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                # as the API does: a deleted Service comes back, a Job's deletion is a Status
                self._send(
                    200, gone if kind == "services" else {"kind": "Status", "status": "Success"}
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def fake_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with FakeAPI() as api:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "fake",
                    "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
                    "users": [{"name": "u", "user": {"token": "t"}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
                }
            )
        )
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        yield api


def test_submit_status_stop_through_the_official_client(fake_api: FakeAPI) -> None:
    from hotwire.jobs.backends import get_backend

    b = get_backend("kubernetes")
    req = parse_request(
        {
            "name": "ddp",
            "framework": "pytorch",
            "mode": "ddp",
            "replicas": 2,
            "program": "image:/app/train.py",
        }
    )
    job = render(req, Catalog.load(use_env=False), "kubernetes")
    st = b.submit(job)
    assert st.state == "pending" and [r.name for r in st.replicas] == ["ddp-0", "ddp-1"]
    assert fake_api.requests[:2] == [
        ("POST", "/api/v1/namespaces/default/services"),
        ("POST", "/apis/batch/v1/namespaces/default/jobs"),
    ]
    stored = fake_api.objects["jobs"][("default", "ddp")]
    assert stored["spec"] == job.jobs()[0]["spec"]  # the client sent the rendered document

    stored["status"] = {"active": 1, "completedIndexes": "0"}
    st = b.status("ddp")
    assert st.state == "running"
    assert [(r.name, r.state) for r in st.replicas] == [
        ("ddp-0", "succeeded"),
        ("ddp-1", "running"),
    ]
    stored["status"] = {
        "completedIndexes": "0-1",
        "conditions": [{"type": "Complete", "status": "True"}],
    }
    assert b.status("ddp").state == "succeeded"
    assert [s.name for s in b.list()] == ["ddp"]

    with pytest.raises(Exception, match="already exists in namespace default; stop it first"):
        b.submit(job)
    b.stop("ddp")
    assert fake_api.objects == {"jobs": {}, "services": {}}
    with pytest.raises(JobNotFound, match="no kubernetes job 'ddp' in namespace default"):
        b.status("ddp")


def test_a_failed_job_reports_the_reason(fake_api: FakeAPI) -> None:
    from hotwire.jobs.backends import get_backend

    b = get_backend("kubernetes")
    req = parse_request({"name": "one", "framework": "pytorch", "program": "image:/app/x.py"})
    b.submit(render(req, Catalog.load(use_env=False), "kubernetes"))
    fake_api.objects["jobs"][("default", "one")]["status"] = {
        "failed": 1,
        "conditions": [
            {
                "type": "Failed",
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit",
            }
        ],
    }
    st = b.status("one")
    assert st.state == "failed" and st.message == "Job has reached the specified backoff limit"
    b.delete("one")


def test_without_configuration_the_backend_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hotwire.jobs import BackendUnavailable
    from hotwire.jobs.backends import get_backend

    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(
        BackendUnavailable,
        match="backend 'kubernetes' is not available on this machine: no kubeconfig",
    ):
        get_backend("kubernetes")
