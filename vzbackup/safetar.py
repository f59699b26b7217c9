"""Safe, streaming tar extraction of root filesystems: OS templates and vzdump archives.

Extraction streams the archive (no seeking), keeps everything a root filesystem needs (device
nodes, setuid/sticky modes, numeric uid/gid, symlinks, hardlinks, mtimes) and refuses members
that would write outside the destination. tarfile's own filters (3.11.4+) don't fit: both strip
setuid/sticky bits (``/tmp`` loses 1777) and drop a leading '/' instead of refusing it; 'data'
also rejects device nodes and absolute symlinks, while 'tar' lets a hardlink to /etc/passwd
through (3.11.7). So extraction runs with the 'fully_trusted' filter and this module checks each
member itself, against the tree on disk, right before it is written.

Decompression validates stream integrity: tarfile's 'r|gz'/'r|xz' and zstandard's stream_reader
accept a stream cut at a member boundary (or missing its CRC trailer) as a shorter archive, so
gzip/lzma file objects and a strict zstd reader are used instead and drained to their end.

Ownership can be shifted on the way in (an unprivileged CT's id map): ``extract(..., shift=S)``
writes ``S.shift_id(uid)``/``S.shift_id(gid)`` for every member, and callers that restore
xattrs pass ACLs and file capabilities through ``S.shift_xattr``.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import lzma
import os
import shutil
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Protocol

import zstandard

_MAGIC = {
    b"\x28\xb5\x2f\xfd": "zst",
    b"\xfd7zXZ\x00": "xz",
    b"\x1f\x8b": "gz",
}
# Extraction filters exist from 3.11.4 (and 3.12+); 3.14 defaults to 'data', so be explicit.
_FILTER_KWARGS: dict[str, str] = (
    {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
)
CHUNK = 1 << 16


class UnsafeMember(Exception):
    """A member that would write outside the destination."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(reason)
        self.name = name


class CorruptArchive(Exception):
    """The archive's data is damaged or inconsistent."""


# what a truncated or garbled archive raises, whatever its compression
ARCHIVE_ERRORS = (
    CorruptArchive,
    tarfile.ReadError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    gzip.BadGzipFile,
    zstandard.ZstdError,
)


class IdShift(Protocol):
    """Ownership rewrite applied while extracting (e.g. a CT's user-namespace id map)."""

    def shift_id(self, node_id: int) -> int:
        """The id to write for a member's uid or gid (one map for both)."""
        ...

    def shift_xattr(self, name: str, value: bytes) -> bytes:
        """An xattr's value with the ids inside it shifted (POSIX ACLs, security.capability)."""
        ...


# ---------------------------------------------------------------------------- decompression


class _ZstdReader(io.RawIOBase):
    """Streaming zstd decoder that raises EOFError on a truncated frame.

    Input is fed in small slices so one call's output stays bounded (~32000:1 worst case).
    """

    _FEED = 2048

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._dobj = self._dctx.decompressobj()
        self._started = False
        self._in = b""  # compressed input read but not yet fed, from self._in_pos
        self._in_pos = 0
        self._out = b""  # decoded output not yet returned, from self._out_pos
        self._out_pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        while self._out_pos >= len(self._out):
            if not self._decode_more():
                return 0
        n = min(len(buf), len(self._out) - self._out_pos)
        buf[:n] = self._out[self._out_pos : self._out_pos + n]
        self._out_pos += n
        return n

    def _decode_more(self) -> bool:
        """Feed one slice of input; False at a clean end of the stream."""
        if self._in_pos >= len(self._in):
            self._in, self._in_pos = self._raw.read(CHUNK), 0
            if not self._in:
                if not self._started or not self._dobj.eof:
                    raise EOFError("zstd stream ends in the middle of a frame")
                return False
        if self._dobj.eof:  # another frame follows (pzstd, concatenated files)
            self._dobj = self._dctx.decompressobj()
        self._started = True
        end = self._in_pos + self._FEED
        self._out, self._out_pos = self._dobj.decompress(self._in[self._in_pos : end]), 0
        self._in_pos = end
        if self._dobj.eof and self._dobj.unused_data:
            self._in, self._in_pos = self._dobj.unused_data + self._in[end:], 0
        return True


@contextlib.contextmanager
def open_stream(archive: Path) -> Iterator[IO[bytes]]:
    """The archive's tar stream: plain tar, or zstd/xz/gzip sniffed from the magic bytes."""
    with Path(archive).open("rb") as raw:
        head = raw.read(263)
        raw.seek(0)
        if head[257:262] == b"ustar":
            yield raw
            return
        kind = next((k for magic, k in _MAGIC.items() if head.startswith(magic)), None)
        if kind is None:
            raise CorruptArchive("not a tar, zstd, xz or gzip stream")
        if kind == "zst":
            with io.BufferedReader(_ZstdReader(raw), CHUNK) as zst:
                yield zst
        elif kind == "xz":
            with lzma.LZMAFile(raw) as xz:
                yield xz
        else:
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                yield gz


# ------------------------------------------------------------------------------- extraction


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def _bad_path(name: str) -> bool:
    return not name or name.startswith("/") or "\0" in name or ".." in name.split("/")


