"""Disk quotas (issue 15): DISKSPACE/DISKINODES enforced on real filesystems made here.

Each filesystem is a loop-mounted image file under the test's prefix, mounted on the bed's
``vz/private``: btrfs with quotas enabled (qgroups), ext4 made with ``-O quota,project`` and
xfs, both mounted ``prjquota`` (project quotas). A kernel without quota support for ext4
(CONFIG_QFMT_V2) or xfs (CONFIG_XFS_QUOTA) refuses those mounts: that case is skipped, in CI
too (setup.sh can't change the kernel), and the project id marking is still checked on an
xfs mounted without quotas. Busybox CTs; everything is unmounted and detached on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodebed import NodeBed, need, next_ctid
from twonode_fixture import twonode

from vzbackup import syscalls as S
from vzbackup.config.ct import diskinodes, diskspace_kib
from vzbackup.ct import fs, quota
from vzbackup.errors import UsageError

MKFS = {
    "btrfs": ["mkfs.btrfs", "-q"],
    "ext4": ["mkfs.ext4", "-q", "-O", "quota,project"],
    "xfs": ["mkfs.xfs", "-q"],
}
IMAGE_MB = {"btrfs": 160, "ext4": 128, "xfs": 320}  # xfs's smallest is 300 MB
MOUNT_OPTS = {"btrfs": [], "ext4": ["-o", "prjquota"], "xfs": ["-o", "prjquota"]}
QUOTA_ERRORS = ("Disk quota exceeded", "No space left on device")


@contextlib.contextmanager
def loop_fs(fstype: str, mnt: Path, *, opts: list[str] | None = None) -> Iterator[str]:
    """mkfs *fstype* on a sparse image beside *mnt* and mount it there; yields "" when the
    kernel refused the mount (the reason is in the kernel log), else the loop device."""
    need(shutil.which(MKFS[fstype][0]) is not None, f"{MKFS[fstype][0]} missing (setup.sh)")
    img = mnt.parent / f".{mnt.name}.{fstype}.img"
    mnt.mkdir(parents=True, exist_ok=True)
    loop = ""
    try:
        with open(img, "wb") as f:
            f.truncate(IMAGE_MB[fstype] << 20)
        subprocess.run([*MKFS[fstype], str(img)], check=True, capture_output=True)
        loop = subprocess.run(["losetup", "--find", "--show", str(img)], check=True,
                              capture_output=True, text=True).stdout.strip()
        opts = MOUNT_OPTS[fstype] if opts is None else opts
        mounted = subprocess.run(["mount", "-t", fstype, *opts, loop, str(mnt)],
                                 capture_output=True).returncode == 0
        yield loop if mounted else ""
    finally:
        _umount_below(mnt)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)
        img.unlink(missing_ok=True)


def _umount_below(mnt: Path) -> None:
    """Unmount *mnt* and whatever is mounted below it (CT roots bound from it)."""
    with open("/proc/self/mountinfo") as f:
        below = [ln.split()[4] for ln in f if ln.split()[4].startswith(f"{mnt}/")]
    for m in sorted(below, key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True, check=False)
    for _ in range(50):
        if not fs.is_mount_point(mnt):
            return
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


@contextlib.contextmanager
def _quota_bed(node: NodeBed, fstype: str) -> Iterator[tuple[NodeBed, str]]:
    """The bed with vz/private on a loop-mounted *fstype* whose quotas are on."""
    mnt = node.prefix / "vz/private"
    try:
        with loop_fs(fstype, mnt) as loop:
            if not loop:
                pytest.skip(f"this kernel refuses to mount {fstype} with project quotas "
                            f"(CONFIG_{'QFMT_V2' if fstype == 'ext4' else 'XFS_QUOTA'} unset)")
            if fstype == "btrfs":
                subprocess.run(["btrfs", "quota", "enable", str(mnt)], check=True)
            yield node, fstype
    finally:
        _stop_all(node)


@pytest.fixture(params=["btrfs", "ext4", "xfs"])
def quota_node(request: pytest.FixtureRequest, node: NodeBed) -> Iterator[tuple[NodeBed, str]]:
    with _quota_bed(node, request.param) as bed:
        yield bed


@pytest.fixture
def btrfs_quota_node(node: NodeBed) -> Iterator[NodeBed]:
    with _quota_bed(node, "btrfs") as (bed, _):
        yield bed


def _stop_all(bed: NodeBed) -> None:
    run = bed.prefix / "vz/run"
    for state in run.glob("*.state") if run.is_dir() else []:
        bed.vz("stop", "--fast", state.stem, check=False, timeout=90)


def _disk(bed: NodeBed, ctid: int) -> dict:
    out = bed.vz("list", "-a", "-o", "ctid,diskspace,diskinodes,quota", "--json").stdout
    return next(r for r in json.loads(out) if r["ctid"] == ctid)


def _fill(bed: NodeBed, ctid: int, name: str, mib: int) -> subprocess.CompletedProcess[str]:
    return bed.vz("exec", str(ctid), f"dd if=/dev/zero of=/{name} bs=1M count={mib} && sync",
                  check=False)


def test_ct_gets_quota_errors_node_keeps_room_and_set_raises_live(
    quota_node: tuple[NodeBed, str],
) -> None:
    bed, fstype = quota_node
    ctid = bed.new_ctid()
    bed.vz("create", str(ctid), "--hostname", f"ct{ctid}")
    bed.vz("set", str(ctid), "--save", "--diskspace", "24M:24M", "--diskinodes", "400:400")
    start = bed.vz("start", str(ctid))
    expect_inodes = fstype != "btrfs"
    assert ("DISKINODES is not enforced" in start.stderr) is not expect_inodes, start.stderr

    full = _fill(bed, ctid, "big", 40)
    assert full.returncode != 0 and any(e in full.stderr for e in QUOTA_ERRORS), full.stderr
    node_free = os.statvfs(bed.prefix / "vz/private")
    assert node_free.f_bavail * node_free.f_frsize > 48 << 20  # the node still has room

    row = _disk(bed, ctid)
    assert row["quota"] == ("btrfs-qgroup" if fstype == "btrfs" else "project")
    space = row["diskspace"]
    assert space["hardlimit"] == 24 * 1024 and space["softlimit"] == 24 * 1024
    assert 20 * 1024 <= space["usage"] <= 25 * 1024, space
    table = bed.vz("list", "-a", "-H", "-o", "ctid,diskspace,diskspace.h").stdout.split()
    assert table[table.index(str(ctid)) + 1:][:2] == [str(space["usage"]), "24576"]

    bed.vz("set", str(ctid), "--diskspace", "96M")  # live, not saved
    assert _fill(bed, ctid, "big", 40).returncode == 0
    assert _disk(bed, ctid)["diskspace"]["usage"] >= 40 * 1024

    if expect_inodes:  # 400 inodes; the busybox tree already holds some of them
        used = _disk(bed, ctid)["diskinodes"]["usage"]
        assert 0 < used < 400
        made = bed.sh(ctid, "mkdir /many; i=0; while touch /many/$i 2>/dev/null; do "
                            "i=$((i+1)); done; echo $i")
        assert 400 - used - 5 <= int(made) <= 400 - used, made
        over = bed.vz("exec", str(ctid), "touch /many/x", check=False)
        assert over.returncode != 0 and any(e in over.stderr for e in QUOTA_ERRORS)
        # a set applies the saved config plus what it is given: keep the raised space
        bed.vz("set", str(ctid), "--diskinodes", "1000:1000", "--diskspace", "96M")
        bed.sh(ctid, "touch /many/x")


def test_destroy_removes_the_qgroup_and_restore_carries_the_limit(
    btrfs_quota_node: NodeBed,
) -> None:
    bed = btrfs_quota_node
    ctid, copy = bed.new_ctid(), bed.new_ctid()
    bed.vz("create", str(ctid))
    bed.vz("set", str(ctid), "--save", "--diskspace", "30M")
    private = bed.prefix / f"vz/private/{ctid}"
    qgroup = fs.qgroups_dir(private) / f"0_{fs.subvolume_id(private)}"
    assert int((qgroup / "max_referenced").read_text()) == 30 << 20

    bed.vz("dump", str(ctid), "--mode", "stop")
    bed.vz("restore", str(ctid), str(copy))  # the snapshot's config, applied here
    restored = bed.prefix / f"vz/private/{copy}"
    assert quota.usage(restored, copy).limits.space_hard == 30 * 1024

    bed.vz("destroy", str(ctid))
    assert not qgroup.exists()


@pytest.mark.slow
def test_online_migration_carries_the_limit_to_dest(two_nodes: twonode.TwoNodes) -> None:
    """A CT with DISKSPACE moves online from A (no quotas) to B (btrfs with quotas): B's
    qgroup holds the limit once the CT runs there, and the CT's writes past it fail at B."""
    bed = two_nodes
    ctid = next_ctid()
    bed.a.vz("create", str(ctid), "--hostname", f"q{ctid}")
    bed.a.vz("set", str(ctid), "--save", "--diskspace", "24M")
    bed.a.vz("start", str(ctid))
    mnt = bed.b.prefix / "vz/private"
    with loop_fs("btrfs", mnt) as loop:
        assert loop
        subprocess.run(["btrfs", "quota", "enable", str(mnt)], check=True)
        try:
            bed.a.vz("migrate", str(ctid), bed.dest(bed.b), *bed.ssh_args(), "--online",
                     timeout=240)
            assert "running" in bed.b.vz("status", str(ctid)).stdout
            usage = quota.usage(mnt / str(ctid), ctid)
            assert usage is not None and usage.limits.space_hard == 24 * 1024
            full = bed.b.vz("exec", str(ctid), "dd if=/dev/zero of=/big bs=1M count=40",
                            check=False)
            assert full.returncode != 0 and "Disk quota exceeded" in full.stderr
        finally:
            bed.b.vz("stop", "--fast", str(ctid), check=False, timeout=90)


