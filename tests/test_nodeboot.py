"""vzbackup shutdown + boot of a node: BOOTORDER waves, ONBOOT, VE_STOP_MODE=suspend keeping a
CT's processes across the "reboot", and the fallback to a fresh start when a restore fails."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from nodebed import ROOT, NodeBed, need, wait_for

# a counter that records its own PID: restored, the same process counts on
PID_COUNTER = (
    "setsid sh -c 'echo $$ > /tmp/counter.pid; i=0; while true; do i=$((i+1)); "
    "echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; usleep 100000; done' "
    "</dev/null >/dev/null 2>&1 &"
)


def _counter(bed: NodeBed, ctid: int) -> int:
    return int(wait_for(lambda: bed.sh(ctid, "cat /tmp/counter").strip(), what="counter"))


def _counter_alive(bed: NodeBed, ctid: int) -> bool:
    """Whether the process in /tmp/counter.pid still runs inside the CT."""
    out = bed.sh(ctid, "grep -q counter /proc/$(cat /tmp/counter.pid)/cmdline && echo alive",
                 check=False)
    return out.strip() == "alive"


def _status(bed: NodeBed, ctid: int) -> str:
    return bed.vz("status", str(ctid), check=False).stdout


def _run(bed: NodeBed, verb: str, rc: int = 0) -> tuple[dict, str]:
    res = bed.vz(verb, "--json", check=False, timeout=300)
    assert res.returncode == rc, res.stdout + res.stderr
    return json.loads(res.stdout), res.stderr


def _waves(data: dict) -> list[set[int]]:
    """The CTs of each BOOTORDER in the order they ran; no wave starts before the last ended."""
    waves: list[set[int]] = []
    last_order, wave_end = object(), 0.0
    for s in data["cts"]:
        if s["bootorder"] != last_order:
            assert s["at"] >= wave_end - 0.002, data  # (times are rounded to ms)
            waves.append(set())
            last_order = s["bootorder"]
        waves[-1].add(s["ctid"])
        wave_end = max(wave_end, s["at"] + s["seconds"])
    return waves


def test_shutdown_suspends_and_boot_restores_in_bootorder(node: NodeBed, criu_ready) -> None:
    bed = node
    (bed.prefix / "etc/vz").mkdir(parents=True, exist_ok=True)
    (bed.prefix / "etc/vz/vz.conf").write_text('VE_STOP_MODE="suspend"\n')
    first, _ = bed.create_running()  # BOOTORDER 20, checkpointed (vz.conf's stop mode)
    broken, _ = bed.create_running()  # BOOTORDER 20, checkpointed; its images break
    plain, _ = bed.create_running()  # BOOTORDER 10, VE_STOP_MODE=stop: halted, started
    stuck, _ = bed.create_running()  # BOOTORDER 10, CRIU can't dump it: halted, started
    manual, _ = bed.create_running()  # ONBOOT=no: halted, stays down
    for ctid, order in ((first, 20), (broken, 20), (plain, 10), (stuck, 10)):
        bed.vz("set", str(ctid), "--onboot", "yes", "--bootorder", str(order), "--save")
    bed.vz("set", str(plain), "--stop-mode", "stop", "--save")
    listed = json.loads(bed.vz("list", "-a", "-o", "ctid,onboot,bootorder,stopmode",
                               "--json").stdout)
    assert {r["ctid"]: (r["onboot"], r["bootorder"], r["stopmode"]) for r in listed} == {
        first: ("yes", "20", "suspend"), broken: ("yes", "20", "suspend"),
        plain: ("yes", "10", "stop"), stuck: ("yes", "10", "suspend"),
        manual: ("no", "-", "suspend")}
    for ctid in (first, broken, plain):
        bed.sh(ctid, PID_COUNTER)
    before = _counter(bed, first)
    bed.sh(stuck, "setsid unshare -u sleep 1000 </dev/null >/dev/null 2>&1 &")  # nested UTS ns

    data, _ = _run(bed, "shutdown")
    actions = {s["ctid"]: s["action"] for s in data["cts"]}
    assert actions == {first: "checkpointed", broken: "checkpointed", plain: "stopped",
                       stuck: "stopped", manual: "stopped"}, data
    stuck_step = next(s for s in data["cts"] if s["ctid"] == stuck)
    assert stuck_step["ok"] and "checkpoint failed" in stuck_step["fallback"]
    # lowest BOOTORDER first: none (ONBOOT=no), then 10, then 20
    assert _waves(data) == [{manual}, {plain, stuck}, {first, broken}]
    assert all("stopped" in _status(bed, c) for c in (first, broken, plain, stuck, manual))
    dump = bed.prefix / "vz/dump"
    assert (dump / f"Dump.{first}/inventory.img").exists()
    (dump / f"Dump.{broken}/inventory.img").write_bytes(b"not an image")

    data, log = _run(bed, "boot")
    by_ct = {s["ctid"]: s for s in data["cts"]}
    assert set(by_ct) == {first, broken, plain, stuck}  # ONBOOT=no stays down
    assert _waves(data) == [{first, broken}, {plain, stuck}]  # highest BOOTORDER first
    assert by_ct[first]["action"] == "restored" and not by_ct[first]["fallback"]
    assert by_ct[plain]["action"] == by_ct[stuck]["action"] == "started"
    assert by_ct[broken]["action"] == "started" and by_ct[broken]["ok"]
    assert "restore failed" in by_ct[broken]["fallback"]
    assert f"CT {broken}: restore failed" in log and "starting it fresh" in log  # logged
    assert (dump / f"Dump.{broken}.failed/inventory.img").exists()
    assert not (dump / f"Dump.{first}").exists()
    # the restored CT: the same process, counting on from where it was
    assert _counter_alive(bed, first)
    wait_for(lambda: _counter(bed, first) > before, what="counter counts on")
    # the fresh ones: running, without the process of before
    for ctid in (broken, plain, stuck):
        assert "running" in _status(bed, ctid) and not _counter_alive(bed, ctid)
    assert "stopped" in _status(bed, manual)
    # a second boot finds nothing to do; a CT whose config can't be read is reported
    data, _ = _run(bed, "boot")
    assert data == {"cts": [], "failed": 0}
    bad = bed.new_ctid()
    (bed.prefix / f"etc/vz/conf/{bad}.conf").write_text('ONBOOT="yes"\nBOOTORDER="first"\n')
    data, _ = _run(bed, "boot", rc=10)
    (step,) = data["cts"]
    assert (step["ctid"], step["action"], step["ok"]) == (bad, "failed", False)
    assert "BOOTORDER" in step["error"]


@pytest.mark.parametrize("unit", sorted(p.name for p in (ROOT / "conf").glob("*.service")))
def test_systemd_unit_verifies(unit: str, tmp_path: Path) -> None:
    """systemd itself reads the unit without a complaint (the vzbackup path pointed at ours)."""
    need(shutil.which("systemd-analyze") is not None, "systemd-analyze not installed")
    text = (ROOT / "conf" / unit).read_text()
    assert "/usr/local/bin/vzbackup " in text
    vzbackup = Path(sys.executable).with_name("vzbackup")
    (tmp_path / unit).write_text(text.replace("/usr/local/bin/vzbackup", str(vzbackup)))
    res = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
