"""Read snapshots back: load a tree, stream file contents, restore a tree to a directory.

Restoring never writes outside the target: every path is validated, parents are opened
component by component with O_NOFOLLOW relative to the target's directory fd, and entries
are created with the ``*at`` calls, so a symlink in the snapshot can't redirect a later
entry. Chunks are fetched (ranged reads of their packs) ahead of the writer by a small
thread pool and opened (decrypted, decompressed) shortly before they are written, checked by
their frame's checksum or GCM tag (a blob without either gets its chunk id computed again:
``Repository.open_chunk``). With two CPUs and
SPLIT_MIN_FILES files or more, a forked second process restores half of the regular files
(``_restore_in_two``), reading the storage through a client of its own.

The read API other components build on (a FUSE mount, ``ls``, ``cat``):
``Repository.open`` -> ``Repository.manifests()`` -> :func:`load_tree` -> :func:`read_range`.
"""

from __future__ import annotations

import bisect
import contextlib
import heapq
import marshal
import os
import signal
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from vzbackup.ct import fs
from vzbackup.engine import tree as T
from vzbackup.engine.forked import fork_child
from vzbackup.engine.repo import Repository
from vzbackup.errors import DamagedError, ExistsError, RuntimeFailure, StorageError
from vzbackup.storage.backend import BackendError, ObjectMissing
from vzbackup.storage.local import pwrite_all
from vzbackup.syscalls import malloc_keeping_freed

PREFETCH_BYTES = 32 * 1024 * 1024  # packed bytes fetched ahead of the writer, or held for it
OPEN_WHOLE_MAX = 1024 * 1024  # reads up to this size are opened whole as they come in (their
# plaintext is written while still in the CPU's caches); bigger ones chunk by chunk, at most
UNPACK_AHEAD = 1024 * 1024  # this many packed bytes ahead of the writer
READ_GAP = 1024 * 1024  # read over unneeded blobs up to this size rather than split a read
PARALLEL_FILE_MAX = 1024 * 1024  # files up to this size are written whole by a writer
SEGMENT_BYTES = 512 * 1024  # bigger files: the writers write them in pieces this big (small
# pieces are written while their chunks' plaintext is still in the CPU's caches: 2 MiB cost
# a 300 MB restore 12% more CPU)
WRITE_BATCH_FILES = 32  # files per writer task at most
WRITE_BATCH_BYTES = 1024 * 1024  # and about this many bytes
THREADS_MAX = 4  # fetch or write threads at most: more only add hand-offs of the GIL
SPLIT_MIN_FILES = 512  # regular files from which a restore runs in two processes
FILE_COST = 16 * 1024  # what creating a file costs, counted in bytes of data written
V1_CHUNK_SIZE = 512 * 1024  # what a version 1 chunk object counts against PREFETCH_BYTES
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def load_tree(repo: Repository, tree_chunks: list[str]) -> list[T.Entry]:
    """The entries of a file list. Its chunks are read as ranged reads of their packs, in
    parallel: one GET after another took 0.21 s of a 3 MB list on the local RGW, 0.07 s so."""
    reads = plan_reads(repo, tree_chunks)
    plain: dict[str, bytes | DamagedError] = {}
    if len(reads) == 1:
        plain = fetch(repo, reads[0])
    elif reads:
        with ThreadPoolExecutor(min(len(reads), repo.backend.parallel_reads),
                                thread_name_prefix="tree") as pool:
            for got in pool.map(lambda r: fetch(repo, r), reads):
                plain.update(got)
    pieces = [plain[c] for c in tree_chunks]
    for p in pieces:
        if isinstance(p, DamagedError):
            raise DamagedError(str(p))
    data = b"".join(pieces)
    try:
        with T.collector_paused():  # (16.4k entries of a Debian rootfs: 48.5 -> 41.4 ms)
            return list(T.decode(data))
    except (ValueError, KeyError) as e:
        raise DamagedError(f"the snapshot's file list is unreadable ({e})") from None


@dataclass
class Read:
    """One ranged read: blobs of one object, needed from position *first* to *last* of
    the order they are used in."""

    key: str
    start: int
    end: int
    chunks: list[tuple[str, int, int]]  # (chunk id, offset, length) inside the object
    packed: bool = True
    first: int = 0
    last: int = 0


