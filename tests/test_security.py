"""A secure cluster refuses whoever lacks credentials, and nothing it refuses reaches an app.

Every test here runs a real master and real workers with mTLS under one cluster
CA (``LocalCluster(secure=True)``), an app counting keyed records into a JSONL
sink, and real attackers: plaintext clients, clients without or with bad
tokens, viewers, revoked tokens, workers with another CA's certificate or
another worker's name, data-plane peers that forge frames, and one that sends
10,000 malformed frames over TLS. Each refusal is counted where it is seen, and
the app's output is checked record by record at the end.
"""

from __future__ import annotations

import asyncio
import os
import random
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest

from hotwire.client import Client
from hotwire.proto import hotwire_pb2 as pb
from hotwire.proto import hotwire_pb2_grpc as pb_grpc
from hotwire.security import pki
from hotwire.security.tls import ClientCredentials, TlsFiles, channel_options
from hotwire.testing import count_lines, read_jsonl
from hotwire.testing.cluster import LocalCluster, poll_for, write_app
from hotwire.testing.scenarios import SCENARIOS, check_output, render

N = 6000
RATE = 1500.0


def _app(tmp_path: Path, n: int = N) -> tuple[Path, Path, Path]:
    out = tmp_path / "out.jsonl"
    v1, v2 = SCENARIOS["change_code"]
    kw: dict[str, Any] = {"out": str(out), "audit": str(tmp_path / "a"), "n": n, "rate": RATE}
    return (
        out,
        write_app(tmp_path, "v1.py", render(v1, **kw)),
        write_app(tmp_path, "v2.py", render(v2, **kw)),
    )


def _assert_exact(out: Path, n: int = N) -> None:
    poll_for(lambda: count_lines(out) >= n, 60, what="every record at the sink")
    v = check_output(read_jsonl(out), n)
    counts = (v.lost, v.duplicated, v.out_of_order, v.state_resets)
    assert counts == (0, 0, 0, 0) and not v.problems, (counts, v.problems)


def _code(fn: Any) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code()
    raise AssertionError("the call was not refused")


def _streamctl(c: LocalCluster, *args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "hotwire.cli", "--master", c.address, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOTWIRE_HOME": str(c.dir / "home"), **(env or {})},
    )


def test_clients_without_valid_credentials_are_refused_and_change_nothing(
    tmp_path: Path,
) -> None:
    out, v1, v2 = _app(tmp_path)
    with LocalCluster(data_dir=tmp_path / "c", secure=True) as c:
        admin = c.client
        admin.submit(str(v1))
        before = admin.status("upg").apps[0].version
        creds = c.credentials()
        refused: dict[str, int] = {}

        def refuse(what: str, code: grpc.StatusCode, fn: Any) -> None:
            got = _code(fn)
            assert got == code, f"{what}: {got}, expected {code}"
            refused[what] = refused.get(what, 0) + 1

        # A plaintext client: the TLS port does not answer it at all.
        plain = Client(c.address, ClientCredentials())
        refuse("plaintext", grpc.StatusCode.UNAVAILABLE, lambda: plain.status("upg", timeout=5))
        refuse("plaintext", grpc.StatusCode.UNAVAILABLE, lambda: plain.kill("upg", timeout=5))
        plain.close()

        # TLS, but no token or a wrong one.
        for token in ("", "hwt_00000000_forged", "not-a-token"):
            cl = Client(c.address, ClientCredentials(creds.tls, token))
            refuse("bad token", grpc.StatusCode.UNAUTHENTICATED, lambda cl=cl: cl.kill("upg"))
            refuse("bad token", grpc.StatusCode.UNAUTHENTICATED, lambda cl=cl: cl.submit(str(v2)))
            cl.close()

        # A viewer reads and dry-runs, and may change nothing.
        vt = admin.create_token("viewer", "dashboard")
        viewer = Client(c.address, ClientCredentials(creds.tls, vt.token))
        assert viewer.status("upg").apps[0].version == before
        assert viewer.workers().workers
        assert not viewer.upgrade(str(v2), dry_run=True).applied
        for what, fn in (
            ("viewer submit", lambda: viewer.submit(str(v2), name="other")),
            ("viewer upgrade", lambda: viewer.upgrade(str(v2))),
            ("viewer rollback", lambda: viewer.rollback("upg")),
            ("viewer kill", lambda: viewer.kill("upg")),
            ("viewer token", lambda: viewer.create_token("admin")),
        ):
            refuse(what, grpc.StatusCode.PERMISSION_DENIED, fn)

        # A revoked token is refused from the next call on.
        at = admin.create_token("admin", "ci")
        second = Client(c.address, ClientCredentials(creds.tls, at.token))
        assert second.status("upg").apps
        admin.revoke_token(at.id)
        refuse("revoked", grpc.StatusCode.UNAUTHENTICATED, lambda: second.status("upg"))
        refuse("revoked", grpc.StatusCode.UNAUTHENTICATED, lambda: second.kill("upg"))
        second.close()
        viewer.close()

        # streamctl: one line on stderr, exit 1.
        env = {
            "HOTWIRE_CA": str(creds.tls.ca),
            "HOTWIRE_CERT": str(creds.tls.cert),
            "HOTWIRE_KEY": str(creds.tls.key),
        }
        r = _streamctl(c, "kill", "upg", env={**env, "HOTWIRE_TOKEN": "hwt_x_y"})
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert "token is not valid" in r.stderr, r.stderr
        r = _streamctl(c, "kill", "upg", env={**env, "HOTWIRE_TOKEN": vt.token})
        assert r.returncode == 1 and "may not call Kill" in r.stderr, r.stderr

        # Nothing reached the app: same version, one app, every record exactly once.
        st = admin.status("")
        assert [a.app for a in st.apps] == ["upg"] and st.apps[0].version == before
        assert len(admin.history("upg").versions) == 1
        _assert_exact(out)

        # The audit log has every mutating call with its outcome.
        entries = admin.audit(limit=1000).entries
        outcomes = [(e.command, e.outcome) for e in entries]
        assert outcomes.count(("Kill", "UNAUTHENTICATED")) >= 5, outcomes
        assert outcomes.count(("Kill", "PERMISSION_DENIED")) >= 2, outcomes
        assert ("Submit", "OK") in outcomes and ("RevokeToken", "OK") in outcomes
        dry = [e for e in entries if e.command == "Upgrade" and e.outcome == "OK"]
        assert dry and dry[0].token == vt.id and "dry run" in dry[0].detail
        r = _streamctl(c, "audit", "upg", "--json", env={**env, "HOTWIRE_TOKEN": c.admin.token})
        assert r.returncode == 0 and '"command": "Kill"' in r.stdout, r.stderr
        assert sum(refused.values()) == 15, refused


