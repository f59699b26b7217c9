#!/usr/bin/env python3
"""A two-node test bed on one machine: two network namespaces with their own sshd and prefix.

    twonode.py up NAME      build the bed (prints the exports of ``env``)
    twonode.py env NAME     shell exports for a bed that is up
    twonode.py down NAME    remove everything the bed created

A Linux bridge in the root netns (10.X.Y.1/24, the root netns plays the external client) joins
node A (10.X.Y.2) and node B (10.X.Y.3), each a netns reached by a veth whose inner end is
``lan0``. Each node runs its own ``sshd`` inside its netns (entered with ``nsenter --net`` only,
so the host mount namespace is kept) with a bed-private host key, authorized key and
known_hosts, and ``SetEnv`` so a remote ``vzbackup`` is this checkout's, on that node's prefix.
State lives in /var/tmp/vzbed-NAME/bed.json, so ``down`` works from another process.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import ipaddress
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BED_BASE = Path("/var/tmp")
LOCK = Path("/run/vzbed.lock")
TEMPLATE = "busybox-1.0-x86_64.tar.zst"
SSHD = "/usr/sbin/sshd"
FIRST_CT_HOST = 100
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")


def _run(argv: list[str], *, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)
    if check and res.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} -> {res.returncode}: {res.stderr.strip()}")
    return res


def _in_ns(netns: str, argv: list[str]) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{netns}", *argv]


@dataclass
class BedNode:
    """One node of the bed: a netns with a LAN address, a vzbackup prefix and an sshd."""

    name: str
    netns: str
    lan_ip: str
    prefix: Path
    _ips: Iterator[int] = field(default_factory=lambda: itertools.count(FIRST_CT_HOST),
                                repr=False)
    _subnet: str = field(default="", repr=False)

    def env(self) -> dict[str, str]:
        """Environment for this node's vzbackup (this checkout first on PYTHONPATH)."""
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        return {**os.environ, "VZBACKUP_PREFIX": str(self.prefix), "PYTHONPATH": path}

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess[str]:
        """Run *argv* inside the node's netns (host mount namespace), capturing text output."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("check", False)
        kw.setdefault("env", self.env())
        return subprocess.run(_in_ns(self.netns, argv), **kw)

    def vz(
        self, *args: str, check: bool = True, timeout: float = 120, input_: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run this node's ``vzbackup ARGS`` inside its netns."""
        res = self.run([sys.executable, "-m", "vzbackup.cli", *args], timeout=timeout,
                       input=input_)
        if check and res.returncode != 0:
            raise AssertionError(
                f"[{self.name}] vzbackup {' '.join(args)} -> {res.returncode}\n"
                f"stdout: {res.stdout}\nstderr: {res.stderr}"
            )
        return res

    def sh(self, ctid: int, script: str, check: bool = True) -> str:
        """Run *script* with /bin/sh inside CT *ctid* on this node; its stdout."""
        return self.vz("exec", str(ctid), script, check=check).stdout

    def new_ip(self) -> str:
        """A free LAN-subnet address for a CT (the counter is shared by both nodes)."""
        net = ipaddress.ip_network(self._subnet)
        return str(net.network_address + next(self._ips))

    def stop_all(self) -> None:
        """Stop every CT of this node, then SIGKILL the pids its state files recorded."""
        run = self.prefix / "vz/run"
        states = list(run.glob("*.state")) if run.is_dir() else []
        for state in states:
            with contextlib.suppress(Exception):
                self.vz("stop", "--fast", state.stem, check=False, timeout=60)
        for state in states:
            with contextlib.suppress(Exception):
                st = json.loads(state.read_text())
                for pid in (st.get("init_pid"), st.get("supervisor_pid")):
                    if pid:
                        os.kill(pid, signal.SIGKILL)


