"""Bad input: one clear error, a meaningful exit code, nothing half-created."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nodebed import NodeBed

# Exit codes (vzbackup/errors.py)
USAGE, CONFIG, NOTFOUND, EXISTS, STATE, NOTROOT = 2, 3, 4, 5, 6, 8


def _leftovers(node: NodeBed, ctid: int) -> list[Path]:
    return [
        p
        for p in (
            node.prefix / f"vz/private/{ctid}",
            node.prefix / f"vz/root/{ctid}",
            node.prefix / f"etc/vz/conf/{ctid}.conf",
        )
        if p.exists()
    ]


@pytest.mark.parametrize("ctid", ["abc", "100", "0", "1e3", "12x", "99999999999", "../101"])
def test_malformed_ctid(node: NodeBed, ctid: str) -> None:
    res = node.vz("create", ctid, check=False)
    assert res.returncode == USAGE, res.stderr
    assert "invalid CTID" in res.stderr
    assert not list((node.prefix / "vz").glob("private/*"))


def test_unknown_template_lists_available(node: NodeBed) -> None:
    ctid = node.new_ctid()
    res = node.vz("create", str(ctid), "--ostemplate", "centos-7", check=False)
    assert res.returncode == NOTFOUND and "busybox-1.0-x86_64" in res.stderr
    assert _leftovers(node, ctid) == []
    res = node.vz("create", str(ctid), "--ostemplate", "../../etc/passwd", check=False)
    assert res.returncode in (USAGE, NOTFOUND)
    assert _leftovers(node, ctid) == []


def test_ctid_name_and_ip_already_used(node: NodeBed) -> None:
    ctid, ip = node.new_ctid(), node.new_ip()
    node.vz("create", str(ctid), "--name", "taken", "--ipadd", ip)
    before = (node.prefix / f"etc/vz/conf/{ctid}.conf").read_text()
    res = node.vz("create", str(ctid), check=False)
    assert res.returncode == EXISTS and "already exists" in res.stderr
    assert (node.prefix / f"etc/vz/conf/{ctid}.conf").read_text() == before
    other = node.new_ctid()
    res = node.vz("create", str(other), "--name", "taken", check=False)
    assert res.returncode == EXISTS and "taken" in res.stderr
    assert _leftovers(node, other) == []
    res = node.vz("create", str(other), "--ipadd", ip, check=False)
    assert res.returncode == EXISTS and ip in res.stderr
    assert _leftovers(node, other) == []
    res = node.vz("create", str(other), "--ipadd", "10.1.2.300", check=False)
    assert res.returncode == USAGE
    assert _leftovers(node, other) == []


def test_wrong_state_operations(node: NodeBed) -> None:
    ctid, _ = node.create_running()
    assert node.vz("start", str(ctid), check=False).returncode == STATE
    res = node.vz("destroy", str(ctid), check=False)
    assert res.returncode == STATE and "running" in res.stderr
    assert (node.prefix / f"vz/private/{ctid}/bin/busybox").exists()
    assert node.vz("umount", str(ctid), check=False).returncode == STATE
    node.vz("stop", str(ctid))
    res = node.vz("stop", str(ctid), check=False)
    assert res.returncode == STATE and "not running" in res.stderr
    assert node.vz("chkpnt", str(ctid), check=False).returncode == STATE
    assert node.vz("exec", str(ctid), "true", check=False).returncode == STATE
    assert node.vz("restore", str(ctid), check=False).returncode == NOTFOUND
    for verb in ("start", "stop", "destroy", "status", "exec"):
        args = [verb, "4242"] + (["true"] if verb == "exec" else [])
        res = node.vz(*args, check=False)
        if verb == "status":
            assert "deleted" in res.stdout
        else:
            assert res.returncode == NOTFOUND, (verb, res.stderr)
    assert node.vz("start", "no-such-name", check=False).returncode == NOTFOUND


@pytest.mark.parametrize(("args", "refused"), [
    (["4242", "--hostname", "h"], "--hostname is for restoring a backup"),
    (["4242", "--start", "--with-state"], "--start/--with-state are for restoring a backup"),
    (["4242", "--force", "--ipadd", "none"], "--force/--ipadd are for restoring a backup"),
    (["/nowhere/x.tar.zst", "4242", "--with-state"], "--with-state is for restoring a snapshot"),
    (["/nowhere/x.tar.zst", "4242", "--storage", "local"], "--storage is for restoring a snap"),
    (["101/2026-11-21T02:00:00Z", "4242", "--dumpfile", "/d"],
     "--dumpfile is for restoring a CRIU checkpoint"),
    (["101/2026-11-21T02:00:00Z", "4242", "--ipadd", "none", "--ipadd", "10.0.0.9"],
     "--ipadd none means no address: don't give addresses with it"),
])
def test_restore_refuses_what_its_source_does_not_use(node: NodeBed, args: list[str],
                                                      refused: str) -> None:
    """A CRIU checkpoint (restore CTID) is resumed as it was, an archive has no state and is
    on no storage: such options were dropped before, as was 'none' beside an address."""
    res = node.vz("restore", *args, check=False)
    assert res.returncode == USAGE and refused in res.stderr, res.stderr


@pytest.mark.parametrize("option", [["-a"], ["-S"], ["-o", "hostname"]])
def test_list_of_snapshots_refuses_the_ct_listing_options(node: NodeBed, option: list[str]) -> None:
    """(they were dropped: the snapshots were listed as without them)"""
    res = node.vz("list", "-b", *option, check=False)
    assert res.returncode == USAGE, res.stderr
    assert f"{option[0]}: for listing CTs, not backup snapshots" in res.stderr


def test_malformed_conf_names_file_and_line(node: NodeBed) -> None:
    ctid = node.new_ctid()
    node.vz("create", str(ctid))
    conf = node.prefix / f"etc/vz/conf/{ctid}.conf"
    original = conf.read_text()
    conf.write_text(original + 'HOSTNAME="unterminated\n')
    line = len(original.splitlines()) + 1
    res = node.vz("start", str(ctid), check=False)
    assert res.returncode == CONFIG
    assert f"{conf}:{line}:" in res.stderr
    assert "running" not in node.vz("status", str(ctid), check=False).stdout
    conf.write_text(original + 'CPUUNITS="lots"\n')
    res = node.vz("start", str(ctid), check=False)
    assert res.returncode == CONFIG and "CPUUNITS" in res.stderr
    conf.write_text(original)
    node.vz("start", str(ctid))


def test_broken_node_config(node: NodeBed) -> None:
    conf = node.prefix / "etc/vz/vz.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text("VE_ROOT=/vz/root/$VEID\nthis is not a config\n")
    res = node.vz("list", "-a", check=False)
    assert res.returncode == CONFIG and f"{conf}:2:" in res.stderr


def test_not_root(node: NodeBed) -> None:
    res = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-m",
            "vzbackup.cli",
            "list",
        ],
        env=node.env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == NOTROOT, res.stderr
    assert "must be run as root" in res.stderr


def test_start_failure_cleans_up(node: NodeBed, tmp_path: Path) -> None:
    """A CT whose init cannot be executed: clear error, no mount, cgroup or route left."""
    ctid, ip = node.new_ctid(), node.new_ip()
    node.vz("create", str(ctid), "--ipadd", ip)
    (node.prefix / f"vz/private/{ctid}/sbin/init").unlink()
    res = node.vz("start", str(ctid), check=False)
    assert res.returncode != 0 and "init" in res.stderr
    assert "unmounted stopped" in node.vz("status", str(ctid)).stdout
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    assert ip not in routes
    res = node.vz("set", str(ctid), "--bindmount", f"{tmp_path}/absent:/mnt/x", "--save")
    (node.prefix / f"vz/private/{ctid}/sbin/init").symlink_to("../bin/busybox")
    res = node.vz("start", str(ctid), check=False)
    assert res.returncode == NOTFOUND and "absent" in res.stderr


def test_enter_gives_an_interactive_shell(node: NodeBed) -> None:
    ctid, _ = node.create_running()
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe(
            sys.executable, [sys.executable, "-m", "vzbackup.cli", "enter", str(ctid)], node.env()
        )
    out = b""
    try:
        os.write(fd, b"echo inside-$(hostname); exit 3\n")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.5)
            if r:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert f"inside-ct{ctid}".encode() in out, out
    assert os.waitstatus_to_exitcode(status) == 3


def test_create_on_full_disk_leaves_nothing(node: NodeBed, tmp_path: Path) -> None:
    """The private area's filesystem is full: one clear error, no half-created CT."""
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tiny", str(tiny)], check=True)
    try:
        conf = node.prefix / "etc/vz/vz.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(f'VE_PRIVATE="{tiny}/$VEID"\n')
        ctid = node.new_ctid()
        res = node.vz("create", str(ctid), check=False)
        assert res.returncode == 10, res.stderr
        assert "No space left on device" in res.stderr and "Traceback" not in res.stderr
        assert list(tiny.iterdir()) == []
        assert not (node.prefix / f"etc/vz/conf/{ctid}.conf").exists()
    finally:
        subprocess.run(["umount", str(tiny)], check=True)
