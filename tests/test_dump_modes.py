"""Backup modes (vzdump's stop, suspend, snapshot, checkpoint) against real containers.

``consistent_source`` is called in-process on CTs created with the real CLI. btrfs cases run
on a loopback btrfs mounted on the bed's ``vz/private`` (fixture ``btrfs_node``).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from nodebed import COUNTER, NOBODY_TASK, EchoPeer, NodeBed, http_get, nobody_pids, wait_for
from treecmp import tree_manifest as full_manifest

from vzbackup.backup.modes import MODES, Source, consistent_source, is_btrfs_subvolume
from vzbackup.config.node import Node
from vzbackup.criu import driver
from vzbackup.ct import fs, ops
from vzbackup.ct.container import Container
from vzbackup.errors import CheckpointError, LockedError, UsageError

APPENDER = (  # keeps a file open and growing: CRIU's size check needs files == state
    "setsid sh -c 'exec 3>>/var/log/appender; i=0; while true; do i=$((i+1)); echo $i >&3; "
    "usleep 50000; done' </dev/null >/dev/null 2>&1 &"
)


# --- helpers -----------------------------------------------------------------------------------


def tree_manifest(root: Path) -> dict[str, tuple]:
    """Contents and metadata of a tree, without times (copies get their own dir times)."""
    return full_manifest(root, mtimes=False, xattrs=False)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """tmpdir for the modes' copies and CRIU images; must end up empty."""
    d = tmp_path / "work"
    d.mkdir()
    return d


def container(bed: NodeBed, ctid: int) -> Container:
    return Container(Node.load(str(bed.prefix)), ctid)


def private(bed: NodeBed, ctid: int) -> Path:
    return bed.prefix / f"vz/private/{ctid}"


def heartbeat_lines(root: Path) -> list[int]:
    log = root / "var/log/heartbeat"
    return [int(ln.split()[0]) for ln in log.read_text().splitlines() if ln.strip()]


def heartbeat(root: Path) -> int:
    lines = heartbeat_lines(root)
    return lines[-1] if lines else 0


def counter(root: Path) -> int:
    return int((root / "tmp/counter").read_text().strip() or 0)


def leftovers(tmp: Path, bed: NodeBed) -> list[str]:
    """Temporary copies, images and snapshots that should be gone (failed CRIU logs may stay)."""
    found = [p.name for p in tmp.iterdir() if not p.name.endswith(".failed.log")]
    found += [p.name for p in (bed.prefix / "vz/private").glob(f"{fs.SNAPSHOT_PREFIX}*")]
    return found


def start_ct(bed: NodeBed) -> tuple[int, str]:
    ctid, ip = bed.create_running()
    wait_for(lambda: heartbeat(private(bed, ctid)) >= 2, what="heartbeat")
    return ctid, ip




def bed_for(request: pytest.FixtureRequest, btrfs: bool) -> NodeBed:
    return request.getfixturevalue("btrfs_node" if btrfs else "node")


# --- each mode on a running CT ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "btrfs"),
    [
        ("stop", False),
        ("suspend", False),
        ("checkpoint", False),
        ("snapshot", True),
        ("checkpoint", True),
    ],
    ids=["stop", "suspend", "checkpoint", "snapshot-btrfs", "checkpoint-btrfs"],
)
def test_mode_on_running_ct_yields_consistent_tree(
    request: pytest.FixtureRequest, mode: str, btrfs: bool, work: Path
) -> None:
    if mode == "checkpoint":
        request.getfixturevalue("criu_ready")
    bed = bed_for(request, btrfs)
    ctid, ip = start_ct(bed)
    ct = container(bed, ctid)
    priv = private(bed, ctid)
    assert is_btrfs_subvolume(priv) == btrfs
    bed.sh(ctid, APPENDER)  # files change every 50 ms: a copy taken while running would differ
    bed.sh(ctid, COUNTER)
    wait_for(lambda: counter(priv) > 2, what="counter")
    marker = f"marker {time.time_ns()}"
    bed.sh(ctid, f"echo '{marker}' > /root/marker")
    phases: list[str] = []
    at_instant: dict[str, tuple] = {}
    lines: list[str] = []

    def phase(p: str) -> None:
        phases.append(p)
        if p == "pre-restart" and mode != "stop":
            # The CT is frozen (cgroup freezer or CRIU) and the files were taken.
            at_instant.update(tree_manifest(priv))

    with consistent_source(ct, mode, tmpdir=work, phase=phase, log=lines.append) as src:
        assert isinstance(src, Source)
        assert src.was_running and src.mode == mode
        assert phases == ["pre-stop", "pre-restart", "post-restart"] or (
            mode == "stop" and phases == ["pre-stop"]
        )
        assert (src.root / "root/marker").read_text().strip() == marker
        got = tree_manifest(src.root)
        if mode == "stop":
            assert src.root == priv and ct.status() == "stopped"
            time.sleep(1.2)  # nothing changes while it is stopped
            assert tree_manifest(src.root) == got
        else:
            assert src.root != priv
            assert got == at_instant  # the whole tree exactly as it was at the frozen instant
            assert ct.status() == "running"
        assert src.same_inodes == (mode == "stop" or btrfs)
        if mode == "snapshot" or (mode == "checkpoint" and btrfs):
            assert is_btrfs_subvolume(src.root)
            assert src.root.parent == priv.parent and src.root.name.startswith(".vzbackup-snap-")
            ro = subprocess.run(
                ["btrfs", "property", "get", "-ts", str(src.root), "ro"],
                capture_output=True,
                text=True,
            ).stdout
            assert "ro=true" in ro
        if mode == "checkpoint":
            assert (src.state_dir / "inventory.img").exists()
        else:
            assert src.state_dir is None
        if mode != "stop":
            assert 0 < src.frozen_seconds < 30
        in_backup = heartbeat(src.root)
    assert phases == ["pre-stop", "pre-restart", "post-restart"]
    if mode == "stop":
        assert src.frozen_seconds >= 1.2  # the whole downtime, body included
    assert ct.status() == "running"
    wait_for(lambda: heartbeat(priv) > in_backup + 1, what="heartbeat after the backup")
    assert "vzbackup" in wait_for(lambda: http_get(ip), what="httpd after the backup")
    assert leftovers(work, bed) == []
    assert lines and all(ln.startswith(f"CT {ctid}: ") for ln in lines)