def plan_reads(repo: Repository, order: Iterable[str]) -> list[Read]:
    """Group the chunks of *order* (the order they are used in) into ranged reads, sorted
    by first use: per pack, chunks by offset, neighbours together (gaps up to READ_GAP
    are read and skipped) up to the storage's ``read_size``. Each chunk is in exactly one
    read."""
    read_max = repo.backend.read_size
    reads: list[Read] = []
    by_pack: dict[str, list[tuple[int, int, str, int]]] = {}
    for pos, cid in enumerate(order):
        key, loc = repo.locate(cid)
        if loc is None:  # a version 1 chunk object
            reads.append(Read(key, 0, 0, [(cid, 0, 0)], packed=False, first=pos, last=pos))
        else:
            by_pack.setdefault(key, []).append((loc.offset, loc.length, cid, pos))
    for key, blobs in by_pack.items():
        blobs.sort()
        cur: Read | None = None
        for off, ln, cid, pos in blobs:
            if cur is not None and cur.chunks[-1][0] == cid:  # used again later
                cur.first, cur.last = min(cur.first, pos), max(cur.last, pos)
                continue
            end = off + ln
            if cur is not None and off <= cur.end + READ_GAP and end - cur.start <= read_max:
                cur.chunks.append((cid, off, ln))
                cur.end = max(cur.end, end)
                cur.first, cur.last = min(cur.first, pos), max(cur.last, pos)
                continue
            cur = Read(key, off, end, [(cid, off, ln)], first=pos, last=pos)
            reads.append(cur)
    reads.sort(key=lambda r: r.first)
    return reads


def fetch(repo: Repository, r: Read, rehash: bool = True,
          unpack: bool = True) -> dict[str, bytes | memoryview | DamagedError]:
    """The plaintext of every chunk of a read (decrypted and verified), or its damage;
    *rehash* as ``Repository.open_chunk`` takes it. With *unpack* False a pack's blobs
    are returned as they are stored (views of the read), for the caller to open."""
    if not r.packed:
        cid = r.chunks[0][0]
        return {cid: _damage_kept(repo.get_chunk, cid, rehash)}
    try:
        data = repo.backend.get_range(r.key, r.start, r.end - r.start)
    except ObjectMissing:  # repacked by a gc since the index was loaded
        return {cid: _damage_kept(repo.get_chunk, cid, rehash) for cid, _, _ in r.chunks}
    except BackendError as e:
        raise StorageError(str(e)) from None
    view = memoryview(data)
    blobs = {cid: view[off - r.start : off - r.start + ln] for cid, off, ln in r.chunks}
    if not unpack:
        return blobs
    return {cid: _damage_kept(repo.open_chunk, cid, blob, rehash) for cid, blob in blobs.items()}


def _damage_kept(read: Callable[..., bytes], cid: str, *args: object) -> bytes | DamagedError:
    """A chunk's plaintext, or its damage kept for the file that needs it (one bad chunk in
    a read must be reported against its own file, not the first one served from the read)."""
    try:
        return read(cid, *args)
    except DamagedError as e:
        return e