def test_unenforced_quota_is_reported(node: NodeBed) -> None:
    """Project quotas off (the bed's filesystem as it is): start, status and check warn."""
    ctid = node.new_ctid()
    node.vz("create", str(ctid))
    conf = node.prefix / f"etc/vz/conf/{ctid}.conf"
    before = conf.read_text()
    for bad in (["--diskspace", "2G:1G"], ["--diskinodes", "1K"], ["--diskspace", "1:2:3"]):
        res = node.vz("set", str(ctid), "--save", *bad, check=False)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert conf.read_text() == before
    node.vz("set", str(ctid), "--save", "--diskspace", "1G:2G")
    assert 'DISKSPACE="1048576:2097152"' in conf.read_text()
    private = node.prefix / f"vz/private/{ctid}"
    if quota.detect(private).backend != quota.NONE:
        pytest.skip(f"{private} has quotas: nothing to warn about")
    start = node.vz("start", str(ctid))
    assert "DISKSPACE/DISKINODES are not enforced" in start.stderr
    status = node.vz("status", str(ctid))
    assert status.stdout.strip() == f"CTID {ctid} exist mounted running"
    assert "not enforced" in status.stderr
    data = json.loads(node.vz("status", str(ctid), "--json").stdout)
    assert data["disk_quota_unenforced"] and "prjquota" in data["disk_quota_unenforced"][0]
    check = json.loads(node.vz("check", "--json").stdout)
    assert check["disk_quota"].startswith("none: ")
    assert any(w.startswith(f"CT {ctid}: ") for w in check["disk_quota_warnings"])
    node.vz("set", str(ctid), "--save", "--diskquota", "no")
    assert not json.loads(node.vz("status", str(ctid), "--json").stdout)[
        "disk_quota_unenforced"]


