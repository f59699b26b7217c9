"""The CT's init, whatever it is: a session leader inside the CT (so CRIU can dump it), asked
to halt with its own signal, killed when it ignores that for STOP_TIMEOUT."""

from __future__ import annotations

import os

from nodebed import NodeBed, PtyDriver, wait_for

# An init that never calls setsid() and ignores every halt signal.
SCRIPT_INIT = """#!/bin/sh
trap '' TERM INT HUP USR1 USR2
n=0
while :; do n=$((n+1)); echo $n > /tmp/ticks; sleep 0.2; done
"""


def _use_script_init(bed: NodeBed, ctid: int) -> None:
    init = bed.prefix / f"vz/private/{ctid}/sbin/init"
    init.unlink()
    init.write_text(SCRIPT_INIT)
    os.chmod(init, 0o755)


def _ticks(bed: NodeBed, ctid: int) -> int:
    return int(bed.sh(ctid, "cat /tmp/ticks").strip() or 0)


def test_shell_script_init_leads_its_session_and_checkpoints(node: NodeBed, criu_ready) -> None:
    ctid, ip = node.new_ctid(), node.new_ip()
    node.vz("create", str(ctid), "--ipadd", ip)
    _use_script_init(node, ctid)
    node.vz("start", str(ctid))
    wait_for(lambda: _ticks(node, ctid) > 1, what="the script init ticking")
    # PID 1 leads its own session and process group inside the CT.
    assert node.sh(ctid, "cut -d' ' -f6,5 /proc/1/stat").split() == ["1", "1"]
    node.vz("chkpnt", str(ctid))
    node.vz("restore", str(ctid))
    before = _ticks(node, ctid)
    wait_for(lambda: _ticks(node, ctid) > before, what="ticks after restore")
    # It ignores the halt signals: stop kills it once the timeout passed, and says so.
    res = node.vz("stop", str(ctid), "--timeout", "1")
    assert "did not halt within 1" in res.stderr
    assert "stopped" in node.vz("status", str(ctid)).stdout


def test_busybox_init_halts_on_its_own_signal(node: NodeBed) -> None:
    ctid, _ = node.create_running()
    # /sbin/halt gone: the runtime signals busybox init directly (SIGUSR1), which runs rcK.
    node.sh(ctid, "rm /sbin/halt")
    res = node.vz("stop", str(ctid), "--timeout", "20")
    assert "did not halt" not in res.stderr
    assert "rcK" in (node.prefix / f"vz/private/{ctid}/var/log/messages").read_text()


def test_checkpoint_while_someone_is_entered(node: NodeBed, criu_ready) -> None:
    ctid, _ = node.create_running()
    term = PtyDriver(node, "enter", str(ctid))
    try:
        term.expect(b"# ")
        term.send(b"tty; sleep 1000\r")
        term.expect(b"/dev/pts/")
        # The entered session is not part of the CT's process tree: the dump goes through,
        # and the session ends with the CT.
        node.vz("chkpnt", str(ctid))
        assert term.wait() != 0
    finally:
        term.kill()
    node.vz("restore", str(ctid))
    assert node.sh(ctid, "echo back").strip() == "back"