class ChunkReader:
    """Serves the chunks a sequence of entries needs, in that order: their packs are read
    in few large ranged reads (plan_reads), in a thread pool, ahead of the writer. A read up
    to OPEN_WHOLE_MAX is opened whole by the thread that read it; the chunks of a bigger one
    (an object store's) are opened one by one in a second pool, UNPACK_AHEAD packed bytes
    ahead of the writer. A chunk stays in memory until its last use; when the chunks held
    (packed sizes) pass PREFETCH_BYTES, the read needed last is dropped, and what is left
    of it is read again, ahead of its next use, like any other read (a root filesystem's packs
    interleave the streams of files chunked in parallel, so a read's chunks are used far
    apart: fetched one GET per chunk, they made a Debian restore from S3 twice as slow as
    one from a directory)."""

    def __init__(self, repo: Repository, entries: Iterable[T.Entry],
                 threads: int | None = None) -> None:
        self.repo = repo
        # the order get() will be called in (a chunk shared by consecutive files once)
        order: list[str] = []
        for e in entries:
            for cid, _, _ in e.chunks:
                if not order or order[-1] != cid:
                    order.append(cid)
        self.order = order
        self.last_use = {cid: pos for pos, cid in enumerate(order)}
        self.reads = plan_reads(repo, order)
        self.read_of: dict[str, tuple[int, int]] = {}  # chunk -> (read number, packed size)
        for n, r in enumerate(self.reads):
            for cid, _, ln in r.chunks:
                self.read_of[cid] = (n, ln if r.packed else V1_CHUNK_SIZE)
        self.uses: list[list[int]] = [[] for _ in self.reads]  # read -> positions served
        for pos, cid in enumerate(order):
            self.uses[self.read_of[cid][0]].append(pos)
        self.again: list[tuple[int, int]] = []  # heap: (next use, read) of dropped reads
        self.pool = ThreadPoolExecutor(max_workers=threads or fetch_threads(repo),
                                       thread_name_prefix="fetch")
        self.unpacker = ThreadPoolExecutor(max_workers=threads or cpu_threads(),
                                           thread_name_prefix="unpack")
        self.unpacking: dict[int, Future] = {}  # position -> its chunk's plaintext
        self.unpack_next = 0  # the next position to unpack ahead
        self.unpack_bytes = 0  # packed bytes of the chunks unpacking ahead
        self.held: dict[int, Future] = {}  # read number -> its chunks not yet served
        self.left: dict[int, int] = {}  # read number -> packed bytes of those chunks
        self.held_bytes = 0
        self.submitted = 0  # reads submitted so far (in first-use order)
        self.pos = -1  # position in order of the chunk served last
        self.data = b""  # and its plaintext

    def _drop(self, n: int) -> None:
        self.held.pop(n).cancel()
        self.held_bytes -= self.left.pop(n)
        uses = self.uses[n]
        i = bisect.bisect_right(uses, self.pos)
        if i < len(uses) and self.reads[n].packed:  # needed again: read it again then
            heapq.heappush(self.again, (uses[i], n))

    def _next(self) -> tuple[int, int, Read, int] | None:
        """(position needed at, read number, read, packed size) of the read to submit next:
        a new one or what is left of a dropped one, whichever is needed first."""
        new = self.reads[self.submitted] if self.submitted < len(self.reads) else None
        while self.again and (new is None or self.again[0][0] < new.first):
            at, n = self.again[0]
            r = self.reads[n]
            rest = [c for c in r.chunks if self.last_use[c[0]] >= self.pos]
            if n in self.held or not rest:  # read again already, or served meanwhile
                heapq.heappop(self.again)
                continue
            part = Read(r.key, rest[0][1], max(off + ln for _, off, ln in rest), rest,
                        first=at, last=r.last)
            return at, n, part, sum(self.read_of[cid][1] for cid, _, _ in rest)
        if new is None:
            return None
        size = sum(self.read_of[cid][1] for cid, _, _ in new.chunks)
        return new.first, self.submitted, new, size

    def _fill(self, now: int) -> None:
        """Submit the reads the current position needs, then more up to PREFETCH_BYTES;
        over budget, drop what is needed last (not read *now*, which serves this chunk)."""
        while (nxt := self._next()) is not None:
            at, n, r, size = nxt
            if at > self.pos and self.held_bytes + size > PREFETCH_BYTES:
                break
            if n == self.submitted:
                self.submitted += 1
            else:
                heapq.heappop(self.again)
            self.held[n] = self.pool.submit(fetch, self.repo, r, rehash=False,
                                            unpack=r.end - r.start <= OPEN_WHOLE_MAX)
            self.left[n] = size
            self.held_bytes += size
        while self.held_bytes > PREFETCH_BYTES and len(self.held) > 1:
            self._drop(max((k for k in self.held if k != now), key=lambda k: self.reads[k].last))

    def get(self, cid: str) -> bytes:
        if self.pos >= 0 and self.order[self.pos] == cid:
            return self.data
        if self.pos + 1 >= len(self.order) or self.order[self.pos + 1] != cid:
            return self.repo.get_chunk(cid)  # not in the planned order (a partial extract)
        self.pos += 1
        for n in [n for n in self.held if self.reads[n].last < self.pos]:
            self._drop(n)  # every chunk it holds was served (or skipped)
        now, size = self.read_of[cid]
        self._fill(now)
        fut = self.held.get(now)  # None: a version 1 chunk object dropped for the budget
        if fut is None:
            data: bytes | DamagedError = self.repo.get_chunk(cid)
        else:
            data = self._plaintext(cid, fut.result())
            if self.last_use[cid] == self.pos:  # its last use: let it go once written
                del fut.result()[cid]
                self.held_bytes -= size
                self.left[now] -= size
                if not self.left[now]:
                    self._drop(now)
        self._unpack_ahead()
        if isinstance(data, DamagedError):
            raise DamagedError(str(data))
        self.data = data
        return data

    def _plaintext(self, cid: str, chunks: dict) -> bytes | DamagedError:
        """The chunk at the current position, opened (ahead, or now); kept opened in its
        read's *chunks* if it is used again."""
        job = self.unpacking.pop(self.pos, None)
        if job is not None:
            self.unpack_bytes -= self.read_of[cid][1]
            data = job.result()
        elif isinstance(chunks[cid], memoryview):
            data = _damage_kept(self.repo.open_chunk, cid, chunks[cid], False)
        else:
            data = chunks[cid]
        if self.last_use[cid] > self.pos:
            chunks[cid] = data
        return data

    def _unpack_ahead(self) -> None:
        """Open the next chunks whose reads are in, up to UNPACK_AHEAD packed bytes ahead of
        the writer, in the unpack threads: their plaintext is written while it is still in
        the CPU's caches (opened as each read came in, it was not, and writing it into the
        page cache cost ~4x as much)."""
        p = max(self.unpack_next, self.pos + 1)
        while p < len(self.order) and self.unpack_bytes < UNPACK_AHEAD:
            cid = self.order[p]
            n, size = self.read_of[cid]
            fut = self.held.get(n)
            if fut is None or not fut.done() or fut.exception() is not None:
                break
            blob = fut.result().get(cid)
            if isinstance(blob, memoryview):
                self.unpacking[p] = self.unpacker.submit(
                    _damage_kept, self.repo.open_chunk, cid, blob, False)
                self.unpack_bytes += size
            p += 1
        self.unpack_next = p

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.unpacker.shutdown(wait=False, cancel_futures=True)