def test_btrfs_without_quotas_says_how_to_enable(node: NodeBed) -> None:
    mnt = node.prefix / "vz/private"
    with loop_fs("btrfs", mnt) as loop:
        assert loop
        sup = quota.detect(mnt / "101", new=True)
        assert sup.backend == quota.NONE and f"btrfs quota enable {mnt}" in sup.why_not


def test_project_ids_marked_and_inherited_on_xfs() -> None:
    """The tree walk of project quotas, on an xfs without quotas (it keeps project ids)."""
    work = Path(tempfile.mkdtemp(prefix="vzt-quota-", dir="/var/tmp"))
    try:
        with loop_fs("xfs", work / "mnt", opts=[]) as loop:
            assert loop
            root = work / "mnt/private"
            (root / "etc/sub").mkdir(parents=True)
            (root / "etc/sub/file").write_text("x")
            (root / "bin").symlink_to("etc")
            os.mkfifo(root / "fifo")
            by_name = _has_file_setattr(root)
            # 3 directories and a file; with file_setattr (Linux >= 6.17) the symlink and fifo
            assert quota.mark_tree(root, 4242) == (6 if by_name else 4)
            assert quota.mark_tree(root, 4242) == 0  # complete: not walked again
            (root / "etc/new").write_text("y")
            for rel, inherit in (("", True), ("etc/sub", True), ("etc/sub/file", False),
                                 ("etc/new", False)):
                fd = os.open(root / rel, os.O_RDONLY)
                try:
                    projid, xflags = S.get_project(fd)
                finally:
                    os.close(fd)
                assert projid == 4242, rel
                assert bool(xflags & S.FS_XFLAG_PROJINHERIT) is inherit, rel
            if by_name:
                fd = os.open(root, os.O_RDONLY)
                try:
                    assert S.get_project_at(fd, "bin") == S.get_project_at(fd, "fifo") == 4242
                finally:
                    os.close(fd)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _has_file_setattr(where: Path) -> bool:
    fd = os.open(where, os.O_RDONLY)
    try:
        S.get_project_at(fd, ".")
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


@pytest.mark.parametrize(("text", "kib"), [
    ("2G:2200M", (2 << 20, 2200 << 10)), ("1048576", (1 << 20, 1 << 20)),
    ("unlimited", (0, 0)), ("10M:unlimited", (10 << 10, 0)), ("25P", (100, 100)),
])
def test_diskspace_values(text: str, kib: tuple[int, int]) -> None:
    assert diskspace_kib(text) == kib


@pytest.mark.parametrize("text", ["2G:1G", "1:2:3", "lots", "-5"])
def test_bad_diskspace_is_refused(text: str) -> None:
    with pytest.raises((ValueError, UsageError)):
        diskspace_kib(text)


def test_diskinodes_values() -> None:
    assert diskinodes("200000:220000") == (200000, 220000)
    assert diskinodes("500") == (500, 500)
    with pytest.raises(ValueError):
        diskinodes("1K")
