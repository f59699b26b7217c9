"""File tree metadata as stored in a snapshot: one JSON object per entry, in walk order.

Keys: ``p`` path (relative, "." is the root), ``t`` type (d f l h c b p), ``m`` permission
bits, ``u``/``g`` numeric owner, ``mt`` mtime in ns, ``s`` size, ``c`` content as
``[chunk id, offset, length]`` slices, ``e`` data extents ``[offset, length]`` of a sparse
file, ``l`` symlink target or hardlink target path, ``r`` device number, ``x`` xattrs
(base64; POSIX ACLs are the ``system.posix_acl_*`` xattrs).
"""

from __future__ import annotations

import base64
import contextlib
import gc
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

DIR, FILE, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO = "d", "f", "l", "h", "c", "b", "p"
KIND_NAMES = {
    DIR: "dir",
    FILE: "file",
    SYMLINK: "symlink",
    HARDLINK: "hardlink",
    CHAR: "chardev",
    BLOCK: "blockdev",
    FIFO: "fifo",
}
TYPE_BITS = {DIR: stat.S_IFDIR, FILE: stat.S_IFREG, SYMLINK: stat.S_IFLNK, CHAR: stat.S_IFCHR,
             BLOCK: stat.S_IFBLK, FIFO: stat.S_IFIFO, HARDLINK: stat.S_IFREG}
HEADER = {"format": "vzbackup-tree", "v": 1}


@dataclass
class Entry:
    """One entry of a file list (see the module docstring for its keys)."""

    path: str
    kind: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    chunks: list[list] = field(default_factory=list)  # [cid, offset, length]
    extents: list[list[int]] | None = None
    link: str = ""
    rdev: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d: dict = {"p": self.path, "t": self.kind, "m": self.mode, "u": self.uid, "g": self.gid,
                   "mt": self.mtime_ns}
        if self.kind == FILE:
            d["s"] = self.size
            d["c"] = self.chunks
            if self.extents is not None:
                d["e"] = self.extents
        if self.link:
            d["l"] = self.link
        if self.rdev:
            d["r"] = self.rdev
        if self.xattrs:
            d["x"] = {k: base64.b64encode(v).decode() for k, v in self.xattrs.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Entry:
        # positional, in field order, xattrs decoded only where there are some: a restore
        # decodes every entry first (16.4k of the Debian rootfs: 60-77 -> 38-42 ms)
        x = d.get("x")
        return cls(d["p"], d["t"], int(d["m"]), int(d["u"]), int(d["g"]), int(d["mt"]),
                   int(d.get("s", 0)), d.get("c", []), d.get("e"), d.get("l", ""),
                   int(d.get("r", 0)), {k: base64.b64decode(v) for k, v in x.items()} if x else {})

    @property
    def st_mode(self) -> int:
        return TYPE_BITS[self.kind] | self.mode

    def ls_line(self) -> str:
        """An ``ls -l``-like line: mode, owner, size, mtime, path (-> target)."""
        import time

        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.mtime_ns / 1e9))
        target = f" -> {self.link}" if self.kind == SYMLINK else ""
        target = f" link to {self.link}" if self.kind == HARDLINK else target
        size = self.size if self.kind == FILE else 0
        return (
            f"{stat.filemode(self.st_mode)} {self.uid:>5}/{self.gid:<5} {size:>12} {when} "
            f"{self.path}{target}"
        )


# one encoder for every line (json.dumps with options builds one per call); entries are
# plain trees of dicts and lists, so the reference-cycle check is skipped
_LINE_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False)


def _c_line_encoder() -> Callable[[dict, int], Iterable[str]] | None:
    """_LINE_ENCODER's C encoder, made once (JSONEncoder.encode makes one per call: 5.5 us
    a line against 4.1 us, ~24 ms of the walk's thread for a 16.4k-entry rootfs); None
    where json has no C accelerator or its private constructor differs from 3.11's (checked
    on a sample line, so a changed signature falls back instead of writing other bytes)."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    try:
        enc = make(None, _LINE_ENCODER.default, json.encoder.encode_basestring_ascii, None,
                   ":", ",", False, False, True)
        sample = {"p": "a\u00e9\"", "n": [1, 2.5, None, True]}
        return enc if "".join(enc(sample, 0)) == _LINE_ENCODER.encode(sample) else None
    except (TypeError, ValueError):
        return None


_C_ENCODE = _c_line_encoder()


def encode_line(d: dict) -> bytes:
    """One entry's line of the file list (as ``json.dumps(d, separators=(",", ":"))``)."""
    if _C_ENCODE is None:  # (see _c_line_encoder)
        return _LINE_ENCODER.encode(d).encode() + b"\n"
    return "".join(_C_ENCODE(d, 0)).encode() + b"\n"


def encode_lines(entries: Iterable[dict]) -> Iterator[bytes]:
    yield json.dumps(HEADER).encode() + b"\n"
    for d in entries:
        yield encode_line(d)


def decode(data: bytes) -> Iterator[Entry]:
    """The entries of a file list; ValueError (or KeyError) if it is not a valid one."""
    head, _, body = data.partition(b"\n")
    if json.loads(head).get("format") != HEADER["format"]:
        raise ValueError("not a vzbackup tree")
    # the lines as one JSON array: one parse in C, not a json.loads per entry (a 4.4k-entry
    # list: 16-33 ms -> 7-22 ms of every restore's start)
    for d in json.loads(b"[" + b",".join(line for line in body.split(b"\n") if line) + b"]"):
        if not isinstance(d, dict):
            raise ValueError(f"an entry is not an object: {str(d)[:40]!r}")
        yield Entry.from_dict(d)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cycle collector off while the block makes a file list's many small objects
    (they hold no cycles; each pass of the collector would visit every one made so far)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def safe_relpath(path: str) -> str:
    """Validate a path from a snapshot: relative, no '..', no empty parts; ValueError if not."""
    if path == ".":
        return path
    if not path or path.startswith("/") or "\0" in path:
        raise ValueError(f"unsafe path {path!r}")
    parts = path.split("/")
    if "" in parts or "." in parts or ".." in parts:  # (list searches in C: once per entry)
        raise ValueError(f"unsafe path {path!r}")
    return path


def read_xattrs(path: str | int) -> dict[str, bytes]:
    """The xattrs of *path* (not followed if a symlink), or of the open file *path*: a
    descriptor spares the kernel a path lookup per call."""
    follow = isinstance(path, int)  # (an fd: nothing to follow, and os refuses the flag)
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError:
        return {}
    out = {}
    for n in names:
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=follow)
        except OSError:
            continue
    return out