def cpu_threads() -> int:
    """Threads for work bound by the CPU: one per CPU, at most THREADS_MAX (a Debian rootfs
    restore on 2 CPUs, 2 fetch + 2 write threads against 4 + 4: 1.78 s against 2.10 s, CPU
    2.70 s against 3.10 s: the extra threads only waited for the GIL)."""
    return min(THREADS_MAX, os.cpu_count() or 2)


def fetch_threads(repo: Repository) -> int:
    """Threads fetching chunks: a fetch from local storage is decompression and hashing
    (cpu_threads); one from remote storage also waits on the network, so more are in flight."""
    return THREADS_MAX if repo.backend.cache_metadata else cpu_threads()


def file_pieces(reader: ChunkReader, e: T.Entry) -> Iterator[memoryview]:
    for cid, off, ln in e.chunks:
        try:
            data = reader.get(cid)
        except DamagedError as err:
            raise DamagedError(f"{e.path}: {err}") from None
        if off + ln > len(data):
            raise DamagedError(f"{e.path}: chunk {cid[:16]} is shorter than the file needs")
        yield memoryview(data)[off : off + ln]


def read_range(repo: Repository, e: T.Entry, offset: int, length: int) -> bytes:
    """Bytes [offset, offset+length) of the file *e* (holes read as zeros), fetching only
    the chunks that hold them: the random-access read a FUSE mount needs."""
    end = min(e.size, offset + length)
    if offset >= end:
        return b""
    out = bytearray(end - offset)
    regions = e.extents if e.extents is not None else [[0, e.size]]
    dpos = 0  # where the region starts in the file's data (its extents back to back)
    for roff, rlen in regions:
        lo, hi = max(offset, roff), min(end, roff + rlen)
        if lo < hi:
            data = _data_range(repo, e.chunks, dpos + lo - roff, dpos + hi - roff)
            out[lo - offset : lo - offset + len(data)] = data
        dpos += rlen
    return bytes(out)


def _data_range(repo: Repository, chunks: list[list], lo: int, hi: int) -> bytes:
    parts = []
    pos = 0
    for cid, coff, clen in chunks:
        if pos >= hi:
            break
        if pos + clen > lo:
            data = repo.get_chunk(cid)
            parts.append(data[coff + max(lo, pos) - pos : coff + min(hi, pos + clen) - pos])
        pos += clen
    return b"".join(parts)


class _Dirs:
    """Directory fds below the target, opened without following symlinks."""

    def __init__(self, root_fd: int, strip_acls: bool = False,
                 before_close: Callable[[], None] = lambda: None) -> None:
        self.root_fd = root_fd
        self.cache: dict[str, int] = {}
        self.strip_acls = strip_acls  # a default ACL in the tree: drop what entries inherit
        self.before_close = before_close  # writers still using the fds finish first
        self.uid, self.gid = os.geteuid(), os.getegid()  # the owner new entries get
        self.umask = os.umask(0o077)
        os.umask(self.umask)
        self.group_of: dict[str, int] = {}  # set-group-ID directories made: their group

    def made(self, rel: str, e: T.Entry) -> None:
        """Directory *rel* now exists as *e* says (what is made in it inherits its group
        when it is set-group-ID)."""
        if e.mode & stat.S_ISGID:
            self.group_of[rel] = e.gid

    def birth(self, e: T.Entry) -> Birth:
        """How to create the file or symlink *e* with the fewest calls: with its final mode
        when the umask keeps it (and no inherited ACL or special bit is involved), without
        a chown when it is born with its owner."""
        parent = e.path.rpartition("/")[0]
        born = (self.uid, self.group_of.get(parent, self.gid))
        plain = not self.strip_acls and not e.mode & (0o7000 | self.umask)
        return Birth(e.mode if plain else 0o600, (e.uid, e.gid) != born, not plain,
                     self.strip_acls)

    def parent(self, rel: str) -> tuple[int, str]:
        head, _, name = rel.rpartition("/")
        return self.open_dir(head), name

    def open_dir(self, rel: str) -> int:
        if not rel:
            return self.root_fd
        fd = self.cache.get(rel)
        if fd is not None:
            return fd
        head, _, name = rel.rpartition("/")
        pfd = self.open_dir(head)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=pfd)
        except OSError as e:
            raise DamagedError(
                f"{rel}: not a directory in the restored tree ({e.strerror})"
            ) from None
        if len(self.cache) > 256:
            self.before_close()
            self.close()
        self.cache[rel] = fd
        return fd

    def close(self) -> None:
        for fd in self.cache.values():
            os.close(fd)
        self.cache.clear()


