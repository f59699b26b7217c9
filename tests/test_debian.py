"""A Debian 12 CT from the built template, with systemd and the stock units, behaves like a
machine: it boots to ``running`` (console, /run, cgroup namespace, journald), halts cleanly,
restarts, and ``enter`` and ``console`` work like vzctl's.

The tests share one started CT (booting systemd costs seconds); they run in file order.
"""

from __future__ import annotations

import pytest
from nodebed import DEBIAN_TEMPLATE_NAME, NodeBed, PtyDriver

BOOT_TIMEOUT = 90  # seconds systemd may take to finish booting
# The template's stock service units issue 17 checkpoints (Debian 12: PostgreSQL 15).
STOCK_UNITS = ("redis-server", "postgresql@15-main", "ssh", "cron")


@pytest.fixture(scope="module")
def deb(debian_module_node: NodeBed) -> tuple[NodeBed, int]:
    ctid, _ = debian_module_node.create_running("--ostemplate", DEBIAN_TEMPLATE_NAME)
    return debian_module_node, ctid


def system_state(bed: NodeBed, ctid: int) -> str:
    """``systemctl is-system-running`` once booting is over, with the failed units if any."""
    script = (
        f"t={BOOT_TIMEOUT * 10}; "  # PID 1's bus socket appears a moment after the start
        "while [ ! -S /run/systemd/private ] && [ $t -gt 0 ]; do sleep 0.1; t=$((t-1)); done; "
        f"s=$(timeout {BOOT_TIMEOUT} systemctl is-system-running --wait); echo $s; "
        '[ "$s" = running ] || systemctl --failed --no-legend --no-pager'
    )
    return bed.sh(ctid, script, check=False).strip()


def stock_units(bed: NodeBed, ctid: int) -> dict[str, str]:
    """``systemctl is-active`` of each of STOCK_UNITS."""
    out = bed.sh(ctid, f"systemctl is-active {' '.join(STOCK_UNITS)}", check=False).split()
    return dict(zip(STOCK_UNITS, out, strict=False))


def pid1_watches_no_memory_pressure(bed: NodeBed, ctid: int) -> bool:
    """PID 1's environment has what SYSTEMD_CHECKPOINT adds (CRIU can't restore PSI fds)."""
    env = bed.sh(ctid, "tr '\\0' '\\n' </proc/1/environ").split()
    return "MEMORY_PRESSURE_WATCH=/dev/null" in env


def journal_logs(bed: NodeBed, ctid: int, tag: str) -> bool:
    script = f"logger -t vzt {tag}; sleep 0.5; journalctl -t vzt --no-pager -q | grep -c {tag}"
    return bed.sh(ctid, script, check=False).strip() == "1"


def test_boots_to_running_with_console_run_cgroupns_and_journal(deb) -> None:
    bed, ctid = deb
    assert system_state(bed, ctid) == "running"
    fstypes = bed.sh(ctid, "for m in /run /run/lock /sys/fs/cgroup /dev/console; do "
                           "findmnt -no FSTYPE $m; done").split()
    assert fstypes == ["tmpfs", "tmpfs", "cgroup2", "devpts"]
    # The CT sees its own cgroup subtree as the root; systemd put itself in init.scope, and
    # none of the node's v1 hierarchies is mounted inside.
    assert bed.sh(ctid, "grep '^0::' /proc/1/cgroup").strip() == "0::/init.scope"
    assert bed.sh(ctid, "findmnt -rno FSTYPE | grep -cx cgroup", check=False).strip() == "0"
    assert journal_logs(bed, ctid, "boot-check")
    assert stock_units(bed, ctid) == dict.fromkeys(STOCK_UNITS, "active")
    # The checkpoint drop-in is in place: redis-server keeps its own mount namespace but
    # shares the CT's UTS and user namespaces (what CRIU can dump).
    shown = bed.sh(ctid, "systemctl show redis-server -p ProtectHostname -p PrivateUsers")
    assert sorted(shown.split()) == ["PrivateUsers=no", "ProtectHostname=no"]
    assert pid1_watches_no_memory_pressure(bed, ctid)
    ns = bed.sh(ctid, "p=$(pidof redis-server); for n in uts user mnt; do "
                      "[ $(readlink /proc/$p/ns/$n) = $(readlink /proc/1/ns/$n) ]; echo $?; done")
    assert ns.split() == ["0", "0", "1"]
    # console-getty runs on the console pty; its output is kept in RUNDIR.
    assert bed.sh(ctid, "systemctl is-active console-getty").strip() == "active"
    assert "login:" in bed.vz("console", str(ctid), "--log").stdout


def test_console_attaches_and_detaches_with_esc_dot(deb) -> None:
    bed, ctid = deb
    con = PtyDriver(bed, "console", str(ctid))
    try:
        con.expect(b"Attached to CT")
        con.send(b"\r")
        con.expect(b"login:")
        con.send(b"\x1b.")
        assert con.wait() == 0
    finally:
        con.kill()
    assert bed.sh(ctid, "systemctl is-active console-getty").strip() == "active"


def test_enter_allocates_a_pty_inside_the_ct(deb) -> None:
    bed, ctid = deb
    term = PtyDriver(bed, "enter", str(ctid), rows=33, cols=101)
    try:
        term.expect(b"entered into CT")
        term.expect(b"# ")  # the shell's prompt: it flushes what was typed before it
        term.send(b"tty; stty size; echo sum=$((6*7))\r")
        out = term.expect(b"sum=42")
        assert b"/dev/pts/" in out
        assert b"33 101" in out
        term.send(b"exit 7\r")
        assert term.wait() == 7
    finally:
        term.kill()


def test_stop_halts_systemd_cleanly_and_restart_boots_again(deb) -> None:
    bed, ctid = deb
    # Switching the checkpoint drop-in off (per CT) takes effect at the next start.
    conf = bed.prefix / f"etc/vz/conf/{ctid}.conf"
    conf.write_text(conf.read_text() + 'SYSTEMD_CHECKPOINT="no"\n')
    res = bed.vz("restart", str(ctid), "--timeout", "60")
    assert "did not halt" not in res.stderr
    log = bed.vz("console", str(ctid), "--log").stdout
    assert "Reached target" in log and "System Halt" in log  # systemd ran its halt.target
    assert system_state(bed, ctid) == "running"
    assert journal_logs(bed, ctid, "after-restart")
    assert stock_units(bed, ctid) == dict.fromkeys(STOCK_UNITS, "active")
    etc = bed.prefix / f"vz/private/{ctid}/etc/systemd"
    assert not list(etc.glob("system/service.d/*vzbackup*"))
    assert not list(etc.glob("system.conf.d/*vzbackup*"))
    shown = bed.sh(ctid, "systemctl show redis-server -p ProtectHostname")
    assert shown.strip() == "ProtectHostname=yes"
    assert not pid1_watches_no_memory_pressure(bed, ctid)
