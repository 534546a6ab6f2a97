"""Observability on a real cluster: Prometheus metrics scraped by a real Prometheus
server and queried with PromQL, and JSON logs parsed line by line."""

from __future__ import annotations

import json
import os
import re
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hotwire.testing.cluster import LocalCluster, poll_for, scrape_metrics, write_app
from hotwire.testing.servers import ServerMissing, find_binary, prometheus_server, promql

RATE = 400  # records per second from the source

APP = """
from hotwire import Topology
from hotwire.testing.sources import counter

def check(r):
    if r["seq"] % 50 == 7:
        raise ValueError("seq ends in 7")  # on_error="skip": logged and counted
    return {{**r, "v": {version}}}

app = Topology("obs")
src = app.source("src", counter(rate={rate}))
m = src.map("check", check, parallelism=2, config={{"on_error": "skip"}})
m.key_by(lambda r: r["key"]).reduce("count", lambda acc, r: (acc or 0) + 1).sink(
    "out", lambda r: None
)
"""


def _app(tmp: Path, version: int) -> str:
    return write_app(tmp, f"v{version}.py", APP.format(version=version, rate=RATE))


def _need(name: str) -> str:
    try:
        return find_binary(name)
    except ServerMissing as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {e}")
        pytest.skip(str(e))


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return bytes(r.read())


@contextmanager
def prometheus(tmp: Path, targets: list[str]) -> Iterator[str]:
    """A real Prometheus server scraping ``targets`` every second; yields its URL.

    ``honor_labels``: hotwire's own ``instance`` label (a PE instance) is kept, not
    renamed ``exported_instance`` for the target's."""
    _need("prometheus")
    jobs = (
        "  - job_name: hotwire\n    honor_labels: true\n    static_configs:\n"
        f"      - targets: {json.dumps(targets)}\n"
    )
    with prometheus_server(tmp, jobs) as url:
        yield url


def scalar(url: str, query: str) -> float | None:
    result = promql(url, query)
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_rates_and_upgrade_durations_status_reports(tmp_path: Path) -> None:
    with LocalCluster(workers=2, data_dir=tmp_path / "c", metrics=True) as c:
        addrs = c.metrics_addresses
        assert set(addrs) == {"master", "w1", "w2"}, addrs
        c.streamctl("submit", _app(tmp_path, 1)).check_returncode()

        # Both expositions parse (prometheus_client's parser) with the types documented.

        w1 = poll_for(
            lambda: (f := scrape_metrics(addrs["w1"]))["hotwire_records_in"].samples and f,
            20,
            what="w1's instances in its metrics",
        )
        assert w1["hotwire_records_in"].type == "counter"
        assert w1["hotwire_batch_process_seconds"].type == "histogram"
        assert scrape_metrics(addrs["master"])["hotwire_worker_up"].type == "gauge"
        with prometheus(tmp_path, sorted(addrs.values())) as prom:
            poll_for(
                lambda: scalar(prom, 'count(up{job="hotwire"} == 1)') == 3,
                30,
                0.2,
                what="prometheus to scrape master and both workers",
            )
            # A rate per PE: PromQL over the workers' counters against status's rate
            # (from the heartbeats), with the source paced at RATE records/s.
            query = 'sum by (pe) (rate(hotwire_records_in_total{app="obs"}[5s]))'

            # Both are rates over a recent window, read at slightly different moments:
            # on a loaded machine one read may catch a stall the other does not, so
            # they are read together until they agree (or the poll fails).
            seen: list[Any] = []

            def agree() -> dict[str, float] | None:
                rates = {r["metric"]["pe"]: float(r["value"][1]) for r in promql(prom, query)}
                status = json.loads(c.streamctl("status", "obs", "--json").stdout)
                by_pe = {p["name"]: p["rate"] for p in status["pes"]}
                seen[:] = [rates, by_pe]
                ok = all(
                    0.8 * RATE <= rates.get(pe, 0) <= 1.2 * RATE
                    and by_pe[pe] == pytest.approx(rates[pe], rel=0.25)
                    for pe in ("check", "count", "out")
                )
                return rates if ok else None

            try:
                poll_for(agree, 45, 0.5, what=f"PromQL and status rates near {RATE}/s to agree")
            except TimeoutError as e:
                raise AssertionError(f"last read (PromQL, status): {seen}") from e
            errors = scalar(prom, 'sum(hotwire_errors_total{app="obs",pe="check"})')
            assert errors is not None and errors > 0  # every 50th record raises

            # An upgrade's duration: Prometheus has what streamctl reports.
            r = c.streamctl("upgrade", _app(tmp_path, 2), "--json")
            r.check_returncode()
            reported_ms = json.loads(r.stdout)["latency_ms"]
            history = json.loads(c.streamctl("history", "obs", "--json").stdout)
            [v2] = [v for v in history["versions"] if v["version"] == 2]
            assert v2["latency_ms"] == pytest.approx(reported_ms, abs=0.01)
            upgrade = 'hotwire_transition_seconds_sum{app="obs",action="upgrade"}'
            seconds = poll_for(
                lambda: scalar(prom, upgrade), 15, 0.2, what="the upgrade's duration scraped"
            )
            assert seconds * 1000 == pytest.approx(reported_ms, abs=0.01)
            outcomes = promql(prom, 'hotwire_transitions_total{app="obs"}')
            assert {
                (o["metric"]["action"], o["metric"]["outcome"], o["value"][1]) for o in outcomes
            } == {("submit", "committed", "1"), ("upgrade", "committed", "1")}
            # Its phases: submit and upgrade each went through prepare, switch, commit,
            # and the phases of the upgrade add up to less than its whole duration.
            for phase in ("prepare", "switch", "commit"):
                q = f'hotwire_transition_phase_seconds_count{{app="obs",phase="{phase}"}}'
                assert scalar(prom, q) == 2, phase
            # The new code's instances are counted under their own instance label.
            poll_for(
                lambda: scalar(
                    prom, 'sum(rate(hotwire_records_in_total{app="obs",instance=~"check@2.*"}[5s]))'
                ),
                20,
                0.5,
                what="the upgraded PE's records scraped",
            )
            # Liveness, slots, checkpoints and the data plane.
            assert scalar(prom, "sum(hotwire_worker_up)") == 2
            assert scalar(prom, 'hotwire_worker_slots{worker="w1"}') == c.slots
            poll_for(
                lambda: scalar(prom, 'hotwire_checkpoints_total{app="obs"}'),
                15,
                0.5,
                what="a checkpoint counted",
            )
            age = scalar(prom, 'hotwire_checkpoint_age_seconds{app="obs"}')
            assert age is not None and age >= 0
            sent = scalar(prom, "sum(hotwire_dataplane_sent_bytes_total)")
            received = scalar(prom, "sum(hotwire_dataplane_received_bytes_total)")
            assert sent and received  # the keyed stream crosses the two workers
            drops = promql(prom, "hotwire_dataplane_drops_total")
            assert all(float(d["value"][1]) == 0 for d in drops), drops
            hist = scalar(prom, 'sum(hotwire_batch_process_seconds_count{pe="count"})')
            assert hist and hist > 0