INHERITED_ACLS = ("system.posix_acl_access", "system.posix_acl_default")


class Birth(NamedTuple):
    """How a new file is made: the mode it is created with, and what must be set after."""

    mode: int
    chown: bool = True
    chmod: bool = True
    strip_acls: bool = False


ADOPTED = Birth(0o600)  # created 0o600, then owner and mode set


def _set_meta(e: T.Entry, pfd: int, name: str, fd: int | None, how: Birth = ADOPTED) -> None:
    if fd is not None:
        if how.chown:
            os.fchown(fd, e.uid, e.gid)
        if how.chmod:
            os.fchmod(fd, e.mode)
        for k in INHERITED_ACLS if how.strip_acls else ():  # inherited, not in the backup
            if k not in e.xattrs:
                with contextlib.suppress(OSError):
                    os.removexattr(fd, k)
        for k, v in e.xattrs.items():
            with contextlib.suppress(OSError):
                os.setxattr(fd, k, v)
    else:
        if how.chown:
            os.chown(name, e.uid, e.gid, dir_fd=pfd, follow_symlinks=False)
        if e.kind != T.SYMLINK:
            os.chmod(name, e.mode, dir_fd=pfd)
        for k, v in e.xattrs.items():
            with contextlib.suppress(OSError):
                os.setxattr(f"/proc/self/fd/{pfd}/{name}", k, v, follow_symlinks=False)


class _Writers:
    """Creates and writes small files in a thread pool: a root filesystem's restore is
    mostly file creation, which blocks in the kernel without holding the GIL. Files go to
    the pool in batches (WRITE_BATCH_FILES or WRITE_BATCH_BYTES): a task per file cost
    three thread wake-ups each, 12% of a Debian restore's CPU in the scheduler."""

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="write")
        self.slots = threading.BoundedSemaphore(threads * 4)  # bounds the data held
        self.pending: list[Future] = []
        self.batch: list[tuple[Callable[..., int], tuple]] = []
        self.batch_bytes = 0
        self.written = 0
        self.open_files: set[_BigFile] = set()  # big files being written in segments

    def submit(self, size: int, fn: Callable[..., int], *args: object) -> None:
        """Run ``fn(*args)`` (it writes about *size* bytes) in the pool, batched."""
        self.batch.append((fn, args))
        self.batch_bytes += size
        if len(self.batch) >= WRITE_BATCH_FILES or self.batch_bytes >= WRITE_BATCH_BYTES:
            self._send()

    def _send(self) -> None:
        if not self.batch:
            return
        batch, self.batch, self.batch_bytes = self.batch, [], 0
        self.slots.acquire()
        try:
            fut = self.pool.submit(_run_batch, batch)
        except BaseException:
            self.slots.release()
            raise
        fut.add_done_callback(lambda f: self.slots.release())
        self.pending.append(fut)
        if len(self.pending) >= 64:
            self._reap(wait=False)

    def _reap(self, wait: bool) -> None:
        left = []
        for fut in self.pending:
            if wait or fut.done():
                self.written += fut.result()  # raises what the writer raised
            else:
                left.append(fut)
        self.pending = left

    def drain(self) -> None:
        """Wait for every file submitted so far; raise the first failure."""
        try:
            self._send()
            self._reap(wait=True)
        finally:
            self.pending = [f for f in self.pending if not f.done()]

    def close(self) -> None:
        self.batch = []
        for fut in self.pending:
            fut.cancel()
        self.pool.shutdown(wait=True)
        self.pending = []
        for f in list(self.open_files):  # a failed restore: never finished
            f.close()


def _run_batch(batch: list[tuple[Callable[..., int], tuple]]) -> int:
    return sum(fn(*args) for fn, args in batch)


