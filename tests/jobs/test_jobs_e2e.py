"""A stream through a dl_job PE on a real local cluster (master and two workers)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from jobs_helpers import processes_mentioning

from hotwire.testing import read_jsonl
from hotwire.testing.cluster import LocalCluster, poll_for, write_app

N = 2_000

DOUBLER = """
from hotwire.jobs import serve

def double(records):
    return [{"seq": r["seq"], "twice": 2 * r["seq"]} for r in records]

serve(double, batch=True)
"""


def _lines(path: Path) -> int:
    return sum(1 for _ in open(path)) if path.exists() else 0


def test_every_record_gets_its_result_exactly_once(
    state_dir: Path, cluster: LocalCluster, tmp_path: Path
) -> None:
    prog = tmp_path / "doubler.py"
    prog.write_text(DOUBLER)
    out = tmp_path / "out.jsonl"
    app = write_app(
        tmp_path,
        "app.py",
        f"""
        from hotwire import Topology
        from hotwire.testing import counter, file_sink

        app = Topology("dl")
        src = app.source("src", counter(n={N}))
        scores = src.dl_job("doubler", request={{"framework": "generic",
                                                "program": {str(prog)!r}}}, parallelism=2)
        scores.sink("out", file_sink({str(out)!r}))
    """,
    )
    cluster.client.submit(app)
    poll_for(lambda: _lines(out) >= N, 60, what="every record's result at the sink")
    got = Counter(r["seq"] for r in read_jsonl(out))
    assert set(got) == set(range(N)) and max(got.values()) == 1
    assert all(r["twice"] == 2 * r["seq"] for r in read_jsonl(out))
    assert processes_mentioning(str(prog)), "each dl_job instance runs its job"
    cluster.stop()  # workers gone: their jobs go with them
    poll_for(lambda: not processes_mentioning(str(prog)), 15, what="the jobs to end")
