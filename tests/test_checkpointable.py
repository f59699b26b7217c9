"""Checkpointability preflight ('vzbackup check CTID', vzbackup.criu.blockers) on real CTs.

Each blocker the preflight reports is also what real CRIU fails on (chkpnt is tried), and
'dump --mode checkpoint' refuses before copying anything. The Debian CT shows which stock
systemd sandboxing CRIU can't dump and what SYSTEMD_CHECKPOINT=yes takes away.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from nodebed import DEBIAN_TEMPLATE_NAME, NodeBed, next_ctid, wait_for

from vzbackup.constants import SYSTEMD_DROPINS
from vzbackup.criu.blockers import _lacks_sys_resource, tree

CRIU_FAILED = 11
BOOT_TIMEOUT = 90


def _check(bed: NodeBed, ctid: int) -> tuple[int, list[dict]]:
    res = bed.vz("check", str(ctid), "--json", check=False)
    return res.returncode, json.loads(res.stdout)["blockers"]


def _bg(bed: NodeBed, ctid: int, cmd: str, setsid: str = "setsid ") -> int:
    """Start *cmd* in the background inside the CT (in a session of its own); its CT pid."""
    return int(bed.sh(ctid, f"{setsid}{cmd} </dev/null >/dev/null 2>&1 & echo $!; sleep 0.3"))


def test_the_process_tree_is_read_while_processes_come_and_go() -> None:
    """A backup's checks read the CT's process tree from /proc while its short-lived commands
    exit: one that went between listing and reading it failed a checkpoint backup in CI
    (FileNotFoundError, or ProcessLookupError for one exiting). Old code: ~1 in 200 reads."""
    churn = subprocess.Popen(["sh", "-c", "while :; do /bin/true & /bin/true & wait; done"])
    try:
        reads, children, deadline = 0, 0, time.monotonic() + 1.5
        while time.monotonic() < deadline:
            pids = tree(churn.pid)
            assert pids[0] == churn.pid and len(set(pids)) == len(pids)
            reads += 1
            children += len(pids) > 1
        assert reads > 1000 and children > 0  # the race was run, with children seen
    finally:
        churn.kill()
        churn.wait()


@pytest.mark.usefixtures("criu_ready")
def test_nested_uts_namespace_is_reported_and_refused_before_copying(node: NodeBed) -> None:
    ctid, _ip = node.create_running()
    assert _check(node, ctid) == (0, [])
    assert "checkpointable" in node.vz("check", str(ctid)).stdout

    pid = _bg(node, ctid, "unshare -u sleep 1000")
    rc, found = _check(node, ctid)
    assert rc == CRIU_FAILED
    assert [(b["comm"], b["kind"], b["what"]) for b in found] == [
        ("sleep", "namespace", "nested uts namespace")
    ]
    text = node.vz("check", str(ctid), check=False).stdout
    assert f"pid {found[0]['ct_pid']} (sleep): nested uts namespace" in text

    # The checkpoint-mode backup refuses with that message and leaves nothing behind.
    res = node.vz("dump", str(ctid), "--mode", "checkpoint", check=False, timeout=300)
    assert res.returncode == CRIU_FAILED, res.stderr
    assert "can't be checkpointed" in res.stderr and "nested uts namespace" in res.stderr
    assert json.loads(node.vz("list", "-b", "--json").stdout)["snapshots"] == []
    # ... and CRIU itself agrees: the dump fails on the same thing, the CT keeps running.
    res = node.vz("chkpnt", str(ctid), check=False, timeout=300)
    assert res.returncode == CRIU_FAILED and "nested uts namespace" in res.stderr
    assert node.sh(ctid, "echo alive").strip() == "alive"

    node.sh(ctid, f"kill {pid}")
    wait_for(lambda: _check(node, ctid) == (0, []), what="the nested namespace gone")


@pytest.mark.usefixtures("criu_ready")
def test_session_from_outside_and_other_uid(node: NodeBed) -> None:
    ctid, _ip = node.create_running()
    pid = _bg(node, ctid, "sleep 1000", setsid="")  # stays in the session of the exec
    rc, found = _check(node, ctid)
    assert rc == CRIU_FAILED and [b["kind"] for b in found] == ["session"]
    assert "outside the CT" in found[0]["what"]
    res = node.vz("chkpnt", str(ctid), check=False, timeout=300)
    assert res.returncode == CRIU_FAILED and "session leader" in res.stderr
    node.sh(ctid, f"kill {pid}")
    wait_for(lambda: _check(node, ctid) == (0, []), what="the outside session gone")


@pytest.mark.usefixtures("criu_ready")
@pytest.mark.parametrize("mode", ["unprivileged", "privileged"])
def test_other_uid_task_agrees_with_criu(node: NodeBed, mode: str) -> None:
    """A 'nobody' task: a blocker only in a CT sharing the node's user namespace while root
    lacks CAP_SYS_RESOURCE; whatever check says, a real chkpnt agrees."""
    extra = ("--privileged",) if mode == "privileged" else ()
    ctid, _ip = node.create_running(*extra)
    _bg(node, ctid, "su -s /bin/sh nobody -c 'exec sleep 1000'")
    rc, found = _check(node, ctid)
    init = json.loads((node.prefix / f"vz/run/{ctid}.state").read_text())["init_pid"]
    shares_userns = os.readlink(f"/proc/{init}/ns/user") == os.readlink("/proc/self/ns/user")
    if shares_userns and _lacks_sys_resource():
        assert rc == CRIU_FAILED
        assert [(b["kind"], b["what"]) for b in found] == [
            ("rlimit", "runs as uid 65534 in a privileged CT")
        ]
        res = node.vz("chkpnt", str(ctid), check=False, timeout=300)
        assert res.returncode == CRIU_FAILED and "rlimit" in res.stderr
        return
    assert (rc, found) == (0, [])
    node.vz("chkpnt", str(ctid), timeout=300)
    node.vz("restore", str(ctid), timeout=300)
    assert node.sh(ctid, "ps -o user,args | grep -c '^nobody.*sleep 1000'").strip() == "1"


def _debian_blockers(bed: NodeBed, ctid: int) -> set[tuple[str, str]]:
    bed.sh(ctid, f"timeout {BOOT_TIMEOUT} systemctl is-system-running --wait", check=False)
    wait_for(lambda: bed.sh(ctid, "systemctl is-active redis-server", check=False).strip()
             == "active", timeout=BOOT_TIMEOUT, what="redis-server")
    _rc, found = _check(bed, ctid)
    return {(b["comm"], b["why"].split(":")[0] if b["kind"] == "file" else b["what"])
            for b in found if b["kind"] != "rlimit"}


def _no_dropins(bed: NodeBed, ctid: int) -> set[tuple[str, str]]:
    conf = bed.prefix / f"etc/vz/conf/{ctid}.conf"
    conf.write_text(conf.read_text() + 'SYSTEMD_CHECKPOINT="no"\n')
    bed.vz("restart", str(ctid), timeout=180)
    return _debian_blockers(bed, ctid)


def test_debian_unprivileged_ct_is_checkpointable_with_the_dropins(debian_node: NodeBed) -> None:
    """The stock Debian 12 units in an unprivileged CT: nothing blocks with the drop-ins."""
    bed = debian_node
    ctid, _ip = bed.create_running("--ostemplate", DEBIAN_TEMPLATE_NAME)
    _debian_blockers(bed, ctid)  # booted, services up
    # (short-lived helpers systemd starts meanwhile may show for a moment: wait them out)
    wait_for(lambda: _check(bed, ctid) == (0, []), timeout=30, what="no blockers")
    # Redis keeps the sandboxing CRIU can dump: its own mount namespace, seccomp, no new privs.
    kept = bed.sh(ctid, "p=$(pidof redis-server); [ $(readlink /proc/$p/ns/mnt) != "
                        "$(readlink /proc/1/ns/mnt) ] && echo mnt; grep -E "
                        "'^(Seccomp|NoNewPrivs):' /proc/$p/status | tr -d '\\t'")
    assert kept.split() == ["mnt", "NoNewPrivs:1", "Seccomp:2"]
    # Without them, ProtectHostname= and PrivateUsers= of the stock units block CRIU.
    stock = _no_dropins(bed, ctid)
    assert {("redis-server", "nested uts namespace"), ("redis-server", "nested user namespace"),
            ("systemd-logind", "nested uts namespace")} <= stock


def test_debian_privileged_ct_dropins_measured(debian_node: NodeBed) -> None:
    """A privileged CT (identity-mapped user namespace): the drop-ins leave nothing for CRIU to
    fail on; without them the stock units' nested UTS/user namespaces block it. systemd can't
    load BPF programs or mount hugetlbfs in any user namespace, so neither shows up here."""
    bed = debian_node
    ctid, _ip = bed.create_running("--ostemplate", DEBIAN_TEMPLATE_NAME, "--privileged")
    _debian_blockers(bed, ctid)
    wait_for(lambda: _check(bed, ctid) == (0, []), timeout=30, what="no blockers")
    stock = _no_dropins(bed, ctid)
    assert {("redis-server", "nested uts namespace"), ("redis-server", "nested user namespace"),
            ("systemd-logind", "nested uts namespace")} <= stock
    assert not {w for _c, w in stock if "hugetlbfs" in w or w.startswith("cgroup_")}, stock


@pytest.mark.usefixtures("criu_ready")
def test_online_migration_refused_before_anything_is_copied(shared_two_nodes) -> None:
    bed = shared_two_nodes
    ctid, ip = next_ctid(), bed.a.new_ip()
    bed.a.vz("create", str(ctid), "--ipadd", ip)
    bed.a.vz("start", str(ctid))
    try:
        _bg(bed.a, ctid, "unshare -u sleep 1000")
        res = bed.a.vz("migrate", str(ctid), bed.dest(bed.b), *bed.ssh_args(), "--online",
                       check=False, timeout=240)
        assert res.returncode == 15, res.stderr
        assert "nothing was changed" in res.stderr
        assert "CRIU can't dump pid" in res.stderr and "nested uts namespace" in res.stderr
        assert "running" in bed.a.vz("status", str(ctid)).stdout
        assert not (bed.b.prefix / f"vz/private/{ctid}").exists()
    finally:
        bed.a.vz("stop", "--fast", str(ctid), check=False)
        bed.a.vz("destroy", str(ctid), check=False)


def test_dropins_follow_the_ct_key_then_vz_conf(node: NodeBed) -> None:
    """Written at start into a CT that has /etc/systemd/system, owned by the CT's root;
    SYSTEMD_CHECKPOINT of CTID.conf wins over vz.conf's; "no" removes them (and their dirs)."""
    ctid = node.new_ctid()
    node.vz("create", str(ctid))
    units = node.prefix / f"vz/private/{ctid}/etc/systemd/system"
    units.mkdir(parents=True)
    os.chown(units, *_owner(node, ctid))
    dropins = [units.parent / rel for rel in SYSTEMD_DROPINS]

    def cycle() -> list[bool]:
        node.vz("start", str(ctid))
        node.vz("stop", "--fast", str(ctid))
        return [p.is_file() for p in dropins]

    assert cycle() == [True] * len(dropins)
    assert {p.stat().st_uid for p in dropins} == {_owner(node, ctid)[0]}
    assert "PrivateUsers=no" in dropins[0].read_text()
    vz_conf = node.prefix / "etc/vz/vz.conf"
    vz_conf.parent.mkdir(parents=True, exist_ok=True)
    vz_conf.write_text('SYSTEMD_CHECKPOINT="no"\n')
    assert cycle() == [False] * len(dropins)
    assert not (units / "service.d").exists()
    conf = node.prefix / f"etc/vz/conf/{ctid}.conf"
    conf.write_text(conf.read_text() + 'SYSTEMD_CHECKPOINT="yes"\n')
    assert cycle() == [True] * len(dropins)


def _owner(node: NodeBed, ctid: int) -> tuple[int, int]:
    st = (node.prefix / f"vz/private/{ctid}").stat()
    return st.st_uid, st.st_gid
