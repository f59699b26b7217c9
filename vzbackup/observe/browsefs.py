"""A read-only FUSE file system over a repository (mfusepy, libfuse 3, threaded).

Layout of a repository mount: ``/CTID/TIME/...`` is the private area of snapshot
``CTID/TIME``, ``/CTID/TIME.criu/`` its CRIU images when it was taken in checkpoint mode, and
``/CTID/latest`` links to the newest one; a snapshot mount shows one snapshot's tree (or its
CRIU images) at its root. Trees load when first entered (the last few stay loaded) and
file contents come chunk by chunk through the view's cache. New snapshots (a backup running
alongside) appear at the next listing; published snapshots never change, so what is open
stays readable unless a prune and GC remove its chunks (then reads fail with EIO).
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # mfusepy would take libfuse 2 first
import mfusepy

from vzbackup.engine import tree as T
from vzbackup.errors import VzError
from vzbackup.observe.engine_view import Entry, FileMap, RepoView, Snapshot

log = logging.getLogger("vzbackup.browse")
LATEST = "latest"
STATE_SUFFIX = ".criu"  # /CTID/TIME.criu: the CRIU images of a checkpoint-mode snapshot
TREES_KEPT = 8  # snapshot trees kept loaded
REFRESH_SECONDS = 5.0  # how old the snapshot list may get before a listing reloads it
SNAPSHOT_INO_SHIFT = 32  # inode = (snapshot number << 32) + entry number
STOPPED_BY_SIGNAL = 8  # fuse_main's code when SIGINT/SIGTERM/SIGHUP ended the loop
CT_INO, LATEST_INO = 2, 2 + 2**31  # + CTID


@dataclass
class TreeIndex:
    """One snapshot's entries by path, children per directory, inode numbers."""

    base: int
    entries: dict[str, Entry] = field(default_factory=dict)
    ino: dict[str, int] = field(default_factory=dict)
    children: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    nlink: collections.Counter = field(default_factory=collections.Counter)

    @classmethod
    def build(cls, entries: list[Entry], base: int) -> TreeIndex:
        t = cls(base)
        for n, e in enumerate(entries, 1):
            T.safe_relpath(e.path)
            t.entries[e.path] = e
            t.ino[e.path] = base + n
            if e.path != ".":
                parent, _, name = e.path.rpartition("/")
                t.children[parent or "."].append(name)
                if e.kind == T.DIR:
                    t.nlink[parent or "."] += 1
        for e in entries:
            if e.kind == T.HARDLINK and e.link in t.entries:
                t.ino[e.path] = t.ino[e.link]
                t.nlink[e.link] += 1
        return t

    def target(self, e: Entry) -> Entry:
        """The entry holding the content (a hard link's first name)."""
        return self.entries.get(e.link, e) if e.kind == T.HARDLINK else e

    def attrs(self, path: str) -> dict:
        e = self.entries[path]
        body = self.target(e)
        nlink = 2 + self.nlink[path] if e.kind == T.DIR else 1 + self.nlink[body.path]
        size = body.size if body.kind == T.FILE else len(os.fsencode(e.link)) * (
            e.kind == T.SYMLINK)
        data = sum(ln for _, ln in body.extents) if body.extents is not None else size
        mode = (T.TYPE_BITS[T.FILE] | body.mode) if e.kind == T.HARDLINK else e.st_mode
        return _attrs(mode, self.ino[path], nlink, body.uid, body.gid, size, body.mtime_ns,
                      rdev=e.rdev, blocks=(data + 511) // 512)


def _attrs(mode: int, ino: int, nlink: int, uid: int, gid: int, size: int, mtime_ns: int,
           rdev: int = 0, blocks: int = 0) -> dict:
    return {"st_mode": mode, "st_ino": ino, "st_nlink": nlink, "st_uid": uid, "st_gid": gid,
            "st_size": size, "st_rdev": rdev, "st_blocks": blocks, "st_blksize": 4096,
            "st_mtime": mtime_ns, "st_atime": mtime_ns, "st_ctime": mtime_ns}


class BrowseFS(mfusepy.Operations):
    """All snapshots of a repository (*only* None) or the tree of one snapshot."""

    use_ns = True

    def __init__(self, view: RepoView, only: Snapshot | None = None, *,
                 state: bool = False, on_ready=None) -> None:
        self.view = view
        self.only = only
        self.only_state = state
        self.on_ready = on_ready
        self._mutex = threading.RLock()
        self.snaps: dict[int, dict[str, Snapshot]] = {}
        self.loaded_at = 0.0
        self.trees: collections.OrderedDict[str, TreeIndex] = collections.OrderedDict()
        self.numbers: dict[str, int] = {}  # snapshot id -> number (stable inode bases)
        self.handles: dict[int, tuple[Entry, FileMap]] = {}
        self.fh = itertools.count(1)
        self.mounted_ns = time.time_ns()
        if only is None:
            self._refresh(force=True)

    # --- snapshots and trees -------------------------------------------------------------
    def _refresh(self, force: bool = False) -> None:
        with self._mutex:
            if not force and time.monotonic() - self.loaded_at < REFRESH_SECONDS:
                return
            snaps: dict[int, dict[str, Snapshot]] = collections.defaultdict(dict)
            for s in self.view.snapshots():
                snaps[s.ctid][s.stamp] = s
            self.snaps = dict(snaps)
            self.loaded_at = time.monotonic()

    def _tree(self, snap: Snapshot, state: bool = False) -> TreeIndex:
        key = snap.id + STATE_SUFFIX if state else snap.id
        with self._mutex:
            t = self.trees.get(key)
            if t is not None:
                self.trees.move_to_end(key)
                return t
            number = self.numbers.setdefault(key, len(self.numbers) + 1)
        entries = self.view.tree(snap.id, state)  # outside the lock: may take a while
        t = TreeIndex.build(entries, number << SNAPSHOT_INO_SHIFT)
        with self._mutex:
            self.trees[key] = t
            while len(self.trees) > TREES_KEPT:
                self.trees.popitem(last=False)
        return t

    def _locate(self, path: str) -> tuple[str, object]:
        """What *path* is: ("root"|"ct"|"latest", ...) or ("tree", (TreeIndex, rel))."""
        parts = [p for p in path.split("/") if p]
        if self.only is not None:
            return "tree", (self._tree(self.only, self.only_state), "/".join(parts) or ".")
        if not parts:
            return "root", None
        if not parts[0].isdigit():
            raise mfusepy.FuseOSError(errno.ENOENT)
        ctid = int(parts[0])
        stamp = parts[1].removesuffix(STATE_SUFFIX) if len(parts) > 1 else ""
        if ctid not in self.snaps or (stamp and stamp not in self.snaps[ctid]
                                      and stamp != LATEST):
            self._refresh()
        stamps = self.snaps.get(ctid)
        if not stamps:
            raise mfusepy.FuseOSError(errno.ENOENT)
        if len(parts) == 1:
            return "ct", (ctid, stamps)
        if parts[1] == LATEST:
            if len(parts) > 2:  # the kernel follows the link itself; be lenient anyway
                parts[1] = max(stamps)
            else:
                return "latest", (ctid, stamps)
        state = parts[1].endswith(STATE_SUFFIX)
        snap = stamps.get(parts[1].removesuffix(STATE_SUFFIX))
        if snap is None or (state and not snap.has_state):
            raise mfusepy.FuseOSError(errno.ENOENT)
        return "tree", (self._tree(snap, state), "/".join(parts[2:]) or ".")

    def _tree_entry(self, path: str) -> tuple[TreeIndex, str, Entry]:
        kind, what = self._locate(path)
        if kind != "tree":
            raise mfusepy.FuseOSError(errno.EISDIR if kind != "latest" else errno.EINVAL)
        t, rel = what  # type: ignore[misc]
        e = t.entries.get(rel)
        if e is None:
            raise mfusepy.FuseOSError(errno.ENOENT)
        return t, rel, e

    # --- FUSE operations -------------------------------------------------------------------
    def init(self, path: str) -> None:
        if self.on_ready:
            self.on_ready()

    def getattr(self, path: str, fh: int | None = None) -> dict:
        kind, what = self._guard(self._locate, path)
        if kind == "root":
            return _attrs(stat.S_IFDIR | 0o755, 1, 2 + len(self.snaps), 0, 0, 0,
                          self.mounted_ns)
        if kind == "ct":
            ctid, stamps = what  # type: ignore[misc]
            newest = max(s.time for s in stamps.values())
            return _attrs(stat.S_IFDIR | 0o755, CT_INO + ctid, 2 + len(stamps), 0, 0, 0,
                          int(newest.timestamp() * 1e9))
        if kind == "latest":
            ctid, stamps = what  # type: ignore[misc]
            return _attrs(stat.S_IFLNK | 0o777, LATEST_INO + ctid, 1, 0, 0, len(max(stamps)),
                          self.mounted_ns)
        t, rel = what  # type: ignore[misc]
        if rel not in t.entries:
            raise mfusepy.FuseOSError(errno.ENOENT)
        return t.attrs(rel)

    def readdir(self, path: str, fh: int) -> list[tuple[str, dict, int]]:
        """Names with inode and type: with use_ino, a zero inode would hide the entry."""
        kind, what = self._guard(self._locate, path)
        if kind == "root":
            self._refresh()
            names = [(str(c), stat.S_IFDIR, CT_INO + c) for c in sorted(self.snaps)]
            return self._dirents(path, 1, names)
        if kind == "ct":
            self._refresh()
            ctid = what[0]  # type: ignore[index]
            names = []
            for stamp, snap in sorted(self.snaps.get(ctid, {}).items()):
                names.append((stamp, stat.S_IFDIR, 0))
                if snap.has_state:
                    names.append((stamp + STATE_SUFFIX, stat.S_IFDIR, 0))
            return self._dirents(path, CT_INO + ctid, [
                *names, (LATEST, stat.S_IFLNK, LATEST_INO + ctid)])
        if kind == "latest":
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        t, rel = what  # type: ignore[misc]
        e = t.entries.get(rel)
        if e is None:
            raise mfusepy.FuseOSError(errno.ENOENT)
        if e.kind != T.DIR:
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        prefix = "" if rel == "." else rel + "/"
        names = []
        for name in t.children.get(rel, []):
            child = t.entries[prefix + name]
            names.append((name, T.TYPE_BITS[child.kind], t.ino[prefix + name]))
        return self._dirents(path, t.ino[rel], names)

    def _dirents(self, path: str, ino: int, names: list[tuple[str, int, int]]
                 ) -> list[tuple[str, dict, int]]:
        out = [(".", {"st_mode": stat.S_IFDIR, "st_ino": ino}, 0),
               ("..", {"st_mode": stat.S_IFDIR, "st_ino": 1}, 0)]
        for name, mode, child_ino in names:
            if not child_ino:  # a snapshot directory not loaded yet: number it now
                child_ino = self._snapshot_root_ino(f"{path.strip('/')}/{name}")
            out.append((name, {"st_mode": mode, "st_ino": child_ino}, 0))
        return out

    def _snapshot_root_ino(self, sid: str) -> int:
        with self._mutex:
            number = self.numbers.setdefault(sid, len(self.numbers) + 1)
        return (number << SNAPSHOT_INO_SHIFT) + 1

    def readlink(self, path: str) -> str:
        kind, what = self._guard(self._locate, path)
        if kind == "latest":
            return max(what[1])  # type: ignore[index]
        if kind != "tree":
            raise mfusepy.FuseOSError(errno.EINVAL)
        t, rel = what  # type: ignore[misc]
        e = t.entries.get(rel)
        if e is None or e.kind != T.SYMLINK:
            raise mfusepy.FuseOSError(errno.EINVAL if e else errno.ENOENT)
        return e.link

    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise mfusepy.FuseOSError(errno.EROFS)
        t, _, e = self._guard(self._tree_entry, path)
        body = t.target(e)
        if body.kind != T.FILE:
            raise mfusepy.FuseOSError(errno.EINVAL)
        fh = next(self.fh)
        with self._mutex:
            self.handles[fh] = (body, FileMap(body))
        return fh

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        entry, fmap = self.handles[fh]
        try:
            return self.view.read(fmap, offset, size)
        except VzError as err:
            log.error("%s: %s", entry.path, err)
            raise mfusepy.FuseOSError(errno.EIO) from None

    def release(self, path: str, fh: int) -> int:
        with self._mutex:
            self.handles.pop(fh, None)
        return 0

    def listxattr(self, path: str) -> list[str]:
        kind, _ = self._guard(self._locate, path)
        if kind != "tree":
            return []
        t, _, e = self._guard(self._tree_entry, path)
        return sorted(t.target(e).xattrs)

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        kind, _ = self._guard(self._locate, path)
        if kind == "tree":
            t, _, e = self._guard(self._tree_entry, path)
            value = t.target(e).xattrs.get(name)
            if value is not None:
                return value
        raise mfusepy.FuseOSError(errno.ENODATA)

    def statfs(self, path: str) -> dict:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_namemax": 255}

    def destroy(self, path: str) -> None:
        self.view.close()

    @staticmethod
    def _guard(fn, *args):
        """Run a lookup; repository trouble becomes EIO (logged), not a crashed mount."""
        try:
            return fn(*args)
        except VzError as err:
            log.error("%s", err)
            raise mfusepy.FuseOSError(errno.EIO) from None
        except ValueError as err:  # an unsafe path in a damaged tree
            log.error("%s", err)
            raise mfusepy.FuseOSError(errno.EIO) from None


def mount(view: RepoView, mountpoint: str, only: Snapshot | None = None, *,
          state: bool = False, allow_other: bool = False, debug: bool = False,
          on_ready=None) -> None:
    """Serve *view* on *mountpoint* until it is unmounted or the process gets SIGINT/SIGTERM
    (libfuse then unmounts)."""
    options = {"foreground": True, "ro": True, "default_permissions": True, "use_ino": True,
               "fsname": f"vzbackup:{view.url}", "subtype": "vzbackup", "kernel_cache": True,
               "attr_timeout": 60, "entry_timeout": 60, "debug": debug}
    if allow_other:
        options["allow_other"] = True
    mfusepy.FUSE(BrowseFS(view, only, state=state, on_ready=on_ready), mountpoint, **options)