def restore_tree(
    repo: Repository,
    entries: list[T.Entry],
    target: Path,
    *,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
    allow_devices: bool = True,
    make_root: Callable[[Path], None] | None = None,
) -> int:
    """Create the tree in the new directory *target*; returns bytes written.

    The tree is built in ``target.partial`` and renamed when complete; on failure nothing
    is left behind.
    """
    if target.exists():
        raise ExistsError(f"{target} already exists")
    partial = target.with_name(target.name + ".partial")
    fs.remove_tree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    (make_root or Path.mkdir)(partial)
    root_fd = os.open(partial, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    strip_acls = any(INHERITED_ACLS[1] in e.xattrs for e in entries if e.kind == T.DIR)
    job = _Restore(repo, _Dirs(root_fd, strip_acls), threads, progress, allow_devices)
    try:
        for e in entries:
            try:
                T.safe_relpath(e.path)
            except ValueError as err:
                raise DamagedError(f"snapshot has {err}; refusing to restore it") from None
        cut = _split_files(repo, entries)
        with malloc_keeping_freed():  # (a Debian restore: ~85k -> ~60k page faults)
            if cut is None:
                job.run(entries)
            else:
                _restore_in_two(job, entries, cut)
        job.set_dir_times(entries)
    except BaseException as err:
        job.dirs.close()
        os.close(root_fd)
        fs.remove_tree(partial, ignore_errors=True)
        if isinstance(err, OSError):
            raise RuntimeFailure(f"restore into {target} failed: {err}") from None
        raise
    os.close(root_fd)
    os.rename(partial, target)
    return job.written


class _Restore:
    """Restores entries into the tree below *dirs*' root, in the order given; a directory's
    modification time is set last (``set_dir_times``), after everything in it."""

    def __init__(self, repo: Repository, dirs: _Dirs, threads: int | None,
                 progress: Callable[[int], None] | None, allow_devices: bool) -> None:
        self.repo, self.dirs, self.threads = repo, dirs, threads
        self.progress, self.allow_devices = progress, allow_devices
        self.written = 0

    def run(self, entries: list[T.Entry]) -> None:
        """Restore *entries* (a hard link's target among them or restored before)."""
        writers = _Writers(self.threads or cpu_threads())
        self.dirs.before_close = writers.drain
        reader = ChunkReader(self.repo, entries, self.threads)
        try:
            for e in entries:
                self._entry(e, writers, reader)
            writers.drain()
        finally:
            writers.close()
            reader.close()
            self.dirs.before_close = lambda: None
        self.written += writers.written

    def _entry(self, e: T.Entry, writers: _Writers, reader: ChunkReader) -> None:
        dirs = self.dirs
        if e.path == ".":
            os.fchown(dirs.root_fd, e.uid, e.gid)
            os.fchmod(dirs.root_fd, e.mode)
            dirs.made("", e)
            return
        pfd, name = dirs.parent(e.path)
        if e.kind == T.FILE and e.size <= PARALLEL_FILE_MAX:
            pieces = list(file_pieces(reader, e))
            writers.submit(e.size, _write_file, e, pfd, name, iter(pieces), dirs.birth(e))
        elif e.kind == T.FILE:
            _write_big_file(e, pfd, name, file_pieces(reader, e), writers, dirs.birth(e))
        else:
            if e.kind == T.HARDLINK:
                writers.drain()  # its target may still be being written
            writers.written += _create(e, pfd, name, dirs, self.allow_devices)
        if self.progress and e.kind == T.FILE:
            self.progress(e.size)

    def set_dir_times(self, entries: list[T.Entry]) -> None:
        """The modification time of each directory of *entries*, deepest first, set by its
        name in its parent: one call instead of an open, a set and a close (1.6k directories
        of a Debian rootfs: 4.0-4.6 -> 2.9-3.1 ms)."""
        dirs = self.dirs
        dirs.close()
        for e in reversed(entries):
            if e.kind != T.DIR:
                continue
            ns = (e.mtime_ns, e.mtime_ns)
            if e.path == ".":
                os.utime(dirs.root_fd, ns=ns)
            else:
                pfd, name = dirs.parent(e.path)
                os.utime(name, ns=ns, dir_fd=pfd, follow_symlinks=False)
        dirs.close()


def _split_files(repo: Repository, entries: list[T.Entry]) -> int | None:
    """Where to cut the regular files in two halves of ``_cost``, if two processes pay and
    may share the storage: two CPUs, enough files, no bwlimit each would take whole."""
    costs = [_cost(e) for e in entries if e.kind == T.FILE]
    if len(costs) < SPLIT_MIN_FILES or not repo.backend.shared_by_processes or \
            len(os.sched_getaffinity(0)) < 2:
        return None
    half, acc = sum(costs) / 2, 0
    for i, cost in enumerate(costs):
        acc += cost
        if acc >= half:
            return i + 1
    return len(costs)


def _cost(e: T.Entry) -> int:
    """What restoring the regular file *e* costs, in bytes written: its data (a sparse
    file's holes cost nothing) and FILE_COST per file. Most of it is per byte (decompressing,
    hashing, writing), but with 4 KiB per file the Debian rootfs' second process (238 MiB in
    10.5k files) ended 0.22 s after the first (269 MiB in 2.7k files and the other entries);
    with 16 KiB they end together (0.00-0.08 s), and 32 KiB makes the first 0.34-0.49 s late."""
    data = e.size if e.extents is None else sum(ln for _, ln in e.extents)
    return FILE_COST + data


def _restore_in_two(job: _Restore, entries: list[T.Entry], cut: int) -> None:
    """Restore in two processes: Python's per-file work holds one interpreter's lock, and a
    restore is mostly that (the kernel's share runs in parallel either way). This process
    makes the directories the regular files from *cut* on need, forks a child for those
    files, makes the other directories and restores its files, symlinks, devices and FIFOs,
    then, once the child is done, the hard links."""
    files = [e for e in entries if e.kind == T.FILE]
    needed = _parent_dirs(files[cut:])
    first = [e for e in entries if e.path == "." or (e.kind == T.DIR and e.path in needed)]
    job.run(first)
    job.repo.index  # noqa: B018 - loaded here: the child must not wait on the loader's lock
    child = _RestoreChild.start(job, files[cut:])
    try:
        done = {id(e) for e in (*first, *files[cut:])}
        job.run([e for e in entries if id(e) not in done and e.kind != T.HARDLINK])
        written, requests = child.join()
    finally:
        child.kill()
    job.written += written
    job.repo.backend.requests += requests
    if job.progress:
        job.progress(sum(e.size for e in files[cut:]))
    job.run([e for e in entries if e.kind == T.HARDLINK])


def _parent_dirs(files: list[T.Entry]) -> set[str]:
    """The directories (relative paths, with every ancestor) that hold *files*."""
    dirs: set[str] = set()
    for e in files:
        head = e.path.rpartition("/")[0]
        while head and head not in dirs:
            dirs.add(head)
            head = head.rpartition("/")[0]
    return dirs


class _RestoreChild:
    """A forked process restoring some regular files with its own readers, writers and
    storage client; it reports the bytes written and the storage requests sent, or the
    error that stopped it, through a pipe."""

    ERRORS = {c.__name__: c for c in (DamagedError, StorageError, RuntimeFailure, OSError)}

    def __init__(self, pid: int, read_fd: int) -> None:
        self.pid, self.read_fd = pid, read_fd

    @classmethod
    def start(cls, job: _Restore, files: list[T.Entry]) -> _RestoreChild:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        pid = fork_child(lambda: _child_restore(job, files, read_fd, write_fd))
        os.close(write_fd)
        return cls(pid, read_fd)

    def join(self) -> tuple[int, int]:
        """Bytes the child wrote, requests it sent; raises what stopped it."""
        with os.fdopen(self.read_fd, "rb") as f:
            self.read_fd = -1
            raw = f.read()
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        try:
            kind, value = marshal.loads(raw)
        except (EOFError, ValueError, TypeError):
            kind, value = "RuntimeFailure", f"the restore's second process ended ({status:#x})"
        if kind == "ok":
            return value[0], value[1]
        raise self.ERRORS.get(kind, RuntimeFailure)(value)

    def kill(self) -> None:
        """Stop the child if it still runs (this one failed first) and reap it."""
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0


def _failure(e: BaseException) -> tuple[str, str]:
    """*e* as the child reports it: its class, if the parent can raise it again, and text."""
    for cls in _RestoreChild.ERRORS.values():
        if isinstance(e, cls):
            return cls.__name__, str(e)
    return "RuntimeFailure", f"restore failed: {e!r}"


def _child_restore(job: _Restore, files: list[T.Entry], read_fd: int, write_fd: int) -> None:
    """The child's part: restore *files* through a repository of its own (the parent's
    connections, pools and locks are neither used nor closed here), report through
    *write_fd*."""
    os.close(read_fd)
    job.progress = None
    parents = job.repo  # kept referenced: never collected (nor closed) here
    try:
        job.repo = parents.reopened()
        before, sent = job.written, job.repo.backend.requests
        job.run(files)
        report: tuple[str, tuple[int, int] | str] = (
            "ok", (job.written - before, job.repo.backend.requests - sent))
    except BaseException as e:
        report = _failure(e)
    os.write(write_fd, marshal.dumps(report))


def _create(e: T.Entry, pfd: int, name: str, dirs: _Dirs, allow_devices: bool) -> int:
    """Make an entry that is not a regular file."""
    ns = (e.mtime_ns, e.mtime_ns)
    if e.kind == T.DIR:
        os.mkdir(name, 0o700, dir_fd=pfd)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=pfd)
        try:
            _set_meta(e, pfd, name, fd, ADOPTED._replace(strip_acls=dirs.strip_acls))
        finally:
            os.close(fd)
        dirs.made(e.path, e)
        return 0
    if e.kind == T.SYMLINK:
        os.symlink(e.link, name, dir_fd=pfd)
        _set_meta(e, pfd, name, None, dirs.birth(e))
        os.utime(name, ns=ns, dir_fd=pfd, follow_symlinks=False)
        return 0
    if e.kind == T.HARDLINK:
        try:
            T.safe_relpath(e.link)
        except ValueError as err:
            raise DamagedError(f"{e.path}: hard link to an {err}") from None
        spfd, sname = dirs.parent(e.link)
        os.link(sname, name, src_dir_fd=spfd, dst_dir_fd=pfd, follow_symlinks=False)
        return 0
    if e.kind in (T.CHAR, T.BLOCK, T.FIFO):
        if e.kind != T.FIFO and not allow_devices:
            raise DamagedError(f"{e.path}: device nodes are not allowed here")
        os.mknod(name, e.st_mode & ~0o7777 | 0o600, e.rdev, dir_fd=pfd)
        _set_meta(e, pfd, name, None)
        os.utime(name, ns=ns, dir_fd=pfd, follow_symlinks=False)
        return 0
    raise DamagedError(f"{e.path}: unknown entry type {e.kind!r}")


