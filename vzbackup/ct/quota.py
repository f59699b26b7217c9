"""Disk quotas of CTs (vzquota's job): DISKSPACE and DISKINODES enforced on the private area.

What holds a CT's limits depends on where its private area lives (README "Disk quotas"):

- a btrfs subvolume on a filesystem with quotas enabled: the subvolume's qgroup
  (``0/SUBVOLID``) gets a referenced-size limit, the hard one (a qgroup has one limit and
  counts no inodes);
- ext4 or xfs mounted with ``prjquota``: a project quota, project id = CTID, given to every
  directory and file of the private area, directories with the inherit flag so whatever the
  CT creates joins the project; soft (with the filesystem's grace period) and hard limits
  for blocks and inodes, vzquota's barrier:limit;
- anything else: nothing is enforced, and start, ``check`` and ``status`` say why.

A CT can't leave its project: the kernel refuses project id changes from a user namespace.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vzbackup import syscalls as S
from vzbackup.ct import fs
from vzbackup.errors import DependencyError, RuntimeFailure

log = logging.getLogger(__name__)

BTRFS = "btrfs-qgroup"
PROJECT = "project"
NONE = "none"
QGROUP_LIMIT_MAX_RFER = 1  # bit of a qgroup's limit_flags (sysfs)
# what a filesystem without (enforced) project quotas needs, by type
PROJECT_HINTS = {
    "ext4": "run tune2fs -O quota,project on the unmounted device, then mount -o prjquota "
            "(kernel: CONFIG_QFMT_V2)",
    "xfs": "mount -o prjquota (at mount time, not by remount; kernel: CONFIG_XFS_QUOTA)",
}
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclass(frozen=True)
class Limits:
    """vzquota's barrier:limit pairs: KiB for space, a count for inodes; 0 = no limit."""

    space_soft: int = 0
    space_hard: int = 0
    inodes_soft: int = 0
    inodes_hard: int = 0

    def __bool__(self) -> bool:
        return any((self.space_soft, self.space_hard, self.inodes_soft, self.inodes_hard))

    @property
    def space(self) -> int:
        """The one space limit of a backend without soft limits (KiB)."""
        return self.space_hard or self.space_soft

    @property
    def inodes(self) -> bool:
        return bool(self.inodes_soft or self.inodes_hard)


@dataclass(frozen=True)
class Usage:
    """What the filesystem counts for a CT (None: not counted) and the limits it holds."""

    space_kib: int | None
    inodes: int | None
    limits: Limits


@dataclass(frozen=True)
class Support:
    """How the filesystem of a private area can hold a CT's quota."""

    backend: str  # BTRFS, PROJECT or NONE
    mount: str
    fstype: str
    why_not: str = ""  # NONE, or PROJECT counted but not enforced: the reason
    enforced: bool = True

    def unenforced(self, limits: Limits) -> list[str]:
        """Each part of *limits* this filesystem leaves unenforced, with why (a soft space
        limit on btrfs is documented, not reported: a qgroup enforces the hard one)."""
        if not limits:
            return []
        if self.backend == NONE or not self.enforced:
            return [f"DISKSPACE/DISKINODES are not enforced: {self.why_not}"]
        if self.backend == BTRFS and limits.inodes:
            return ["DISKINODES is not enforced: btrfs qgroups count bytes, not inodes"]
        return []

    def describe(self) -> str:
        if self.backend == NONE:
            return f"none: {self.why_not}"
        what = {BTRFS: "btrfs qgroups (hard space limit only)",
                PROJECT: "project quotas (space and inodes, soft:hard)"}[self.backend]
        extra = "" if self.enforced else f", NOT ENFORCED: {self.why_not}"
        return f"{what} on {self.mount} ({self.fstype}){extra}"