def test_stop_mode_on_stopped_ct_keeps_it_stopped_and_locked(node: NodeBed, work: Path) -> None:
    ctid = node.new_ctid()
    node.vz("create", str(ctid), "--ipadd", node.new_ip())
    ct = container(node, ctid)
    phases: list[str] = []
    for mode in MODES:  # every mode: the private area as is
        with consistent_source(ct, mode, tmpdir=work, phase=phases.append) as src:
            assert src.root == private(node, ctid)
            assert (src.was_running, src.mode, src.state_dir) == (False, "stop", None)
            assert src.same_inodes and src.frozen_seconds == 0
            assert ct.status() == "stopped"
            with pytest.raises(LockedError):  # nobody can start it meanwhile
                ct.lock(wait=0).acquire()
    assert phases == []
    assert ct.status() == "stopped"
    assert leftovers(work, node) == []
    ct.lock(wait=0).acquire().release()


def test_suspend_mode_on_user_suspended_ct_leaves_it_suspended(node: NodeBed, work: Path) -> None:
    ctid, _ = start_ct(node)
    node.sh(ctid, "echo before-suspend > /root/marker")
    node.vz("suspend", str(ctid))
    ct = container(node, ctid)
    priv = private(node, ctid)
    frozen_hb = heartbeat(priv)
    with consistent_source(ct, "suspend", tmpdir=work) as src:
        assert (src.root / "root/marker").read_text() == "before-suspend\n"
        assert tree_manifest(src.root) == tree_manifest(priv)
        assert ct.status() == "suspended"
    assert ct.status() == "suspended"
    time.sleep(1.5)
    assert heartbeat(priv) == frozen_hb
    node.vz("resume", str(ctid))
    wait_for(lambda: heartbeat(priv) > frozen_hb, what="heartbeat after resume")
    assert leftovers(work, node) == []


def test_snapshot_mode_needs_btrfs(node: NodeBed, work: Path) -> None:
    ctid, _ = start_ct(node)
    ct = container(node, ctid)
    phases: list[str] = []
    with (
        pytest.raises(UsageError) as ei,
        consistent_source(ct, "snapshot", tmpdir=work, phase=phases.append),
    ):
        pytest.fail("snapshot mode must refuse a private area that is not on btrfs")
    msg = str(ei.value)
    assert ei.value.exit_code == 2
    assert fs.fs_type(private(node, ctid)) in msg
    assert "use mode stop, suspend or checkpoint instead" in msg
    assert phases == []
    assert ct.status() == "running"
    assert leftovers(work, node) == []
    with (
        pytest.raises(UsageError, match="unknown backup mode"),
        consistent_source(ct, "snap", tmpdir=work),
    ):
        pass


# --- checkpoint: the state is usable ---------------------------------------------------------


