"""Recovery from a killed worker: detection + restart from checkpoint, and the sink gap.

    python bench/recovery.py

For a heartbeat timeout of 1 s and 3 s: a keyed app at 5,000 records/s on a real
two-worker cluster, the worker without the source killed with SIGKILL after a
checkpoint; prints one JSON line per timeout: the longest interval without sink
output, the master's restart time, records lost and redelivered.
"""

import json
import re
import shutil
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hotwire.testing.cluster import LocalCluster, poll_for, write_app
from hotwire.testing.scenarios import SCENARIOS, render

tmp = Path(tempfile.mkdtemp(prefix="hotwire-recovery-"))
out = tmp / "out.jsonl"
N = 30000
for timeout in (1.0, 3.0):
    if out.exists():
        out.unlink()
    with LocalCluster(workers=2, data_dir=tmp / f"c{timeout}", heartbeat_timeout=timeout) as c:
        src = render(
            SCENARIOS["change_code"][0], out=str(out), audit=str(tmp / "a"), n=N, rate=5000.0
        )
        # stamp sink time
        src = src.replace(
            "def write(r):\n    OUT(r)",
            'import time\ndef write(r):\n    OUT({**r, "t": time.time()})',
        )
        c.client.submit(write_app(tmp, "v1.py", src))
        poll_for(lambda: c.client.status("upg").apps[0].last_checkpoint >= 1, 15)
        st = c.client.status("upg").apps[0]
        srcw = next(i.worker for p in st.pes if p.name == "src" for i in p.instances)
        victim = "w1" if srcw != "w1" else "w2"
        t_kill = time.time()
        c.kill_worker(victim)
        poll_for(lambda: c.client.status("upg").apps[0].recoveries >= 1, 30)
        poll_for(lambda: len({json.loads(line)["seq"] for line in open(out)}) >= N, 60)
        rows = [json.loads(line) for line in open(out)]
        ts = sorted(r["t"] for r in rows)
        gaps = [(b - a, a) for a, b in pairwise(ts)]
        g, at = max(gaps)
        after = [r["t"] for r in rows if r["t"] > t_kill]
        seqs = [r["seq"] for r in rows]
        log = (c.dir / "master.1.log").read_text()
        m = re.search(r"restarted from checkpoint on the live workers in (\d+) ms", log)
        print(
            json.dumps(
                {
                    "heartbeat_timeout_s": timeout,
                    "longest_sink_gap_ms": round(g * 1000),
                    "gap_started_after_kill_ms": round((at - t_kill) * 1000),
                    "master_restart_ms": int(m.group(1)) if m else None,
                    "lost": N - len(set(seqs)),
                    "redelivered": len(seqs) - len(set(seqs)),
                }
            )
        )
shutil.rmtree(tmp, ignore_errors=True)
