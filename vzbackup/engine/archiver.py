"""Back a directory tree up into the repository: walk, chunk, dedup, compress, upload.

File contents are cut by content-defined chunking (FastCDC, compiled, from ``pyfastcdc``).
Files of at least the stream's average chunk size are large: chunked on their own, finer
(the repository's ``file_chunker``: a small write into a database re-stores little), so
their chunks stay the same wherever they sit in the tree. Smaller files are concatenated, in
walk order, into one stream cut in larger chunks (``chunker``): a root filesystem's many
small files compress together (as in a tar) and still deduplicate, because content-defined
cuts resynchronise; only changed files are read again, so the stream's chunk size costs
little when a few of them change.
An entry's content is a list of ``[chunk, offset, length]`` slices.

Hashing, compression and encryption run in a bounded thread pool that fills pack files
(pack.py), written as they fill; the walk reads ahead while the pool works. The files
cache (filescache.py) lets an unchanged directory reuse its file list lines, and an
unchanged file its slices, without being read or encoded again; an unchanged tree reuses
the last file list's chunks (nothing is cut or hashed, not even ``pyfastcdc`` imported).
"""

from __future__ import annotations

import collections
import json
import mmap
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from vzbackup.engine import tree as T
from vzbackup.engine.dirstat import StatAhead, list_dir, open_dir, stat_names
from vzbackup.engine.filescache import (
    NAME_SEP,
    RACY_NS,
    UNTRUSTED,
    DirLines,
    DirRecord,
    FilesCache,
    Sig,
    Tree,
    entries,
    make_record,
    packed_sigs,
    signature,
)
from vzbackup.engine.pack import Index
from vzbackup.engine.repo import ID_CUT, ID_RUN_MAX, ID_SIZE, LISTED, Repository
from vzbackup.errors import RuntimeFailure
from vzbackup.storage.ratelimit import Limiter
from vzbackup.syscalls import malloc_large_with_mmap

FILE_WINDOW = 8 * 1024 * 1024  # bytes of one file read at once; a stream's buffer holds this
BUFFERS_KEPT = 4  # free stream buffers kept for reuse (FILE_WINDOW + largest chunk each)
T_ = TypeVar("T_")


class Stats:
    """Counts of one backup's walk: entries, bytes read and stored, chunks."""

    def __init__(self) -> None:
        self.files = 0
        self.dirs = 0
        self.other = 0
        self.bytes_total = 0  # logical size of all regular files
        self.bytes_read = 0  # what was actually read (files cache misses)
        self.bytes_new = 0  # plaintext of chunks the repository did not have
        self.stored_new = 0  # what those took in the repository
        self.chunks_total = 0
        self.chunks_new = 0
        self.cache_hits = 0
        self.skipped: list[str] = []

    def merge(self, other: Stats) -> None:
        for k, v in other.__dict__.items():
            if isinstance(v, int):
                setattr(self, k, getattr(self, k) + v)
            else:
                getattr(self, k).extend(v)