def detect(private: Path, *, new: bool = False) -> Support:
    """What can hold the quota of the CT whose private area is *private*; *new*: of a CT
    yet to be created there (on btrfs it will be a subvolume)."""
    where = private
    while not where.is_dir() and where != where.parent:
        where = where.parent
    mount, fstype = fs.mount_of(where)
    if fstype == "btrfs":
        if not new and not fs.is_btrfs_subvolume(private):
            return Support(NONE, mount, fstype, f"{private} is a directory on btrfs, not a "
                           "subvolume (qgroups limit subvolumes; recreate or restore the CT)")
        if fs.qgroups_dir(where) is None:
            return Support(NONE, mount, fstype,
                           f"quotas are off on the btrfs at {mount} (btrfs quota enable {mount})")
        return Support(BTRFS, mount, fstype)
    hint = PROJECT_HINTS.get(fstype, f"{fstype} has no project quotas")
    try:
        with _opened(where) as fd:
            flags = S.project_quota_flags(fd)
    except OSError as e:
        if e.errno != errno.ENOSYS:  # ENOSYS: no quota of any type is on
            return Support(NONE, mount, fstype, f"no project quotas on {mount} ({fstype}: "
                           f"{e.strerror}); {hint}")
        flags = 0
    if not flags & S.FS_QUOTA_PDQ_ACCT:
        return Support(NONE, mount, fstype,
                       f"{mount} ({fstype}) is not mounted with prjquota; {hint}")
    if not flags & S.FS_QUOTA_PDQ_ENFD:
        return Support(PROJECT, mount, fstype, f"project quotas are counted, not enforced, on "
                       f"{mount}: mount it with prjquota", enforced=False)
    return Support(PROJECT, mount, fstype)


def apply(private: Path, ctid: int, limits: Limits) -> Support:
    """Put *limits* (all zero: none) on CT *ctid*'s private area, joining its files to the
    CT's project first where project quotas hold them. Returns what holds them."""
    sup = detect(private)
    try:
        if sup.backend == BTRFS:
            fs.set_qgroup_limit(private, limits.space * 1024)
        elif sup.backend == PROJECT:
            mark_tree(private, ctid)
            with _opened(private) as fd:
                S.set_project_quota(fd, ctid, space_soft=limits.space_soft,
                                    space_hard=limits.space_hard,
                                    inodes_soft=limits.inodes_soft,
                                    inodes_hard=limits.inodes_hard)
    except OSError as e:
        raise RuntimeFailure(f"CT {ctid}: setting its disk quota on {private} failed: "
                             f"{e.strerror or e}") from None
    return sup


def prepare(private: Path, ctid: int) -> None:
    """Join a new, still empty private area to the CT's project (where project quotas hold
    it), so what is copied in later is counted without a walk over it at start."""
    with contextlib.suppress(OSError):
        if detect(private).backend == PROJECT:
            mark_tree(private, ctid)


