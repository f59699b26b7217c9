"""Filesystem facts about private areas: the filesystem type, btrfs subvolumes and snapshots.

A private area whose parent directory is on btrfs is created as a subvolume, so backups can
take an instant read-only snapshot of it (``.vzbackup-snap-CTID-PID`` next to it).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

from vzbackup.errors import DependencyError, RuntimeFailure

MOUNTINFO = "/proc/self/mountinfo"
BTRFS_SUBVOL_INO = 256  # the root directory of every btrfs subvolume has this inode number
SNAPSHOT_PREFIX = ".vzbackup-snap-"


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_of(path: str | Path) -> tuple[str, str]:
    """(mount point, filesystem type) of the mount holding *path* (which may not exist yet)."""
    target = os.path.realpath(path)
    best, fstype = "", "unknown"
    with open(MOUNTINFO) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) < 5 or not right:
                continue
            mnt = _unescape(fields[4])
            inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
            # ">=": of mounts stacked on one point the last listed is the visible one
            if inside and len(mnt) >= len(best):
                best, fstype = mnt, right.split()[0]
    return best, fstype


def is_mount_point(path: str | Path) -> bool:
    """True if *path* is a mount point (os.path.ismount says so for every btrfs subvolume)."""
    return mount_of(path)[0] == os.path.realpath(path)


def fs_type(path: str | Path) -> str:
    """The filesystem type of *path* as the kernel names it (ext4, btrfs, xfs, tmpfs, ...)."""
    return mount_of(path)[1]


def is_btrfs_subvolume(path: str | Path) -> bool:
    """True if *path* is the root directory of a btrfs subvolume (or snapshot)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_ino == BTRFS_SUBVOL_INO and fs_type(path) == "btrfs"


def _btrfs(*args: str) -> None:
    try:
        res = subprocess.run(["btrfs", *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise DependencyError(
            "the btrfs tool is missing", hint="apt-get install btrfs-progs"
        ) from None
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        raise RuntimeFailure(f"btrfs {' '.join(args)} failed: {msg[-1] if msg else res.returncode}")


def create_subvolume(path: str | Path) -> None:
    _btrfs("subvolume", "create", str(path))


def snapshot(source: str | Path, dest: str | Path, *, readonly: bool = True) -> None:
    """Snapshot subvolume *source* as *dest* (same btrfs filesystem)."""
    _btrfs("subvolume", "snapshot", *(["-r"] if readonly else []), str(source), str(dest))


def delete_subvolume(path: str | Path) -> None:
    """Delete a subvolume or snapshot; falls back to removing the files (nested subvolumes)."""
    try:
        _btrfs("subvolume", "delete", str(path))
    except (RuntimeFailure, DependencyError):
        if not os.path.lexists(path):
            return
        # A read-only snapshot must become writable before its files can be removed.
        with contextlib.suppress(RuntimeFailure, DependencyError):
            _btrfs("property", "set", "-ts", str(path), "ro", "false")
        shutil.rmtree(path)  # root may rmdir an empty subvolume (Linux >= 4.18)


def remove_tree(path: str | Path, *, ignore_errors: bool = False) -> None:
    """Remove a private area (or a copy of one), whether a plain directory or a subvolume."""
    try:
        if is_btrfs_subvolume(path) and not is_mount_point(path):
            delete_subvolume(path)
        elif os.path.lexists(path):
            shutil.rmtree(path)
    except (OSError, RuntimeFailure, DependencyError):
        if not ignore_errors:
            raise


def snapshot_path(private: str | Path, ctid: int) -> Path:
    """Where this process puts the backup snapshot of *private*: a hidden sibling."""
    return Path(private).parent / f"{SNAPSHOT_PREFIX}{ctid}-{os.getpid()}"


def leftover_snapshots(private: str | Path, ctid: int) -> list[Path]:
    """Backup snapshots of CT *ctid* next to *private* (from any process)."""
    parent = Path(private).parent
    pat = re.compile(rf"{re.escape(SNAPSHOT_PREFIX)}{ctid}-\d+")
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    return sorted(parent / n for n in names if pat.fullmatch(n))
