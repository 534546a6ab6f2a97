"""Apache Flink as a peer of the upgrade benchmark (PyFlink 2.3.0, ``pip install hotwire[flink]``).

What a Flink user does to change the code or the parallelism of a running job: stop it
with a savepoint (``flink stop --savepointPath DIR JOBID``), then submit the changed job
from that savepoint (``flink run -d -s SAVEPOINT -py job.py``). Every operator has a
``uid`` so that its state maps onto the new version.

The cluster is a local standalone one started in a temporary directory: one JobManager
and one TaskManager (3 slots) on loopback, on free ports, as child processes that are
stopped at the end, even on error. Hashmap state backend, a checkpoint every second,
Python functions in thread mode (embedded in the TaskManager's JVM; the flink-python jar
is linked into the cluster's lib directory, as thread mode on Java 17 needs).

The job is the keyed workload of ``bench/workload.py``: a sequence source (parallelism
1; its position is in the savepoint) and, chained to it, a map pacing the stream to
``rate`` records/s (1 ms ticks, from the moment the job starts, as hotwire's source) that
makes ``{seq, key: "k{seq % keys}", t}``; ``key_by(key)``; a keyed process function
counting ``n`` per key in a ``ValueState`` (parallelism ``count_p``) and outputting its
``code``; and a sink map appending ``{seq, key, n, code, ver, t_emit, t_sink}`` JSON lines
to a file (``t_sink`` when the record reaches it, one O_APPEND write per record). Every
record reaching the sink is written, so lost and duplicated records are counted by
sequence number.

Run as a script under ``flink run -py``, this file is one version of that job:

    flink run -d [-s SAVEPOINT] -py bench/peer_flink.py job \
        '{"out": F, "n": N, "rate": R, "keys": K, "code": C, "count_p": P, "ver": V}'

(the arguments start with a word, ``job``, since the CLI would take a leading option such
as ``--job`` for an abbreviation of one of its own).

Run directly, it is the benchmark of the Flink peer alone (``--help``); ``bench/upgrade.py
--flink`` runs it beside hotwire and Bytewax. PyFlink need not be importable in the
driver's interpreter: ``--flink-python`` (or ``HOTWIRE_FLINK_PYTHON``) names one that has
it, such as a separate virtualenv (PyFlink pins grpcio and protobuf older than hotwire's).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
TICK_S = 0.001
STOP_ALLOWANCE_S = 60.0  # input budgeted for the stop, the run and start of v2


# -- the job (runs in the Flink client and in the TaskManager) --------------------
def build_job(out: str, n: int, rate: float, keys: int, code: int, count_p: int, ver: int) -> Any:
    """The job graph of one version; returns the StreamExecutionEnvironment to execute."""
    from pyflink.common import Types
    from pyflink.common.watermark_strategy import WatermarkStrategy
    from pyflink.datastream import StreamExecutionEnvironment
    from pyflink.datastream.connectors.number_seq import NumberSequenceSource
    from pyflink.datastream.functions import (
        FlatMapFunction,
        KeyedProcessFunction,
        MapFunction,
        RuntimeContext,
    )
    from pyflink.datastream.state import ValueStateDescriptor

    class Stamp(MapFunction):
        """Paces the sequence to ``rate``/s (0: unpaced) and makes the record."""

        def __init__(self, rate: float, keys: int):
            self.rate, self.keys = rate, keys

        def open(self, ctx: RuntimeContext) -> None:
            self.t0 = time.monotonic()
            self.i = 0

        def map(self, seq: int) -> tuple[int, str, float]:
            if self.rate:
                self.i += 1
                ahead = self.i / self.rate - (time.monotonic() - self.t0)
                if ahead >= TICK_S:
                    time.sleep(ahead)
            return (seq, f"k{seq % self.keys}", time.time())

    class Count(KeyedProcessFunction):
        def __init__(self, code: int):
            self.code = code

        def open(self, ctx: RuntimeContext) -> None:
            self.count = ctx.get_state(ValueStateDescriptor("n", Types.LONG()))

        def process_element(self, r: Any, ctx: Any) -> Any:
            c = (self.count.value() or 0) + 1
            self.count.update(c)
            yield (r[0], r[1], c, self.code, r[2])

    class Write(FlatMapFunction):
        """Appends one JSON line per record, one O_APPEND write each.

        Not buffered: a version that wrote every 20 ms and at ``close()`` lost what its
        buffer held at a stop with a savepoint (records already counted in the
        savepoint's state, so the new job does not output them again).
        """

        def __init__(self, path: str, ver: int):
            self.path, self.ver = path, ver

        def open(self, ctx: RuntimeContext) -> None:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

        def flat_map(self, r: Any) -> Any:
            row = {
                "seq": r[0],
                "key": r[1],
                "n": r[2],
                "code": r[3],
                "ver": self.ver,
                "t_emit": r[4],
                "t_sink": time.time(),
            }
            os.write(self.fd, (json.dumps(row) + "\n").encode())
            return []

        def close(self) -> None:
            os.close(self.fd)

    env = StreamExecutionEnvironment.get_execution_environment()
    env.set_max_parallelism(128)
    src = env.from_source(
        NumberSequenceSource(0, n - 1), WatermarkStrategy.no_watermarks(), "src"
    ).set_parallelism(1)
    src.uid("src")
    rec = Types.TUPLE([Types.LONG(), Types.STRING(), Types.DOUBLE()])
    counted_t = Types.TUPLE(
        [Types.LONG(), Types.STRING(), Types.LONG(), Types.INT(), Types.DOUBLE()]
    )
    s = src.map(Stamp(rate, keys), output_type=rec).name("stamp").uid("stamp").set_parallelism(1)
    counted = (
        s.key_by(lambda r: r[1], key_type=Types.STRING())
        .process(Count(code), output_type=counted_t)
        .name("count")
        .uid("count")
        .set_parallelism(count_p)
    )
    written = (
        counted.flat_map(Write(out, ver), output_type=Types.INT())
        .name("out")
        .uid("out")
        .set_parallelism(count_p)
    )
    written.print().name("discard").uid("discard").set_parallelism(count_p)
    return env


def _job_main(spec: str) -> None:
    """Submit the version ``spec`` (the JSON of :func:`job_args`) and return (detached)."""
    a = json.loads(spec)
    env = build_job(a["out"], a["n"], a["rate"], a["keys"], a["code"], a["count_p"], a["ver"])
    env.execute_async(f"peer-v{a['ver']}")


# -- pure parts: configuration and the CLI's answers --------------------------------
def flink_config(
    *,
    work: Path,
    rpc_port: int,
    rest_port: int,
    python: str,
    slots: int = 3,
    jm_mb: int = 1600,
    tm_mb: int = 2048,
    java_opts: str = "",
) -> str:
    """The cluster's config.yaml: loopback, the given ports, thread mode, checkpoints."""
    conf = {
        "jobmanager.bind-host": "localhost",
        "jobmanager.rpc.address": "localhost",
        "jobmanager.rpc.port": rpc_port,
        "jobmanager.memory.process.size": f"{jm_mb}m",
        "rest.address": "localhost",
        "rest.bind-address": "localhost",
        "rest.port": rest_port,
        "blob.server.port": "0",
        "taskmanager.bind-host": "localhost",
        "taskmanager.host": "localhost",
        "taskmanager.rpc.port": "0",
        "taskmanager.data.port": 0,
        "taskmanager.numberOfTaskSlots": slots,
        "taskmanager.memory.process.size": f"{tm_mb}m",
        "parallelism.default": 1,
        "restart-strategy.type": "none",
        "state.backend.type": "hashmap",
        "execution.checkpointing.interval": "1 s",
        "execution.checkpointing.dir": (work / "checkpoints").as_uri(),
        "execution.checkpointing.savepoint-dir": (work / "savepoints").as_uri(),
        "python.execution-mode": "thread",
        "python.executable": python,
        "python.client.executable": python,
        "env.log.dir": str(work / "log"),
        "env.pid.dir": str(work),
        "io.tmp.dirs": str(work / "tmp"),
    }
    if java_opts:
        conf["env.java.opts.all"] = java_opts
    return "".join(f"{k}: {json.dumps(v)}\n" for k, v in conf.items())


def job_args(
    *,
    out: str | Path,
    n: int,
    rate: float,
    keys: int,
    code: int = 1,
    count_p: int = 2,
    ver: int = 1,
) -> list[str]:
    """The program arguments of one version of the job after ``-py peer_flink.py``."""
    spec = {
        "out": str(out),
        "n": int(n),
        "rate": float(rate),
        "keys": int(keys),
        "code": int(code),
        "count_p": int(count_p),
        "ver": int(ver),
    }
    return ["job", json.dumps(spec)]


def parse_job_id(text: str) -> str:
    """The JobID that ``flink run -d`` printed; ValueError naming the output if none."""
    m = re.search(r"Job has been submitted with JobID ([0-9a-f]{32})", text)
    if m is None:
        raise ValueError(f"flink run printed no JobID: {text.strip()[-500:]!r}")
    return m.group(1)


def parse_savepoint(text: str) -> str:
    """The savepoint path that ``flink stop --savepointPath`` printed."""
    m = re.search(r"Savepoint completed\. Path: (\S+)", text)
    if m is None:
        raise ValueError(f"flink stop printed no savepoint path: {text.strip()[-500:]!r}")
    return m.group(1)


def _java_opts(conf_yaml: str) -> str:
    """``env.java.opts.all`` of the distribution's config.yaml (the --add-opens Java 17 needs)."""
    m = re.search(r"^env:\s*\n\s+java:\s*\n\s+opts:\s*\n\s+all:\s*(.+)$", conf_yaml, re.M)
    return m.group(1).strip() if m else ""


# -- availability ------------------------------------------------------------------
def flink_python() -> str:
    """The interpreter that has PyFlink: HOTWIRE_FLINK_PYTHON, else this one."""
    return os.environ.get("HOTWIRE_FLINK_PYTHON") or sys.executable


def find_pyflink(python: str) -> tuple[Path | None, str]:
    """(PyFlink's package directory, its version), or (None, why not)."""
    if shutil.which("java") is None:
        return None, "java is not on PATH (Flink needs Java 17: apt-get install openjdk-17-jre)"
    code = "import pyflink, pyflink.version as v; print(pyflink.__path__[0]); print(v.__version__)"
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    except OSError as e:
        return None, f"{python} cannot be run: {e}"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return None, (
            f"pyflink is not importable by {python} ({last}); "
            "pip install 'hotwire[flink]' there, or set HOTWIRE_FLINK_PYTHON"
        )
    home, ver = r.stdout.split()
    return Path(home), ver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the cluster ---------------------------------------------------------------------
class FlinkCluster:
    """A standalone Flink cluster (1 JobManager, 1 TaskManager) in a temporary directory.

    ``with FlinkCluster(python) as fc:``; the JobManager and TaskManager are this
    process's children, each in a process group of its own, and are stopped (SIGTERM,
    then SIGKILL) when the block is left.
    """

    def __init__(self, python: str, *, slots: int = 3, work: Path | None = None):
        home, ver = find_pyflink(python)
        if home is None:
            raise RuntimeError(ver)
        self.home, self.version, self.python, self.slots = home, ver, python, slots
        self._tmp = None if work else tempfile.TemporaryDirectory(prefix="hotwire-flink-")
        self.work = work or Path(self._tmp.name)  # type: ignore[union-attr]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.files: list[Any] = []
        self.env: dict[str, str] = {}
        self.rest = ""

    def __enter__(self) -> FlinkCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = 120.0) -> None:
        w = self.work
        for d in ("conf", "lib", "log", "tmp", "checkpoints", "savepoints"):
            (w / d).mkdir(parents=True, exist_ok=True)
        for jar in (self.home / "lib").glob("*.jar"):
            (w / "lib" / jar.name).symlink_to(jar)
        for jar in (self.home / "opt").glob("flink-python*.jar"):
            (w / "lib" / jar.name).symlink_to(jar)
        for f in (self.home / "conf").glob("log4j*.properties"):
            shutil.copy(f, w / "conf" / f.name)
        rpc, rest = _free_port(), _free_port()
        (w / "conf" / "config.yaml").write_text(
            flink_config(
                work=w,
                rpc_port=rpc,
                rest_port=rest,
                python=self.python,
                slots=self.slots,
                java_opts=_java_opts((self.home / "conf" / "config.yaml").read_text()),
            )
        )
        self.env = {
            **os.environ,
            "FLINK_HOME": str(self.home),
            "FLINK_CONF_DIR": str(w / "conf"),
            "FLINK_LIB_DIR": str(w / "lib"),
            "FLINK_LOG_DIR": str(w / "log"),
            "FLINK_PID_DIR": str(w),
            "PYFLINK_CLIENT_EXECUTABLE": self.python,
        }
        self.rest = f"http://localhost:{rest}"
        # the TaskManager's embedded interpreter is the base one of ``python``: it finds
        # PyFlink and pemja (in a virtualenv's site-packages) on PYTHONPATH
        site = str(self.home.parent)
        tm_env = {
            **self.env,
            "PYTHONPATH": os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")])),
        }
        for what, env in (("jobmanager", self.env), ("taskmanager", tm_env)):
            self.procs.append(
                subprocess.Popen(
                    ["bash", str(self.home / "bin" / f"{what}.sh"), "start-foreground"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=self._console(what),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + timeout
        while True:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a Flink process exited with {p.returncode}: {self.logs()}")
            try:
                tms = self.get("/taskmanagers")["taskmanagers"]
                if tms and tms[0].get("slotsNumber", 0) >= self.slots:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Flink cluster did not come up in {timeout:g} s")
            time.sleep(0.5)

    def _console(self, what: str) -> Any:
        f = open(self.work / "log" / f"{what}.console", "wb")
        self.files.append(f)
        return f

    def logs(self, chars: int = 1500) -> str:
        text = ""
        for f in sorted((self.work / "log").glob("*")):
            if f.is_file():
                text += f"--- {f.name}\n" + f.read_text(errors="replace")[-chars:]
        return text

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs = []
        for f in self.files:
            f.close()
        self.files = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.rest + path, timeout=10) as r:
            return json.loads(r.read())

    def cli(self, *args: str, timeout: float = 180.0) -> str:
        r = subprocess.run(
            ["bash", str(self.home / "bin" / "flink"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if r.returncode != 0:
            raise RuntimeError(
                f"flink {args[0]} exited with {r.returncode}: {r.stdout[-1500:]}{r.stderr[-1500:]}"
            )
        return r.stdout + r.stderr

    def run(self, job: dict[str, Any], savepoint: str | None = None) -> str:
        """Submit one version of the job (detached); its JobID."""
        args = ["run", "-d"]
        if savepoint:
            args += ["-s", savepoint]
        # the program's arguments start with a word: the CLI parses no option after it
        args += ["-py", str(HERE), *job_args(**job)]
        return parse_job_id(self.cli(*args))

    def stop(self, job_id: str) -> str:
        """Stop with a savepoint; the savepoint's path."""
        sp = self.work / "savepoints"
        return parse_savepoint(self.cli("stop", "--savepointPath", sp.as_uri(), job_id))

    def state(self, job_id: str) -> str:
        return str(self.get(f"/jobs/{job_id}")["state"])

    def cancel(self, job_id: str) -> None:
        try:
            if self.state(job_id) not in ("FINISHED", "FAILED", "CANCELED"):
                urllib.request.urlopen(
                    urllib.request.Request(f"{self.rest}/jobs/{job_id}", method="PATCH"),
                    timeout=10,
                ).close()
        except OSError:
            pass

    def wait(self, job_id: str, timeout: float) -> str:
        """Wait until the job is finished, failed or canceled; its last state."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.state(job_id)
            if st in ("FINISHED", "FAILED", "CANCELED") or time.monotonic() > deadline:
                return st
            time.sleep(0.2)

    def exception(self, job_id: str) -> str:
        try:
            ex = self.get(f"/jobs/{job_id}/exceptions")
            return str(ex.get("rootException") or "")[:1500]
        except OSError as e:
            return str(e)


# -- the driver: stop with a savepoint, restart the changed job from it -----------------
def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _has_ver(path: Path, ver: int) -> bool:
    """Whether the last whole line of ``path`` was written by version ``ver``."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().splitlines()
    except FileNotFoundError:
        return False
    for line in reversed(lines[1:] if len(lines) > 1 else lines):
        try:
            return bool(json.loads(line)["ver"] == ver)
        except ValueError:
            continue
    return False


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def saturate(
    fc: FlinkCluster, work: Path, *, n: int, keys: int, count_p: int = 2
) -> dict[str, Any]:
    """The job unpaced on ``n`` records: records/s at the sink after its first second
    (its first third if shorter)."""
    out = work / "flink-saturate.out.jsonl"
    out.unlink(missing_ok=True)
    jid = fc.run({"out": out, "n": n, "rate": 0, "keys": keys, "count_p": count_p, "ver": 1})
    st = fc.wait(jid, 600)
    if st != "FINISHED":
        raise RuntimeError(f"the saturating Flink job ended {st}: {fc.exception(jid)}")
    ts = sorted(r["t_sink"] for r in _read_rows(out))
    out.unlink()
    t0, t1 = ts[0] + min(1.0, (ts[-1] - ts[0]) / 3), ts[-1]  # leave out the start-up
    done = sum(1 for t in ts if t >= t0)
    return {"records": len(ts), "count_p": count_p, "rps": done / (t1 - t0) if t1 > t0 else None}


def stop_and_resume(
    fc: FlinkCluster,
    work: Path,
    tag: str,
    v1: dict[str, Any],
    v2: dict[str, Any],
    *,
    n: int,
    rate: float,
    keys: int,
    warm: float,
    after: float,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Run ``v1``; after ``warm`` s of output stop it with a savepoint and run ``v2`` from it.

    ``v1``/``v2``: ``code`` and ``count_p``. ``v2`` is stopped with a savepoint as well
    after ``after`` s of output (unless its ``n`` records are done): every record its
    source emitted before that savepoint reaches the sink, so sequence numbers
    ``0 .. emitted - 1`` are checked (``emitted``: the highest one written, plus 1).
    Returns the sink rows (``ver`` says which job wrote each), ``emitted``, ``t_req``
    (before ``flink stop``), ``t_done`` (``flink run`` of ``v2`` returned), ``stop_ms`` and
    ``run_ms`` (the two commands), ``first_output_s`` (from ``t_req`` to the first record
    written by ``v2``) and ``v2``'s final state.
    """
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{tag}.out.jsonl"
    out.unlink(missing_ok=True)
    base = {"out": out, "n": n, "rate": rate, "keys": keys}
    j1 = fc.run({**base, "code": v1.get("code", 1), "count_p": v1.get("count_p", 2), "ver": 1})
    j2 = None
    try:
        deadline = time.monotonic() + timeout
        while _count_lines(out) == 0:
            if fc.state(j1) in ("FAILED", "CANCELED", "FINISHED") or time.monotonic() > deadline:
                raise RuntimeError(f"flink v1 produced no output: {fc.exception(j1)}")
            time.sleep(0.05)
        time.sleep(warm)
        t_req, c0 = time.time(), time.perf_counter()
        sp = fc.stop(j1)
        c1 = time.perf_counter()
        j2 = fc.run(
            {**base, "code": v2.get("code", 1), "count_p": v2.get("count_p", 2), "ver": 2},
            savepoint=sp,
        )
        c2, t_done = time.perf_counter(), time.time()
        deadline = time.monotonic() + timeout
        while not _has_ver(out, 2):
            if fc.state(j2) in ("FAILED", "CANCELED", "FINISHED") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        time.sleep(after)
        if fc.state(j2) == "RUNNING":
            fc.stop(j2)
        st = fc.wait(j2, timeout)
        err = fc.exception(j2) if st != "FINISHED" else ""
    finally:
        for j in (j1, j2):
            if j:
                fc.cancel(j)
    rows = _read_rows(out)
    first_new = min((r["t_sink"] for r in rows if r["ver"] == 2), default=None)
    return {
        "rows": rows,
        "emitted": max((r["seq"] for r in rows), default=-1) + 1,
        "t_req": t_req,
        "t_done": t_done,
        "stop_ms": (c1 - c0) * 1000,
        "run_ms": (c2 - c1) * 1000,
        "first_output_s": None if first_new is None else first_new - t_req,
        "state": st,
        "error": err,
    }


# -- the benchmark of the peer alone ---------------------------------------------------
SCENARIO_VERSIONS = {
    "change_code": ({"code": 1, "count_p": 2}, {"code": 2, "count_p": 2}),
    "rescale_keyed": ({"code": 1, "count_p": 2}, {"code": 1, "count_p": 3}),
}


def peer_runs(
    fc: FlinkCluster,
    work: Path,
    scenario: str,
    runs: int,
    *,
    rate: float,
    keys: int,
    warm: float,
    after: float,
    steady_window: float = 1.0,
) -> dict[str, Any]:
    """``runs`` stop-with-savepoint upgrades of ``scenario``: the entry of its figures."""
    sys.path.insert(0, str(HERE.parent))
    import statistics

    from upgrade import (
        Event,
        Run,
        count_resets,
        max_gap,
        measure,
        new_output_gap,
        pct,
        r3,
        steady_gap,
        summary,
        timeline,
    )

    v1, v2 = SCENARIO_VERSIONS[scenario]
    warm = max(warm, keys / rate + 1.0)  # every key is in the state before the stop
    # the source must still be running when the savepoint is triggered: ``flink stop``
    # starts a JVM first (seconds, more under load); v2 is stopped after ``after`` s
    n = int(rate * (warm + STOP_ALLOWANCE_S + after))
    gaps: list[float] = []
    new_gaps: list[float] = []
    first: list[float] = []
    stop_ms: list[float] = []
    run_ms: list[float] = []
    steady: list[float] = []
    stretch: list[float] = []
    lost = dup = ooo = resets = resets_first = received = 0
    keys_held: list[int] = []
    tl = None
    for i in range(runs):
        r = stop_and_resume(
            fc,
            work,
            f"flink-{scenario}-{i}",
            v1,
            v2,
            n=n,
            rate=rate,
            keys=keys,
            warm=warm,
            after=after,
        )
        if r["state"] != "FINISHED":
            raise RuntimeError(f"flink v2 ended {r['state']}: {r['error']}")
        run = Run(f"flink:{scenario}", rows=r["rows"], n=r["emitted"])
        run.events.append(
            Event("restart", r["t_req"], r["t_done"], r["stop_ms"] + r["run_ms"], r["run_ms"])
        )
        m = measure(run)
        v = m["verdict"]
        gaps += m["gaps"]
        # the noise floor: v1's output before the stop and v2's after its start-up, apart
        for part in (
            [x for x in r["rows"] if x["t_sink"] < r["t_req"]],
            [x for x in r["rows"] if x["ver"] == 2],
        ):
            steady += steady_gap(Run("steady", rows=part), steady_window)
        t_out = min(x["t_sink"] for x in r["rows"])
        stretch.append(max_gap(run.sink_times, t_out + 0.5, r["t_req"] - 0.2) * 1000)
        new_gaps.append(new_output_gap(run, run.events[0]))
        stop_ms.append(r["stop_ms"])
        run_ms.append(r["run_ms"])
        if r["first_output_s"] is not None:
            first.append(r["first_output_s"] * 1000)
        keys_held.append(len({x["key"] for x in r["rows"] if x["ver"] == 1}))
        received += v.received
        lost, dup, ooo = lost + v.lost, dup + v.duplicated, ooo + v.out_of_order
        resets += max(v.state_resets, count_resets(r["rows"]))
        resets_first += v.state_resets
        wrong_code = sum(1 for x in r["rows"] if x["ver"] == 2 and x["code"] != v2["code"])
        if wrong_code:
            raise RuntimeError(f"{wrong_code} records of the new job carry the old code")
        if i == 0:
            tl = timeline(run)
    entry = {
        "available": True,
        "system": f"apache-flink {fc.version}",
        "how": "flink stop --savepointPath DIR JOBID, then flink run -d -s SAVEPOINT -py "
        "job.py of the new version (operators with uids; hashmap state backend, "
        "checkpoints every 1 s; Python functions in thread mode)",
        "measured": scenario,
        "runs": len(gaps),
        "rate": rate,
        "keys": keys,
        "warm_s": warm,
        "keys_in_state_at_stop": summary(keys_held, "p50", "max"),
        "count_p": [v1["count_p"], v2["count_p"]],
        "gap_ms": summary(gaps, "p50", "max"),
        "gap_ms_all": [r3(g) for g in gaps],
        "steady_window_s": steady_window,
        "steady_gap_ms_p50": r3(statistics.median(steady)) if steady else None,
        "steady_gap_ms_p99": r3(pct(steady, 0.99)),
        "steady_gap_ms_max": r3(max(steady)) if steady else None,
        "steady_windows": len(steady),
        "steady_stretch_gap_ms": summary(stretch, "p50", "max"),
        "new_output_gap_ms": summary(new_gaps, "p50", "max"),
        "first_output_ms": summary(first, "p50", "max"),
        "stop_savepoint_ms": summary(stop_ms, "p50", "max"),
        "run_from_savepoint_ms": summary(run_ms, "p50", "max"),
        "throughput_rps": m["throughput_rps"] if gaps else None,
        "received": received,
        "lost": lost,
        "duplicated": dup,
        "out_of_order": ooo,
        "state_resets": resets,
        "state_resets_first_delivery": resets_first,
    }
    return {"entry": entry, "timeline": tl}


def unavailable(python: str | None = None) -> dict[str, Any] | None:
    """``{"available": False, "reason"}`` when PyFlink or java is missing, else None."""
    home, why = find_pyflink(python or flink_python())
    return {"available": False, "reason": why} if home is None else None


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        description="Flink peer: stop-with-savepoint upgrades of the keyed workload on a "
        "local Flink cluster; prints JSON"
    )
    ap.add_argument(
        "--flink-python",
        default=None,
        help="interpreter with pyflink (default: HOTWIRE_FLINK_PYTHON, else this one)",
    )
    ap.add_argument("--rate", type=float, default=1000.0, help="input records per second")
    ap.add_argument("--keys", type=int, default=10000, help="key domain of the keyed count")
    ap.add_argument("--runs", type=int, default=3, help="upgrades per scenario")
    ap.add_argument(
        "--scenarios",
        default="change_code,rescale_keyed",
        help="comma-separated subset of: " + ", ".join(SCENARIO_VERSIONS),
    )
    ap.add_argument(
        "--warm",
        type=float,
        default=2.0,
        help="s of output before the stop (at least keys/rate + 1)",
    )
    ap.add_argument(
        "--after", type=float, default=4.0, help="s of output of the new version before its stop"
    )
    ap.add_argument(
        "--saturate-n",
        type=int,
        default=100000,
        help="records of the unpaced throughput run (0: none)",
    )
    ap.add_argument("--out", default="bench/results/flink.json")
    a = ap.parse_args(argv)
    scenarios = [x for x in a.scenarios.split(",") if x]
    for x in scenarios:
        if x not in SCENARIO_VERSIONS:
            ap.error(f"unknown scenario {x!r}; choose from {', '.join(SCENARIO_VERSIONS)}")
    python = a.flink_python or flink_python()
    missing = unavailable(python)
    if missing is not None:
        print(f"peer_flink: skipped: {missing['reason']}", file=sys.stderr)
        return 0
    sys.path.insert(0, str(HERE.parent))
    from upgrade import log, machine, r3

    t0 = time.perf_counter()
    doc: dict[str, Any] = {"machine": machine()}
    timelines = []
    with (
        tempfile.TemporaryDirectory(prefix="hotwire-flink-bench-") as tmp,
        FlinkCluster(python, work=Path(tmp) / "cluster") as fc,
    ):
        doc["config"] = {
            "system": f"apache-flink {fc.version}",
            "cluster": "1 JobManager (1600 MB), 1 TaskManager (2048 MB, 3 slots), loopback",
            "state_backend": "hashmap",
            "checkpoint_interval_s": 1,
            "python_execution_mode": "thread",
            "rate": a.rate,
            "keys": a.keys,
            "runs": a.runs,
            "scenarios": scenarios,
        }
        if a.saturate_n:
            log(f"flink: saturated throughput ({a.saturate_n} records, count parallelism 2)")
            sat = saturate(fc, Path(tmp), n=a.saturate_n, keys=a.keys)
            doc["throughput"] = {**sat, "rps": r3(sat["rps"])}
            log(f"flink: {doc['throughput']['rps']} records/s")
        doc["scenarios"] = []
        for x in scenarios:
            log(f"flink: {a.runs} stop-with-savepoint upgrade(s) of {x} at {a.rate:g}/s")
            r = peer_runs(
                fc, Path(tmp), x, a.runs, rate=a.rate, keys=a.keys, warm=a.warm, after=a.after
            )
            e = r["entry"]
            doc["scenarios"].append(e)
            timelines.append(r["timeline"])
            log(
                f"flink {x}: gap p50/max {e['gap_ms']['p50']}/{e['gap_ms']['max']} ms "
                f"(steady 1 s windows p99 {e['steady_gap_ms_p99']}), first output p50 "
                f"{e['first_output_ms']['p50']} ms, lost/dup {e['lost']}/{e['duplicated']}"
            )
    doc["elapsed_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(doc, indent=2)
    print(text)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        out.with_suffix(".timeline.json").write_text(json.dumps(timelines) + "\n")
        log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "job":
        _job_main(sys.argv[2])
    else:
        sys.exit(main())
