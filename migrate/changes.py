"""What changed in a private area since a point in time (fanotify on its filesystem).

A migration's final sync runs while the CT is frozen, and rsync over the whole private area
stats every file at both ends (the Debian CT: ~25k files, 1.2-1.7 s of its freeze on the
loaded bed). A :class:`ChangeWatch` starts before the first sync and records every directory
whose entries changed: created, written, renamed, deleted, attributes changed. At the freeze
the final sync only visits those (rsync ``--files-from`` entries ``DIR/.`` with ``--dirs
--delete``: their entries one level deep, deletions included); a directory that came in
whole (created or renamed into the area) is listed with every directory below it.

The filesystem mark (``FAN_MARK_FILESYSTEM``, directory handles with names) sees writes through
any mount of the filesystem: the CT's root, idmapped or not, and the node's own. Writes
through a shared file mapping raise no event, so the directories of files a CT task maps
shared and writable, at the start and at the freeze, are listed too.

:meth:`ChangeWatch.changed` answers None, for a sync of the whole tree, whenever the record
may be incomplete: the kernel dropped events (queue overflow), too many directories, a
changed file has other hard links (rsync ``-H`` only links the names it is shown), or a
mapped file can't be placed in the area. A watch that can't start (no fanotify; btrfs
refuses filesystem marks on a subvolume) is no watch: :func:`start` returns None.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import stat
import threading
from collections.abc import Iterable
from pathlib import Path

from vzbackup import syscalls as S

log = logging.getLogger(__name__)

WATCH_MASK = (S.FAN_MODIFY | S.FAN_ATTRIB | S.FAN_CLOSE_WRITE | S.FAN_MOVED_FROM
              | S.FAN_MOVED_TO | S.FAN_CREATE | S.FAN_DELETE | S.FAN_DELETE_SELF
              | S.FAN_MOVE_SELF | S.FAN_ONDIR)
ARRIVED = S.FAN_CREATE | S.FAN_MOVED_TO  # a name that (re)appeared in a directory
WRITTEN = S.FAN_MODIFY | S.FAN_CLOSE_WRITE | S.FAN_ATTRIB | ARRIVED
MAX_DIRS = 4000  # beyond this a walk of the whole tree costs about the same
READ_SIZE = 1 << 16
_DELETED = " (deleted)"


class ChangeWatch:
    """Records the directories of *root* whose entries change from now on."""

    def __init__(self, root: Path, pids: Iterable[int] = ()) -> None:
        self.root = os.path.realpath(root)
        self.why = ""  # why changed() answered None
        self._fd = S.fanotify_init(S.FAN_CLOEXEC | S.FAN_NONBLOCK | S.FAN_UNLIMITED_QUEUE
                                   | S.FAN_REPORT_DFID_NAME)
        try:
            S.fanotify_mark(self._fd, S.FAN_MARK_ADD | S.FAN_MARK_FILESYSTEM, WATCH_MASK,
                            self.root)
            self._mount_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            os.close(self._fd)
            raise
        self._dev = os.stat(self.root).st_dev
        self._where: dict[bytes, str | None] = {}  # directory handle -> path in root or None
        self._dirs: set[bytes] = set()  # handles of directories whose entries changed
        self._arrived: set[tuple[bytes, bytes]] = set()  # directories that came in whole
        self._written: set[tuple[bytes, bytes]] = set()  # other names written or (re)created
        self._overflow = False
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._mapped = _mapped_files(pids)  # written through mappings made before the mark
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the record
    def changed(self, pids: Iterable[int] = ()) -> list[str] | None:
        """The directories to sync (``DIR/.`` relative to the root), in the state of now:
        call it with the writers frozen (*pids*: the CT's tasks). None: sync everything."""
        with self._lock:
            self._drain()
            dirs = self._collect(pids)
        if dirs is None:
            log.info("final sync of the whole tree: %s", self.why)
            return None
        return sorted(f"{d}/." if d else "." for d in dirs)

    def _collect(self, pids: Iterable[int]) -> set[str] | None:
        if self._overflow:
            return self._give_up("the kernel dropped change events (queue overflow)")
        dirs = {p for h in self._dirs if (p := self._resolve(h, again=True)) is not None}
        for h, name in self._written:
            path = self._path(h, name)
            with contextlib.suppress(OSError):
                st = os.lstat(path) if path else None
                if st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    return self._give_up(f"{path} changed and has other hard links")
        for h, name in self._arrived:
            path = self._path(h, name)
            if path and os.path.isdir(path) and not os.path.islink(path):
                for top, _subdirs, _files in os.walk(path):
                    dirs.add(os.path.relpath(top, self.root))
                    if len(dirs) > MAX_DIRS:
                        break
        mapped = self._mapped | _mapped_files(pids)
        for path, ident in mapped:
            where = self._place(path, ident)
            if where is None:
                return self._give_up(f"a CT task maps {path} shared and writable, not found "
                                     f"under {self.root}")
            if where:
                dirs.add(os.path.dirname(where[1:]))
        if len(dirs) > MAX_DIRS:
            return self._give_up(f"more than {MAX_DIRS} directories changed")
        return {"" if d == "." else d for d in dirs}

    def _give_up(self, why: str) -> None:
        self.why = why

    def _path(self, handle: bytes, name: bytes) -> str | None:
        where = self._resolve(handle)
        return None if where is None else os.path.join(self.root, where, os.fsdecode(name))

    def _place(self, path: str, ident: tuple[int, int]) -> str | None:
        """Where a mapped file is: "/REL" when found at REL under the root, "" when it is
        on another filesystem (a tmpfs: not in the private area), None when not found."""
        if ident[0] != self._dev:
            return ""
        rel = path[len(self.root):] if path.startswith(self.root + "/") else path
        with contextlib.suppress(OSError):
            st = os.stat(os.path.join(self.root, rel.lstrip("/")))
            if (st.st_dev, st.st_ino) == ident:
                return "/" + rel.lstrip("/")
        return None

    # ------------------------------------------------------------ events
    def _follow(self) -> None:
        poll = select.poll()
        poll.register(self._fd, select.POLLIN)
        poll.register(self._stop_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poll.poll()}
            if self._stop_r in ready:
                return
            with self._lock:
                self._drain()

    def _drain(self) -> None:
        """Read every queued event (the queue holds all events of finished syscalls)."""
        while True:
            try:
                buf = os.read(self._fd, READ_SIZE)
            except BlockingIOError:
                return
            except OSError:  # closed: nothing more to read
                return
            self._parse(buf)

    def _parse(self, buf: bytes) -> None:
        off = 0
        while off + S.FAN_EVENT_METADATA.size <= len(buf):
            length, _ver, _res, meta_len, mask, _fd, _pid = S.FAN_EVENT_METADATA.unpack_from(
                buf, off)
            if mask & S.FAN_Q_OVERFLOW:
                self._overflow = True
            info = off + meta_len
            while info + S.FAN_EVENT_INFO_HEADER.size <= off + length:
                kind, _pad, info_len = S.FAN_EVENT_INFO_HEADER.unpack_from(buf, info)
                if kind == S.FAN_EVENT_INFO_TYPE_DFID_NAME:
                    self._event(mask, buf[info + S.FAN_EVENT_INFO_HEADER.size + 8:
                                          info + info_len])
                info += max(info_len, 1)
            off += max(length, 1)

    def _event(self, mask: int, record: bytes) -> None:
        """One event's directory record: struct file_handle, then the entry's name."""
        size = int.from_bytes(record[:4], "little") + 8
        handle, name = record[:size], record[size:].split(b"\0", 1)[0]
        if self._resolve(handle) is None:
            return
        self._dirs.add(handle)
        if name == b".":
            return  # the directory itself: its own entry is "DIR/."
        if mask & S.FAN_ONDIR:
            if mask & ARRIVED:
                self._arrived.add((handle, name))
        elif mask & WRITTEN:
            self._written.add((handle, name))

    def _resolve(self, handle: bytes, *, again: bool = False) -> str | None:
        """Where directory *handle* is, relative to the root ("" the root itself); None when
        outside the root or gone. Outside once is outside for good: a directory that moves
        in later arrives by a rename the watch sees (and whose tree the sync walks)."""
        if handle in self._where and not (again and self._where[handle] is not None):
            return self._where[handle]
        where = None
        with contextlib.suppress(OSError):
            fd = S.open_by_handle_at(self._mount_fd, handle)
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
            if path == self.root:
                where = ""
            elif path.startswith(self.root + "/") and not path.endswith(_DELETED):
                where = path[len(self.root) + 1:]
        self._where[handle] = where
        return where

    # ------------------------------------------------------------ end
    def close(self) -> None:
        if self._thread.is_alive():
            os.write(self._stop_w, b"x")
            self._thread.join()
        for fd in (self._fd, self._mount_fd, self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def start(root: Path, pids: Iterable[int] = ()) -> ChangeWatch | None:
    """A watch of *root* (*pids*: the CT's tasks now), or None where the kernel or the
    filesystem won't give one (the caller then syncs whole trees)."""
    try:
        return ChangeWatch(root, pids)
    except OSError as e:
        log.info("no change tracking for %s (%s): the final sync walks the whole tree", root, e)
        return None


def _mapped_files(pids: Iterable[int]) -> set[tuple[str, tuple[int, int]]]:
    """(path as the task sees it, (st_dev, st_ino)) of files the tasks map shared+writable."""
    found = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/maps") as f:
                lines = f.readlines()
            for line in lines:
                parts = line.split(None, 5)
                if len(parts) < 6 or parts[1][1] != "w" or parts[1][3] != "s" or parts[4] == "0":
                    continue
                path = parts[5].rstrip("\n")
                if path.endswith(_DELETED) or not path.startswith("/"):
                    continue
                with contextlib.suppress(OSError):
                    st = os.stat(f"/proc/{pid}/map_files/{parts[0]}")
                    found.add((path, (st.st_dev, st.st_ino)))
    return found
