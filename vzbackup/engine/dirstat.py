"""Reading directories below the backup root's descriptor, and the stat-ahead child.

An unchanged backup spends most of its walk in ``fstatat``: kernel time, one call per entry.
``StatAhead`` forks a child that checks the files cache's directories against their cached
signatures from the end of the walk while the walk comes from the start, so the two run on
two CPUs. Threads would not: each call returns to wait for the GIL behind the walk's
Python. The child only stats and compares; the walk still decides, and stats any directory
the child did not find unchanged itself.
"""

from __future__ import annotations

import mmap
import os

from vzbackup.engine.filescache import NAME_SEP, DirRecord, packed_sigs, signature
from vzbackup.engine.forked import fork_child
from vzbackup.errors import RuntimeFailure

STAT_BY_PATH = 4  # directories with at most this many names are not opened to stat them
STAT_AHEAD_MIN_DIRS = 200  # cached directories below which a fork costs more than it saves
UNKNOWN, SAME, CHANGED, TAKEN = 0, 1, 2, 3  # StatAhead's marks: not yet; child's; walk's
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(rel_dir: str, root_fd: int | None = None, path: str = "") -> int:
    """A descriptor of the directory *rel_dir* below *root_fd* ("": the root itself; no
    *root_fd*: *rel_dir* is a path of its own); *path* names it in errors."""
    try:
        return os.open(rel_dir or ".", _DIR_FLAGS, dir_fd=root_fd)
    except OSError as e:
        raise RuntimeFailure(f"cannot read directory {path or rel_dir}: {e.strerror}") from None


def list_dir(root_fd: int, rel_dir: str, path: str
             ) -> tuple[list[str], list[os.stat_result | None]]:
    """The names in the directory *rel_dir* below *root_fd* (at *path*), sorted, and their
    lstat (None: vanished meanwhile)."""
    fd = open_dir(rel_dir, root_fd, path)
    try:
        names = sorted(os.listdir(fd))
        try:
            sts: list[os.stat_result | None] = [
                os.stat(n, dir_fd=fd, follow_symlinks=False) for n in names]
        except FileNotFoundError:
            sts = [_lstat_at(n, fd) for n in names]
    finally:
        os.close(fd)
    return names, sts


def stat_names(root_fd: int, rel_dir: str, names: list[str], path: str
               ) -> list[os.stat_result] | None:
    """The lstat of *names* in the directory *rel_dir* below *root_fd* (at *path*; known not
    to have changed: no listing); None if one of them is gone. A few names are looked up by
    their paths: opening and closing the directory would cost more (a third of a root
    filesystem's directories hold one entry)."""
    if len(names) <= STAT_BY_PATH:
        base = rel_dir + "/" if rel_dir else ""
        try:
            return [os.stat(base + n, dir_fd=root_fd, follow_symlinks=False) for n in names]
        except (FileNotFoundError, NotADirectoryError):
            return None  # (list_dir tells what became of the directory)
    fd = open_dir(rel_dir, root_fd, path)
    try:
        return [os.stat(n, dir_fd=fd, follow_symlinks=False) for n in names]
    except FileNotFoundError:
        return None
    finally:
        os.close(fd)


def _lstat_at(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def same_entries(root_fd: int, root_dev: int, rel_dir: str, old: DirRecord) -> bool:
    """Whether every name *old* records in *rel_dir* still has its signature, and its
    subdirectories are still on the root's device (no mount point appeared)."""
    names = old.names.split(NAME_SEP) if old.names else []
    try:
        sts = stat_names(root_fd, rel_dir, names, rel_dir)
    except RuntimeFailure:
        return False
    return sts is not None and packed_sigs(map(signature, sts)) == old.sigs and all(
        sts[i].st_dev == root_dev for i in old.subdirs)


class StatAhead:
    """A forked child checking the files cache's directories from the last one the walk
    will reach, backwards, while the walk goes forwards: they meet wherever the load puts
    them. One shared byte per directory says who did what (``UNKNOWN`` until then)."""

    def __init__(self, pid: int, marks: mmap.mmap, order: dict[str, int]) -> None:
        self.pid, self.marks, self.order = pid, marks, order

    @classmethod
    def start(cls, root_fd: int, root_dev: int, records: dict[str, DirRecord]
              ) -> StatAhead | None:
        """Fork the child when it pays: two CPUs and a large cache. Other threads may run
        (the repository lock's refresh): the child takes no lock they could hold, it only
        stats, compares and marks."""
        if len(records) < STAT_AHEAD_MIN_DIRS or len(os.sched_getaffinity(0)) < 2:
            return None
        walk = walk_order(records)
        marks = mmap.mmap(-1, len(walk))  # shared with the child
        pid = fork_child(lambda: _check_backwards(marks, root_fd, root_dev, walk))
        return cls(pid, marks, {rel: i for i, (rel, _) in enumerate(walk)})

    def same(self, rel_dir: str) -> bool:
        """Whether the child found every entry of *rel_dir* unchanged; if it has not got
        there yet, it never will (the walk does it)."""
        i = self.order.get(rel_dir)
        if i is None:
            return False
        mark = self.marks[i]
        self.marks[i] = TAKEN
        return mark == SAME

    def close(self) -> None:
        """Stop the child (it looks at the next mark before each directory) and reap it."""
        self.marks[:] = bytes([TAKEN]) * len(self.marks)
        os.waitpid(self.pid, 0)
        self.marks.close()


def walk_order(records: dict[str, DirRecord]) -> list[tuple[str, DirRecord]]:
    """The cached directories in the order the walk visits them (depth first, by name)."""
    order = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        rec = records.get(rel_dir)
        if rec is None:
            continue
        order.append((rel_dir, rec))
        if rec.subdirs:
            names = rec.names.split(NAME_SEP)
            prefix = rel_dir + "/" if rel_dir else ""
            stack.extend(prefix + names[i] for i in reversed(rec.subdirs))
    return order


def _check_backwards(marks: mmap.mmap, root_fd: int, root_dev: int,
                     walk: list[tuple[str, DirRecord]]) -> None:
    """The child's part: check *walk* from its end until a directory the walk took."""
    for i in range(len(walk) - 1, -1, -1):
        if marks[i] == TAKEN:
            break
        same = same_entries(root_fd, root_dev, *walk[i])
        if marks[i] != TAKEN:
            marks[i] = SAME if same else CHANGED