def test_metrics_flag_refuses_a_malformed_address() -> None:
    from hotwire.testing.cluster import streamctl

    r = streamctl("master", "--metrics", "nowhere", "--listen", "127.0.0.1:0")
    assert r.returncode == 2
    assert "expected HOST:PORT" in r.stderr
    assert "Traceback" not in r.stderr


def test_metrics_on_a_taken_port_fails_in_one_line(tmp_path: Path) -> None:
    import socket

    from hotwire.testing.cluster import streamctl

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        for args in (
            ["master", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "m")],
            ["worker", "--master", "127.0.0.1:1", "--data-dir", str(tmp_path / "w")],
        ):
            r = streamctl(*args, "--metrics", addr, timeout=60)
            assert r.returncode == 1, (args[0], r.stderr)
            assert (
                r.stderr.strip()
                == f"streamctl: --metrics {addr}: cannot listen: Address already in use"
            )


def test_json_logs_every_line_an_object_with_its_fields(tmp_path: Path) -> None:
    with LocalCluster(
        workers=2, data_dir=tmp_path / "c", log_format="json", log_level="debug"
    ) as c:
        c.streamctl("submit", _app(tmp_path, 1)).check_returncode()
        poll_for(
            lambda: (
                "seq ends in 7" in (c.dir / "w1.log").read_text()
                or "seq ends in 7" in (c.dir / "w2.log").read_text()
            ),
            20,
            what="a record's error logged",
        )
        c.streamctl("upgrade", _app(tmp_path, 2)).check_returncode()
        logs = {p.name: p.read_text() for p in sorted(c.dir.glob("*.log"))}
    assert set(logs) == {"master.1.log", "w1.log", "w2.log"}
    lines: dict[str, list[dict[str, Any]]] = {}
    for name, text in logs.items():
        lines[name] = []
        for n, line in enumerate(text.splitlines(), 1):
            doc = json.loads(line)  # every line, or the test fails naming it
            assert isinstance(doc, dict), (name, n, line)
            assert {"time", "level", "logger", "message"} <= set(doc), (name, n, line)
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"]), doc
            lines[name].append(doc)
    for w in ("w1", "w2"):
        assert lines[f"{w}.log"], w
        assert all(d.get("worker") == w for d in lines[f"{w}.log"]), w
    master = lines["master.1.log"]
    about_app = [d for d in master if "app 'obs'" in d["message"]]
    assert about_app and all(d.get("app") == "obs" for d in about_app), about_app
    # The master's transition steps carry the transition (its epoch): 1 the submit,
    # 2 the upgrade.
    assert {d["transition"] for d in master if "transition" in d} >= {1, 2}
    # A PE's error line names the app, PE and instance it happened in.
    worker_lines = lines["w1.log"] + lines["w2.log"]
    errors = [d for d in worker_lines if "seq ends in 7" in d["message"]]
    assert errors
    for d in errors:
        assert d["app"] == "obs" and d["pe"] == "check", d
        assert re.fullmatch(r"check@\d+\.\d+", d["instance"]), d
    # The workers' instruction batches of both transitions carry app and transition.
    assert {d["transition"] for d in worker_lines if d.get("app") == "obs" and "transition" in d}
