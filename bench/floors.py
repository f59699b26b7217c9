"""The CPU a backup and a restore of a tree cannot avoid, whatever the tool (bench/backup.py).

    python bench/floors.py REPO_DIR TREE_DIR SNAPSHOT

prints JSON: CPU seconds of

  walk_read   listing and reading every file of TREE_DIR (the kernel's part, system time
              only: the loop's own Python is not counted)
  compress    zstd at the repository's level, once per distinct chunk of SNAPSHOT (what a
              deduplicating backup must compress: the chunks themselves, not their
              duplicates), each chunk on its own as the repository stores it
  compress_all_cpus
              the same on as many threads as CPUs at once, as a backup that keeps every
              CPU busy compresses: threads that share a machine's caches and memory
              bandwidth each run slower than one alone, so this is the floor of a tool
              that wants all CPUs' wall time (tar|zstd -T0 pays the same)
  decompress  opening each of those chunks as a restore does (zstd, the frame's checksum)
  levels      the same chunks (one thread) at each zstd level up to the repository's, CPU
              and compressed bytes: whether a cheaper setting could lower the compress
              floor within the size target (on a Debian rootfs no zstd parameter set tried
              was cheaper at level 3's size: level 3 is on the frontier)
  cut, name   cutting every file's bytes into chunks as the backup does (FastCDC with the
              repository's parameters: small files as one stream, large files each on
              their own) and naming each chunk (the repository's chunk id: BLAKE3): what
              a deduplicating backup adds to a tar, for duplicates too (the file's bytes
              are in memory beforehand: no reading counted)

A backup can't cost less CPU than walk_read + compress (walk_read + compress_all_cpus if
it uses every CPU), a deduplicating one less than that + cut + name, a restore less than
decompress plus creating and writing the files (bench/backup.py measures that with
``tar -x`` of an uncompressed tar). With C CPUs a tool can't take less wall time than that
CPU / C: what the issue 14 targets may ask for on a given machine. Packing, encryption
and the interpreter come on top of these floors, so they are lower bounds.
"""

from __future__ import annotations

import json
import os
import resource
import stat
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import zstandard
from vzbackup.storage.local import DirBackend

from vzbackup.engine.archiver import Chunker
from vzbackup.engine.extract import load_tree
from vzbackup.engine.repo import Repository

READ_BUF = 1024 * 1024


def system_s() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def walk_read(tree: Path) -> tuple[float, int]:
    """System CPU seconds of listing and reading every regular file under *tree*; bytes."""
    buf = bytearray(READ_BUF)
    total = 0
    t0 = system_s()
    for dirpath, _, files in os.walk(tree):
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                while n := os.readv(fd, [buf]):
                    total += n
            finally:
                os.close(fd)
    return system_s() - t0, total


def cut_and_name(repo: Repository, tree: Path) -> dict:
    """CPU seconds of cutting the regular files under *tree* into chunks and of naming each
    chunk, as a backup into *repo* does (files of the stream's average chunk size or more on
    their own, the others concatenated into one stream, cut as it fills)."""
    stream_cdc, file_cdc = Chunker(*repo.chunker_params), Chunker(*repo.file_chunker_params)
    large = repo.chunker_params[1]
    stream_max = 64 * repo.chunker_params[2]  # the stream is cut this much at a time
    cut = name = 0.0
    cut_bytes = 0
    stream = bytearray()

    def work(cdc: Chunker, data: bytes) -> None:
        nonlocal cut, name, cut_bytes
        view = memoryview(data)
        t0 = time.process_time()
        pieces = list(cdc.cut_buf(view))
        t1 = time.process_time()
        for c in pieces:
            repo.codec.chunk_id(view[c.offset : c.offset + c.length])
        name += time.process_time() - t1
        cut += t1 - t0
        cut_bytes += sum(c.length for c in pieces)

    for dirpath, _, files in os.walk(tree):
        for filename in files:
            path = os.path.join(dirpath, filename)
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            data = Path(path).read_bytes()
            if len(data) >= large:
                work(file_cdc, data)
                continue
            stream += data
            if len(stream) >= stream_max:
                work(stream_cdc, bytes(stream))
                stream.clear()
    if stream:
        work(stream_cdc, bytes(stream))
    return {"cut": cut, "name": name, "cut_bytes": cut_bytes}


def chunk_work(repo: Repository, snapshot: str) -> dict:
    """CPU seconds of compressing and of opening each distinct data chunk of *snapshot*."""
    manifest = repo.load_manifest(snapshot)
    order = list(dict.fromkeys(cid for e in load_tree(repo, repo.tree_of(manifest))
                               for cid, _, _ in e.chunks))
    cctx = zstandard.ZstdCompressor(level=repo.codec.level, write_checksum=True)
    compress = decompress = 0.0
    stored = plain = 0
    chunks = []
    for cid in order:
        key, loc = repo.locate(cid)
        blob = repo.backend.get_range(key, loc.offset, loc.length)  # (not counted)
        t0 = time.process_time()
        data = repo.open_chunk(cid, blob, rehash=False)
        t1 = time.process_time()
        cctx.compress(data)
        t2 = time.process_time()
        decompress += t1 - t0
        compress += t2 - t1
        stored += len(blob)
        plain += len(data)
        chunks.append(data)
    return {"compress": compress, "compress_all_cpus": compress_all_cpus(repo, chunks),
            "decompress": decompress, "chunks": len(order), "chunk_bytes": plain,
            "stored_bytes": stored, "levels": zstd_levels(repo, chunks)}


def zstd_levels(repo: Repository, chunks: list[bytes]) -> dict[str, dict]:
    """CPU seconds and compressed bytes of *chunks* (one thread) at the repository's zstd
    level and at each cheaper one: what a faster compressor setting would cost in size."""
    out = {}
    for level in range(1, repo.codec.level + 1):
        cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
        t0 = time.process_time()
        size = sum(len(cctx.compress(data)) for data in chunks)
        out[str(level)] = {"cpu": time.process_time() - t0, "bytes": size}
    return out


def compress_all_cpus(repo: Repository, chunks: list[bytes]) -> float:
    """CPU seconds of compressing *chunks* on one thread per CPU at once (zstd releases
    the interpreter's lock: the threads run in parallel)."""
    local = threading.local()

    def compress(data: bytes) -> None:
        if not hasattr(local, "cctx"):
            local.cctx = zstandard.ZstdCompressor(level=repo.codec.level, write_checksum=True)
        local.cctx.compress(data)

    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        t0 = time.process_time()
        for _ in pool.map(compress, chunks):
            pass
        return time.process_time() - t0


def main() -> None:
    repo_dir, tree, snapshot = sys.argv[1:4]
    repo = Repository.open(DirBackend(repo_dir, fsync=False))
    read_s, read_bytes = walk_read(Path(tree))
    out = {"walk_read": read_s, "read_bytes": read_bytes, **chunk_work(repo, snapshot),
           **cut_and_name(repo, Path(tree))}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