@pytest.mark.usefixtures("criu_ready")
@pytest.mark.parametrize("btrfs", [False, True], ids=["rsync", "btrfs"])
def test_checkpoint_backup_restores_with_state(
    request: pytest.FixtureRequest, btrfs: bool, tmp_path: Path, work: Path
) -> None:
    bed = bed_for(request, btrfs)
    ctid, ip = start_ct(bed)
    ct = container(bed, ctid)
    priv = private(bed, ctid)
    peer = EchoPeer()
    try:
        bed.sh(ctid, COUNTER)
        bed.sh(ctid, APPENDER)
        bed.sh(ctid, NOBODY_TASK)
        nobody = wait_for(lambda: nobody_pids(bed, ctid), what="the nobody task")
        peer.connect_from(bed, ctid)
        assert peer.roundtrip(b"before\n") == b"before\n"
        wait_for(lambda: counter(priv) > 5, what="counter")
        saved, images = tmp_path / "saved", tmp_path / "images"
        with consistent_source(ct, "checkpoint", tmpdir=work) as src:
            assert src.same_inodes == btrfs and src.state_dir is not None
            assert (src.state_dir / "inventory.img").exists()
            subprocess.run(
                ["rsync", "-aHAX", "--numeric-ids", f"{src.root}/", f"{saved}/"], check=True
            )
            subprocess.run(["cp", "-a", str(src.state_dir), str(images)], check=True)
        # The CT kept running, connection included.
        assert ct.status() == "running"
        assert peer.roundtrip(b"after backup\n") == b"after backup\n"
        at_dump, hb_saved = counter(saved), heartbeat_lines(saved)
        wait_for(lambda: counter(priv) > at_dump + 5, what="counter after the backup")
        # Lose the CT's runtime and its files; bring both back from the backup.
        with ct.lock():
            ops.stop(ct, fast=True)
            subprocess.run(
                ["rsync", "-aHAX", "--numeric-ids", "--delete", f"{saved}/", f"{priv}/"],
                check=True,
            )
            ops.restore(ct, str(images), tcp_close=True)
        assert ct.status() == "running"
        assert counter(priv) >= at_dump  # the in-memory counter did not start again at 1
        wait_for(lambda: counter(priv) > at_dump + 3, what="counter after the restore")
        wait_for(lambda: len(heartbeat_lines(priv)) > len(hb_saved) + 1, what="heartbeat")
        hb = heartbeat_lines(priv)
        assert hb[: len(hb_saved)] == hb_saved
        assert hb[len(hb_saved)] == hb_saved[-1] + 1  # continues from the dumped value
        appended = [int(x) for x in (priv / "var/log/appender").read_text().split()]
        assert appended == list(range(1, len(appended) + 1))  # no gap, no repeat
        assert "vzbackup" in wait_for(lambda: http_get(ip), what="httpd after the restore")
        assert nobody_pids(bed, ctid) == nobody  # the unprivileged CT's non-root task too
        assert not images.exists()  # consumed by the restore
        assert leftovers(work, bed) == []
    finally:
        peer.close()


@pytest.mark.usefixtures("criu_ready")
def test_failing_post_dump_callback_aborts_dump_ct_keeps_running(
    node: NodeBed, tmp_path: Path, work: Path
) -> None:
    ctid, _ = start_ct(node)
    node.sh(ctid, COUNTER)
    ct = container(node, ctid)
    priv = private(node, ctid)
    seen: list[str] = []

    def boom() -> None:
        seen.append("post-dump")
        raise OSError("disk on fire")

    def note(name: str):
        return lambda: seen.append(name)

    pid = ct.state().init_pid
    opts = driver.DumpOptions(leave_running=True, external=ops.dump_external(ct.conf))
    with pytest.raises(CheckpointError, match="post-dump step failed: disk on fire") as ei:
        driver.dump(
            pid, tmp_path / "img", opts, notify={"pre-dump": note("pre-dump"), "post-dump": boom}
        )
    assert isinstance(ei.value.__cause__, OSError)
    assert seen == ["pre-dump", "post-dump"]
    assert ct.status() == "running"
    before = counter(priv)
    wait_for(lambda: counter(priv) > before + 2, what="counter after the aborted dump")

    # The same through consistent_source: a hook failing inside the frozen window.
    phases: list[str] = []

    def phase(p: str) -> None:
        phases.append(p)
        if p == "pre-restart":
            raise RuntimeError("hook failed")

    with (
        pytest.raises(CheckpointError, match="hook failed"),
        consistent_source(ct, "checkpoint", tmpdir=work, phase=phase),
    ):
        pytest.fail("the dump must have failed")
    assert phases == ["pre-stop", "pre-restart", "post-restart"]
    assert ct.status() == "running"
    before = counter(priv)
    wait_for(lambda: counter(priv) > before + 2, what="counter after the failed backup")
    assert leftovers(work, node) == []
    # A good dump still works afterwards.
    took = driver.dump(pid, tmp_path / "img2", opts, notify={"post-dump": lambda: None})
    assert took > 0 and (tmp_path / "img2/inventory.img").exists()
    assert ct.status() == "running"