def test_workers_must_hold_their_own_certificate(tmp_path: Path) -> None:
    with LocalCluster(data_dir=tmp_path / "c", workers=1, secure=True) as c:
        # A worker with a certificate from another CA: its registration never succeeds.
        other = tmp_path / "other-ca"
        pki.make_ca(other, cluster="evil")
        forged = pki.issue(other, "worker", "w9", other)
        log = tmp_path / "w9.log"
        with open(log, "w") as f:
            p = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "hotwire.cli",
                    "--master",
                    c.address,
                    "--ca",
                    str(other / "ca.pem"),
                    "worker",
                    "--worker-cert",
                    str(forged.cert),
                    "--worker-key",
                    str(forged.key),
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        try:
            # It keeps retrying: give it several attempts, then check it never got in.
            time.sleep(4)
            names = [w.name for w in c.client.workers().workers]
            assert names == ["w1"], names
        finally:
            p.kill()
            p.wait()

        # A worker certificate of this CA, registering under another worker's name.
        w3 = pki.issue(c.admin.tls_dir, "worker", "w3", tmp_path / "w3")
        files = TlsFiles.of(c.admin.ca, w3.cert, w3.key)
        with grpc.secure_channel(
            c.address, files.channel_credentials(), options=channel_options()
        ) as ch:
            stub = pb_grpc.WorkerControlStub(ch)
            for name in ("w1", "w2"):
                with pytest.raises(grpc.RpcError) as e:
                    stub.Register(pb.RegisterRequest(name=name, data_address="127.0.0.1:1"))
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "cannot act as worker" in (e.value.details() or "")
        # A client certificate cannot call the worker service at all.
        creds = c.credentials()
        with grpc.secure_channel(
            c.address, creds.tls.channel_credentials(), options=channel_options()
        ) as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.WorkerControlStub(ch).Register(
                    pb.RegisterRequest(name="admin", data_address="127.0.0.1:1")
                )
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        ws = c.client.workers().workers
        assert [w.name for w in ws] == ["w1"] and ws[0].alive and not ws[0].fenced


def _frame(*items: Any) -> bytes:
    body = msgpack.packb(list(items), use_bin_type=True)
    return struct.pack(">I", len(body)) + body


