"""Unprivileged CTs (user namespace, id map), privileged ones on request, both fenced; the
mode travels and changes only through 'convert'; CRIU checkpoints CTs with non-root tasks."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from nodebed import NOBODY_TASK, NodeBed, nobody_pids, wait_for

from vzbackup.ct import fencing

BASE = 100000  # vz.conf's default IDMAP_BASE
NOBODY = 65534
MODES = {"unprivileged": (), "privileged": ("--privileged",)}


def _conf(node: NodeBed, ctid: int) -> str:
    return (node.prefix / f"etc/vz/conf/{ctid}.conf").read_text()


def _private(node: NodeBed, ctid: int) -> Path:
    return node.prefix / f"vz/private/{ctid}"


def test_unprivileged_by_default_privileged_on_request(node: NodeBed) -> None:
    ctid, _ = node.create_running()
    assert 'UNPRIVILEGED="yes"' in _conf(node, ctid) and f'IDMAP_BASE="{BASE}"' in _conf(node, ctid)
    assert _private(node, ctid).stat().st_uid == BASE
    assert (_private(node, ctid) / "bin/busybox").stat().st_uid == BASE
    assert node.sh(ctid, "cat /proc/self/uid_map").split() == ["0", str(BASE), "65536"]
    assert node.sh(ctid, "id -u").strip() == "0"
    # the hostname file written by the node belongs to the CT's root
    assert (_private(node, ctid) / "etc/hostname").stat().st_uid == BASE

    priv, _ = node.create_running("--privileged")
    assert 'UNPRIVILEGED="no"' in _conf(node, priv) and "IDMAP_BASE" not in _conf(node, priv)
    assert _private(node, priv).stat().st_uid == 0
    assert node.sh(priv, "cat /proc/self/uid_map").split() == ["0", "0", "4294967295"]
    created = json.loads(node.vz("create", str(node.new_ctid()), "--json").stdout)
    assert created["unprivileged"] is True and created["idmap"] == {"base": BASE, "size": 65536}


@pytest.mark.parametrize("mode", MODES)
def test_fences_hold_in_both_modes(node: NodeBed, mode: str) -> None:
    """Each attempt, as the CT's root, must fail; the node's view is checked from outside."""
    ctid, _ = node.create_running(*MODES[mode])
    bounding = int(node.sh(ctid, "grep CapBnd /proc/1/status").split()[1], 16)
    for name, bit in fencing.CAPS_DROPPED.items():
        assert not bounding & (1 << bit), f"CAP_{name} is in init's bounding set"
    drop_caches = Path("/proc/sys/vm/drop_caches")
    attempts = {
        "umount /proc/sys": "umount /proc/sys",
        "umount -l /sys/firmware": "umount -l /sys/firmware",
        "remount /sys rw": "mount -o remount,rw /sys",
        "remount /proc/sys rw": "mount -o remount,rw /proc/sys",
        "fresh proc": "mkdir -p /tmp/p && mount -t proc proc /tmp/p",
        "fresh sysfs": "mkdir -p /tmp/s && mount -t sysfs sysfs /tmp/s",
        "devtmpfs": "mkdir -p /tmp/d && mount -t devtmpfs d /tmp/d",
        "node sysctl": f"echo 3 > {drop_caches}",
        "set clock": "date -s '2001-01-01 00:00' && [ $(date +%Y) = 2001 ]",  # busybox: rc 0
        "mknod disk": "mknod /tmp/sda b 8 0",
    }
    for what, script in attempts.items():
        res = node.vz("exec", str(ctid), script, check=False)
        assert res.returncode != 0, f"{mode}: '{what}' succeeded inside the CT"
    assert time.time() > 1.7e9, "the node's clock was set back to 2001"
    # what the CT owns stays writable: its own network sysctls and hostname
    node.sh(ctid, "echo 1 > /proc/sys/net/ipv4/ip_forward && hostname renamed")
    assert node.sh(ctid, "cat /proc/sys/net/ipv4/ip_forward; hostname").split() == ["1", "renamed"]


def test_convert_shifts_owners_acls_and_file_caps_with_dry_run(node: NodeBed) -> None:
    ctid = node.new_ctid()
    node.vz("create", str(ctid), "--privileged")
    private = _private(node, ctid)
    tool = private / "bin/busybox"
    subprocess.run(["setcap", "cap_net_raw+ep", str(tool)], check=True)
    (private / "srv").mkdir(exist_ok=True)
    (private / "srv/data").write_text("x")
    os.chown(private / "srv/data", 1000, 1000)
    subprocess.run(["setfacl", "-m", "u:1001:r", str(private / "srv/data")], check=True)

    dry = json.loads(node.vz("convert", str(ctid), "--unprivileged", "--dry-run", "--json").stdout)
    assert dry["dry_run"] and dry["entries"] > 100 and dry["fcaps"] == 1 and dry["acls"] == 1
    assert tool.stat().st_uid == 0 and 'UNPRIVILEGED="no"' in _conf(node, ctid)

    node.vz("convert", str(ctid), "--unprivileged")
    assert 'UNPRIVILEGED="yes"' in _conf(node, ctid)
    st = (private / "srv/data").stat()
    assert (st.st_uid, st.st_gid, tool.stat().st_uid) == (BASE + 1000, BASE + 1000, BASE)
    acl = subprocess.check_output(["getfacl", "-n", str(private / "srv/data")], text=True)
    assert f"user:{BASE + 1001}:r--" in acl
    caps = os.getxattr(tool, "security.capability")
    assert len(caps) == 24 and int.from_bytes(caps[20:], "little") == BASE  # v3, rootid
    node.vz("start", str(ctid))
    assert node.sh(ctid, "stat -c %u:%g /srv/data").strip() == "1000:1000"
    assert "cap_net_raw" in subprocess.check_output(["getcap", str(tool)], text=True)
    res = node.vz("convert", str(ctid), "--privileged", check=False)
    assert res.returncode != 0 and "running" in res.stderr
    node.vz("stop", str(ctid))

    node.vz("convert", str(ctid), "--privileged")
    assert (private / "srv/data").stat().st_uid == 1000 and tool.stat().st_uid == 0
    assert len(os.getxattr(tool, "security.capability")) == 20  # back to v2


def test_convert_refuses_map_options_it_would_not_use(node: NodeBed) -> None:
    """--base/--size name an unprivileged map: with --privileged (or a size of 0) they were
    dropped and the CT converted as if they were not given."""
    ctid = node.new_ctid()
    node.vz("create", str(ctid), "--unprivileged")
    before = _conf(node, ctid)
    for args in (("--privileged", "--base", "200000"), ("--privileged", "--size", "1000"),
                 ("--unprivileged", "--size", "0")):
        res = node.vz("convert", str(ctid), *args, check=False)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert _conf(node, ctid) == before and _private(node, ctid).stat().st_uid == BASE
    node.vz("convert", str(ctid), "--unprivileged", "--base", "200000", "--size", "70000")
    assert 'IDMAP_BASE="200000"' in _conf(node, ctid)
    assert 'IDMAP_SIZE="70000"' in _conf(node, ctid)
    assert _private(node, ctid).stat().st_uid == 200000


@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_restore_keeps_a_nonroot_task(node: NodeBed, criu_ready, mode: str) -> None:
    """CRIU must read the rlimits of a non-root task: root here lacks CAP_SYS_RESOURCE, the
    CT's user namespace gives it back (a CT without one failed with 'Can't get rlimit')."""
    ctid, _ = node.create_running(*MODES[mode])
    node.sh(ctid, NOBODY_TASK)
    pids = wait_for(lambda: nobody_pids(node, ctid), what="the nobody task")
    node.vz("chkpnt", str(ctid))
    assert "stopped" in node.vz("status", str(ctid)).stdout
    node.vz("restore", str(ctid))
    assert nobody_pids(node, ctid) == pids
    host_uid = NOBODY + (BASE if mode == "unprivileged" else 0)
    owners = subprocess.check_output(["ps", "-o", "uid=", "-C", "sleep"], text=True).split()
    assert str(host_uid) in owners
    # the fences are still there after the restore (CRIU re-created the mounts)
    assert node.vz("exec", str(ctid), "echo 3 > /proc/sys/vm/drop_caches", check=False).returncode