# --- undo on errors and signals --------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "exc"),
    [
        ("stop", RuntimeError),
        ("suspend", RuntimeError),
        ("suspend", KeyboardInterrupt),
        ("checkpoint", RuntimeError),
    ],
)
def test_error_in_body_undoes_everything(
    request: pytest.FixtureRequest, node: NodeBed, work: Path, mode: str, exc: type
) -> None:
    if mode == "checkpoint":
        request.getfixturevalue("criu_ready")
    ctid, _ = start_ct(node)
    ct = container(node, ctid)
    phases: list[str] = []
    with pytest.raises(exc), consistent_source(ct, mode, tmpdir=work, phase=phases.append) as src:
        assert src.root.exists()
        raise exc("backup failed")
    assert phases == ["pre-stop", "pre-restart", "post-restart"]
    assert ct.status() == "running"
    hb = heartbeat(private(node, ctid))
    wait_for(lambda: heartbeat(private(node, ctid)) > hb, what="heartbeat after the error")
    assert leftovers(work, node) == []
    ct.lock(wait=0).acquire().release()


def test_error_in_body_undoes_snapshots_on_btrfs(
    btrfs_node: NodeBed, work: Path, request: pytest.FixtureRequest
) -> None:
    request.getfixturevalue("criu_ready")
    bed = btrfs_node
    ctid, _ = start_ct(bed)
    ct = container(bed, ctid)
    for mode in ("snapshot", "checkpoint"):
        with pytest.raises(RuntimeError), consistent_source(ct, mode, tmpdir=work) as src:
            assert is_btrfs_subvolume(src.root)
            raise RuntimeError("backup failed")
        assert ct.status() == "running"
        assert leftovers(work, bed) == []


SIGTERM_SCRIPT = """
import sys, time
from pathlib import Path
from vzbackup.backup.modes import consistent_source
from vzbackup.config.node import Node
from vzbackup.ct.container import Container
ct = Container(Node.load(sys.argv[1]), int(sys.argv[2]))
with consistent_source(ct, sys.argv[3], tmpdir=Path(sys.argv[4])) as src:
    print("READY", src.root, flush=True)
    time.sleep(300)
print("NOT REACHED", flush=True)
"""


@pytest.mark.parametrize("mode", ["stop", "suspend"])
def test_sigterm_undoes_everything(node: NodeBed, work: Path, mode: str) -> None:
    ctid, _ = start_ct(node)
    ct = container(node, ctid)
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_SCRIPT, str(node.prefix), str(ctid), mode, str(work)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "the backup process did not get ready"
        line = proc.stdout.readline()
        assert line.startswith("READY "), line
        root = Path(line.split(" ", 1)[1].strip())
        assert root.is_dir()
        assert ct.status() == ("stopped" if mode == "stop" else "running")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
        assert "NOT REACHED" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert ct.status() == "running"
    assert leftovers(work, node) == []
    ct.lock(wait=0).acquire().release()


# --- btrfs private areas -----------------------------------------------------------------------


def test_btrfs_private_area_is_a_subvolume_and_destroy_removes_snapshots(
    btrfs_node: NodeBed,
) -> None:
    bed = btrfs_node
    ctid = bed.new_ctid()
    bed.vz("create", str(ctid), "--ipadd", bed.new_ip())
    priv = private(bed, ctid)
    assert is_btrfs_subvolume(priv) and (priv / "bin/busybox").exists()
    assert not is_btrfs_subvolume(priv / "bin")
    stale = priv.parent / f"{fs.SNAPSHOT_PREFIX}{ctid}-999999"
    fs.snapshot(priv, stale)
    other = priv.parent / f"{fs.SNAPSHOT_PREFIX}{ctid + 1}-999999"  # another CT's: kept
    fs.snapshot(priv, other)
    try:
        bed.vz("destroy", str(ctid))
        assert not priv.exists() and not stale.exists()
        assert other.exists()
    finally:
        fs.delete_subvolume(other)


def test_criu_environment_gate_runs_same_flags_together_and_others_after() -> None:
    """Parallel dumps (drain) share the environment criu starts with: a dump asking for
    another flag must not start while one with a different flag runs, and no flag outlives
    its dumps."""
    gate, flag, seen = driver._EnvGate(), "VZBACKUP_TEST_GATE_FLAG", []
    started = threading.Event()

    def dump_without_flag() -> None:
        with gate.holding(None):
            seen.append(os.environ.get(flag))
            started.set()

    with gate.holding(flag), gate.holding(flag):  # the same flag: both run at once
        seen.append(os.environ.get(flag))
        other = threading.Thread(target=dump_without_flag)
        other.start()
        assert not started.wait(0.3), "a dump without the flag started while it was set"
        seen.append(os.environ.get(flag))
    other.join(5)
    assert seen == ["1", "1", None]
