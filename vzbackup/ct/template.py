"""Safe extraction of OS template tarballs (``<ostemplate>.tar.{zst,xz,gz}``) into a private area.

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
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import zstandard

from vzbackup.errors import ExistsError, NotFoundError, RuntimeFailure

_MAGIC = {
    b"\x28\xb5\x2f\xfd": "zst",
    b"\xfd7zXZ\x00": "xz",
    b"\x1f\x8b": "gz",
}
# Extraction filters exist from 3.11.4 (and 3.12+); 3.14 defaults to 'data', so be explicit.
_FILTER_KWARGS: dict[str, str] = (
    {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
)
_CHUNK = 1 << 16


class _Unsafe(Exception):
    """A member that would write outside the destination."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(reason)
        self.name = name


class _Corrupt(Exception):
    """The archive's data is damaged or inconsistent."""


# what a truncated or garbled archive raises, whatever its compression
ARCHIVE_ERRORS = (
    _Corrupt,
    tarfile.ReadError,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    gzip.BadGzipFile,
    zstandard.ZstdError,
)


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
            self._in, self._in_pos = self._raw.read(_CHUNK), 0
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
def _decompressed(archive: Path) -> Iterator[IO[bytes]]:
    """The archive's decompressed tar stream, format sniffed from the magic bytes."""
    with archive.open("rb") as raw:
        head = raw.read(6)
        raw.seek(0)
        kind = next((k for magic, k in _MAGIC.items() if head.startswith(magic)), None)
        if kind is None:
            raise _Corrupt("not a zstd, xz or gzip stream")
        if kind == "zst":
            with io.BufferedReader(_ZstdReader(raw), _CHUNK) as zst:
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


def _check_member(member: tarfile.TarInfo, root: str) -> None:
    """Refuse *member* if extracting it, given what is on disk now, could touch outside *root*."""
    name = member.name
    if _bad_path(name):
        raise _Unsafe(name, "absolute path or '..' component")
    parent = os.path.realpath(os.path.join(root, os.path.dirname(name)))
    if not _inside(parent, root):
        raise _Unsafe(name, f"its directory resolves to {parent}, outside the destination")
    target = os.path.join(parent, os.path.basename(name))
    if member.issym() or member.islnk():
        # Links replace the final component instead of following it.
        if os.path.normpath(target) == root:
            raise _Unsafe(name, "a link cannot replace the root directory")
    else:
        real = os.path.realpath(target)
        if not _inside(real, root):
            raise _Unsafe(name, f"it would be written through a symlink to {real}")
    if member.islnk():
        link = member.linkname
        if _bad_path(link):
            raise _Unsafe(name, f"hardlink to {link!r} points outside the tree")
        real = os.path.realpath(os.path.join(root, link))
        if not _inside(real, root):
            raise _Unsafe(name, f"hardlink to {link!r} resolves to {real}, outside the tree")
        if not os.path.exists(real) or os.path.isdir(real):
            raise _Corrupt(f"hardlink {name} refers to {link!r}, not extracted before it")


def _set_dir_attrs(member: tarfile.TarInfo, path: str, root: str) -> None:
    """Apply a directory member's owner, mode and mtime (deferred, like tarfile does)."""
    if os.path.islink(path) or not _inside(os.path.realpath(path), root):
        raise _Unsafe(member.name, "directory was replaced by a symlink")
    if os.geteuid() == 0:
        os.chown(path, member.uid, member.gid, follow_symlinks=False)
    os.chmod(path, member.mode)  # after chown, which clears setgid
    os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)


