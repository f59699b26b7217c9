"""Filesystem facts about private areas: the filesystem type, btrfs subvolumes and snapshots.

A private area whose parent directory is on btrfs is created as a subvolume, so backups can
take an instant read-only snapshot of it (``.vzbackup-snap-CTID-PID`` next to it).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import stat
from pathlib import Path

from vzbackup.errors import DependencyError, RuntimeFailure

logger = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"
BTRFS_SUBVOL_INO = 256  # the root directory of every btrfs subvolume has this inode number
SNAPSHOT_PREFIX = ".vzbackup-snap-"
BTRFS_SYSFS = Path("/sys/fs/btrfs")
# btrfs ioctls: INO_LOOKUP (args 4096 bytes) answers the subvolume id of an fd, FS_INFO
# (1024 bytes) the filesystem's uuid at offset 16
_BTRFS_IOC_INO_LOOKUP, _BTRFS_IOC_FS_INFO = 0xD0009412, 0x8400941F


def unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` for a space, ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem that holds (or would
    hold) *path*."""
    while not path.exists():
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def tree_bytes(top: Path) -> int:
    """Bytes allocated under *top*, directories included (a tree that may change meanwhile:
    vanished entries count 0)."""
    total, stack = 0, [str(top)]
    while stack:
        with contextlib.suppress(OSError), os.scandir(stack.pop()) as it:
            for e in it:
                with contextlib.suppress(OSError):
                    total += e.stat(follow_symlinks=False).st_blocks * 512
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
    return total


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
            mnt = unescape(fields[4])
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
    import subprocess  # (here and below: a backup of a plain directory needs neither)

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


def private_subvolume(path: Path) -> bool:
    """Create the private area *path* as a btrfs subvolume where its parent is on btrfs
    (backups then snapshot it instantly); False, nothing created, elsewhere or without the
    btrfs tool (logged)."""
    if fs_type(path.parent) != "btrfs":
        return False
    try:
        create_subvolume(path)
    except DependencyError as e:
        logger.warning("%s: private area %s is a plain directory", e, path)
        return False
    return True


def make_private_area(path: Path) -> None:
    """Create the empty private area *path*: a subvolume where possible, else a directory."""
    if not private_subvolume(path):
        path.mkdir()


def _dir_ioctl(path: str | Path, request: int, args: bytearray) -> bytearray:
    """Run the ioctl *request* on the directory *path*; *args* is filled in place."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, request, args)
    finally:
        os.close(fd)
    return args


def subvolume_id(path: str | Path) -> int:
    """The id of the btrfs subvolume holding *path*."""
    args = bytearray(4096)
    args[8:16] = BTRFS_SUBVOL_INO.to_bytes(8, "little")  # objectid: the subvolume's root dir
    return int.from_bytes(_dir_ioctl(path, _BTRFS_IOC_INO_LOOKUP, args)[:8], "little")


def qgroups_dir(path: str | Path) -> Path | None:
    """sysfs directory of the qgroups of the btrfs holding *path*; None when quotas are off."""
    args = _dir_ioctl(path, _BTRFS_IOC_FS_INFO, bytearray(1024))
    uuid = bytes(args[16:32]).hex()
    qgroups = BTRFS_SYSFS / "-".join((uuid[:8], uuid[8:12], uuid[12:16], uuid[16:20],
                                      uuid[20:])) / "qgroups"
    return qgroups if qgroups.is_dir() else None


def set_qgroup_limit(subvolume: str | Path, limit_bytes: int) -> None:
    """Referenced-size limit of *subvolume*'s own qgroup (0: none)."""
    _btrfs("qgroup", "limit", str(limit_bytes) if limit_bytes else "none", str(subvolume))


def destroy_qgroup(parent: str | Path, subvol_id: int) -> None:
    """Drop the qgroup of deleted subvolume *subvol_id* once the cleaner has removed the
    subvolume (kernels >= 6.7 drop it themselves; then there is nothing left to do). A
    commit first wakes the cleaner, which would otherwise wait up to 30 s."""
    _btrfs("filesystem", "sync", str(parent))
    _btrfs("subvolume", "sync", str(parent), str(subvol_id))
    try:
        _btrfs("qgroup", "destroy", f"0/{subvol_id}", str(parent))
    except RuntimeFailure as e:
        if "No such file" not in str(e):  # already gone
            raise


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
        import shutil

        shutil.rmtree(path)  # root may rmdir an empty subvolume (Linux >= 4.18)


def remove_tree(path: str | Path, *, ignore_errors: bool = False) -> None:
    """Remove a private area (or a copy of one), whether a plain directory or a subvolume."""
    try:
        if is_btrfs_subvolume(path) and not is_mount_point(path):
            delete_subvolume(path)
        elif os.path.lexists(path):
            import shutil

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