class ChunkStore:
    """Dedups chunks and packs new ones, in a thread pool; ``submit`` returns a future id.

    A chunk referenced by a published snapshot (*known*) is reused as is. One that is only
    in the index (left by an interrupted backup, or by a pruned snapshot) is reused after
    touching its pack, so a concurrent gc spares it; the job checks those packs still exist
    before it publishes. Anything else is sealed and added to a pack.
    """

    def __init__(self, repo: Repository, known: set[str], *, threads: int, stats: Stats,
                 bwlimit_kbps: int | None = None) -> None:
        self.repo = repo
        self.known = known  # chunks referenced by published snapshots + stored by us
        self.stats = stats
        self.refs: set[str] = set()
        self.reused_orphans: list[str] = []
        self.touched: dict[str, bool] = {}  # object key -> still there when touched
        self.lock = threading.Lock()
        malloc_large_with_mmap()  # the pools' big buffers go back to the kernel when freed
        repo.upgrade()
        self._index: Index | None = None  # loaded at the first new chunk (if any)
        self.index_lock = threading.Lock()
        self.packer = repo.packer()
        # one worker per CPU thread: more only add context switches and GIL hand-offs (a
        # full backup of a Debian rootfs: 10 % less CPU; on S3 too, where packs upload in
        # threads of their own and a worker waits only when both uploads are busy)
        workers = self.workers = max(1, threads)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chunk")
        self.slots = threading.BoundedSemaphore(workers * 2)
        # files chunked on their own: read and cut here, their chunks go to the pool
        self.files = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="file")
        self.file_slots = threading.BoundedSemaphore(max(1, threads) * 2)
        self.limiter = Limiter(bwlimit_kbps)
        self.error: BaseException | None = None

    def submit_all(self, chunks: list[memoryview]) -> list[ChunkId]:
        """Process *chunks* in the pool, a run of them per worker in one task (bounded:
        blocks while the pool is full); the handles' results are their ids. A task per
        chunk woke a worker, and the submitter after it, once per chunk: a full backup of
        a Debian rootfs switched context 11.7k times, now 4.3k."""
        out: list[ChunkId] = []
        n = len(chunks)
        k = min(self.workers, n)
        for j in range(k):
            run = chunks[j * n // k : (j + 1) * n // k]
            fut = self._submit(self.pool, self.slots, self.process_all, run)
            out.extend(ChunkId(fut, i) for i in range(len(run)))
        return out

    def process_all(self, chunks: Sequence[bytes | memoryview]) -> list[str]:
        return [self.process(c) for c in chunks]

    def submit_file(self, fn: Callable[..., T_], *args: object) -> Future:
        """Run a file's chunking *fn* in the file pool (bounded: blocks while it is full)."""
        return self._submit(self.files, self.file_slots, fn, *args)

    def _submit(self, pool: ThreadPoolExecutor, slots: threading.BoundedSemaphore,
                fn: Callable[..., T_], *args: object) -> Future:
        """Run *fn* in *pool*; its first error fails the next submission and ``finish``."""
        if self.error:
            raise self.error
        slots.acquire()
        fut = pool.submit(self._guarded, fn, *args)
        fut.add_done_callback(lambda f: slots.release())
        return fut

    def _guarded(self, fn: Callable[..., T_], *args: object) -> T_:
        try:
            return fn(*args)
        except BaseException as e:
            self.error = self.error or e
            raise

    def process(self, data: bytes | memoryview) -> str:
        """Hash, dedup and (if new) seal and pack one chunk; returns its id. Thread-safe."""
        cid = self.repo.codec.chunk_id(data)
        with self.lock:
            self.refs.add(cid)
            if cid in self.known:
                return cid
            self.known.add(cid)
        if cid in self.index() and self._reuse(cid):
            return cid
        blob = self.repo.codec.seal_parts(cid, data)
        size = sum(map(len, blob))
        self.limiter.take(size)
        self.packer.add(cid, *blob)
        with self.lock:
            self.stats.bytes_new += len(data)
            self.stats.stored_new += size
            self.stats.chunks_new += 1
        return cid

    def index(self) -> Index:
        """The repository's index as it is now, with what other writers stored since this
        backup began: read when first needed (an unchanged backup never reads it), not
        from a repository this process just created."""
        with self.index_lock:
            if self._index is None:
                self._index = self.repo.index if self.repo.fresh else self.repo.reload_index()
            return self._index

    def _reuse(self, cid: str) -> bool:
        key, _ = self.repo.locate(cid)
        with self.lock:
            ok = self.touched.get(key)
        if ok is None:
            ok = self.repo.touch_pack(cid)
            with self.lock:
                self.touched[key] = ok
        if ok:
            with self.lock:
                self.reused_orphans.append(cid)
        return ok

    def wait(self) -> None:
        """Wait for every chunk submitted (all their ids are in ``refs`` then); ``process``
        still stores more, in the calling thread."""
        self.files.shutdown(wait=True)
        self.pool.shutdown(wait=True)
        if self.error:
            raise self.error

    def finish(self) -> None:
        """Wait for every chunk, then write the last pack (and its index)."""
        self.wait()
        self.packer.flush()

    def vanished(self) -> list[str]:
        """Reused chunks a concurrent gc removed (or left unindexed) meanwhile."""
        if not self.reused_orphans:
            return []
        index = self.repo.reload_index()
        gone = [c for c in self.reused_orphans if c not in index]
        return gone + [k for k, ok in self.touched.items()
                       if ok and not self.repo.backend.exists(k)]

    def close(self) -> None:
        self.files.shutdown(wait=True, cancel_futures=True)
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.packer.close()


class ChunkId:
    """The id of one chunk of a run processed in one task (``ChunkStore.submit_all``)."""

    __slots__ = ("fut", "i")

    def __init__(self, fut: Future, i: int) -> None:
        self.fut = fut
        self.i = i

    def done(self) -> bool:
        return self.fut.done()

    def result(self) -> str:
        return self.fut.result()[self.i]


class Chunker:
    """FastCDC with the repository's parameters; ``pyfastcdc`` is imported when something
    is first cut (an unchanged backup cuts nothing)."""

    def __init__(self, min_size: int, avg_size: int, max_size: int) -> None:
        self.min_size, self.avg_size, self.max_size = min_size, avg_size, max_size
        self._cdc = None

    def cut_buf(self, data: memoryview) -> Iterable:
        """The chunks of *data* (each with ``offset`` and ``length``)."""
        if self._cdc is None:
            import pyfastcdc

            self._cdc = pyfastcdc.FastCDC(avg_size=self.avg_size, min_size=self.min_size,
                                          max_size=self.max_size)
        return self._cdc.cut_buf(data)


class Buffers:
    """Stream buffers of one size, reused once every chunk cut from one has been processed.

    A ``bytearray`` this big is zeroed while holding the GIL, then returned to the kernel
    when freed (``malloc_large_with_mmap``): 10 MiB took about 30 ms of the walk's thread,
    0.6 s of a 500 MB full backup. Buffers are anonymous maps instead (pages are zeroed by
    the kernel when first read into, the GIL released), and a buffer whose chunks are done
    is reused as it is. At most *keep* buffers wait here.
    """

    def __init__(self, size: int, keep: int = BUFFERS_KEPT) -> None:
        self.size = size
        self.keep = keep
        self.lock = threading.Lock()
        self.held: list[tuple[mmap.mmap, list[Future]]] = []  # a buffer, its chunks' tasks

    def take(self, need: int) -> mmap.mmap:
        """A buffer of at least *need* bytes: a free one, else a new one of ``size`` (or
        *need*, if more). Its pages cost nothing until read into, so a small file or file
        list gets a full-size buffer too, and gives it back for reuse (new exact-size maps
        were half of a full backup's buffers: page faults and zeroing of every byte read)."""
        if need <= self.size:
            with self.lock:
                for i, (buf, futs) in enumerate(self.held):
                    if all(f.done() for f in futs):
                        del self.held[i]
                        return buf
        return mmap.mmap(-1, max(need, self.size), mmap.MAP_PRIVATE)

    def give(self, buf: mmap.mmap, futs: list[Future]) -> None:
        """*buf* is free for reuse once *futs* (the chunks cut from it) are done."""
        if len(buf) == self.size:
            with self.lock:
                if len(self.held) < self.keep:
                    self.held.append((buf, futs))


class Stream:
    """Content-defined chunking of a byte stream filled piecewise; remembers chunk positions.

    The bytes go into one buffer (files are read straight into it); once it holds
    *flush_at* bytes the chunks found are handed to the store as views of it, and what
    follows the last cut starts the next buffer (from *buffers*: its size is *flush_at*
    plus the largest chunk).
    """

    def __init__(self, cdc: Chunker, store: ChunkStore, buffers: Buffers) -> None:
        self.cdc = cdc
        self.store = store
        self.buffers = buffers
        self.flush_at = buffers.size - cdc.max_size
        self.buf: mmap.mmap | bytes = b""
        self.fill = 0  # bytes in buf, not yet chunked
        self.base = 0  # stream offset of buf[0]
        self.chunks: collections.deque[tuple[int, int, ChunkId]] = collections.deque()

    @property
    def end(self) -> int:
        return self.base + self.fill

    @property
    def cut(self) -> int:
        """Everything before this offset is in chunks already."""
        return self.base

    def _room(self, n: int) -> None:
        """Room for *n* more bytes."""
        need = self.fill + n
        if need > len(self.buf):
            new = self.buffers.take(need)
            new[: self.fill] = memoryview(self.buf)[: self.fill]
            self.buf = new

    def write(self, data: bytes) -> None:
        n = len(data)
        if not n:
            return  # (an empty directory's block; the first buffer may not exist yet)
        self._room(n)
        self.buf[self.fill : self.fill + n] = data
        self.fill += n
        if self.fill >= self.flush_at:
            self._cut(final=False)

    def read_from(self, fd: int, offset: int, n: int) -> int:
        """Append up to *n* bytes of *fd* from *offset*; returns how many there were."""
        if self.fill and self.fill + n > self.buffers.size:
            # cut first: growing the buffer would copy what it holds (with the GIL held)
            # into a new one, of a size never reused (a large file's second window did)
            self._cut(final=False)
        self._room(n)
        got = read_into(fd, memoryview(self.buf)[self.fill : self.fill + n], offset)
        self.fill += got
        if self.fill >= self.flush_at:
            self._cut(final=False)
        return got

    def finish(self) -> None:
        self._cut(final=True)

    def _cut(self, final: bool) -> None:
        if not self.fill:
            return
        old = self.buf
        data = memoryview(old)[: self.fill]  # chunks are views of it: a new buf follows
        pieces = [(c.offset, c.length) for c in self.cdc.cut_buf(data)]
        if not final:
            pieces = pieces[:-1]  # the last cut is only where the buffer ended
        ids = self.store.submit_all([data[off : off + length] for off, length in pieces])
        for (off, length), cid in zip(pieces, ids, strict=True):
            self.chunks.append((self.base + off, length, cid))
        used = pieces[-1][0] + pieces[-1][1] if pieces else 0
        rest = self.fill - used
        self.buf = self.buffers.take(self.buffers.size) if not final else b""
        if rest:
            self.buf[:rest] = data[used:]
        self.fill = rest
        self.base += used
        data.release()
        self.buffers.give(old, list({c.fut for c in ids}))

    def slices(self, start: int, end: int) -> list[tuple[ChunkId, int, int]]:
        out = []
        for cstart, clen, fut in self.chunks:
            if cstart + clen <= start:
                continue
            if cstart >= end:
                break
            lo, hi = max(start, cstart), min(end, cstart + clen)
            out.append((fut, lo - cstart, hi - lo))
        return out

    def forget_before(self, offset: int) -> None:
        while self.chunks and self.chunks[0][0] + self.chunks[0][1] <= offset:
            self.chunks.popleft()

def data_extents(fd: int, size: int) -> list[list[int]]:
    """[offset, length] of the data regions of a sparse file (SEEK_DATA/SEEK_HOLE)."""
    out: list[list[int]] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append([start, min(end, size) - start])
        pos = end
    return out


def open_for_reading(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOATIME)
    except PermissionError:  # O_NOATIME needs the file's owner (or CAP_FOWNER)
        pass
    except OSError as e:
        raise RuntimeFailure(f"cannot read {path}: {e.strerror}") from None
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise RuntimeFailure(f"cannot read {path}: {e.strerror}") from None


def read_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill *view* from *fd* at *offset*; fewer bytes only at the end of the file."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if not n:
            break
        done += n
    return done


def chunk_file(store: ChunkStore, cdc: Chunker, buffers: Buffers, fd: int,
               path: str, regions: list[list[int]], exact: bool) -> tuple[list[list], int]:
    """Chunk one file's data *regions* as one stream (in the file pool, FILE_WINDOW bytes at
    a time) and store the chunks (in the chunk pool); closes *fd*. Returns the file's slices
    and how many bytes were read. With *exact*, a file that shrank ends where its data did."""
    stream = Stream(cdc, store, buffers)
    try:
        for off, ln in regions:
            pos, end = off, off + ln
            while pos < end:
                want = min(FILE_WINDOW, end - pos)
                got = stream.read_from(fd, pos, want)
                pos += got
                if got < want:
                    break
            if pos < end and exact:
                break
        stream.finish()
    except OSError as e:
        raise RuntimeFailure(f"cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    return [[fut.result(), 0, n] for _, n, fut in stream.chunks], stream.end


Excluder = Callable[[str, bool], bool]
Progress = Callable[[int, int], None]  # (files done, bytes done)


class _Pending:
    """One line of the file list, written once the chunks it names are known."""

    __slots__ = ("entry", "file", "ranges", "raw", "slot", "stream")

    def __init__(self, entry: T.Entry | None, stream: Stream | None = None,
                 ranges: list | None = None, slot: tuple[_DirBuild, int] | None = None,
                 raw: bytes | None = None, file: Future | None = None) -> None:
        self.entry = entry
        self.stream = stream
        self.ranges = ranges  # (start, end) on stream, or resolved (future, offset, length)
        self.slot = slot  # where the line goes in the files cache
        self.raw = raw  # lines reused from the files cache, written as they are
        self.file = file  # a file chunked on its own: (slices, bytes read)


class _DirBuild:
    """A directory's files cache record while its lines are being written."""

    __slots__ = ("chunks", "counts", "lines", "links", "names", "rel", "sigs", "skipped",
                 "subdirs")

    def __init__(self, rel: str, names: list[str]) -> None:
        n = len(names)
        self.rel = rel
        self.names = names
        self.sigs: list[Sig] = [UNTRUSTED] * n
        self.lines: list[bytes] = [b""] * n
        self.chunks: list[tuple[str, ...]] = [()] * n
        self.subdirs: list[int] = []
        self.links: list[tuple[int, int, int, str]] = []
        self.counts = (0, 0, 0, 0)
        self.skipped: list[str] = []

    def record(self) -> tuple[DirRecord, DirLines]:
        return make_record(self.names, self.sigs, self.lines, self.chunks, self.subdirs,
                           self.links, self.counts, self.skipped)


class TreeWriter:
    """Walks a directory and writes its entries and contents into the repository.

    The walk goes directory by directory; a directory's entries are written together (in
    name order), then its subdirectories in turn. With a files cache, a directory whose
    entries all kept their signatures has its lines copied from the cache (filescache.py).
    """

    def __init__(self, repo: Repository, store: ChunkStore, *, cache: FilesCache | None = None,
                 exclude: Excluder | None = None, progress: Progress | None = None,
                 log: Callable[[str], None] = lambda m: None) -> None:
        mn, avg, mx = repo.chunker_params
        self.cdc = Chunker(mn, avg, mx)  # the small files' stream
        self.file_cdc = Chunker(*repo.file_chunker_params)  # large files
        tree_cdc = Chunker(*repo.tree_chunker_params)  # the file list
        self.avg = avg  # a file this big is large
        self.repo = repo
        self.store = store
        self.cache = cache
        self.exclude = exclude
        self.progress = progress
        self.log = log
        self.stats = store.stats
        self.buffers = Buffers(FILE_WINDOW + max(mx, self.file_cdc.max_size, tree_cdc.max_size))
        self.small = Stream(self.cdc, store, self.buffers)
        self.meta = Stream(tree_cdc, store, self.buffers)
        self.queue: collections.deque[_Pending] = collections.deque()
        self.small_starts: collections.deque[int] = collections.deque()  # of queued entries
        self.hardlinks: dict[tuple[int, int], str] = {}
        self.builds: list[_DirBuild] = []
        self.racy_ns = 0  # entries changed after this are not trusted by the next backup
        # reused directories whose lines are not written yet: while nothing changed, the
        # last file list may be reused whole (their lines are then never even decoded)
        self.held: list[str] | None = [] if cache is not None and cache.old_tree else None
        self.root_dev = 0
        self.root_fd = -1  # the walked tree's root, open while it is walked
        self.ahead: StatAhead | None = None  # checks the cache's last directories meanwhile

    # --- output in walk order ----------------------------------------------------------------
    def _emit(self, p: _Pending) -> None:
        self.queue.append(p)
        if p.stream is not None:
            self.small_starts.append(p.ranges[0][0] if p.ranges else self.small.end)
        self._drain(force=False)

    def _write_lines(self, raw: bytes) -> None:
        if self.queue:
            self.queue.append(_Pending(None, raw=raw))
        else:
            self.meta.write(raw)

    def _release_held(self) -> None:
        """Something changed: write the lines of the directories reused so far."""
        if self.held is not None:
            rels, self.held = self.held, None
            for rel in rels:
                self._write_lines(self.cache.old_lines(rel).block)

    def _drain(self, force: bool) -> None:
        while self.queue:
            p = self.queue[0]
            if p.stream is not None:
                start, end = p.ranges[0] if p.ranges else (0, 0)
                if p.ranges and p.stream.cut < end:
                    if not force:
                        return
                    p.stream.finish()
                resolved = p.stream.slices(start, end) if p.ranges else []
                p.stream = None
                p.ranges = resolved
                self.small_starts.popleft()
            waiting = (p.file is not None and not p.file.done()) or (
                p.ranges and not all(f.done() for f, _, _ in p.ranges))
            if waiting and not force:
                break  # keep reading while the workers finish; never wait here
            self.queue.popleft()
            if p.raw is not None:
                self.meta.write(p.raw)
                continue
            e = p.entry
            if p.file is not None:
                e.chunks, nread = p.file.result()
                if e.extents is None:
                    e.size = nread
                self.stats.bytes_read += nread
                self._progress(nread)
            elif p.ranges is not None:
                e.chunks = [[fut.result(), off, ln] for fut, off, ln in p.ranges]
            line = T.encode_line(e.to_dict())
            self.meta.write(line)
            if p.slot is not None:
                build, i = p.slot
                build.lines[i] = line
                build.chunks[i] = tuple(dict.fromkeys(c[0] for c in e.chunks))
        self.small.forget_before(self.small_starts[0] if self.small_starts else self.small.cut)

    # --- walking -----------------------------------------------------------------------------
    def write(self, root: Path) -> list[str]:
        """Back up the tree under *root*; returns the chunk ids of its metadata stream."""
        with T.collector_paused():
            return self._write(root)

    def _write(self, root: Path) -> list[str]:
        self.racy_ns = time.time_ns() - RACY_NS
        self.meta.write(json.dumps(T.HEADER).encode() + b"\n")
        root_st = os.lstat(root)
        if not stat.S_ISDIR(root_st.st_mode):
            raise RuntimeFailure(f"{root} is not a directory")
        self.root_dev = root_st.st_dev
        self._add(str(root), ".", root_st)  # a directory: its line is written at once
        head = bytes(memoryview(self.meta.buf)[: self.meta.fill])
        stack = [(str(root), "", False)]
        # entries are looked up below the root's descriptor by their paths in the tree, not
        # from / (each path component is one more lookup: the root of the bench's Debian CT
        # is 6 deep; its unchanged walk's stats took 1 ms less of 39)
        self.root_fd = open_dir(str(root))
        if self.cache is not None and self.cache.use_inode:
            self.ahead = StatAhead.start(self.root_fd, self.root_dev, self.cache.old)
        try:
            while stack:
                stack.extend(reversed(self._dir(*stack.pop())))
        finally:
            if self.ahead is not None:
                self.ahead.close()
                self.ahead = None
            os.close(self.root_fd)
        self.small.finish()
        self._drain(force=True)
        tree = self._same_tree(head)
        if tree is None:
            self._release_held()
            self.meta.finish()
            tree = tuple(fut.result() for _, _, fut in self.meta.chunks)
        if self.cache is not None:
            for b in self.builds:
                self.cache.put(b.rel, *b.record())
            self.cache.tree = (head, tree)
        return list(tree)

    def _same_tree(self, head: bytes) -> tuple[str, ...] | None:
        """The last backup's file list chunks, if this one is the same byte for byte: every
        directory's lines were reused (so in the same walk order; none written yet) after
        the same header and root lines."""
        cache = self.cache
        old: Tree | None = cache.old_tree if cache is not None else None
        if old is None or self.held is None or old[0] != head:
            return None
        if not cache.unchanged() or not self.store.known.issuperset(old[1]):
            return None
        self.store.refs.update(old[1])
        return old[1]

    def _dir(self, abs_dir: str, rel_dir: str, same_names: bool) -> list[tuple[str, str, bool]]:
        """Write the entries of one directory; returns the subdirectories to walk, each with
        whether its own signature held (*same_names*: it still has the names cached for
        it, since adding, removing or renaming an entry sets a directory's mtime)."""
        old = self.cache.get(rel_dir) if self.cache is not None else None
        checked = self.ahead is not None and self.ahead.same(rel_dir)  # (now the walk's)
        base = abs_dir.rstrip("/") + "/"
        prefix = rel_dir + "/" if rel_dir else ""
        sts = None
        if same_names and old is not None:
            names = old.names.split(NAME_SEP) if old.names else []
            if checked and self._reuse(old, rel_dir, names):
                return [(base + names[i], prefix + names[i], True) for i in old.subdirs]
            # no listing; None if one vanished meanwhile
            sts = stat_names(self.root_fd, rel_dir, names, abs_dir)
        listed = sts is None
        if listed:
            names, sts = list_dir(self.root_fd, rel_dir, abs_dir)
        if old is not None and self.cache.use_inode and \
                self._reuse_dir(old, rel_dir, names, sts, listed):
            return [(base + names[i], prefix + names[i], True) for i in old.subdirs]
        return [(base + names[i], prefix + names[i], same)
                for i, same in self._entries(abs_dir, rel_dir, names, sts, old)]

    def _reuse_dir(self, old: DirRecord, rel_dir: str, names: list[str],
                   sts: list[os.stat_result | None], listed: bool) -> bool:
        """Copy a directory's lines from the files cache if none of its entries changed
        (*listed*: its names were read from the directory, not taken from *old*)."""
        if listed and (None in sts or old.names != NAME_SEP.join(names)):
            return False
        if packed_sigs(map(signature, sts)) != old.sigs:
            return False
        if any(sts[i].st_dev != self.root_dev for i in old.subdirs):
            return False  # a mount point appeared
        return self._reuse(old, rel_dir, names)

    def _reuse(self, old: DirRecord, rel_dir: str, names: list[str]) -> bool:
        """Copy the lines of a directory whose entries all kept their signatures, if its
        chunks are still known and its hardlinks still hold."""
        if not self.store.known.issuperset(old.chunks):
            return False
        if old.links and not self._claim_links(old.links, names, rel_dir):
            return False
        self.store.refs.update(old.chunks)
        files, dirs, other, nbytes = old.counts
        st = self.stats
        st.files += files
        st.cache_hits += files
        st.dirs += dirs
        st.other += other
        st.bytes_total += nbytes
        st.skipped.extend(old.skipped)
        if self.held is not None:
            self.held.append(rel_dir)
        else:
            self._write_lines(self.cache.old_lines(rel_dir).block)
        self.cache.put(rel_dir, old)
        self._progress(nbytes)
        return True

    def _claim_links(self, links: tuple[tuple[int, int, int, str], ...], names: list[str],
                     rel_dir: str) -> bool:
        """Register the cached hardlinked files if the walk so far left them as they were
        (the first name of an inode stored its content, the others point to it)."""
        prefix = rel_dir + "/" if rel_dir else ""
        added = []
        for i, dev, ino, target in links:
            have = self.hardlinks.get((dev, ino), "")
            if have != target:
                for k in added:
                    del self.hardlinks[k]
                return False
            if not target:
                added.append((dev, ino))
                self.hardlinks[(dev, ino)] = prefix + names[i]
        return True

    def _entries(self, abs_dir: str, rel_dir: str, names: list[str],
                 sts: list[os.stat_result | None], old: DirRecord | None
                 ) -> list[tuple[int, bool]]:
        """Write a directory's entries one by one (reusing unchanged ones' cached lines);
        returns the subdirectories to walk: (index, whether its line was reused)."""
        base = abs_dir.rstrip("/") + "/"
        prefix = rel_dir + "/" if rel_dir else ""
        build = None
        if self.cache is not None:
            build = _DirBuild(rel_dir, names)
            self.builds.append(build)
        self._release_held()
        old_at = entries(old, self.cache.old_lines(rel_dir)) if old is not None else {}
        st0 = self.stats
        before = (st0.files, st0.dirs, st0.other, st0.bytes_total, len(st0.skipped))
        subdirs = []
        for i, (name, st) in enumerate(zip(names, sts, strict=True)):
            if st is None:
                continue  # vanished since it was listed
            rel = prefix + name
            is_dir = stat.S_ISDIR(st.st_mode)
            if build is not None and st.st_ctime_ns < self.racy_ns:
                build.sigs[i] = signature(st)
            if self.exclude and self.exclude("/" + rel, is_dir):
                continue
            was = old_at.get(name)
            slot = (build, i) if build is not None else None
            reused = was is not None and self._reuse_line(*was, st, build, i)
            if not reused:
                content = self._old_content(*was, st) if was is not None else None
                self._add(base + name, rel, st, slot, content)
            if is_dir and st.st_dev == self.root_dev:
                subdirs.append((i, reused))
        if build is not None:
            build.subdirs = [i for i, _ in subdirs]
            build.counts = (st0.files - before[0], st0.dirs - before[1], st0.other - before[2],
                            st0.bytes_total - before[3])
            build.skipped = st0.skipped[before[4]:]
        return subdirs

    def _reuse_line(self, sig: Sig, line: bytes, st: os.stat_result,
                    build: _DirBuild | None, i: int) -> bool:
        """Copy one unchanged entry's line from the files cache."""
        if (not self.cache.use_inode or not line
                or sig != signature(st)):
            return False
        mode = st.st_mode
        if stat.S_ISREG(mode) and st.st_nlink > 1:
            return False  # which name is the hardlink target depends on the walk: redo it
        chunks = line_chunks(line)
        if not self.store.known.issuperset(chunks):
            return False
        self.store.refs.update(chunks)
        s = self.stats
        if stat.S_ISREG(mode):
            s.files += 1
            s.cache_hits += 1
            s.bytes_total += st.st_size
        elif stat.S_ISDIR(mode):
            s.dirs += 1
        else:
            s.other += 1
        if build is not None:
            build.lines[i] = line
            build.chunks[i] = chunks
        self._write_lines(line)
        return True

    def _old_content(self, sig: Sig, line: bytes, st: os.stat_result) -> list | None:
        """The cached chunk slices and extents of a file whose content is unchanged."""
        ino, size, mtime, ctime = sig
        if not stat.S_ISREG(st.st_mode) or size != st.st_size or mtime != st.st_mtime_ns:
            return None
        if self.cache.use_inode and (ino != st.st_ino or ctime != st.st_ctime_ns):
            return None
        d = json.loads(line) if line else {}
        if d.get("t") != T.FILE or not self.store.known.issuperset(c[0] for c in d["c"]):
            return None
        return [d["c"], d.get("e")]

    def _add(self, abs_p: str, rel: str, st: os.stat_result,
             slot: tuple[_DirBuild, int] | None = None, content: list | None = None) -> None:
        mode = st.st_mode
        e = T.Entry(rel, "", stat.S_IMODE(mode), st.st_uid, st.st_gid, st.st_mtime_ns)
        if stat.S_ISDIR(mode):
            e.kind = T.DIR
            self.stats.dirs += 1
        elif stat.S_ISLNK(mode):
            e.kind = T.SYMLINK
            e.link = os.readlink(abs_p)
            self.stats.other += 1
        elif stat.S_ISSOCK(mode):
            self.stats.skipped.append(rel)  # like tar: sockets are not archived
            return
        elif st.st_nlink > 1 and (st.st_dev, st.st_ino) in self.hardlinks:
            e.kind = T.HARDLINK
            e.link = self.hardlinks[(st.st_dev, st.st_ino)]
            self.stats.other += 1
        elif stat.S_ISREG(mode):
            e.kind = T.FILE
            if st.st_nlink > 1:
                self.hardlinks[(st.st_dev, st.st_ino)] = rel
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            e.kind = T.CHAR if stat.S_ISCHR(mode) else T.BLOCK
            e.rdev = st.st_rdev
            self.stats.other += 1
        elif stat.S_ISFIFO(mode):
            e.kind = T.FIFO
            self.stats.other += 1
        else:
            self.stats.skipped.append(rel)
            return
        if slot is not None and st.st_nlink > 1 and stat.S_ISREG(mode):
            target = e.link if e.kind == T.HARDLINK else ""
            slot[0].links.append((slot[1], st.st_dev, st.st_ino, target))
        if e.kind != T.FILE:
            e.xattrs = T.read_xattrs(abs_p)
            self._emit(_Pending(e, slot=slot))
            return
        self._add_file(abs_p, e, st, slot, content)

    def _add_file(self, abs_p: str, e: T.Entry, st: os.stat_result,
                  slot: tuple[_DirBuild, int] | None, content: list | None) -> None:
        self.stats.files += 1
        self.stats.bytes_total += st.st_size
        if content is not None:
            e.xattrs = T.read_xattrs(abs_p)
            e.size, e.chunks, e.extents = st.st_size, content[0], content[1]
            self.stats.cache_hits += 1
            self.store.refs.update(c[0] for c in e.chunks)
            self._emit(_Pending(e, slot=slot))
            self._progress(st.st_size)
            return
        fd = open_for_reading(abs_p)
        try:
            e.xattrs = T.read_xattrs(fd)  # (from the descriptor: no path lookup)
            extents = None
            if st.st_blocks * 512 < st.st_size:
                extents = data_extents(fd, st.st_size)
            regions = extents if extents is not None else [[0, st.st_size]]
            if sum(ln for _, ln in regions) >= self.avg:  # chunked on its own, in the pool
                e.size, e.extents = st.st_size, extents  # (the bytes read, if not sparse)
                fut = self.store.submit_file(chunk_file, self.store, self.file_cdc, self.buffers,
                                             fd, abs_p, regions, extents is None)
                fd = -1  # the task closes it
                self._emit(_Pending(e, file=fut, slot=slot))
                return
            stream = self.small
            start = stream.end
            for off, ln in regions:
                got = stream.read_from(fd, off, ln)
                if got < ln and extents is None:  # the file shrank while read: keep what exists
                    break
            end = stream.end
            self.stats.bytes_read += end - start
            self._progress(end - start)
            e.size = st.st_size if extents is not None else end - start
            e.extents = extents
        except OSError as e2:
            raise RuntimeFailure(f"cannot read {abs_p}: {e2.strerror}") from None
        finally:
            if fd >= 0:
                os.close(fd)
        self._emit(_Pending(e, stream, [(start, end)] if end > start else [], slot))

    def _progress(self, nbytes: int) -> None:
        if self.progress:
            self.progress(self.stats.files, nbytes)


def line_chunks(line: bytes) -> tuple[str, ...]:
    """The chunk ids a file list line references."""
    return tuple(dict.fromkeys(c[0] for c in json.loads(line).get("c", ())))


def manifest_lists(repo: Repository, store: ChunkStore, tree: list[str],
                   state_tree: list[str] | None) -> dict[str, object]:
    """The Manifest fields that name a snapshot's chunks, once *store* has processed every
    chunk of it (``ChunkStore.wait``). Version 4 (FORMAT.md) stores each list of chunk ids
    as chunks (an unchanged backup's lists are the last one's chunks): ``lists``; older
    versions keep the lists in the manifest."""
    inline = {"tree": tree, "state_tree": state_tree, "refs": sorted(store.refs)}
    if repo.version < LISTED:
        return inline
    return {"lists": {name: store.process_all(cut_id_list(ids))
                      for name, ids in inline.items() if ids is not None}}


def cut_id_list(ids: list[str]) -> list[bytes]:
    """*ids* as 32 raw bytes each, cut into chunks by the ids themselves (FORMAT.md)."""
    data = bytes.fromhex("".join(ids))  # (one conversion: half the time of one per id)
    out, start, run = [], 0, 0
    for i, last in enumerate(data[ID_SIZE - 1 :: ID_SIZE]):
        run += 1
        if last % ID_CUT == 0 or run == ID_RUN_MAX:
            end = (i + 1) * ID_SIZE
            out.append(data[start:end])
            start, run = end, 0
    if start < len(data):
        out.append(data[start:])
    return out