class _StrictTarInfo(tarfile.TarInfo):
    """TarInfo whose reader fails on a damaged header (tarfile takes one for the archive's end)."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:  # a zero block: the regular end-of-archive marker
            raise
        except tarfile.EmptyHeaderError:
            raise _Corrupt(
                f"tar data ends without an end-of-archive marker at {tf.offset}"
            ) from None
        except tarfile.HeaderError as e:
            raise _Corrupt(f"damaged tar header at offset {tf.offset}: {e}") from None


def _extract_into(archive: Path, root: str) -> None:
    """Extract *archive* into the existing empty directory *root* (a realpath)."""
    directories: list[tarfile.TarInfo] = []
    with (
        _decompressed(archive) as stream,
        tarfile.open(fileobj=stream, mode="r|", errorlevel=2, tarinfo=_StrictTarInfo) as tf,
    ):
        for member in tf:
            _check_member(member, root)
            # Directories get their attributes at the end; a hardlink shares its target's inode,
            # whose attributes it must not overwrite (GNU tar doesn't either).
            attrs = not (member.isdir() or member.islnk())
            tf.extract(member, root, set_attrs=attrs, numeric_owner=True, **_FILTER_KWARGS)
            if member.isdir():
                directories.append(member)
        # After the end marker only zero padding may follow; reading to the very end also makes
        # the decompressor verify the stream's length and checksum.
        while chunk := stream.read(_CHUNK):
            if chunk.count(0) != len(chunk):
                raise _Corrupt("data after the end of the tar archive (damaged header?)")
    for member in sorted(directories, key=lambda m: m.name, reverse=True):
        _set_dir_attrs(member, os.path.join(root, member.name), root)
    if not any(os.path.normpath(m.name) == "." for m in directories):
        os.chmod(root, 0o755)  # no entry for the root itself: a usable default, not mkdir's 0700


def _rmtree(path: str) -> None:
    """Best-effort removal of *path*, even if extracted modes lock out a non-root owner."""
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


def extract_template(archive: Path, dest: str | Path) -> None:
    """Extract the OS template *archive* into *dest* (absent or an empty directory), atomically.

    A new *dest* is built as the sibling ``<dest>.partial-<pid>`` and renamed into place. An
    existing empty *dest* (say a mounted volume or btrfs subvolume, which can't be renamed over)
    is filled from ``<dest>/.partial-<pid>`` and emptied again on failure. Either way nothing is
    left behind when extraction fails.
    """
    archive = Path(archive)
    dest = Path(dest)
    if not archive.is_file():
        raise NotFoundError(f"template {archive} does not exist")
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise ExistsError(f"cannot extract template into {dest}: it exists and is not a directory")
    in_place = dest.is_dir()
    if in_place:
        with os.scandir(dest) as it:
            if any(True for _ in it):
                raise ExistsError(f"cannot extract template into {dest}: directory is not empty")
        tmp = dest / f".partial-{os.getpid()}"
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    _rmtree(str(tmp))  # stale leftover of a crashed run that had our pid
    try:
        try:
            tmp.mkdir(mode=0o700)
            _extract_into(archive, os.path.realpath(tmp))
            if in_place:
                _move_up(tmp, dest)
            else:
                os.rename(tmp, dest)
        except BaseException:
            if in_place:
                for entry in os.listdir(dest):
                    _rmtree(os.path.join(dest, entry))
            else:
                _rmtree(str(tmp))
            raise
    except _Unsafe as e:
        raise RuntimeFailure(f"template {archive} has an unsafe member {e.name}: {e}") from None
    except ARCHIVE_ERRORS as e:
        raise RuntimeFailure(f"template {archive} is corrupt: {e}") from None
    except (OSError, tarfile.TarError) as e:
        raise RuntimeFailure(f"extracting template {archive} into {dest} failed: {e}") from e


def _move_up(tmp: Path, dest: Path) -> None:
    """Move the tree from *tmp* up into *dest* (same filesystem); *dest* takes its attrs."""
    st = os.lstat(tmp)
    for entry in os.listdir(tmp):
        os.rename(tmp / entry, dest / entry)
    os.rmdir(tmp)
    if os.geteuid() == 0:
        os.chown(dest, st.st_uid, st.st_gid)
    os.chmod(dest, st.st_mode & 0o7777)
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns))