def usage(private: Path, ctid: int) -> Usage | None:
    """What the filesystem counts for CT *ctid* and the limits it holds; None without quota."""
    if not private.is_dir():
        return None
    sup = detect(private)
    if sup.backend == BTRFS:
        qgroup = _qgroup_dir(private)
        with _opened(private) as fd:
            S.syncfs(fd)  # btrfs brings qgroup counters up to date at commit
        flags = int((qgroup / "limit_flags").read_text())
        hard = int((qgroup / "max_referenced").read_text()) // 1024
        return Usage(int((qgroup / "referenced").read_text()) // 1024, None,
                     Limits(space_hard=hard if flags & QGROUP_LIMIT_MAX_RFER else 0))
    if sup.backend == PROJECT:
        with _opened(private) as fd:
            bhard, bsoft, used, ihard, isoft, inodes = S.get_project_quota(fd, ctid)
        return Usage(used // 1024, inodes, Limits(bsoft, bhard, isoft, ihard))
    return None


@contextlib.contextmanager
def removal(private: Path, ctid: int) -> Iterator[None]:
    """Around the removal of CT *ctid*'s private area: afterwards its qgroup is destroyed
    (btrfs) or its project's limits cleared. A failure there is logged: the CT is gone."""
    sup = detect(private) if private.is_dir() else None
    subvol = fs.subvolume_id(private) if sup and sup.backend == BTRFS else 0
    yield
    try:
        if subvol and not os.path.lexists(private):
            fs.destroy_qgroup(private.parent, subvol)
        elif sup and sup.backend == PROJECT:
            with _opened(private.parent) as fd:
                S.set_project_quota(fd, ctid, space_soft=0, space_hard=0, inodes_soft=0,
                                    inodes_hard=0)
    except (OSError, RuntimeFailure, DependencyError) as e:
        log.warning("CT %s: the quota of its removed private area stays: %s", ctid, e)


def mark_tree(root: Path, projid: int) -> int:
    """Give every inode under *root* (one filesystem) project *projid*, directories with the
    inherit flag; returns how many changed. *root* goes last, so a tree whose root has the
    project is complete and is not walked again. Directory fds pin the walk: a running CT
    swapping a directory for a symlink can't send it outside. Symlinks, device nodes and
    fifos need file_setattr (Linux >= 6.17); before, they keep their project (those the CT
    creates inherit the CT's)."""
    with _opened(root) as fd:
        have, xflags = S.get_project(fd)
    if have == projid and xflags & S.FS_XFLAG_PROJINHERIT:
        return 0
    dev = root.lstat().st_dev
    changed, failed = 0, []
    for dirpath, dirs, files, dirfd in os.fwalk(root, topdown=False):
        for name in files + dirs:  # dirs: symlinks to directories are listed there
            try:
                changed += _mark_entry(dirfd, name, projid, dev)
            except OSError as e:
                failed.append(f"{dirpath}/{name}: {e.strerror}")
        try:
            changed += _mark_fd(dirfd, projid, dev)
        except OSError as e:
            failed.append(f"{dirpath}: {e.strerror}")
    if failed:
        log.warning("project %s not set on %d entries of %s (first: %s)", projid,
                    len(failed), root, failed[0])
    return changed


# file_setattr can't: the kernel is older than 6.17, or the filesystem has no attributes there
_BY_NAME_UNSUPPORTED = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTTY)


def _mark_entry(dirfd: int, name: str, projid: int, dev: int) -> int:
    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    if st.st_dev != dev or stat.S_ISDIR(st.st_mode):  # a directory: by its own walk step
        return 0
    if not stat.S_ISREG(st.st_mode):  # symlinks, device nodes, fifos, sockets: by name
        try:
            if S.get_project_at(dirfd, name) == projid:
                return 0
            S.set_project_at(dirfd, name, projid)
        except OSError as e:
            if e.errno in _BY_NAME_UNSUPPORTED:
                return 0
            raise
        return 1
    fd = os.open(name, _OPEN_FLAGS | os.O_NOATIME, dir_fd=dirfd)
    try:
        return _mark_fd(fd, projid, dev)
    finally:
        os.close(fd)


def _mark_fd(fd: int, projid: int, dev: int) -> int:
    """Mark the directory or regular file *fd* (checked again: the walk may have raced)."""
    st = os.fstat(fd)
    is_dir = stat.S_ISDIR(st.st_mode)
    if st.st_dev != dev or not (is_dir or stat.S_ISREG(st.st_mode)):
        return 0
    have, xflags = S.get_project(fd)
    if have == projid and (xflags & S.FS_XFLAG_PROJINHERIT or not is_dir):
        return 0
    S.set_project(fd, projid, inherit=is_dir)
    return 1


def _qgroup_dir(private: Path) -> Path:
    qgroups = fs.qgroups_dir(private)
    if qgroups is None:
        raise RuntimeFailure(f"btrfs quotas went off under {private}")
    return qgroups / f"0_{fs.subvolume_id(private)}"


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)
