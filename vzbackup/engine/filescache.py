"""The files cache: what the last backup of a CT wrote for each directory, so the next one
reuses it without reading files or encoding their metadata again (like Proxmox's metadata
change detection and borg's files cache).

Per directory (its path relative to the backup root) a ``DirRecord`` keeps, for every name
in it, a signature (inode, size, mtime, ctime) and the entry's line of the snapshot's file
list, and the chunks the lines reference. When every entry of a directory still has its
signature, the directory's lines go into the new file list as they are: two comparisons per
directory (its names joined, its signatures packed into one ``bytes``; both built in C), no
``listxattr``, no JSON. Otherwise each entry whose signature matches keeps its
line, and a file whose content signature matches keeps its chunks (no read). A directory
whose own signature held still has the names recorded for it (adding, removing or renaming
an entry sets its mtime): it is not listed again, only its entries are stat'ed. When every
directory was reused as it was and the root's line is the same, the file list is the last
backup's byte for byte: its chunks (*tree*) are reused without cutting or hashing it.

ctime covers everything else an entry carries (mode, owner, xattrs, ACLs, content): any
change sets it to the current time. An entry changed less than ``RACY_NS`` before the backup
started is not trusted next time, since a second change within the same clock tick would
leave its signature unchanged.

The file is ``MAGIC``, the lengths of two zstd frames (8 bytes each, little endian) and
the CRC-32 of the second (4 bytes), then the frames: marshal((key, {dir path: record tuple},
tree)), *tree* the last file list's first lines (header, root) and its chunk ids (or None),
and marshal({dir path: lines tuple}), the bulk of the file, decoded only when a directory
changed (its CRC is checked at load, so damage there too just means starting over). Local,
written by this host's vzbackup only, and rebuilt from scratch whenever it is unreadable,
from another Python version, or was made with other exclusions (*key*).
"""

from __future__ import annotations

import contextlib
import marshal
import operator
import os
import struct
import sys
import zlib
from array import array
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import zstandard

from vzbackup.errors import RuntimeFailure

MAGIC = b"vzbackup-files-cache\x08"
RACY_NS = 100_000_000  # coarse kernel clocks tick every few ms; keep a wide margin

Sig = tuple[int, int, int, int]  # inode, size, mtime ns, ctime ns
Tree = tuple[bytes, tuple[str, ...]]  # a file list's header and root lines, its chunk ids
UNTRUSTED: Sig = (-1, -1, -1, -1)  # matches no entry: racy, vanished
signature = operator.attrgetter("st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")
"""An entry's ``Sig`` from its ``os.stat_result`` (in C: it runs for every entry)."""
NAME_SEP = "/"  # joins a directory's names (no name holds it)
_HEADER = struct.Struct("<QQI")  # frame lengths, CRC-32 of the second
_PACK_SIG = struct.Struct("4q").pack  # native order, as array("q") reads it back


def packed_sigs(sigs: Iterable[Sig]) -> bytes | None:
    """Signatures as 4 signed 64-bit ints each, in one bytes object: compared, stored and
    loaded whole (a tuple per name made loading the cache and comparing it slower). None if
    a value doesn't fit (it then matches no record)."""
    try:
        return b"".join([_PACK_SIG(*sig) for sig in sigs])
    except struct.error:
        return None


class DirRecord(NamedTuple):
    """A directory as the last backup wrote it. Few objects (it is loaded for every
    directory at each backup): names joined, signatures packed; its lines are apart
    (``DirLines``)."""

    names: str  # every name in the directory, sorted, joined by NAME_SEP
    sigs: bytes  # packed_sigs: per name its signature, or UNTRUSTED
    subdirs: tuple[int, ...]  # indexes of the entries walked into
    links: tuple[tuple[int, int, int, str], ...]  # files with nlink > 1: (index, dev, inode,
    #                                               hardlink target, "" for the first name)
    counts: tuple[int, int, int, int]  # files, dirs, other entries, bytes of files
    skipped: tuple[str, ...]  # paths left out (sockets, unknown types)
    chunks: tuple[str, ...]  # every chunk the lines reference


class DirLines(NamedTuple):
    """A directory's file list lines."""

    block: bytes  # the entries' lines, one after the other (excluded: none)
    ends: bytes  # array("Q") of where each name's line ends in block


def entries(rec: DirRecord, lines: DirLines) -> dict[str, tuple[Sig, bytes]]:
    """name -> (signature, line), for a directory that changed."""
    names = rec.names.split(NAME_SEP) if rec.names else []
    flat = array("q", rec.sigs)
    out = {}
    start = 0
    for j, end in enumerate(array("Q", lines.ends)):
        sig = tuple(flat[4 * j : 4 * j + 4]) if len(flat) == 4 * len(names) else UNTRUSTED
        out[names[j]] = (sig, lines.block[start:end])
        start = end
    return out


