"""Classic vzdump archives (``vzdump-openvz-CTID-YYYY_MM_DD-HH_MM_SS.tar.zst``), out and in.

Layout, as vzdump makes it for OpenVZ: the CT's private area with member names ``./...``, and
the CT's config as ``./etc/vzdump/vps.conf``. We write the config as the first member (as
Proxmox does with pct.conf) so it can be read without decompressing everything, and leave the
CT's own ``/etc/vzdump`` out, as vzdump does.

Export writes POSIX.1-2001 (pax) tar that GNU tar reads: numeric owners only, mtimes to the
nanosecond, xattrs as ``SCHILY.xattr.*`` records, POSIX ACLs also as ``SCHILY.acl.access`` /
``SCHILY.acl.default`` text (what ``tar --acls`` restores), hardlinks, device nodes, fifos.
Sparse files are stored in full (same size and content, holes written as zeros). The stream
is zstd with a content checksum. Entries go in depth-first, like ``find`` lists them.

Import reads .tar, .tar.gz/.tgz, .tar.xz and .tar.zst (not .tar.lzo), with the checks of
vzbackup.safetar's safe extraction: nothing is ever written outside the destination. It
restores owners, modes, nanosecond mtimes (symlinks included), hardlinks, xattrs and ACLs
(from SCHILY.xattr, or from SCHILY.acl text for archives of ``tar --acls``), and returns the
text of vps.conf, which is never written into the tree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import io
import logging
import os
import posixpath
import pwd
import re
import stat
import struct
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import zstandard

from vzbackup.backup.defaults import ExcludeMatcher
from vzbackup.constants import MAX_CTID
from vzbackup.errors import (
    ConfigError,
    ExistsError,
    NotFoundError,
    RuntimeFailure,
    UsageError,
    VzError,
)
from vzbackup.safetar import (
    ARCHIVE_ERRORS,
    IdShift,
    UnsafeMember,
    extract,
    open_stream,
    remove_partial,
)

log = logging.getLogger("vzbackup.vzdump")

ARCHIVE_SUFFIXES = ("tar", "tgz", "tar.gz", "tar.lzo", "tar.zst", "tar.xz")
_NAME = re.compile(
    r"vzdump-openvz-([0-9]+)-([0-9]{4})_([0-9]{2})_([0-9]{2})-([0-9]{2})_([0-9]{2})_([0-9]{2})"
    r"\.(?:" + "|".join(re.escape(s) for s in ARCHIVE_SUFFIXES) + ")"
)
CONF_MEMBER = "./etc/vzdump/vps.conf"
_CONF_PATH = "etc/vzdump/vps.conf"
_VZDUMP_DIR = "etc/vzdump"  # vzdump's own: the CT's copy is left out of an export
CONF_MAX = 1 << 20
KINDS = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "chardev": tarfile.CHRTYPE,
    "blockdev": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}
_LZO_MAGIC = b"\x89LZO\x00\r\n\x1a\n"
_XATTR = "SCHILY.xattr."
_READ_SIZE = 1 << 20


# ------------------------------------------------------------------------------------ names


def archive_name(ctid: int, when: datetime) -> str:
    """``vzdump-openvz-CTID-YYYY_MM_DD-HH_MM_SS.tar.zst``, in local time like vzdump's."""
    if isinstance(ctid, bool) or not isinstance(ctid, int) or not 0 <= ctid <= MAX_CTID:
        raise UsageError(f"invalid CTID {ctid!r} for an archive name")
    local = when.astimezone() if when.tzinfo else when
    return f"vzdump-openvz-{ctid}-{local:%Y_%m_%d-%H_%M_%S}.tar.zst"


def parse_archive_name(name: str) -> tuple[int, datetime] | None:
    """(CTID, local time) of a vzdump OpenVZ archive name (any vzdump suffix), else None."""
    m = _NAME.fullmatch(os.path.basename(name))
    if not m or int(m.group(1)) > MAX_CTID:
        return None
    try:
        when = datetime(*(int(g) for g in m.groups()[1:]))  # type: ignore[misc]
    except ValueError:
        return None
    return int(m.group(1)), when.astimezone()


# ----------------------------------------------------------------------------------- export


