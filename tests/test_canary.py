"""Canary upgrades on a real two-worker cluster, through streamctl: a canary whose
new code fails rolls back by itself, a healthy one is promoted after --canary-for,
and one is aborted and promoted by hand; keyed counts stay exact throughout (every
record once, no count restarting).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from hotwire.testing import count_lines, read_jsonl
from hotwire.testing.cluster import LocalCluster, poll_for, write_app
from hotwire.testing.scenarios import BASE, check_output, read_exact, render

N = 9000
RATE = 2000.0
COUNTING = '.process("count", Count, '


def _apps(
    tmp_path: Path, v2_edit: Callable[[str], str] = lambda text: text, rate: float = RATE
) -> tuple[Path, str, str]:
    out, audit = tmp_path / "out.jsonl", tmp_path / "audit.jsonl"
    v1 = render(BASE, out=str(out), audit=str(audit), n=N, rate=rate)
    v2 = render(
        replace(BASE, count_code=2),
        out=str(out),
        audit=str(audit),
        n=N,
        rate=rate,
    )
    assert COUNTING in v1 and COUNTING in v2
    v2 = v2_edit(v2)
    return out, str(write_app(tmp_path, "v1.py", v1)), str(write_app(tmp_path, "v2.py", v2))


def _status(cluster: LocalCluster) -> dict[str, Any]:
    res = cluster.streamctl("status", "upg", "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _start(cluster: LocalCluster, out: Path, app1: str) -> None:
    assert cluster.streamctl("submit", app1).returncode == 0
    poll_for(lambda: count_lines(out) > N // 6, 20, what="records flowing before the canary")


def _failing(v2: str) -> str:
    # The new code raises on some records (skipped, the default on_error, and counted).
    return v2.replace(
        '        k = r["key"]\n',
        '        k = r["key"]\n        if r["seq"] % 97 == 5:\n'
        '            raise ValueError("bad record")\n',
        1,
    )


def test_failing_canary_rolls_back_by_itself(cluster: LocalCluster, tmp_path: Path) -> None:
    out, app1, app2 = _apps(tmp_path, _failing)
    _start(cluster, out, app1)
    res = cluster.streamctl(
        "upgrade", app2, "--canary", "count=30%", "--canary-errors", "0.01", "--canary-for", "60"
    )
    assert res.returncode == 0, res.stderr
    assert "canary count=30% is live" in res.stdout
    poll_for(lambda: _status(cluster)["canary"] is None, 30, what="the failing canary rolled back")
    st = _status(cluster)
    assert st["version"] == 1
    count = next(p for p in st["pes"] if p["name"] == "count")
    assert count["canary_percent"] is None and count["parallelism"] == 2
    hist = json.loads(cluster.streamctl("history", "upg", "--json").stdout)
    [c] = hist["canaries"]
    assert c["outcome"] == "aborted" and c["why"].startswith("rolled back automatically"), c
    skipped = c["stats"]["canary"]["errors"]
    assert skipped >= 1
    assert [v["version"] for v in hist["versions"]] == [1]
    # Only the records the canary's code raised on (and skipped, as on_error says) are
    # missing; nothing else is lost or duplicated, and no key's count restarted.
    last = {r["seq"] for r in read_jsonl(out) if r["seq"] % 97 != 5}
    poll_for(
        lambda: {r["seq"] for r in read_jsonl(out)} >= {s for s in range(N) if s % 97 != 5},
        40,
        what="every record the canary did not raise on, at the sink",
    )
    assert last
    v = check_output(read_jsonl(out), N)
    missing = sorted(set(range(N)) - {r["seq"] for r in read_jsonl(out)})
    assert len(missing) >= skipped and all(s % 97 == 5 for s in missing), missing
    assert (v.duplicated, v.out_of_order, v.state_resets) == (0, 0, 0), v
    assert not v.problems, v.problems
    # on_error="fail" would hold the senders at their credit limit: refused for a canary
    strict = tmp_path / "v3.py"
    strict.write_text(
        Path(app2).read_text().replace(COUNTING, COUNTING + 'config={"on_error": "fail"}, ')
    )
    res = cluster.streamctl("upgrade", str(strict), "--canary", "count=10%")
    assert res.returncode == 1 and "on_error='fail'" in res.stderr, res.stderr


def test_healthy_canary_is_promoted_after_its_time(cluster: LocalCluster, tmp_path: Path) -> None:
    out, app1, app2 = _apps(tmp_path)
    _start(cluster, out, app1)
    res = cluster.streamctl(
        "upgrade", app2, "--canary", "count=30%", "--canary-errors", "0.01", "--canary-for", "1.5"
    )
    assert res.returncode == 0, res.stderr
    st = _status(cluster)
    if st["canary"] is not None:  # it may already be promoted
        count = next(p for p in st["pes"] if p["name"] == "count")
        assert count["canary_percent"] == 30
        assert sorted(i["version"] for i in count["instances"]) == [1, 1, 2]
    poll_for(lambda: _status(cluster)["version"] == 2, 30, what="the canary promoted")
    assert _status(cluster)["canary"] is None
    rows = read_exact(out, N, 40)
    assert {r["code"] for r in rows} == {1, 2}
    hist = cluster.streamctl("history", "upg")
    assert "canary of 'count' on 30% of its keys, v1 -> v2" in hist.stdout, hist.stdout
    assert "promoted (automatically" in hist.stdout, hist.stdout


def test_canary_aborted_then_promoted_by_hand(cluster: LocalCluster, tmp_path: Path) -> None:
    # Slower records: a dozen streamctl calls (a process each) must fit while they flow.
    out, app1, app2 = _apps(tmp_path, rate=RATE / 4)
    _start(cluster, out, app1)
    assert cluster.streamctl("upgrade", app2, "--canary", "count=20%").returncode == 0
    human = cluster.streamctl("status", "upg")
    assert "canary of 'count' on 20% of its keys" in human.stdout, human.stdout
    assert "v2 (canary): 1 instance(s)" in human.stdout, human.stdout
    assert "ms/record in the PE's code" in human.stdout, human.stdout
    st = _status(cluster)
    assert set(st["canary"]["stats"]) == {"old", "canary"}
    assert {"error_rate", "ms_per_record"} <= set(st["canary"]["stats"]["canary"])
    # another upgrade waits for the canary to end
    busy = cluster.streamctl("upgrade", app2)
    assert busy.returncode == 1 and "a canary of PE 'count' is running" in busy.stderr
    ab = cluster.streamctl("canary", "abort", "upg")
    assert ab.returncode == 0, ab.stderr
    assert "canary of 'count' aborted: app 'upg' runs version 1" in ab.stdout
    assert _status(cluster)["canary"] is None
    assert cluster.streamctl("canary", "abort", "upg").returncode == 1

    assert cluster.streamctl("upgrade", app2, "--canary", "count=50%").returncode == 0
    pr = cluster.streamctl("canary", "promote", "upg")
    assert pr.returncode == 0, pr.stderr
    assert "runs version 2" in pr.stdout
    assert count_lines(out) < N, "the canary must run while records flow"
    rows = read_exact(out, N, 40)
    assert {r["code"] for r in rows} == {1, 2}
    hist = json.loads(cluster.streamctl("history", "upg", "--json").stdout)
    assert [c["outcome"] for c in hist["canaries"]] == ["aborted", "promoted"]
    assert hist["versions"][-1]["changes"]["canary"]["share_percent"] == 50


def test_canary_refused_for_more_than_one_change(cluster: LocalCluster, tmp_path: Path) -> None:
    out, app1, _ = _apps(tmp_path)
    v3 = render(
        replace(BASE, count_code=2, extra=True),
        out=str(out),
        audit=str(tmp_path / "a.jsonl"),
        n=N,
        rate=RATE,
    )
    app3 = str(write_app(tmp_path, "v3.py", v3))
    _start(cluster, out, app1)
    res = cluster.streamctl("upgrade", app3, "--canary", "count=10%")
    assert res.returncode == 1
    assert "a canary upgrade may change PE 'count' only" in res.stderr, res.stderr
    bad = cluster.streamctl("upgrade", app3, "--canary", "count=150%")
    assert bad.returncode == 1 and "strictly between 0% and 100%" in bad.stderr


def test_canary_survives_a_master_restart(cluster: LocalCluster, tmp_path: Path) -> None:
    # The canary is in the master's store: a master killed (SIGKILL) and started
    # again shows it, takes a promote or an abort, and runs its --canary-for timer.
    n, rate = 12000, 800.0
    out = tmp_path / "out.jsonl"
    kw: dict[str, Any] = {"out": str(out), "audit": str(tmp_path / "a.jsonl"), "n": n, "rate": rate}
    app1 = str(write_app(tmp_path, "v1.py", render(BASE, **kw)))
    app2 = str(write_app(tmp_path, "v2.py", render(replace(BASE, count_code=2), **kw)))
    assert cluster.streamctl("submit", app1).returncode == 0
    poll_for(lambda: count_lines(out) > 500, 20, what="records flowing before the canary")

    def restart() -> None:
        cluster.kill_master()
        cluster.restart_master()
        poll_for(lambda: cluster.live_workers() == 2, 15, what="workers to re-attach")

    # 1. started by hand, aborted by hand after the restart
    assert cluster.streamctl("upgrade", app2, "--canary", "count=20%").returncode == 0
    restart()
    st = _status(cluster)
    assert st["canary"] is not None, st
    assert (st["canary"]["pe"], st["canary"]["share_percent"]) == ("count", 20)
    assert st["canary"]["outcome"] == "running"
    busy = cluster.streamctl("upgrade", app2)
    assert busy.returncode == 1 and "a canary of PE 'count' is running" in busy.stderr
    ab = cluster.streamctl("canary", "abort", "upg")
    assert ab.returncode == 0, ab.stderr
    assert _status(cluster)["canary"] is None and _status(cluster)["version"] == 1

    # 2. promoted by its --canary-for timer, which runs on in the restarted master
    res = cluster.streamctl("upgrade", app2, "--canary", "count=30%", "--canary-for", "3")
    assert res.returncode == 0, res.stderr
    restart()
    st = _status(cluster)
    if st["version"] == 1:  # not promoted yet: the canary was resumed
        assert st["canary"] is not None and st["canary"]["promote_after_s"] == 3, st
    poll_for(lambda: _status(cluster)["version"] == 2, 30, what="the canary promoted")
    assert _status(cluster)["canary"] is None

    poll_for(lambda: count_lines(out) >= n, 40, what="every record at the sink")
    v = check_output(read_jsonl(out), n)
    assert (v.lost, v.duplicated, v.out_of_order, v.state_resets) == (0, 0, 0, 0), v
    hist = json.loads(cluster.streamctl("history", "upg", "--json").stdout)
    assert [(c["outcome"], c["share_percent"]) for c in hist["canaries"]] == [
        ("aborted", 20),
        ("promoted", 30),
    ], hist["canaries"]
    assert hist["canaries"][0]["why"] == "aborted by hand"
    assert hist["canaries"][1]["why"].startswith("automatically")
    restart()  # ended canaries stay in the history, and none is resumed
    assert _status(cluster)["canary"] is None
    hist = json.loads(cluster.streamctl("history", "upg", "--json").stdout)
    assert [c["outcome"] for c in hist["canaries"]] == ["aborted", "promoted"]


def test_canary_start_finished_by_a_restarted_master(cluster: LocalCluster, tmp_path: Path) -> None:
    # The master is SIGKILLed while the canary's switch runs (the old instances'
    # teardown is slow): the restarted master finishes the switch, and the canary
    # it commits is the one that was asked for, promotable by hand.
    n, rate = 12000, 1000.0
    out = tmp_path / "out.jsonl"
    kw: dict[str, Any] = {"out": str(out), "audit": str(tmp_path / "a.jsonl"), "n": n, "rate": rate}
    slow = "    def teardown(self):\n        import time\n        time.sleep(4)\n\n"
    v1 = render(BASE, **kw).replace("    def snapshot(self):", slow + "    def snapshot(self):")
    assert "time.sleep(4)" in v1
    app1 = str(write_app(tmp_path, "v1.py", v1))
    app2 = str(write_app(tmp_path, "v2.py", render(replace(BASE, count_code=2), **kw)))
    assert cluster.streamctl("submit", app1).returncode == 0
    poll_for(lambda: count_lines(out) > 500, 20, what="records flowing before the canary")
    t = threading.Thread(
        target=lambda: cluster.streamctl("upgrade", app2, "--canary", "count=25%"), daemon=True
    )
    t.start()
    poll_for(
        lambda: any(r.get("code") == 2 for r in read_jsonl(out)[-200:]),
        15,
        what="the canary's code to process records (its switch under way)",
    )
    cluster.kill_master()
    t.join(30)
    cluster.restart_master()
    poll_for(lambda: cluster.live_workers() == 2, 15, what="workers to re-attach")
    poll_for(lambda: _status(cluster)["canary"] is not None, 30, what="the canary committed")
    st = _status(cluster)
    assert (st["version"], st["canary"]["pe"], st["canary"]["share_percent"]) == (1, "count", 25)
    pr = cluster.streamctl("canary", "promote", "upg")
    assert pr.returncode == 0, pr.stderr
    assert _status(cluster)["version"] == 2
    poll_for(lambda: count_lines(out) >= n, 40, what="every record at the sink")
    v = check_output(read_jsonl(out), n)
    assert (v.lost, v.duplicated, v.out_of_order, v.state_resets) == (0, 0, 0, 0), v
    hist = json.loads(cluster.streamctl("history", "upg", "--json").stdout)
    assert [c["outcome"] for c in hist["canaries"]] == ["promoted"], hist["canaries"]