def make_record(names: list[str], sigs: list[Sig], lines: list[bytes],
                chunks: list[tuple[str, ...]], subdirs: list[int],
                links: list[tuple[int, int, int, str]], counts: tuple[int, int, int, int],
                skipped: list[str]) -> tuple[DirRecord, DirLines]:
    ends = array("Q")
    pos = 0
    for ln in lines:
        pos += len(ln)
        ends.append(pos)
    return (DirRecord(NAME_SEP.join(names), packed_sigs(sigs) or b"", tuple(subdirs),
                      tuple(links), counts, tuple(skipped), tuple(set().union(*chunks))),
            DirLines(b"".join(lines), ends.tobytes()))


class FilesCache:
    """Directory records of the last backup (*old*) and of this one (*new*), and the file
    list each wrote (*old_tree*, *tree*)."""

    def __init__(self, path: Path | None, *, use_inode: bool = True, key: str = "") -> None:
        self.path = path
        self.use_inode = use_inode  # False: the source is a fresh copy (inodes, ctimes change)
        self.key = f"{sys.version_info[:2]}\n{key}"  # marshal's format may change with Python
        self.old: dict[str, DirRecord] = {}
        self.new: dict[str, DirRecord] = {}
        self.new_lines: dict[str, DirLines] = {}  # of the records this backup built
        self.old_tree: Tree | None = None
        self.tree: Tree | None = None
        self._old_lines: dict[str, DirLines] | None = {}
        self._lines_frame = b""  # the old lines, decoded when first needed
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            raw = path.read_bytes()
        except OSError:
            return
        if not raw.startswith(MAGIC):
            return
        try:
            n1, n2, crc = _HEADER.unpack_from(raw, len(MAGIC))
            at = len(MAGIC) + _HEADER.size
            end = at + n1
            view = memoryview(raw)
            if len(raw) != end + n2 or zlib.crc32(view[end:]) != crc:
                return  # cut short or damaged
            key, dirs, tree = marshal.loads(zstandard.ZstdDecompressor().decompress(view[at:end]))
            if key != self.key:
                return
            self.old = {d: DirRecord._make(rec) for d, rec in dirs.items()}
        except (ValueError, EOFError, TypeError, struct.error, zstandard.ZstdError):
            return  # only an optimisation: start over
        self.old_tree = tree
        self._old_lines, self._lines_frame = None, raw[end:]

    def _decode_lines(self) -> dict[str, DirLines]:
        try:
            lines = marshal.loads(zstandard.ZstdDecompressor().decompress(self._lines_frame))
            out = {d: DirLines._make(v) for d, v in lines.items()}
            if out.keys() == self.old.keys():
                return out
        except (ValueError, EOFError, TypeError, zstandard.ZstdError):
            pass
        if self.path:
            with contextlib.suppress(OSError):
                self.path.unlink()
        raise RuntimeFailure(f"the files cache {self.path} is unreadable; removed it",
                             hint="run the backup again (it reads every file once)")

    def get(self, rel_dir: str) -> DirRecord | None:
        return self.old.get(rel_dir)

    def old_lines(self, rel_dir: str) -> DirLines:
        """The lines of the old record of *rel_dir* (decoding all of them on first use)."""
        if self._old_lines is None:
            self._old_lines = self._decode_lines()
            self._lines_frame = b""
        return self._old_lines[rel_dir]

    def lines(self, rel_dir: str) -> DirLines:
        """The lines of the record put for *rel_dir*: built by this backup, or the old one."""
        got = self.new_lines.get(rel_dir)
        return got if got is not None else self.old_lines(rel_dir)

    def put(self, rel_dir: str, rec: DirRecord, lines: DirLines | None = None) -> None:
        """*rec* for *rel_dir* in the new cache, with its *lines* (None: the old record's)."""
        self.new[rel_dir] = rec
        if lines is not None:
            self.new_lines[rel_dir] = lines

    def unchanged(self) -> bool:
        """Whether this backup reused every directory record of the last one as it was."""
        return self.new.keys() == self.old.keys() and all(
            self.new[d] is self.old[d] for d in self.new)

    def save(self) -> None:
        """Write the new records and tree (unless they are exactly the old ones)."""
        if not self.path:
            return
        if self.tree == self.old_tree and self.unchanged():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cctx = zstandard.ZstdCompressor(level=1, write_checksum=True)  # damage is an error
        head = cctx.compress(marshal.dumps(
            (self.key, {d: tuple(r) for d, r in self.new.items()}, self.tree)))
        lines = cctx.compress(marshal.dumps({d: tuple(self.lines(d)) for d in self.new}))
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            tmp.write_bytes(MAGIC + _HEADER.pack(len(head), len(lines), zlib.crc32(lines)) + head
                            + lines)
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