@dataclass
class ExportEntry:
    """One entry of the tree to export; the caller fills it (or uses ``entries_from_dir``).

    ``path`` is relative and posix ("." is the root); ``kind`` a key of ``KINDS``; ``mode``
    the permission bits (setuid/setgid/sticky included); ``link_target`` a symlink's target or
    a hardlink's target path (exported before it); ``rdev`` a device number (``os.makedev``);
    ``read`` yields a file's bytes, ``size`` of them in all.
    """

    path: str
    kind: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    link_target: str | None = None
    rdev: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    read: Callable[[], Iterator[bytes]] | None = None


class _Changed(Exception):
    """A file's content did not match its size while it was read."""


class _Content(io.RawIOBase):
    """A file-like view of an entry's ``read()`` chunks that insists on exactly ``size`` bytes."""

    def __init__(self, entry: ExportEntry) -> None:
        self._entry = entry
        self._chunks = iter(entry.read()) if entry.read else iter(())
        self._buf = memoryview(b"")
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        while not self._buf:
            chunk = self._next()
            if chunk is None:
                if self.total < self._entry.size:
                    raise _Changed(
                        f"{self._entry.path}: got {self.total} bytes of {self._entry.size} "
                        "(did it shrink while being read?)"
                    )
                return 0
            self._buf = memoryview(chunk)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def _next(self) -> bytes | None:
        try:
            chunk = next(self._chunks)
        except StopIteration:
            return None
        except OSError as e:
            raise _Changed(f"{self._entry.path}: read failed: {e.strerror or e}") from None
        self.total += len(chunk)
        if self.total > self._entry.size:
            raise _Changed(
                f"{self._entry.path}: more than its {self._entry.size} bytes "
                "(did it grow while being read?)"
            )
        return chunk

    def finish(self) -> None:
        """Make sure nothing follows the expected size."""
        while self._next() is not None:  # raises on any byte beyond the size
            pass


def _member_name(path: str, what: str = "path") -> str:
    if path in ("", ".", "./"):
        return "."
    parts = path.split("/")
    if "\0" in path or any(p in ("", ".", "..") for p in parts):
        raise UsageError(f"invalid {what} {path!r} for an archive member")
    return "./" + path


def _pax_time(ns: int) -> str:
    sign = "-" if ns < 0 else ""
    sec, frac = divmod(abs(ns), 10**9)
    return f"{sign}{sec}.{frac:09d}"


def _tarinfo(e: ExportEntry, name: str) -> tarfile.TarInfo:
    if e.kind not in KINDS:
        raise UsageError(f"{e.path}: unknown entry kind {e.kind!r} (one of {', '.join(KINDS)})")
    if name == "." and e.kind != "dir":
        raise UsageError(f"the root entry must be a directory, not a {e.kind}")
    info = tarfile.TarInfo(name)
    info.type = KINDS[e.kind]
    info.mode = e.mode & 0o7777
    info.uid, info.gid = e.uid, e.gid
    info.uname = info.gname = ""  # numeric owners only, like vzdump's --numeric-owner
    info.mtime = e.mtime_ns // 10**9
    pax: dict[str, str] = {}
    if e.mtime_ns % 10**9:
        pax["mtime"] = _pax_time(e.mtime_ns)
    if e.kind == "file":
        if e.size < 0 or (e.size and e.read is None):
            raise UsageError(f"{e.path}: a file of {e.size} bytes needs a read function")
        info.size = e.size
    elif e.kind == "symlink":
        if not e.link_target or "\0" in e.link_target:
            raise UsageError(f"{e.path}: symlink without a valid target")
        info.linkname = e.link_target
    elif e.kind == "hardlink":
        info.linkname = _member_name(e.link_target or "", "hardlink target")
    elif e.kind in ("chardev", "blockdev"):
        info.devmajor, info.devminor = os.major(e.rdev), os.minor(e.rdev)
    for key, value in sorted(e.xattrs.items()):
        pax[_XATTR + key] = value.decode("utf-8", "surrogateescape")
        if key.startswith("system.posix_acl_"):
            text = _acl_to_text(value)
            if text is not None:  # GNU tar --acls reads these
                pax["SCHILY.acl." + key.removeprefix("system.posix_acl_")] = text
    info.pax_headers = pax
    return info


