"""The two-node bed: sshd per node netns, remote vzbackup on the node's prefix, full cleanup."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from nodebed import next_ctid, wait_for
from twonode_fixture import twonode

pytestmark = pytest.mark.slow
SCRIPT = Path(twonode.__file__)


def _gone(bed: twonode.TwoNodes) -> list[str]:
    """What of *bed* still exists (empty when cleanup was complete)."""
    left = [f"netns {n.netns}" for n in (bed.a, bed.b) if Path("/run/netns", n.netns).exists()]
    if Path("/sys/class/net", bed.bridge).exists():
        left.append(f"bridge {bed.bridge}")
    left += [f"pid {p}" for p in bed.sshd_pids if Path(f"/proc/{p}").exists()]
    if bed.dir.exists():
        left.append(f"dir {bed.dir}")
    return left


def test_ssh_from_a_runs_vzbackup_of_b(two_nodes: twonode.TwoNodes) -> None:
    bed = two_nodes
    ctid = next_ctid()
    bed.b.vz("create", str(ctid), "--hostname", "onb")
    res = bed.a.run(bed.ssh_cmd(bed.b, "vzbackup --version && vzbackup list -a"), timeout=60)
    assert res.returncode == 0, res.stderr
    assert "vzbackup, version" in res.stdout
    assert str(ctid) in res.stdout
    assert str(ctid) not in bed.a.vz("list", "-a").stdout
    env = bed.b.run(bed.ssh_cmd(bed.a, "echo $VZBACKUP_PREFIX; echo $PYTHONPATH"), timeout=60)
    assert env.stdout.split() == [str(bed.a.prefix), str(twonode.REPO)]


def test_unknown_client_key_is_refused(two_nodes: twonode.TwoNodes, tmp_path: Path) -> None:
    bed = two_nodes
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    argv = bed.ssh_cmd(bed.b, "true")
    argv[argv.index(str(bed.ssh_key))] = str(other)
    res = bed.a.run(argv, timeout=60)
    assert res.returncode == 255
    assert "Permission denied" in res.stderr


def test_ct_on_b_reached_from_root_netns(two_nodes: twonode.TwoNodes) -> None:
    bed = two_nodes
    ctid, ip = next_ctid(), bed.b.new_ip()
    assert ip != bed.a.new_ip()
    bed.b.vz("create", str(ctid), "--ipadd", ip, "--hostname", "web")
    bed.b.vz("start", str(ctid))
    # Stand-in for the CT network code's LAN announcement (lead's proxy-ARP work): B answers
    # ARP for the CT address on its LAN side; its forwarding does the rest.
    res = bed.b.run(["ip", "neigh", "replace", "proxy", ip, "dev", "lan0"])
    assert res.returncode == 0, res.stderr
    bed.b.sh(ctid, "setsid nc -ll -p 8080 -e echo hello </dev/null >/dev/null 2>&1 &")

    def greet() -> bytes:
        with socket.create_connection((ip, 8080), timeout=3) as s:
            return s.recv(100)

    assert wait_for(greet, what=f"TCP to {ip}:8080") == b"hello\n"


def test_cleanup_leaves_nothing(template_cache: Path) -> None:
    bed = twonode.up(f"c{os.getpid()}", template_cache)
    try:
        ctid = next_ctid()
        bed.a.vz("create", str(ctid), "--ipadd", bed.a.new_ip())
        bed.a.vz("start", str(ctid))
        session = subprocess.Popen(  # a lingering ssh session inside node B
            ["nsenter", f"--net=/run/netns/{bed.a.netns}",
             *bed.ssh_cmd(bed.b, "sleep 600")], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: len(_netns_pids(bed.b.netns)) > 1, what="ssh session on B")
        assert len(_gone(bed)) == 6  # both netns, the bridge, both sshds, the bed dir
    finally:
        bed.cleanup()
    assert session.wait(timeout=30) is not None
    wait_for(lambda: _gone(bed) == [], what="bed removed")
    with open("/proc/self/mountinfo") as f:
        assert str(bed.dir) not in f.read()


def test_cli_up_env_down(template_cache: Path) -> None:
    name = f"cli{os.getpid()}"
    py = [sys.executable, str(SCRIPT)]
    up = subprocess.run([*py, "up", name, "--template-cache", str(template_cache)],
                        capture_output=True, text=True, timeout=120)
    try:
        assert up.returncode == 0, up.stderr
        env = subprocess.run([*py, "env", name], capture_output=True, text=True, check=True)
        assert env.stdout == up.stdout
        assert "export VZBED_B_IP=" in env.stdout
        bed = twonode.TwoNodes.load(name)
        assert (bed.b.prefix / "vz/template/cache" / twonode.TEMPLATE).exists()
    finally:
        subprocess.run([*py, "down", name], capture_output=True, timeout=120)
    wait_for(lambda: _gone(bed) == [], what="bed removed")  # sshds reaped by init


def _netns_pids(netns: str) -> list[int]:
    ino = os.stat(f"/run/netns/{netns}").st_ino
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and os.stat(p / "ns/net").st_ino == ino:
                pids.append(int(p.name))
        except OSError:
            continue
    return pids