async def _attack(host: str, port: int, ssl_ctx: Any, hello: str, frames: list[bytes]) -> str:
    """Connect, say HELLO as ``hello``, send ``frames``; how the connection ended."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host, port, ssl=ssl_ctx, server_hostname="w1" if ssl_ctx else None
            ),
            10,
        )
    except (TimeoutError, OSError) as e:
        return f"refused at connect: {type(e).__name__}"
    try:
        writer.write(_frame(0, hello, "attacker"))
        for i in range(0, len(frames), 500):
            writer.write(b"".join(frames[i : i + 500]))
            await writer.drain()
        data = await asyncio.wait_for(reader.read(1 << 16), 10)
        return "closed" if not data else f"answered {len(data)} bytes"
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as e:
        return f"closed: {type(e).__name__}"
    finally:
        writer.close()


def _malformed(n: int, rng: random.Random) -> list[bytes]:
    frames = []
    for i in range(n):
        k = i % 5
        if k == 0:  # not msgpack at all
            body = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 40)))
            frames.append(struct.pack(">I", len(body)) + body)
        elif k == 1:  # a batch whose sequence number is not an integer
            frames.append(_frame(1, "upg", "enrich@1.0>count@1.0", "seq", [{"k": 1}]))
        elif k == 2:  # an unknown frame kind
            frames.append(_frame(99, "upg", "x", 1))
        elif k == 3:  # a batch for a channel no instance has, out of sequence
            frames.append(_frame(1, "upg", f"nowhere{i}", 7, [1, 2, 3]))
        else:  # not even a list
            frames.append(_frame_scalar(i))
    return frames


def _frame_scalar(i: int) -> bytes:
    body = msgpack.packb({"i": i})
    return struct.pack(">I", len(body)) + body


def test_data_plane_refuses_uncertified_peers_and_survives_garbage(tmp_path: Path) -> None:
    out, v1, _ = _app(tmp_path)
    with LocalCluster(data_dir=tmp_path / "c", secure=True) as c:
        c.client.submit(str(v1))
        poll_for(lambda: count_lines(out) >= N // 10, 30, what="records flowing")
        target = next(w for w in c.client.workers().workers if w.name == "w2")
        host, _, port = target.data_address.rpartition(":")
        # Forged frames on the app's real channels (version 1: generation 1): records
        # that would show as duplicates at the sink, then END markers.
        channels = ["src@1.0>enrich@1.0", "src@1.0>enrich@1.1"]
        channels += [f"enrich@1.{a}>count@1.{b}" for a in (0, 1) for b in (0, 1)]
        channels += ["count@1.0>out@1.0", "count@1.1>out@1.0"]
        dup = [{"seq": s, "key": f"k{s % 64}", "n": 1} for s in range(5)]
        forged = [_frame(1, "upg", ch, 1, dup) for ch in channels]
        forged += [_frame(2, "upg", ch, 2) for ch in channels]

        other = tmp_path / "other-ca"
        pki.make_ca(other, cluster="evil")
        evil = pki.issue(other, "worker", "w1", other)
        w3 = pki.issue(c.admin.tls_dir, "worker", "w3", tmp_path / "w3")
        own = TlsFiles.of(c.admin.ca, w3.cert, w3.key).client_context()
        foreign = TlsFiles.of(other / "ca.pem", evil.cert, evil.key).client_context()
        foreign.verify_mode = ssl.CERT_NONE  # it does not trust this cluster's CA either

        async def attacks() -> list[str]:
            return [
                # plaintext, claiming to be w1, with forged frames
                await _attack(host, int(port), None, "w1", forged),
                # TLS with a certificate of another CA naming w1
                await _attack(host, int(port), foreign, "w1", forged),
                # a valid certificate of w3 whose HELLO claims w1
                await _attack(host, int(port), own, "w1", forged),
                # a valid certificate, its own name: 10,000 malformed frames
                await _attack(host, int(port), own, "w3", _malformed(10_000, random.Random(3))),
            ]

        ends = asyncio.run(attacks())

        def counters() -> dict[str, int]:
            w = next(w for w in c.client.workers().workers if w.name == "w2")
            return dict(w.data_plane)

        def dropped(got: dict[str, int]) -> int:
            return sum(got.get(k, 0) for k in ("bad_frame", "out_of_sequence", "unknown_channel"))

        deadline = time.monotonic() + 15
        while True:
            got = counters()
            seen = (got.get("tls_refused", 0), got.get("bad_identity", 0), dropped(got))
            if seen >= (2, 1, 10_000) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        _assert_exact(out)
        assert got["tls_refused"] == 2 and got["bad_identity"] == 1, (got, ends)
        # Every malformed frame is counted as dropped, none more: most cannot be decoded
        # or dispatched (bad_frame); a batch out of sequence on a channel nobody has is
        # out_of_sequence.
        assert dropped(got) == 10_000 and got["out_of_sequence"] >= 2000, got
        dead = [p.label for p in [c.master, *c.workers] if p.proc.poll() is not None]
        assert not dead, dead
        r = _streamctl(
            c,
            "workers",
            env={
                "HOTWIRE_CA": str(c.admin.ca),
                "HOTWIRE_CERT": str(c.admin.client_cert),
                "HOTWIRE_KEY": str(c.admin.client_key),
                "HOTWIRE_TOKEN": c.admin.token,
            },
        )
        assert "tls_refused 2" in r.stdout and "bad_identity 1" in r.stdout, r.stdout


def test_non_loopback_without_tls_refuses_to_start(tmp_path: Path) -> None:
    for args in (
        ["master", "--listen", "0.0.0.0:0", "--data-dir", str(tmp_path / "m")],
        ["worker", "--listen", "0.0.0.0:0"],
    ):
        r = subprocess.run(
            [sys.executable, "-m", "hotwire.cli", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 1, r
        assert "without TLS" in r.stderr and r.stderr.count("\n") == 1, r.stderr