def _conf_info(data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(CONF_MEMBER)
    info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
    info.uname = info.gname = ""
    return info


def _write_members(tf: tarfile.TarFile, entries: Iterable[ExportEntry], conf_text: str) -> None:
    data = conf_text.encode()
    tf.addfile(_conf_info(data), io.BytesIO(data))
    written: dict[str, str] = {}  # member name -> kind
    left_out: set[str] = set()
    open_dirs = ["."]  # the directories whose contents may still follow, innermost last
    for e in entries:
        name = _member_name(e.path)
        if name in written or name in left_out:
            raise UsageError(f"{e.path}: given twice")
        if name[2:] == _VZDUMP_DIR or name[2:].startswith(_VZDUMP_DIR + "/"):
            left_out.add(name)
            continue
        info = _tarinfo(e, name)
        # Depth-first order, or GNU tar sets a directory's mtime before all of it is there.
        if name == "." and written:
            raise UsageError("the root entry must come first")
        parent = "." if name == "." else posixpath.dirname(name)
        while open_dirs and open_dirs[-1] != parent:
            open_dirs.pop()
        if not open_dirs:
            raise UsageError(
                f"{e.path}: out of order: its directory {parent} is not being listed",
                hint="entries must come depth-first (a directory, then all below it, as find "
                "lists them); vzbackup.backup.vzdump_archive.preorder() sorts them",
            )
        if e.kind == "dir" and name != ".":
            open_dirs.append(name)
        if e.kind == "hardlink":
            if info.linkname in left_out:
                left_out.add(name)
                continue
            if written.get(info.linkname, "dir") == "dir":
                raise UsageError(
                    f"{e.path}: hardlink to {e.link_target!r}, which is not a non-directory "
                    "exported before it"
                )
        if e.kind == "file":
            content = _Content(e)
            tf.addfile(info, io.BufferedReader(content))
            content.finish()
        else:
            tf.addfile(info)
        written[name] = e.kind


def _workers(threads: int) -> int:
    """zstandard's thread count for vzdump's ``zstd`` value (0 = half of the CPUs)."""
    n = threads or max(1, (os.cpu_count() or 2) // 2)
    return n if n > 1 else 0  # 0: compress in this thread


def export_tar(
    out: Path,
    entries: Iterable[ExportEntry],
    conf_text: str,
    *,
    level: int = 3,
    threads: int = 0,
) -> int:
    """Write a vzdump archive of *entries* with *conf_text* as vps.conf; returns its size.

    *entries* must come depth-first (a directory, then everything below it, as ``find`` lists
    them; ``entries_from_dir`` walks so, ``preorder`` sorts other listings): GNU tar sets a
    directory's mtime when the archive moves past it. The archive is built as
    ``<out>.partial`` and renamed into place; on any failure the partial file is removed.
    *threads* follows vzdump's ``zstd`` option (0 = half the CPUs).
    """
    out = Path(out)
    if isinstance(level, bool) or not 1 <= level <= 19:
        raise UsageError(f"zstd level must be 1..19, not {level!r}")
    if threads < 0:
        raise UsageError(f"zstd threads must be 0 or more, not {threads}")
    if out.exists() or out.is_symlink():
        raise ExistsError(f"archive {out} already exists")
    partial = out.with_name(out.name + ".partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise ExistsError(
            f"{partial} exists: another export is running or one was interrupted",
            hint=f"remove {partial} if no export is running",
        ) from None
    except OSError as e:
        raise RuntimeFailure(f"cannot create {partial}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as raw:
            cctx = zstandard.ZstdCompressor(
                level=level, threads=_workers(threads), write_checksum=True
            )
            with (
                cctx.stream_writer(raw, closefd=False) as zw,
                tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tf,
            ):
                tf.copybufsize = _READ_SIZE
                _write_members(tf, entries, conf_text)
            raw.flush()
            os.fsync(raw.fileno())
        os.rename(partial, out)
    except BaseException as e:
        partial.unlink(missing_ok=True)
        if isinstance(e, _Changed):
            raise RuntimeFailure(f"exporting {out} failed: {e}") from None
        if isinstance(e, OSError | tarfile.TarError | zstandard.ZstdError):
            raise RuntimeFailure(f"writing {out} failed: {e}") from e
        raise
    return out.stat().st_size


def entries_from_dir(
    root: Path, *, exclude: ExcludeMatcher | None = None, one_file_system: bool = True
) -> Iterator[ExportEntry]:
    """Walk *root* (a CT's private area or a snapshot of it) into export entries.

    Depth-first and sorted, like ``find``; hardlinks after their first name. Sockets are
    skipped (tar can't store them), so are excluded paths and, with *one_file_system*,
    whatever is mounted below the root (the mount point itself is kept, like tar's
    ``--one-file-system``).
    """
    root = Path(root)
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        raise NotFoundError(f"{root} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{root} is not a directory")
    seen: dict[tuple[int, int], str] = {}
    yield _entry(str(root), ".", st, seen)
    stack = [_children(str(root), ".")]
    while stack:
        child = next(stack[-1], None)
        if child is None:
            stack.pop()
            continue
        path, sub, cst = child
        is_dir = stat.S_ISDIR(cst.st_mode)
        if stat.S_ISSOCK(cst.st_mode) or (exclude and exclude.excluded(sub, is_dir)):
            continue
        yield _entry(path, sub, cst, seen)
        if is_dir and (not one_file_system or cst.st_dev == st.st_dev):
            stack.append(_children(path, sub))


def _children(dirpath: str, rel: str) -> Iterator[tuple[str, str, os.stat_result]]:
    with os.scandir(dirpath) as it:
        names = sorted(d.name for d in it)
    for name in names:
        path = os.path.join(dirpath, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:  # removed meanwhile (a live CT)
            continue
        yield path, name if rel == "." else f"{rel}/{name}", st


def preorder(entries: Iterable[ExportEntry]) -> list[ExportEntry]:
    """*entries* in the depth-first order export_tar needs (a directory, then all below it).

    For trees listed in another order (say per directory, subdirectories after files). When a
    hardlink now comes before its target, it takes the data and the target becomes the link.
    """

    def key(e: ExportEntry) -> list[str]:
        return [] if e.path in ("", ".") else e.path.split("/")

    ordered = sorted(entries, key=key)
    targets = {e.link_target for e in ordered if e.kind == "hardlink"}
    data_of = {e.path: e for e in ordered if e.kind != "hardlink" and e.path in targets}
    carrier: dict[str, str] = {}  # target path -> the path that now carries the data
    out = []
    for e in ordered:
        if e.kind == "hardlink":
            target = e.link_target or ""
            if target not in data_of:
                raise UsageError(f"{e.path}: hardlink to {target!r}, which is not in the tree")
            if target not in carrier:
                carrier[target] = e.path
                out.append(dataclasses.replace(data_of[target], path=e.path))
            else:
                out.append(dataclasses.replace(e, link_target=carrier[target]))
        elif e.path in carrier:
            link = ExportEntry(e.path, "hardlink", e.mode, e.uid, e.gid, e.mtime_ns)
            link.link_target = carrier[e.path]
            out.append(link)
        else:
            if e.path in targets:
                carrier[e.path] = e.path
            out.append(e)
    return out


_KIND_OF_TYPE = {
    stat.S_IFDIR: "dir",
    stat.S_IFREG: "file",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
    stat.S_IFIFO: "fifo",
}


def _entry(
    path: str, rel: str, st: os.stat_result, seen: dict[tuple[int, int], str]
) -> ExportEntry:
    kind = _KIND_OF_TYPE.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        raise UsageError(f"{path}: unsupported file type {stat.S_IFMT(st.st_mode):o}")
    e = ExportEntry(rel, kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
    if kind != "dir" and st.st_nlink > 1:
        first = seen.setdefault((st.st_dev, st.st_ino), rel)
        if first != rel:
            e.kind, e.link_target = "hardlink", first
            return e
    e.xattrs = _xattrs(path)
    if kind == "symlink":
        e.link_target = os.readlink(path)
    elif kind == "file":
        e.size = st.st_size
        e.read = lambda: _read_file(path)
    elif kind in ("chardev", "blockdev"):
        e.rdev = st.st_rdev
    return e


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:  # not supported on this filesystem
        return {}
    out = {}
    for name in sorted(names):
        with contextlib.suppress(OSError):  # removed in between
            out[name] = os.getxattr(path, name, follow_symlinks=False)
    return out


def _read_file(path: str) -> Iterator[bytes]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb", buffering=0) as f:
        while chunk := f.read(_READ_SIZE):
            yield chunk


# -------------------------------------------------------------------------------- POSIX ACLs

# posix_acl_xattr: u32 version 2, then (u16 tag, u16 perm, u32 id) entries, little-endian.
_ACL_VERSION = 2
_ACL_UNDEFINED_ID = 0xFFFFFFFF
_ACL_TAGS = {0x01: ("user", False), 0x02: ("user", True), 0x04: ("group", False),
             0x08: ("group", True), 0x10: ("mask", False), 0x20: ("other", False)}
_ACL_CODES = {(name, named): code for code, (name, named) in _ACL_TAGS.items()}
_ACL_SHORT = {"u": "user", "g": "group", "m": "mask", "o": "other"}


def _acl_to_text(data: bytes) -> str | None:
    """The long text form with numeric ids, as GNU tar stores it; None if *data* isn't an ACL."""
    if len(data) < 4 or (len(data) - 4) % 8 or struct.unpack_from("<I", data)[0] != _ACL_VERSION:
        return None
    lines = []
    for offset in range(4, len(data), 8):
        tag, perm, ident = struct.unpack_from("<HHI", data, offset)
        if tag not in _ACL_TAGS:
            return None
        name, named = _ACL_TAGS[tag]
        rwx = "".join(c if perm & bit else "-" for c, bit in (("r", 4), ("w", 2), ("x", 1)))
        lines.append(f"{name}:{ident if named else ''}:{rwx}\n")
    return "".join(lines)


def _acl_from_text(text: str) -> bytes:
    """Binary ACL from its text form (``user::rw-,user:1000:r--,...``); ValueError if bad."""
    entries = []
    for raw in re.split(r"[,\n]", text):
        item = raw.split("#", 1)[0].strip()
        if not item:
            continue
        parts = item.split(":")
        if len(parts) != 3:
            raise ValueError(f"bad ACL entry {item!r}")
        tag, qualifier, perms = (p.strip() for p in parts)
        tag = _ACL_SHORT.get(tag, tag)
        code = _ACL_CODES.get((tag, bool(qualifier)))
        if code is None or not re.fullmatch(r"[rwx-]{1,3}", perms):
            raise ValueError(f"bad ACL entry {item!r}")
        bits = sum(bit for c, bit in (("r", 4), ("w", 2), ("x", 1)) if c in perms)
        entries.append((code, _acl_id(tag, qualifier) if qualifier else _ACL_UNDEFINED_ID, bits))
    entries.sort()
    body = b"".join(struct.pack("<HHI", code, bits, ident) for code, ident, bits in entries)
    return struct.pack("<I", _ACL_VERSION) + body


def _acl_id(tag: str, qualifier: str) -> int:
    if qualifier.isdigit():
        return int(qualifier)
    try:  # a name: only the host's databases can resolve it
        if tag == "user":
            return pwd.getpwnam(qualifier).pw_uid
        return grp.getgrnam(qualifier).gr_gid
    except KeyError:
        raise ValueError(f"unknown {tag} {qualifier!r} in ACL") from None


# ----------------------------------------------------------------------------------- import


def _refuse_lzo(archive: Path) -> None:
    with archive.open("rb") as raw:
        if raw.read(len(_LZO_MAGIC)) == _LZO_MAGIC:
            raise UsageError(
                f"{archive}: .tar.lzo archives are not supported",
                hint=f"convert it first: lzop -dc {archive} | zstd -o ARCHIVE.tar.zst",
            )


def _relative(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/") or "."


def _read_conf(tf: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    if not member.isreg():
        raise ConfigError(f"{CONF_MEMBER} in the archive is not a regular file")
    if member.size > CONF_MAX:
        raise ConfigError(f"{CONF_MEMBER} in the archive is too large ({member.size} bytes)")
    f = tf.extractfile(member)
    data = f.read() if f else b""
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{CONF_MEMBER} in the archive is not UTF-8 text") from None


def _pax_ns(value: str | None) -> int | None:
    """A pax time (``-12.5``, ``1700000000.123456789``) in ns, exactly; None if absent/bad."""
    m = re.fullmatch(r"(-?)([0-9]+)(?:\.([0-9]*))?", value or "")
    if not m:
        return None
    ns = int(m.group(2)) * 10**9 + int((m.group(3) or "").ljust(9, "0")[:9])
    return -ns if m.group(1) else ns


class _Extraction:
    """State of one import: vps.conf's text and the warnings already given."""

    def __init__(self, root: str, allow_devices: bool, shift: IdShift | None) -> None:
        self.root = root
        self.allow_devices = allow_devices
        self.shift = shift
        self.conf: str | None = None
        self.lxc = False
        self._warned: set[tuple[str, int]] = set()

    def run(self, archive: Path) -> None:
        _refuse_lzo(archive)
        with open_stream(archive) as stream:
            extract(
                stream, self.root, shift=self.shift, allow_devices=self.allow_devices,
                select=self._select, finish=self._finish,
            )

    def _select(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> bool:
        """vps.conf is read, never written into the tree; vzdump's own directory stays out."""
        rel = _relative(member.name)
        if rel == _CONF_PATH:
            self.conf = _read_conf(tf, member)
            return False
        self.lxc |= rel == "etc/vzdump/pct.conf"
        return rel != _VZDUMP_DIR

    def _finish(self, member: tarfile.TarInfo, path: str) -> None:
        """xattrs and ACLs, then the exact mtime (after all else that could touch it)."""
        pax = member.pax_headers
        xattrs = {
            k[len(_XATTR) :]: v.encode("utf-8", "surrogateescape")
            for k, v in pax.items()
            if k.startswith(_XATTR)
        }
        for kind in ("access", "default"):
            text, name = pax.get(f"SCHILY.acl.{kind}"), f"system.posix_acl_{kind}"
            if text is not None and name not in xattrs:
                try:
                    xattrs[name] = _acl_from_text(text)
                except ValueError as e:
                    self._warn(member.name, name, 0, str(e))
        for name, value in xattrs.items():
            if member.issym() and name.startswith("system.posix_acl_"):
                continue  # symlinks have no ACLs
            if self.shift is not None:
                value = self.shift.shift_xattr(name, value)
            try:
                os.setxattr(path, name, value, follow_symlinks=False)
            except OSError as e:
                self._warn(member.name, name, e.errno or 0, e.strerror or str(e))
        ns = _pax_ns(pax.get("mtime"))
        if ns is None:
            ns = int(member.mtime) * 10**9
        os.utime(path, ns=(ns, ns), follow_symlinks=False)

    def _warn(self, member: str, xattr: str, errno: int, reason: str) -> None:
        if (xattr, errno) not in self._warned:
            self._warned.add((xattr, errno))
            log.warning("cannot restore %s on %s (and maybe others): %s", xattr, member, reason)


def import_tar(
    archive: Path, dest: Path, *, allow_devices: bool = True, shift: IdShift | None = None
) -> str:
    """Extract a vzdump archive into the new directory *dest*; returns vps.conf's text.

    The tree is built in ``<dest>.partial`` and renamed to *dest*; nothing is left behind on
    failure. Device nodes are allowed by default (a CT's /dev needs them). *shift* rewrites
    owners, ACLs and file capabilities on the way in (an unprivileged CT's id map).
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise NotFoundError(f"archive {archive} does not exist")
    if dest.exists() or dest.is_symlink():
        raise ExistsError(f"cannot import into {dest}: it already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    try:
        partial.mkdir(mode=0o700)
    except FileExistsError:
        raise ExistsError(
            f"{partial} exists: another import is running or one was interrupted",
            hint=f"remove {partial} if no import is running",
        ) from None
    job = _Extraction(os.path.realpath(partial), allow_devices, shift)
    try:
        try:
            job.run(archive)
            if job.conf is None:
                hint = (
                    "this is a Proxmox LXC archive (pct.conf), not an OpenVZ one"
                    if job.lxc
                    else "vzdump archives of OpenVZ containers carry it"
                )
                raise NotFoundError(f"archive {archive} has no {CONF_MEMBER}", hint=hint)
            if dest.exists() or dest.is_symlink():
                raise ExistsError(f"cannot import into {dest}: it appeared meanwhile")
            os.rename(partial, dest)
        except BaseException:
            remove_partial(partial)
            raise
    except VzError:
        raise
    except UnsafeMember as e:
        raise RuntimeFailure(f"archive {archive} has an unsafe member {e.name}: {e}") from None
    except ARCHIVE_ERRORS as e:
        raise RuntimeFailure(f"archive {archive} is corrupt: {e}") from None
    except (OSError, tarfile.TarError) as e:
        raise RuntimeFailure(f"importing {archive} into {dest} failed: {e}") from e
    return job.conf