def check_member(member: tarfile.TarInfo, root: str) -> None:
    """Refuse *member* if extracting it, given what is on disk now, could touch outside *root*."""
    name = member.name
    if _bad_path(name):
        raise UnsafeMember(name, "absolute path or '..' component")
    parent = os.path.realpath(os.path.join(root, os.path.dirname(name)))
    if not _inside(parent, root):
        raise UnsafeMember(name, f"its directory resolves to {parent}, outside the destination")
    target = os.path.join(parent, os.path.basename(name))
    if member.issym() or member.islnk():
        # Links replace the final component instead of following it.
        if os.path.normpath(target) == root:
            raise UnsafeMember(name, "a link cannot replace the root directory")
    else:
        real = os.path.realpath(target)
        if not _inside(real, root):
            raise UnsafeMember(name, f"it would be written through a symlink to {real}")
    if member.islnk():
        link = member.linkname
        if _bad_path(link):
            raise UnsafeMember(name, f"hardlink to {link!r} points outside the tree")
        real = os.path.realpath(os.path.join(root, link))
        if not _inside(real, root):
            raise UnsafeMember(name, f"hardlink to {link!r} resolves to {real}, outside the tree")
        if not os.path.exists(real) or os.path.isdir(real):
            raise CorruptArchive(f"hardlink {name} refers to {link!r}, not extracted before it")


def _set_dir_attrs(member: tarfile.TarInfo, path: str, root: str) -> None:
    """Apply a directory member's owner, mode and mtime (deferred, like tarfile does)."""
    if os.path.islink(path) or not _inside(os.path.realpath(path), root):
        raise UnsafeMember(member.name, "directory was replaced by a symlink")
    if os.geteuid() == 0:
        os.chown(path, member.uid, member.gid, follow_symlinks=False)
    os.chmod(path, member.mode)  # after chown, which clears setgid
    os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)


class StrictTarInfo(tarfile.TarInfo):
    """TarInfo whose reader fails on a damaged header (tarfile takes one for the archive's end)."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:  # a zero block: the regular end-of-archive marker
            raise
        except tarfile.EmptyHeaderError:
            raise CorruptArchive(
                f"tar data ends without an end-of-archive marker at {tf.offset}"
            ) from None
        except tarfile.HeaderError as e:
            raise CorruptArchive(f"damaged tar header at offset {tf.offset}: {e}") from None


def extract(
    stream: IO[bytes],
    root: str,
    *,
    shift: IdShift | None = None,
    allow_devices: bool = True,
    select: Callable[[tarfile.TarFile, tarfile.TarInfo], bool] | None = None,
    finish: Callable[[tarfile.TarInfo, str], None] | None = None,
) -> None:
    """Extract the tar *stream* into the existing empty directory *root* (a realpath).

    *select(tf, member)* may consume a member and return False to keep it out of the tree;
    *finish(member, path)* runs once a member is complete on disk (directories last, after
    their attributes), e.g. to restore xattrs. Raises UnsafeMember or CorruptArchive (or one
    of ARCHIVE_ERRORS); the caller removes the half-made tree.
    """
    directories: list[tarfile.TarInfo] = []
    with tarfile.open(fileobj=stream, mode="r|", errorlevel=2, tarinfo=StrictTarInfo) as tf:
        for member in tf:
            if select is not None and not select(tf, member):
                continue
            if (member.ischr() or member.isblk()) and not allow_devices:
                raise UnsafeMember(member.name, "device nodes are not allowed here")
            check_member(member, root)
            if shift is not None:
                member.uid, member.gid = shift.shift_id(member.uid), shift.shift_id(member.gid)
            # Directories get their attributes at the end; a hardlink shares its target's inode,
            # whose attributes it must not overwrite (GNU tar doesn't either).
            attrs = not (member.isdir() or member.islnk())
            tf.extract(member, root, set_attrs=attrs, numeric_owner=True, **_FILTER_KWARGS)
            if member.isdir():
                directories.append(member)
            elif finish is not None and not member.islnk():
                finish(member, os.path.join(root, member.name))
        # After the end marker only zero padding may follow; reading to the very end also makes
        # the decompressor verify the stream's length and checksum.
        while chunk := stream.read(CHUNK):
            if chunk.count(0) != len(chunk):
                raise CorruptArchive("data after the end of the tar archive (damaged header?)")
    for member in sorted(directories, key=lambda m: m.name, reverse=True):
        path = os.path.join(root, member.name)
        _set_dir_attrs(member, path, root)
        if finish is not None:
            finish(member, path)
    if not any(os.path.normpath(m.name) == "." for m in directories):
        os.chmod(root, 0o755)  # no entry for the root itself: a usable default, not mkdir's 0700


def remove_partial(path: str | Path) -> None:
    """Best-effort removal of a half-extracted *path*, even if modes lock out a non-root owner."""
    path = str(path)
    if not os.path.lexists(path):
        return
    if os.geteuid() != 0 and not os.path.islink(path):
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
        for top, dirs, _files in os.walk(path):
            for d in dirs:
                sub = os.path.join(top, d)
                if not os.path.islink(sub):
                    with contextlib.suppress(OSError):
                        os.chmod(sub, 0o700)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def move_up(tmp: Path, dest: Path) -> None:
    """Move the tree from *tmp* up into *dest* (same filesystem); *dest* takes its attrs."""
    st = os.lstat(tmp)
    for entry in os.listdir(tmp):
        os.rename(tmp / entry, dest / entry)
    os.rmdir(tmp)
    if os.geteuid() == 0:
        os.chown(dest, st.st_uid, st.st_gid)
    os.chmod(dest, st.st_mode & 0o7777)
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
