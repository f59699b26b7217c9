"""Pack files and the index that locates chunks in them (repository format v2).

A pack holds many sealed chunk blobs back to back, then a sealed header listing them, then
the header's length (4 bytes, little endian)::

    blob_1 ... blob_n  sealed(header)  u32le(len(sealed(header)))
    header = n x (chunk id: 32 bytes, offset: u32le, length: u32le)

The pack's name is the SHA-256 of its bytes. An index file lists, per pack, the same
entries; every chunk of a published snapshot is in some index file. In memory the index is
one dict from the 32-byte chunk id to one int (pack number, offset, length), about 150
bytes per chunk whatever the entry count per pack.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

PACK_TARGET = 16 * 1024 * 1024  # a pack is written once it holds this much
# packs being written at once, each in an upload thread (bounds memory: ~PACK_TARGET each;
# two streams keep a LAN or loopback server busy, and a network that dies mid-backup
# leaves the packs before them complete, with their index files: resumable)
PACK_UPLOADS = 2
# a packer with an *index* hands it the packs stored every this many packs, and all the
# rest once flushed: an interrupted backup leaves all but its last pack or so indexed, for
# the next one to reuse (an index file per pack cost a request each, ~6 ms of a Ceph RGW's
# CPU, and two more to merge them at the end)
INDEX_EVERY = 2
HEADER_AAD = "pack-header"
INDEX_MAGIC = b"VZIX\x01"
ENTRY = struct.Struct("<32sII")  # chunk id, offset, length
PACK_HEAD = struct.Struct("<32sI")  # pack id, entry count
TRAILER = struct.Struct("<I")


class Location(NamedTuple):
    """Where a chunk's blob sits: pack id, offset and length (a tuple: made for every chunk
    looked up, and created at import ten times cheaper than a frozen dataclass)."""

    pack: str  # hex pack id
    offset: int
    length: int


Entries = list[tuple[bytes, int, int]]  # (raw chunk id, offset, length)


def encode_header(entries: Entries) -> bytes:
    return b"".join(ENTRY.pack(c, o, n) for c, o, n in entries)


def decode_entries(data: bytes | memoryview) -> Entries:
    if len(data) % ENTRY.size:
        raise ValueError("truncated pack header")
    return list(ENTRY.iter_unpack(data))


def encode_index(packs: Iterable[tuple[str, Entries]]) -> bytes:
    out = [INDEX_MAGIC]
    for pack, entries in packs:
        out.append(PACK_HEAD.pack(bytes.fromhex(pack), len(entries)))
        out.append(encode_header(entries))
    return b"".join(out)


def decode_index(data: bytes) -> Iterator[tuple[str, Entries]]:
    if not data.startswith(INDEX_MAGIC):
        raise ValueError("not a vzbackup index")
    view = memoryview(data)
    pos = len(INDEX_MAGIC)
    while pos < len(view):
        pack, count = PACK_HEAD.unpack_from(view, pos)
        pos += PACK_HEAD.size
        end = pos + count * ENTRY.size
        if end > len(view):
            raise ValueError("truncated index")
        yield pack.hex(), decode_entries(view[pos:end])
        pos = end


class Index:
    """chunk id -> Location, compact; which packs and index files it was built from."""

    def __init__(self) -> None:
        self.packs: list[str] = []
        self._pack_no: dict[str, int] = {}
        self._pos: dict[bytes, int] = {}
        self.files: dict[str, list[str]] = {}  # index file key -> the packs it lists

    def add(self, pack: str, entries: Entries) -> None:
        no = self._pack_no.get(pack)
        if no is None:
            no = self._pack_no[pack] = len(self.packs)
            self.packs.append(pack)
        base = no << 64
        pos = self._pos
        for cid, off, ln in entries:
            pos[cid] = base | off << 32 | ln

    def add_file(self, key: str, packs: Iterable[tuple[str, Entries]]) -> None:
        names = []
        for pack, entries in packs:
            self.add(pack, entries)
            names.append(pack)
        self.files[key] = names

    def lookup(self, cid: str) -> Location | None:
        v = self._pos.get(bytes.fromhex(cid))
        if v is None:
            return None
        return Location(self.packs[v >> 64], (v >> 32) & 0xFFFFFFFF, v & 0xFFFFFFFF)

    def __contains__(self, cid: str) -> bool:
        return bytes.fromhex(cid) in self._pos

    def __len__(self) -> int:
        return len(self._pos)

    def by_pack(self) -> dict[str, Entries]:
        """Every pack with the entries the index points into it."""
        out: dict[str, Entries] = {p: [] for p in self.packs}
        for cid, v in self._pos.items():
            out[self.packs[v >> 64]].append((cid, (v >> 32) & 0xFFFFFFFF, v & 0xFFFFFFFF))
        return out


Seal = Callable[[str, bytes], bytes]
Store = Callable[[str, list[bytes], Entries], None]  # (pack id, pack bytes in pieces, entries)
Packs = list[tuple[str, Entries]]
IndexPacks = Callable[[Packs, bool], None]  # (packs stored, whether the packer was flushed)


class Packer:
    """Collects sealed blobs into packs; thread-safe. A full pack is handed to *store* in
    an upload thread of its own (at most PACK_UPLOADS packs at once; a full pack waits
    for a free one), so the threads that fill packs go on hashing and compressing while a
    pack is joined, hashed and written, and memory stays bounded. A failed write is raised
    by the next ``add`` and by ``flush``. With *index*, the packs stored are handed to
    it every INDEX_EVERY packs (in the upload thread, before the next pack's upload
    starts there), and the rest at the end of ``flush``, which flags that call."""

    def __init__(self, seal: Seal, store: Store, index: IndexPacks | None = None,
                 target: int = PACK_TARGET) -> None:
        self.seal = seal
        self.store = store
        self.index = index
        self.target = target
        self.lock = threading.Lock()
        self.uploads = threading.BoundedSemaphore(PACK_UPLOADS)
        self._pool: ThreadPoolExecutor | None = None  # started with the first full pack
        self._writing: list[Future] = []
        self._buf: list[bytes] = []
        self._entries: Entries = []
        self._size = 0
        self._stored: Packs = []  # packs not handed to *index* yet
        self._flushing = False  # the rest go to *index* at the flush's end, all together

    def add(self, cid: str, *blob: bytes) -> None:
        """Add the sealed blob of chunk *cid*, given as one or more pieces."""
        size = sum(map(len, blob))
        with self.lock:
            self._entries.append((bytes.fromhex(cid), self._size, size))
            self._buf.extend(blob)
            self._size += size
            full = self._take() if self._size >= self.target else None
        if full:
            self._submit(*full)

    def flush(self) -> None:
        """Write the pack being filled, however small, alongside the packs still being
        written, and wait for them all (each pack is complete, or not there: a network
        dying at the end of a backup loses the last ones); then hand *index* the packs it
        has not had. Writing it only once the others are done added a pack's upload to
        every backup's end."""
        with self.lock:
            self._flushing = True
            full = self._take() if self._entries else None
        if full:
            self._submit(*full)
        self._wait()
        with self.lock:
            rest, self._stored, self._flushing = self._stored, [], False
        if self.index is not None:
            self.index(rest, True)

    def _wait(self) -> None:
        with self.lock:
            writing, self._writing = self._writing, []
            pool, self._pool = self._pool, None
        try:
            for fut in writing:
                fut.result()  # the first failure
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        """Stop: packs not written yet are dropped (a failed backup)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _take(self) -> tuple[list[bytes], Entries]:
        taken = self._buf, self._entries
        self._buf, self._entries, self._size = [], [], 0
        return taken

    def _submit(self, blobs: list[bytes], entries: Entries) -> None:
        self.uploads.acquire()
        try:
            with self.lock:
                failed = next((f for f in self._writing if f.done() and f.exception()), None)
                if failed is not None:
                    failed.result()
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(PACK_UPLOADS, thread_name_prefix="pack")
                fut = self._pool.submit(self._write, blobs, entries)
                self._writing = [f for f in self._writing
                                 if not f.done() or f.exception()] + [fut]
        except BaseException:
            self.uploads.release()
            raise
        fut.add_done_callback(lambda _: self.uploads.release())

    def _write(self, blobs: list[bytes], entries: Entries) -> None:
        header = self.seal(HEADER_AAD, encode_header(entries))
        blobs.append(header)
        blobs.append(TRAILER.pack(len(header)))
        import hashlib  # (see Codec.chunk_id)

        # hashed and written piece by piece: joining them would copy the pack once more
        pack_id = hashlib.sha256()
        for b in blobs:
            pack_id.update(b)
        pack = pack_id.hexdigest()
        self.store(pack, blobs, entries)
        if self.index is None:
            return
        with self.lock:
            self._stored.append((pack, entries))
            if len(self._stored) < INDEX_EVERY or self._flushing:
                return
            batch, self._stored = self._stored, []
        self.index(batch, False)


def header_span(tail: bytes, size: int) -> tuple[int, int]:
    """(offset, length) of the sealed header in a pack of *size* bytes, from the pack's
    last bytes *tail* (at least its trailer)."""
    if size < TRAILER.size or len(tail) < TRAILER.size:
        raise ValueError("pack too short")
    (hlen,) = TRAILER.unpack_from(tail, len(tail) - TRAILER.size)
    start = size - TRAILER.size - hlen
    if start < 0:
        raise ValueError("bad pack trailer")
    return start, hlen
