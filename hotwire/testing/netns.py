"""Several hosts on one machine: network namespaces on a bridge, for multi-host tests.

:class:`Net` makes a Linux bridge in the caller's namespace (which becomes one
more host, the *client*, at ``.254``) and one network namespace per host, each
joined to the bridge by a veth pair and given its own address in a /24 of
``10.213.0.0/16``. Faults are nftables rules inside a host's namespace:

- :meth:`Net.loss` drops a share of the host's outgoing TCP packets at random
  (``numgen random``), so its connections see loss and retransmissions;
- :meth:`Net.partition` drops everything between the host and some (or all)
  other hosts, in both directions; :meth:`Net.heal` removes it;
- :meth:`Net.link_down` / :meth:`Net.link_up` take the host's interface down.

Latency is not emulated: that needs the kernel's ``sch_netem`` queueing
discipline, which kernels without loadable modules (some VMs) do not have;
:func:`netem_available` says whether this one has it, and :meth:`Net.delay`
adds ``tc netem`` delay where it does.

It needs root (``CAP_NET_ADMIN``), ``ip`` and ``nft``. :func:`unavailable`
says why not, when not. Every namespace, link and rule a :class:`Net` made is
removed by :meth:`Net.close` (also at interpreter exit), and a new ``Net``
first removes what a killed test run left behind (names carry the creating
process's pid).

:class:`NetnsCluster` is a :class:`~hotwire.testing.cluster.LocalCluster`
whose master and workers each run in a namespace of their own.
"""

from __future__ import annotations

import atexit
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from hotwire.testing.cluster import LocalCluster

__all__ = ["Host", "Net", "NetnsCluster", "netem_available", "unavailable"]

_PREFIX = "hwn"  # namespace, bridge and veth names start with it


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        msg = f"{' '.join(args)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()}"
        raise RuntimeError(msg)
    return r


def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool!r} is not installed (apt-get install iproute2 nftables)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"{_PREFIX}probe{os.getpid()}"
    r = _run("ip", "netns", "add", name, check=False)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    _run("ip", "netns", "del", name, check=False)
    return None


def netem_available() -> bool:
    """Whether ``tc netem`` works here (the kernel has ``sch_netem``)."""
    if shutil.which("tc") is None:
        return False
    name = f"{_PREFIX}probe{os.getpid()}"
    if _run("ip", "netns", "add", name, check=False).returncode != 0:
        return False
    try:
        r = _run(
            "ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
            "delay", "1ms", check=False,
        )  # fmt: skip
        return r.returncode == 0
    finally:
        _run("ip", "netns", "del", name, check=False)


@dataclass
class Host:
    """One host: a namespace with an address on the bridge."""

    name: str
    netns: str
    ip: str
    veth: str  # its end on the bridge side, in the caller's namespace
    rules: dict[str, list[str]] = field(default_factory=dict)  # nft chain -> rules

    def exec_args(self) -> list[str]:
        """Prefix a command with this to run it in the host's namespace."""
        return ["ip", "netns", "exec", self.netns]