def _write_file(e: T.Entry, pfd: int, name: str, pieces: Iterator[memoryview],
                how: Birth) -> int:
    """Create the regular file *name* in *pfd* with the content *pieces*; bytes written."""
    fd = os.open(name, CREATE_FLAGS, how.mode, dir_fd=pfd)
    written = 0
    try:
        for offset, views, _ in _segments(e, pieces):
            written += pwrite_all(fd, views, offset)
        if e.extents is not None or written != e.size:
            os.ftruncate(fd, e.size)
        _set_meta(e, pfd, name, fd, how)
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
    finally:
        os.close(fd)
    return written


def _segments(e: T.Entry, pieces: Iterator[memoryview]
              ) -> Iterator[tuple[int, list[memoryview], int]]:
    """The file's content *pieces* placed in its regions (holes skipped), as (offset, views,
    bytes) segments of at most SEGMENT_BYTES, each within one region."""
    regions = e.extents if e.extents is not None else [[0, e.size]]
    buf: memoryview | bytes = b""
    for off, ln in regions:
        left = ln
        while left > 0:
            start, views, size = off + ln - left, [], 0
            while left > 0 and size < SEGMENT_BYTES:
                if not buf:
                    buf = next(pieces, b"")
                    if not buf:
                        raise DamagedError(f"{e.path}: content is shorter than its size")
                n = min(left, len(buf), SEGMENT_BYTES - size)
                views.append(buf[:n])
                buf, left, size = buf[n:], left - n, size + n
            yield start, views, size


