"""The one place that reads the repository engine for the observers (FUSE, metrics, report).

Everything here uses the engine's public read API only: open a repository, list snapshots,
read a snapshot's tree, read a byte range of a file. A change of the repository format
touches this module and nothing above it.
"""

from __future__ import annotations

import bisect
import collections
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from vzbackup.engine import tree as T
from vzbackup.engine.extract import load_tree
from vzbackup.engine.repo import Manifest, Repository, snapshot_time
from vzbackup.errors import DamagedError, NotFoundError

Entry = T.Entry
CHUNK_CACHE_BYTES = 256 * 1024 * 1024  # plaintext chunks kept in memory
PREFETCH_CHUNKS = 4  # chunks of a file fetched ahead of a sequential reader
FETCH_THREADS = 4


@dataclass(frozen=True)
class Snapshot:
    id: str
    ctid: int
    time: datetime
    mode: str
    size: int  # logical bytes of its files
    stats: dict
    protected: bool
    has_state: bool

    @property
    def stamp(self) -> str:
        """The TIME part of the id (a directory name in the mounted repository)."""
        return self.id.split("/", 1)[1]


def _snapshot(m: Manifest) -> Snapshot:
    return Snapshot(m.id, m.ctid, snapshot_time(m.id), m.mode, m.size, dict(m.stats),
                    m.protected, m.has_state)


def stored_bytes(repo: Repository) -> int:
    """What the repository takes on its storage (chunk data, after dedup and compression)."""
    return repo.stored_bytes()


class FileMap:
    """Where a file's bytes are: data regions (holes between them read as zeros) and the
    chunk slices of its content stream."""

    def __init__(self, e: Entry) -> None:
        self.size = e.size
        self.slices = [(cid, int(off), int(ln)) for cid, off, ln in e.chunks]
        self.slice_starts: list[int] = []
        pos = 0
        for _, _, ln in self.slices:
            self.slice_starts.append(pos)
            pos += ln
        self.content_len = pos
        self.regions: list[tuple[int, int, int]] = []  # (file offset, length, content offset)
        cpos = 0
        for off, ln in e.extents if e.extents is not None else [[0, e.size]]:
            self.regions.append((int(off), int(ln), cpos))
            cpos += int(ln)

    def content_spans(self, start: int, end: int):
        """(file offset, content offset, length) of the data inside [start, end)."""
        for off, ln, coff in self.regions:
            a, b = max(start, off), min(end, off + ln)
            if a < b:
                yield a, coff + (a - off), b - a

    def slices_at(self, coff: int, length: int):
        """(slice index, cid, chunk offset, length) covering content [coff, coff+length)."""
        i = bisect.bisect_right(self.slice_starts, coff) - 1
        end = coff + length
        while coff < end and 0 <= i < len(self.slices):
            cid, off, ln = self.slices[i]
            inner = coff - self.slice_starts[i]
            n = min(ln - inner, end - coff)
            yield i, cid, off + inner, n
            coff += n
            i += 1
        if coff < end:
            raise DamagedError("content is shorter than the file's size")


class ChunkCache:
    """Plaintext chunks by id, least recently used dropped first; one fetch per chunk even
    when several readers want it at once; fetches run in a small thread pool."""

    def __init__(self, repo: Repository, max_bytes: int = CHUNK_CACHE_BYTES) -> None:
        self.repo = repo
        self.max_bytes = max_bytes
        self.bytes = 0
        self.data: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self.pending: dict[str, Future] = {}
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="chunk")
        self.fetched = 0  # chunks downloaded (for tests and stats)

    def get(self, cid: str) -> bytes:
        return self._future(cid).result()

    def prefetch(self, cid: str) -> None:
        self._future(cid)

    def _future(self, cid: str) -> Future:
        with self.lock:
            data = self.data.get(cid)
            if data is not None:
                self.data.move_to_end(cid)
                done: Future = Future()
                done.set_result(data)
                return done
            fut = self.pending.get(cid)
            if fut is None:
                fut = self.pool.submit(self._fetch, cid)
                self.pending[cid] = fut
            return fut

    def _fetch(self, cid: str) -> bytes:
        try:
            data = self.repo.get_chunk(cid)
        finally:
            with self.lock:
                self.pending.pop(cid, None)
        with self.lock:
            self.fetched += 1
            if cid not in self.data and len(data) <= self.max_bytes:
                self.data[cid] = data
                self.bytes += len(data)
                while self.bytes > self.max_bytes:
                    _, old = self.data.popitem(last=False)
                    self.bytes -= len(old)
        return data

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class RepoView:
    """Read-only access to one repository: snapshots, their trees, byte ranges of files."""

    def __init__(self, repo: Repository, cache_bytes: int = CHUNK_CACHE_BYTES) -> None:
        self.repo = repo
        self.url = repo.backend.url
        self.chunks = ChunkCache(repo, cache_bytes)
        self._manifests: dict[str, Manifest] = {}

    def snapshots(self) -> list[Snapshot]:
        ms = self.repo.manifests()
        self._manifests.update((m.id, m) for m in ms)
        return [_snapshot(m) for m in ms]

    def resolve(self, text: str) -> Snapshot:
        m = self.repo.resolve(text)
        self._manifests[m.id] = m
        return _snapshot(m)

    def tree(self, sid: str, state: bool = False) -> list[Entry]:
        """The snapshot's files, or with *state* its CRIU images (checkpoint mode)."""
        m = self._manifests.get(sid) or self.repo.load_manifest(sid)
        if state and not m.has_state:
            raise NotFoundError(f"snapshot {sid} has no running state")
        return load_tree(self.repo, self.repo.state_tree_of(m) if state else self.repo.tree_of(m))

    def read(self, fmap: FileMap, offset: int, size: int) -> bytes:
        """*size* bytes of the file from *offset* (fewer at its end)."""
        end = min(fmap.size, offset + size)
        if offset >= end:
            return b""
        out = bytearray(end - offset)
        last = -1
        for foff, coff, n in fmap.content_spans(offset, end):
            pos = foff - offset
            for i, cid, off, ln in fmap.slices_at(coff, n):
                data = self.chunks.get(cid)
                if off + ln > len(data):
                    raise DamagedError(f"chunk {cid[:16]} is shorter than the file needs")
                out[pos : pos + ln] = data[off : off + ln]
                pos += ln
                last = i
        for cid, _, _ in fmap.slices[last + 1 : last + 1 + PREFETCH_CHUNKS]:
            self.chunks.prefetch(cid)
        return bytes(out)

    def close(self) -> None:
        self.chunks.close()