def _sweep() -> None:
    """Remove namespaces and links left by test runs whose process is gone."""
    pat = re.compile(rf"^{_PREFIX}(\d+)[a-z]")
    listed = _run("ip", "netns", "list", check=False).stdout.split()
    links = re.findall(rf"^\d+: ({_PREFIX}\d+[a-z]\w*)[@:]", _run("ip", "-o", "link").stdout, re.M)
    for name in [*listed, *links]:
        m = pat.match(name)
        if m is None or _alive(int(m.group(1))):
            continue
        if name in listed:
            _run("ip", "netns", "del", name, check=False)
        else:
            _run("ip", "link", "del", name, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Net:
    """A bridge with hosts in network namespaces (module docstring)."""

    def __init__(self) -> None:
        why = unavailable()
        if why is not None:
            raise RuntimeError(f"network namespaces are not usable here: {why}")
        _sweep()
        self._tag = f"{_PREFIX}{os.getpid()}"
        self.bridge = f"{self._tag}b"
        used = _run("ip", "-o", "addr").stdout
        for _ in range(100):
            third = random.randrange(1, 255)
            self.subnet = f"10.213.{third}"
            if f"{self.subnet}." not in used:
                break
        if _run("ip", "link", "show", self.bridge, check=False).returncode == 0:
            raise RuntimeError(f"bridge {self.bridge} exists already (one Net per process)")
        self.hosts: dict[str, Host] = {}
        self.client_ip = f"{self.subnet}.254"
        self._closed = False
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        atexit.register(self.close)
        _run("ip", "addr", "add", f"{self.client_ip}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")

    # -- hosts --------------------------------------------------------------
    def add_host(self, name: str) -> Host:
        i = len(self.hosts) + 1
        if i > 250:
            raise ValueError("at most 250 hosts on one Net")
        h = Host(name, f"{self._tag}n{i}", f"{self.subnet}.{i}", f"{self._tag}v{i}")
        # An earlier Net of this process may have left them: the kernel frees a deleted
        # namespace, and the veth end in it, only once nothing holds it any more.
        _run("ip", "link", "del", h.veth, check=False)
        _run("ip", "netns", "del", h.netns, check=False)
        _run("ip", "netns", "add", h.netns)
        self.hosts[name] = h
        _run("ip", "link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.netns)
        _run("ip", "link", "set", h.veth, "master", self.bridge, "up")
        _run("ip", "-n", h.netns, "addr", "add", f"{h.ip}/24", "dev", "eth0")
        _run("ip", "-n", h.netns, "link", "set", "eth0", "up")
        _run("ip", "-n", h.netns, "link", "set", "lo", "up")
        nft = (
            "table inet hotwire {\n"
            "  chain input { type filter hook input priority 0; policy accept; }\n"
            "  chain output { type filter hook output priority 0; policy accept; }\n"
            "}\n"
        )
        self._nft(h, nft)
        return h

    def host(self, name: str) -> Host:
        return self.hosts[name]

    def _nft(self, h: Host, script: str) -> None:
        r = subprocess.run(
            [*h.exec_args(), "nft", "-f", "-"],
            input=script,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if r.returncode != 0:
            raise RuntimeError(f"nft in {h.netns} failed: {r.stderr.strip()}")

    def _set_rules(self, h: Host) -> None:
        lines = ["flush chain inet hotwire input", "flush chain inet hotwire output"]
        for chain, rules in h.rules.items():
            lines += [f"add rule inet hotwire {chain} {rule}" for rule in rules]
        self._nft(h, "\n".join(lines) + "\n")

    # -- faults -------------------------------------------------------------
    def loss(self, name: str, percent: int) -> None:
        """Drop ``percent`` % of ``name``'s outgoing TCP packets at random (0: none)."""
        h = self.hosts[name]
        h.rules["output"] = [r for r in h.rules.get("output", []) if "numgen" not in r]
        if percent > 0:
            rule = f"meta l4proto tcp numgen random mod 100 < {percent} counter drop"
            h.rules["output"].append(rule)
        self._set_rules(h)

    def dropped(self, name: str) -> int:
        """How many packets :meth:`loss` dropped on ``name`` since it was last set."""
        h = self.hosts[name]
        r = _run(*h.exec_args(), "nft", "list", "chain", "inet", "hotwire", "output")
        return sum(int(n) for n in re.findall(r"numgen .* counter packets (\d+)", r.stdout))

    def partition(self, name: str, peers: list[str] | None = None) -> None:
        """Drop all traffic between ``name`` and ``peers`` (host names, or ``"client"``
        for the caller's namespace); every other host when ``peers`` is None."""
        h = self.hosts[name]
        if peers is None:
            ips = [o.ip for o in self.hosts.values() if o is not h] + [self.client_ip]
        else:
            ips = [self.client_ip if p == "client" else self.hosts[p].ip for p in peers]
        for ip in ips:
            h.rules.setdefault("input", []).append(f"ip saddr {ip} drop")
            h.rules.setdefault("output", []).append(f"ip daddr {ip} drop")
        self._set_rules(h)

    def heal(self, name: str) -> None:
        """Remove every partition of ``name`` (the loss setting stays)."""
        h = self.hosts[name]
        h.rules = {c: [r for r in rs if "numgen" in r] for c, rs in h.rules.items()}
        self._set_rules(h)

    def link_down(self, name: str) -> None:
        _run("ip", "-n", self.hosts[name].netns, "link", "set", "eth0", "down")

    def link_up(self, name: str) -> None:
        _run("ip", "-n", self.hosts[name].netns, "link", "set", "eth0", "up")

    def delay(self, name: str, ms: float, jitter_ms: float = 0) -> None:
        """``tc netem`` delay on ``name``'s interface (needs :func:`netem_available`)."""
        args = ["delay", f"{ms}ms"] + ([f"{jitter_ms}ms"] if jitter_ms else [])
        _run("ip", "netns", "exec", self.hosts[name].netns, "tc", "qdisc", "replace", "dev",
             "eth0", "root", "netem", *args)  # fmt: skip

    # -- clean-up -----------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for h in self.hosts.values():
            _run("ip", "netns", "pids", h.netns, check=False)
            for pid in _run("ip", "netns", "pids", h.netns, check=False).stdout.split():
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            # Deleting our end of the veth pair deletes both at once; the namespace's
            # deletion alone frees its end only when nothing holds the namespace.
            _run("ip", "link", "del", h.veth, check=False)
            _run("ip", "netns", "del", h.netns, check=False)
        _run("ip", "link", "del", self.bridge, check=False)
        atexit.unregister(self.close)

    def __enter__(self) -> Net:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NetnsCluster(LocalCluster):
    """A :class:`LocalCluster` whose master and workers each run in a network
    namespace of their own, with their own address; the test (the client) runs in
    the caller's namespace. ``net`` holds the hosts: ``"master"``, ``"w1"``, ...

    Without ``secure`` the processes listen on non-loopback addresses with
    ``--insecure``; with it, the certificates carry the namespaces' addresses.
    """

    def __init__(self, net: Net | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._own_net = net is None
        self.net = net if net is not None else Net()

    def _host(self, name: str) -> Host:
        return self.net.hosts.get(name) or self.net.add_host(name)

    def start(self) -> NetnsCluster:
        if self.secure and self.admin is None:
            from hotwire.master.access import bootstrap

            self.admin = bootstrap(self.dir / "master", hosts=(self._host("master").ip,))
        try:
            super().start()
        except BaseException:
            self.stop()
            raise
        return self

    def _process_args(self, host: str, args: list[str]) -> list[str]:
        h = self._host(host)
        insecure = [] if self.secure else ["--insecure"]
        if host == "master":
            port = args[args.index("--listen") + 1].rpartition(":")[2]
            args = [*args, *insecure]
            args[args.index("--listen") + 1] = f"{h.ip}:{port}"
        else:
            i = args.index("worker") + 1
            args = [*args[:i], "--listen", f"{h.ip}:0", *insecure, *args[i:]]
        return [*h.exec_args(), *args]

    def worker_tls(self, name: str) -> list[str]:
        if self.admin is None:
            return []
        from hotwire.security import pki

        issued = pki.issue(
            self.admin.tls_dir, "worker", name, self.dir / "certs", hosts=(self._host(name).ip,)
        )
        return ["--worker-cert", str(issued.cert), "--worker-key", str(issued.key)]

    # -- faults through the namespaces ------------------------------------
    def partition_worker(self, name: str, peers: list[str] | None = None) -> None:
        """Cut worker ``name`` off ``peers`` (host names: "master", "w2", "client"),
        or off the master only (as :class:`LocalCluster` does with its proxies)."""
        self.net.partition(name, ["master"] if peers is None else peers)

    def heal_worker(self, name: str) -> None:
        self.net.heal(name)

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            if self._own_net:
                self.net.close()
