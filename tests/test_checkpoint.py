"""CRIU through pycriu: checkpoint/restore with a live TCP connection, failures, suspend."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nodebed import (
    COUNTER,
    TENANT_LEGACY,
    TENANT_NFT,
    EchoPeer,
    NodeBed,
    http_get,
    in_ct_netns,
    wait_for,
)

from vzbackup.config.node import Node
from vzbackup.criu import netconf
from vzbackup.ct.cgroups import open_cgroups

pytestmark = pytest.mark.usefixtures("criu_ready")




def _counter(node: NodeBed, ctid: int) -> int:
    return int((node.prefix / f"vz/private/{ctid}/tmp/counter").read_text() or 0)


def _masks_external(dump: Path) -> list[str]:
    """The masked directories in the images, each asserted to be an external mount."""
    from vzbackup.criu.check import pycriu_module
    from vzbackup.ct import fencing

    images = pycriu_module().images
    masks = {"/" + p for p in fencing.MASKED_DIRS}
    found = []
    for img in dump.glob("mountpoints-*.img"):
        with open(img, "rb") as f:
            for m in images.load(f)["entries"]:
                if m["mountpoint"] in masks:
                    assert m.get("ext_key") == fencing.external_key(m["mountpoint"]), m
                    found.append(m["mountpoint"])
    return found


def _state(node: NodeBed, ctid: int) -> dict:
    return json.loads((node.prefix / f"vz/run/{ctid}.state").read_text())




def test_checkpoint_restore_keeps_counter_and_tcp_connection(node: NodeBed) -> None:
    ctid, ip = node.create_running()
    peer = EchoPeer()
    try:
        node.sh(ctid, COUNTER)
        peer.connect_from(node, ctid)
        node.sh(
            ctid,
            "echo held > /tmp/lockfile; setsid flock /tmp/lockfile sleep 1000 "
            "</dev/null >/dev/null 2>&1 &",
        )
        assert peer.roundtrip(b"before\n") == b"before\n"
        wait_for(lambda: _counter(node, ctid) > 3, what="counter")
        in_ct_netns(node.prefix, ctid, "nft", TENANT_NFT)  # the tenant's own firewall
        in_ct_netns(node.prefix, ctid, *TENANT_LEGACY)
        in_ct_netns(node.prefix, ctid, "sysctl", "-qw", "net.ipv4.tcp_keepalive_time=1234",
                    "net.ipv4.conf.all.rp_filter=2")
        nc_pid = node.sh(ctid, "pidof cat").strip()
        assert node.vz("exec", str(ctid), "flock -n /tmp/lockfile true", check=False).returncode

        out = json.loads(node.vz("chkpnt", str(ctid), "--json").stdout)
        dump = Path(out["dumpdir"])
        assert (dump / "inventory.img").exists()
        assert _masks_external(dump)  # no tar of their empty tmpfs in the freeze
        assert "stopped" in node.vz("status", str(ctid)).stdout
        frozen_at = _counter(node, ctid)
        time.sleep(1.0)
        assert _counter(node, ctid) == frozen_at  # nothing runs while checkpointed

        node.vz("restore", str(ctid))
        assert not dump.exists()  # images consumed on success
        assert "running" in node.vz("status", str(ctid)).stdout
        wait_for(lambda: _counter(node, ctid) > frozen_at + 3, what="counter to continue")
        assert _counter(node, ctid) > frozen_at  # continued, not restarted from 0
        assert node.sh(ctid, "pidof cat").strip() == nc_pid
        # the network is built anew, the tenant's firewall loaded into it
        assert "tcp dport 2222 drop" in in_ct_netns(node.prefix, ctid, "nft", "list", "table",
                                                    "inet", "tenant")
        assert "--dport 2223 -j DROP" in in_ct_netns(node.prefix, ctid, "iptables-legacy", "-S")
        assert in_ct_netns(node.prefix, ctid, "sysctl", "-n", "net.ipv4.tcp_keepalive_time",
                           "net.ipv4.conf.all.rp_filter").split() == ["1234", "2"]
        # The connection carries data both ways after the restore.
        assert peer.roundtrip(b"after restore\n") == b"after restore\n"
        # File lock is still held by the restored process.
        assert node.vz("exec", str(ctid), "flock -n /tmp/lockfile true", check=False).returncode
        # The restored CT is fully manageable: service, exec, supervisor, chkpnt again, stop.
        assert "vzbackup" in wait_for(lambda: http_get(ip), what="httpd after restore")
        st = _state(node, ctid)
        assert st["restored"]
        # the console came back: CRIU's "orphan-pts-master" notification carried its master
        assert "no console after restore" not in (node.prefix / f"vz/run/{ctid}.log").read_text()
        ppid = int(Path(f"/proc/{st['init_pid']}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert ppid == st["supervisor_pid"]
        node.vz("chkpnt", str(ctid))
        node.vz("restore", str(ctid))
        assert peer.roundtrip(b"twice\n") == b"twice\n"
        node.vz("stop", str(ctid))
        assert "stopped" in node.vz("status", str(ctid)).stdout
    finally:
        peer.close()


def test_checkpoint_with_bind_mount_and_custom_dumpfile(node: NodeBed, tmp_path: Path) -> None:
    shared = tmp_path / "vol"
    shared.mkdir()
    os.chown(shared, 100000, 100000)  # the unprivileged CT's root writes there
    ctid = node.new_ctid()
    node.vz("create", str(ctid), "--ipadd", node.new_ip())
    node.vz("set", str(ctid), "--bindmount", f"{shared}:/srv/vol", "--save")
    node.vz("start", str(ctid))
    node.sh(
        ctid,
        "setsid sh -c 'exec 3>>/srv/vol/log; while true; do echo x >&3; usleep 100000;"
        " done' </dev/null >/dev/null 2>&1 &",
    )
    dump = tmp_path / "images"
    node.vz("chkpnt", str(ctid), "--dumpfile", str(dump))
    size = (shared / "log").stat().st_size
    node.vz("restore", str(ctid), "--dumpfile", str(dump), "--keep-dump")
    assert dump.exists()
    wait_for(lambda: (shared / "log").stat().st_size > size + 10, what="writes to the bind mount")


def test_relative_dumpfile_is_the_callers(node: NodeBed, tmp_path: Path) -> None:
    """chkpnt and restore take a relative --dumpfile from where they are run; the restore
    (done by the CT's supervisor, which runs in /) used to look for it below / and fail."""
    ctid, _ = node.create_running()
    node.sh(ctid, COUNTER)
    wait_for(lambda: _counter(node, ctid) > 2, what="the counter")

    def vz(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vzbackup.cli", *args], cwd=tmp_path,
                              env=node.env(), capture_output=True, text=True, timeout=120)

    res = vz("chkpnt", str(ctid), "--dumpfile", "imgs")
    assert res.returncode == 0 and (tmp_path / "imgs/inventory.img").exists(), res.stderr
    before = _counter(node, ctid)
    res = vz("restore", str(ctid), "--dumpfile", "imgs")
    assert res.returncode == 0, res.stderr
    wait_for(lambda: _counter(node, ctid) > before, what="the restored counter going on")
    assert not (tmp_path / "imgs").exists()  # used, then removed (no --keep-dump)


def test_destroy_removes_the_cts_checkpoint(node: NodeBed) -> None:
    """destroy removes DUMPDIR/Dump.CTID, as vzctl does: it was left, and a new CT created
    with the same CTID then resumed the destroyed CT's processes ('restore CTID', boot)."""
    ctid, _ = node.create_running()
    node.vz("chkpnt", str(ctid))
    images = node.prefix / f"vz/dump/Dump.{ctid}"
    assert (images / "inventory.img").exists()
    node.vz("destroy", str(ctid))
    assert not images.exists()
    node.vz("create", str(ctid), "--ipadd", node.new_ip())
    res = node.vz("restore", str(ctid), check=False)
    assert res.returncode == 4 and "no CRIU images" in res.stderr, res.stderr


def test_a_fresh_start_sets_the_outdated_checkpoint_aside(node: NodeBed) -> None:
    """start (afresh) moves the CT's checkpoint to Dump.CTID.old: it was left in place, so
    the CT's next chkpnt was refused and boot resumed the old processes on files the fresh
    run had changed since."""
    ctid, _ = node.create_running()
    node.vz("set", str(ctid), "--onboot", "yes", "--save")
    node.vz("chkpnt", str(ctid))
    dump = node.prefix / f"vz/dump/Dump.{ctid}"
    assert "checkpoint moved to" in node.vz("start", str(ctid)).stderr
    assert not dump.exists() and (dump.parent / f"Dump.{ctid}.old/inventory.img").exists()
    node.vz("stop", str(ctid))
    boot = json.loads(node.vz("boot", "--json").stdout)
    assert [(c["ctid"], c["action"]) for c in boot["cts"]] == [(ctid, "started")]
    node.vz("chkpnt", str(ctid))  # its dump directory is free again


def test_failed_dump_leaves_ct_running(node: NodeBed, tmp_path: Path) -> None:
    ctid, ip = node.create_running()
    node.sh(ctid, COUNTER)
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tiny", str(full)], check=True)
    try:
        res = node.vz("chkpnt", str(ctid), "--dumpfile", str(full / "Dump"), check=False)
        assert res.returncode == 11, res.stderr
        assert "CRIU dump" in res.stderr
    finally:
        subprocess.run(["umount", str(full)], check=True)
    assert "running" in node.vz("status", str(ctid)).stdout
    before = _counter(node, ctid)
    wait_for(lambda: _counter(node, ctid) > before, what="counter after failed dump")
    assert "vzbackup" in http_get(ip)


def test_failed_restore_keeps_images_and_cleans_up(node: NodeBed, tmp_path: Path) -> None:
    ctid, ip = node.create_running()
    node.vz("chkpnt", str(ctid))
    dump = node.prefix / f"vz/dump/Dump.{ctid}"
    good = tmp_path / "good"
    shutil.copytree(dump, good)
    pstree = dump / "pstree.img"
    pstree.write_bytes(pstree.read_bytes()[:10])
    res = node.vz("restore", str(ctid), check=False)
    assert res.returncode == 11, res.stderr
    assert "restore" in res.stderr and "images are kept" in res.stderr
    assert pstree.exists()
    assert "unmounted stopped" in node.vz("status", str(ctid)).stdout
    assert not any(
        ip in ln
        for ln in subprocess.run(
            ["ip", "route"], capture_output=True, text=True
        ).stdout.splitlines()
    )
    node.vz("restore", str(ctid), "--dumpfile", str(good))
    assert "vzbackup" in wait_for(lambda: http_get(ip), what="httpd after good restore")


def test_suspend_resume_freezes_in_place(node: NodeBed) -> None:
    ctid, _ = node.create_running()
    node.sh(ctid, COUNTER)
    wait_for(lambda: _counter(node, ctid) > 2, what="counter")
    node.vz("suspend", str(ctid))
    assert "suspended" in node.vz("status", str(ctid)).stdout
    frozen = _counter(node, ctid)
    time.sleep(0.8)
    assert _counter(node, ctid) == frozen
    assert node.vz("suspend", str(ctid), check=False).returncode == 6
    node.vz("resume", str(ctid))
    wait_for(lambda: _counter(node, ctid) > frozen, what="counter after resume")
    assert node.vz("resume", str(ctid), check=False).returncode == 6


def test_exec_and_set_hostname_refuse_a_suspended_ct(node: NodeBed) -> None:
    """exec, and set --hostname (run inside the CT), refuse a suspended CT: their process
    froze on joining its cgroups and hung, and once interrupted its frozen child kept the
    CT's lock, so not even resume could run."""
    ctid, _ = node.create_running()
    node.vz("suspend", str(ctid))
    conf = node.prefix / f"etc/vz/conf/{ctid}.conf"
    before = conf.read_text()
    try:
        for args in (["exec", str(ctid), "hostname"],
                     ["set", str(ctid), "--hostname", "frozen", "--save"]):
            res = node.vz(*args, check=False, timeout=20)
            assert res.returncode == 6 and "suspended" in res.stderr, (args, res.stderr)
        assert conf.read_text() == before
        node.vz("resume", str(ctid))
    finally:  # (the old code's frozen processes go on, and end, once thawed)
        open_cgroups(f"{Node.load(str(node.prefix)).cgroup_parent}/{ctid}").thaw()
    assert node.sh(ctid, "hostname").strip() == f"ct{ctid}"


def test_missing_or_old_criu_is_one_clear_message(node: NodeBed, tmp_path: Path) -> None:
    ctid, _ = node.create_running()
    env_missing = {"VZBACKUP_CRIU": str(tmp_path / "no-criu")}
    old = tmp_path / "criu"
    old.write_text("#!/bin/sh\necho 'Version: 3.17.1'\n")
    old.chmod(0o755)
    for extra in (env_missing, {"VZBACKUP_CRIU": str(old)}):
        res = subprocess.run(
            [sys.executable, "-m", "vzbackup.cli", "chkpnt", str(ctid)],
            env={**node.env(), **extra},
            capture_output=True,
            text=True,
        )
        assert res.returncode == 9, res.stderr
        assert "CRIU >= 4.2 is required" in res.stderr and "setup.sh" in res.stderr
    assert "3.17.1" in res.stderr
    assert "running" in node.vz("status", str(ctid)).stdout


def test_restore_reads_the_new_netns_sysctls_in_process() -> None:
    """The restore writes only the saved sysctls the new netns lacks; it reads that netns's
    values with a thread joined to it: those of that netns, never the node's."""
    holder = subprocess.Popen(["unshare", "-n", "sleep", "60"])
    try:
        ns = f"/proc/{holder.pid}/ns/net"
        wait_for(lambda: os.stat(ns).st_ino != os.stat("/proc/self/ns/net").st_ino,
                 what="a netns of its own")
        keys = ["net/ipv4/tcp_keepalive_time", "net/ipv4/ip_local_port_range"]
        subprocess.run(["nsenter", f"--net={ns}", "sh", "-c",
                        "echo 1234 > /proc/sys/net/ipv4/tcp_keepalive_time"], check=True)
        assert netconf._read_sysctls(holder.pid, keys) == {
            keys[0]: "1234",
            keys[1]: Path("/proc/sys", keys[1]).read_text().rstrip("\n"),  # tabs as grep's
        }
        assert Path("/proc/sys", keys[0]).read_text().strip() != "1234"  # the node's own
    finally:
        holder.kill()
        holder.wait()


def test_notify_relay_switch_interval_is_shared_and_restored() -> None:
    """While CRIU waits on our replies the thread switch interval is short; overlapping
    dumps and restores (drain) share it, and the last one out restores the old value."""
    from vzbackup import constants as C
    from vzbackup.criu.driver import _PROMPT_REPLIES

    before = sys.getswitchinterval()
    assert before > C.NOTIFY_SWITCH_INTERVAL
    with _PROMPT_REPLIES:
        assert sys.getswitchinterval() == C.NOTIFY_SWITCH_INTERVAL
        with _PROMPT_REPLIES:  # a second relay at the same time
            assert sys.getswitchinterval() == C.NOTIFY_SWITCH_INTERVAL
        assert sys.getswitchinterval() == C.NOTIFY_SWITCH_INTERVAL  # the first still waits
    assert sys.getswitchinterval() == before