class _BigFile:
    """A file the writers write in segments (in any order, at their offsets); the writer
    that finishes its last segment (or this thread, if they all finished first) sets its
    size and metadata and closes it. One that never got there is closed by the writers'
    ``close`` (a failed restore)."""

    def __init__(self, e: T.Entry, fd: int, how: Birth, writers: _Writers) -> None:
        self.e, self.fd, self.how, self.writers = e, fd, how, writers
        self.lock = threading.Lock()
        self.left = 1  # segments not written yet, plus one until every one is submitted
        self.failed = False
        writers.open_files.add(self)

    def segment(self, offset: int, views: list[memoryview]) -> int:
        """Write *views* back to back from *offset* (a writer's task); bytes written."""
        try:
            written = pwrite_all(self.fd, views, offset)
        except BaseException:
            self.failed = True
            raise
        self.done()
        return written

    def add(self) -> None:
        with self.lock:
            self.left += 1

    def done(self) -> None:
        with self.lock:
            self.left -= 1
            if self.left:
                return
        try:
            if not self.failed:
                os.ftruncate(self.fd, self.e.size)  # (holes at the end, a shrunk file)
                _set_meta(self.e, -1, "", self.fd, self.how)
                os.utime(self.fd, ns=(self.e.mtime_ns, self.e.mtime_ns))
        finally:
            self.close()

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
                self.writers.open_files.discard(self)


def _write_big_file(e: T.Entry, pfd: int, name: str, pieces: Iterator[memoryview],
                    writers: _Writers, how: Birth) -> None:
    """Create the regular file *name* in *pfd* and have the writers write its content
    *pieces* in SEGMENT_BYTES segments: big files are written in parallel with each other
    and with the small ones, while this thread goes on reading the tree."""
    fd = os.open(name, CREATE_FLAGS, how.mode, dir_fd=pfd)
    f = _BigFile(e, fd, how, writers)
    try:
        for start, views, size in _segments(e, pieces):
            f.add()
            writers.submit(size, f.segment, start, views)
    except BaseException:
        f.failed = True  # closed by the writers' close
        raise
    f.done()


def find(entries: list[T.Entry], path: str) -> list[T.Entry]:
    """Entries at *path* and below it ('/' or '' is everything)."""
    p = path.strip("/")
    if not p or p == ".":
        return entries
    return [e for e in entries if e.path == p or e.path.startswith(p + "/")]