@dataclass
class TwoNodes:
    """The bed: nodes *a* and *b*, the client address and the SSH credentials."""

    a: BedNode
    b: BedNode
    client_ip: str
    ssh_key: Path
    known_hosts: Path
    dir: Path
    bridge: str
    sshd_pids: list[int] = field(default_factory=list)

    def dest(self, node: BedNode) -> str:
        return f"root@{node.lan_ip}"

    def ssh_args(self) -> list[str]:
        """``vzbackup migrate`` options that make it use the bed's key and known_hosts."""
        return ["--ssh-key", str(self.ssh_key), "--ssh-opt",
                f"UserKnownHostsFile={self.known_hosts}"]

    def ssh_cmd(self, node: BedNode, *command: str) -> list[str]:
        """An OpenSSH client command line reaching *node* with the bed's credentials."""
        return ["ssh", "-i", str(self.ssh_key), "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                "-o", "GlobalKnownHostsFile=/dev/null", self.dest(node), *command]

    def env_exports(self) -> str:
        pairs = {
            "VZBED_DIR": str(self.dir),
            "VZBED_CLIENT_IP": self.client_ip,
            "VZBED_SSH_KEY": str(self.ssh_key),
            "VZBED_KNOWN_HOSTS": str(self.known_hosts),
        }
        for n in (self.a, self.b):
            up = n.name.upper()
            pairs |= {f"VZBED_{up}_NETNS": n.netns, f"VZBED_{up}_IP": n.lan_ip,
                      f"VZBED_{up}_PREFIX": str(n.prefix)}
        return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in pairs.items())

    def save(self) -> None:
        data = {
            "client_ip": self.client_ip, "ssh_key": str(self.ssh_key),
            "known_hosts": str(self.known_hosts), "bridge": self.bridge,
            "sshd_pids": self.sshd_pids,
            "nodes": [{"name": n.name, "netns": n.netns, "lan_ip": n.lan_ip,
                       "prefix": str(n.prefix), "subnet": n._subnet} for n in (self.a, self.b)],
        }
        (self.dir / "bed.json").write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, name: str) -> TwoNodes:
        d = bed_dir(name)
        data = json.loads((d / "bed.json").read_text())
        ips = itertools.count(FIRST_CT_HOST)
        a, b = (BedNode(n["name"], n["netns"], n["lan_ip"], Path(n["prefix"]), ips, n["subnet"])
                for n in data["nodes"])
        return cls(a, b, data["client_ip"], Path(data["ssh_key"]), Path(data["known_hosts"]),
                   d, data["bridge"], data["sshd_pids"])

    def cleanup(self) -> None:
        """Undo everything: CTs, sshds and other processes in the netns, mounts, links, dirs."""
        for n in (self.a, self.b):
            n.stop_all()
        for pid in self.sshd_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)  # reap it when this process started the bed
        for n in (self.a, self.b):
            _kill_netns_procs(n.netns)
        time.sleep(0.2)
        with open("/proc/self/mountinfo") as f:
            mounts = [ln.split()[4] for ln in f]
        below = [m for m in mounts if m.startswith(f"{self.dir}/")]
        for m in sorted(below, key=len, reverse=True):
            _run(["umount", "-l", m], check=False)
        for n in (self.a, self.b):
            _run(["ip", "netns", "del", n.netns], check=False)
        _run(["ip", "link", "del", self.bridge], check=False)
        for n in (self.a, self.b):
            _run(["ip", "link", "del", _root_veth(self.bridge, n.name)], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def bed_dir(name: str, base: Path = BED_BASE) -> Path:
    return base / f"vzbed-{name}"


def _tag(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:8]


def _root_veth(bridge: str, node: str) -> str:
    return f"{bridge}{node}"


def _netns_ino(netns: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{netns}").st_ino
    except OSError:
        return None


def _kill_netns_procs(netns: str) -> None:
    """SIGKILL, by pid, every process still living in the bed's netns (sshd sessions)."""
    ino = _netns_ino(netns)
    if ino is None:
        return
    me = os.getpid()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == me:
            continue
        with contextlib.suppress(OSError):
            if os.stat(p / "ns/net").st_ino == ino:
                os.kill(int(p.name), signal.SIGKILL)


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = json.loads(_run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout or "[]")
    nets = []
    for r in out:
        with contextlib.suppress(ValueError):
            dst = r.get("dst", "")
            if dst and dst != "default":
                nets.append(ipaddress.ip_network(dst, strict=False))
    return nets


def _pick_subnet(name: str) -> ipaddress.IPv4Network:
    """A 10.X.Y.0/24 overlapping no route of the root netns (call with LOCK held)."""
    used = _used_networks()
    seed = int(_tag(f"{name}:{os.getpid()}"), 16)
    for i in range(2000):
        v = (seed + i * 7919) % (40 * 256)
        net = ipaddress.ip_network(f"10.{200 + v // 256}.{v % 256}.0/24")
        if not any(net.overlaps(u) for u in used if u.version == 4):
            return net
    raise RuntimeError("no free 10.200-239.x.0/24 subnet for the bed")


def _ssh_keygen(path: Path, comment: str) -> None:
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def _sshd_config(node: BedNode, ndir: Path, authorized: Path) -> Path:
    path_env = ":".join([os.path.dirname(sys.executable), "/usr/local/sbin", "/usr/local/bin",
                         "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    setenv = {"VZBACKUP_PREFIX": str(node.prefix), "PATH": path_env, "PYTHONPATH": str(REPO),
              # a bed-private HOME: the machine's ~/.bashrc must not change PATH
              "HOME": str(ndir)}
    # an experimental CRIU, or CRIU's debug logs, for both ends (bench, tests)
    for key in ("VZBACKUP_CRIU", "VZBACKUP_CRIU_LOG_LEVEL"):
        if os.environ.get(key):
            setenv[key] = os.environ[key]
    conf = ndir / "sshd_config"
    conf.write_text(
        f"ListenAddress {node.lan_ip}:22\n"
        f"HostKey {ndir / 'ssh_host_ed25519_key'}\n"
        f"PidFile {ndir / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {authorized}\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nUseDNS no\nPrintMotd no\nMaxStartups 100:30:200\n"
        "MaxSessions 100\nSubsystem sftp internal-sftp\n"
        "ClientAliveInterval 5\nClientAliveCountMax 3\n"
        "SetEnv " + " ".join(f'"{k}={v}"' for k, v in setenv.items()) + "\n"
    )
    return conf


def _wait_port(ip: str, port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((ip, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _template(bed: Path, template_cache: Path | None) -> Path:
    if template_cache is not None:
        return template_cache
    cache = bed / "template-cache"
    _run(["bash", str(REPO / "scripts/build-template.sh"), str(cache / TEMPLATE)])
    return cache


def _fill_cache(prefix: Path, source: Path) -> None:
    cache = prefix / "vz/template/cache"
    cache.mkdir(parents=True)
    for f in source.iterdir():
        if f.stat().st_dev == cache.stat().st_dev:
            os.link(f, cache / f.name)
        else:
            shutil.copy(f, cache / f.name)


def up(name: str, template_cache: Path | None = None, base: Path = BED_BASE) -> TwoNodes:
    """Build bed *name* from scratch (in *base*: ``down`` finds it only in the default);
    on failure everything created so far is removed."""
    if not _NAME.match(name):
        raise ValueError(f"bed name {name!r}: use 1-31 of a-z 0-9 - (starting alnum)")
    d = bed_dir(name, base)
    if d.exists():
        raise FileExistsError(f"bed {name!r} exists ({d}); run 'twonode.py down {name}' first")
    d.mkdir(mode=0o755)
    bridge = f"vb{_tag(name)}"
    ips = itertools.count(FIRST_CT_HOST)
    nodes = [BedNode(n, f"vzbed-{name}-{n}", "", d / n / "prefix", ips) for n in ("a", "b")]
    bed = TwoNodes(nodes[0], nodes[1], "", d / "id_ed25519", d / "known_hosts", d, bridge)
    try:
        cache = _template(d, template_cache)
        with open(LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            net = _pick_subnet(name)
            hosts = [str(net.network_address + i) for i in (1, 2, 3)]
            bed.client_ip = hosts[0]
            _run(["ip", "link", "add", bridge, "type", "bridge"])
            _run(["ip", "addr", "add", f"{hosts[0]}/24", "dev", bridge])
            _run(["ip", "link", "set", bridge, "up"])
        bed.save()
        _ssh_keygen(bed.ssh_key, f"vzbed-{name}-client")
        authorized = d / "authorized_keys"
        shutil.copy(f"{bed.ssh_key}.pub", authorized)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        known: list[str] = []
        for node, ip in zip(nodes, hosts[1:], strict=True):
            node.lan_ip, node._subnet = ip, str(net)
            _run(["ip", "netns", "add", node.netns])
            outer = _root_veth(bridge, node.name)
            _run(["ip", "link", "add", outer, "type", "veth", "peer", "name", "lan0",
                  "netns", node.netns])
            _run(["ip", "link", "set", outer, "master", bridge, "up"])
            for argv in (["ip", "link", "set", "lo", "up"],
                         ["ip", "addr", "add", f"{ip}/24", "dev", "lan0"],
                         ["ip", "link", "set", "lan0", "up"],
                         ["sysctl", "-qw", "net.ipv4.ip_forward=1"]):
                _run(_in_ns(node.netns, argv))
            ndir = d / node.name
            _fill_cache(node.prefix, cache)
            _ssh_keygen(ndir / "ssh_host_ed25519_key", f"vzbed-{name}-{node.name}")
            pub = (ndir / "ssh_host_ed25519_key.pub").read_text().split()
            known.append(f"{ip} {pub[0]} {pub[1]}\n")
            conf = _sshd_config(node, ndir, authorized)
            proc = subprocess.Popen(
                _in_ns(node.netns, [SSHD, "-D", "-f", str(conf), "-E", str(ndir / "sshd.log")]),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            bed.sshd_pids.append(proc.pid)  # nsenter execs sshd: the same pid
            bed.save()
        bed.known_hosts.write_text("".join(known))
        for node in nodes:
            _wait_port(node.lan_ip, 22)
        return bed
    except BaseException:
        bed.cleanup()
        raise


def down(name: str) -> None:
    """Remove bed *name* (also a half-built one)."""
    d = bed_dir(name)
    if (d / "bed.json").exists():
        TwoNodes.load(name).cleanup()
        return
    bridge = f"vb{_tag(name)}"
    for n in ("a", "b"):
        _kill_netns_procs(f"vzbed-{name}-{n}")
        _run(["ip", "netns", "del", f"vzbed-{name}-{n}"], check=False)
    _run(["ip", "link", "del", bridge], check=False)
    shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["up", "down", "env"])
    ap.add_argument("name")
    ap.add_argument("--template-cache", type=Path, help="directory holding the busybox template")
    args = ap.parse_args(argv)
    if args.action == "up":
        print(up(args.name, args.template_cache).env_exports(), end="")
    elif args.action == "env":
        print(TwoNodes.load(args.name).env_exports(), end="")
    else:
        down(args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
