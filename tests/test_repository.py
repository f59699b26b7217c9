"""The backup repository engine on a real directory backend: no containers needed.

Round trips of trees with every kind of entry, deduplication, the files cache, encryption,
corruption, hostile snapshots, locks, prune + GC (also with a backup running), a full disk
and kill -9 in the middle of a backup.
"""

from __future__ import annotations

import ctypes
import gc as cycle_gc
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import zstandard
from nodebed import need
from treecmp import diff, make_rich_tree, tree_manifest
from vzbackup.storage.backend import Kind
from vzbackup.storage.local import DIRECT_WINDOW, DirBackend

from vzbackup.engine import extract, gc, knowncache, maintenance
from vzbackup.engine import locks as L
from vzbackup.engine import tree as T
from vzbackup.engine.archiver import (
    ChunkStore,
    Stats,
    TreeWriter,
    cut_id_list,
    manifest_lists,
)
from vzbackup.engine.crypto import Codec, KeyFile
from vzbackup.engine.dirstat import STAT_AHEAD_MIN_DIRS, STAT_BY_PATH, UNKNOWN, StatAhead
from vzbackup.engine.extract import SPLIT_MIN_FILES, _split_files, load_tree, restore_tree
from vzbackup.engine.filescache import (
    RACY_NS,
    UNTRUSTED,
    FilesCache,
    entries,
    make_record,
    packed_sigs,
)
from vzbackup.engine.keeppolicy import KeepPolicy
from vzbackup.engine.knowncache import known_chunks
from vzbackup.engine.pack import INDEX_EVERY
from vzbackup.engine.repo import ID_CUT, TIME_FMT, Manifest, Repository
from vzbackup.engine.verify import verify
from vzbackup.errors import ConfigError, DamagedError, LockedError, StorageError
from vzbackup.syscalls import malloc_keeping_freed

ROOT = Path(__file__).resolve().parents[1]


def backup(repo: Repository, src: Path, ctid: int = 101, *, cache: FilesCache | None = None,
           when: str | None = None) -> tuple[Manifest, Stats]:
    stats = Stats()
    store = ChunkStore(repo, known_chunks(repo), threads=2, stats=stats)
    try:
        tree = TreeWriter(repo, store, cache=cache).write(src)
        store.wait()
        chunk_lists = manifest_lists(repo, store, tree, None)
        store.finish()
    finally:
        store.close()
    m = Manifest(id="", ctid=ctid, time=when or time.strftime(TIME_FMT, time.gmtime()),
                 **chunk_lists, stats={"bytes_total": stats.bytes_total})
    m = repo.publish(m, "log\n")
    if cache:
        cache.save()
    return m, stats


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(DirBackend(tmp_path / "repo"))


def test_round_trip_keeps_every_kind_of_entry_and_metadata(repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    make_rich_tree(src)
    with open(src / "sparse-big", "wb") as f:  # sparse, enough data to be chunked on its own
        for at in (1 << 20, 40 << 20):
            f.seek(at)
            f.write(os.urandom(1 << 20))
        f.truncate(48 << 20)
    m, stats = backup(repo, src)
    assert stats.files > 300 and stats.bytes_new > 0
    out = tmp_path / "out"
    restore_tree(repo, load_tree(repo, repo.tree_of(m)), out)
    assert diff(tree_manifest(src), tree_manifest(out)) == []
    # the sparse file stays sparse, the ACLs came back
    assert os.stat(out / "sparse").st_blocks * 512 < 1 << 20
    acl = subprocess.run(["getfacl", "-p", str(out / "etc/conf1")], capture_output=True, text=True)
    assert "user:1234:r--" in acl.stdout
    assert os.lstat(out / "bin/busybox").st_uid == 42


def test_restore_sets_owner_and_mode_it_was_not_born_with(repo: Repository, tmp_path: Path):
    # restore skips the chown and chmod a new file doesn't need (no default ACL here): what
    # the umask takes away, special bits and a set-group-ID directory's group still get set
    src = tmp_path / "src"
    (src / "srv").mkdir(parents=True)
    os.chown(src / "srv", 0, 5678)
    os.chmod(src / "srv", 0o2775)
    for name, mode, owner in [("srv/inherits", 0o644, (0, 5678)), ("srv/root", 0o644, (0, 0)),
                              ("srv/user", 0o600, (1234, 5678)), ("shared", 0o664, (0, 0)),
                              ("open", 0o666, (0, 0)), ("sgid", 0o2755, (0, 0)),
                              ("suid", 0o4750, (1234, 0)), ("plain", 0o755, (0, 0))]:
        (src / name).write_bytes(name.encode())
        os.chown(src / name, *owner)
        os.chmod(src / name, mode)
    os.symlink("root", src / "srv/link")
    os.chown(src / "srv/link", 0, 0, follow_symlinks=False)
    m, _ = backup(repo, src)
    old = os.umask(0o022)
    try:
        restore_tree(repo, load_tree(repo, repo.tree_of(m)), tmp_path / "out")
    finally:
        os.umask(old)
    assert diff(tree_manifest(src), tree_manifest(tmp_path / "out")) == []
    assert os.lstat(tmp_path / "out/srv/link").st_gid == 0


def test_small_files_share_chunks_and_compress_together(repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    for i in range(2000):
        (src / "etc" / f"f{i:04d}").write_text(f"line {i % 10}\n" * 30)
    m, stats = backup(repo, src)
    # 2000 files but a handful of chunks (besides the file list's), stored much smaller than
    # the data
    assert len(set(repo.refs_of(m)) - set(repo.tree_of(m))) < 20
    assert stats.stored_new * 5 < stats.bytes_total


def chunk_lengths(repo: Repository, m: Manifest, path: str) -> list[int]:
    return [ln for e in load_tree(repo, repo.tree_of(m)) if e.path == path for _, _, ln in e.chunks]


def test_large_files_are_cut_finer_and_old_repositories_keep_their_cuts(tmp_path: Path):
    """A new repository cuts large files (and the file list) with its file_chunker, small
    files' stream with its chunker; one made before file_chunker existed cuts both with its
    chunker (FORMAT.md), so its large files keep deduplicating against older snapshots."""
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(6 << 20)
    (src / "db").write_bytes(data)
    new = Repository.init(DirBackend(tmp_path / "new"))
    stream_avg = new.chunker_params[1]
    file_min, _, file_max = new.file_chunker_params
    assert file_max < stream_avg  # a large file is at least one stream chunk: many of its own
    cuts = chunk_lengths(new, backup(new, src)[0], "db")
    assert sum(cuts) == len(data) and len(cuts) > 6
    assert all(n <= file_max for n in cuts) and min(cuts[:-1]) >= file_min

    old_root = tmp_path / "old"
    Repository.init(DirBackend(old_root))
    config = json.loads((old_root / "config").read_text())
    config["chunker"] = {"min": 128 << 10, "avg": 512 << 10, "max": 2 << 20}
    del config["file_chunker"]
    (old_root / "config").write_text(json.dumps(config))
    old = Repository.open(DirBackend(old_root))
    assert old.file_chunker_params == old.chunker_params == (128 << 10, 512 << 10, 2 << 20)
    m1, _ = backup(old, src)
    assert max(chunk_lengths(old, m1, "db")) > file_max
    with open(src / "db", "r+b") as f:  # a small write in the middle re-stores one chunk
        f.seek(3 << 20)
        f.write(b"x" * 4096)
    _, s2 = backup(old, src)
    assert 0 < s2.bytes_new < 2 * (2 << 20)  # the chunk(s) around it (<= 2 MiB each), no more


def test_scattered_changes_re_store_a_small_part_of_the_file_list(tmp_path: Path):
    """A new repository cuts the file list with its tree_chunker (FORMAT.md), so 1% of the
    files changed, every 100th (as bench/backup.py changes a Debian rootfs), re-stores the
    pieces of the list around them, not all of it (at the 128 KiB of large files, every
    piece of a 4000-file list changed); one made before tree_chunker existed cuts its file
    list as before, with its file_chunker."""
    src = tmp_path / "src"
    files = []
    for d in range(40):
        (src / f"dir{d:02d}").mkdir(parents=True)
        for i in range(100):
            files.append(src / f"dir{d:02d}" / f"file{i:03d}.conf")
            files[-1].write_text(f"setting{i} = {d}\n")
    repo = Repository.init(DirBackend(tmp_path / "repo"))
    cache_path = tmp_path / "cache" / "101.zst"
    settle()
    m1, _ = backup(repo, src, cache=FilesCache(cache_path))
    _, _, tree_max = repo.tree_chunker_params
    assert len(repo.tree_of(m1)) > 20
    assert all(len(repo.get_chunk(c)) <= tree_max for c in repo.tree_of(m1))
    for f in files[::100]:
        with open(f, "a") as out:
            out.write("# changed\n")
    m2, _ = backup(repo, src, cache=FilesCache(cache_path))  # the others keep their slices
    changed = set(repo.tree_of(m2)) - set(repo.tree_of(m1))
    assert 0 < len(changed) < len(repo.tree_of(m2)) / 2

    config = json.loads((tmp_path / "repo/config").read_text())
    del config["tree_chunker"]
    (tmp_path / "repo/config").write_text(json.dumps(config))
    old = Repository.open(DirBackend(tmp_path / "repo"))
    assert old.tree_chunker_params == old.file_chunker_params


@pytest.mark.parametrize("key", ["chunker", "file_chunker", "tree_chunker"])
@pytest.mark.parametrize("bad", [{"min": 0, "avg": 0, "max": 0}, {"min": 4096, "avg": 1024,
                                 "max": 8192}, {"min": 1024, "avg": 4096, "max": 1 << 40},
                                 {"min": "4k", "avg": 1, "max": 2}, {"avg": 4096}, [1, 2, 3]])
def test_damaged_chunkers_are_refused_by_writers_only(tmp_path: Path, key: str, bad: object):
    src = tmp_path / "src"
    make_rich_tree(src)
    repo = Repository.init(DirBackend(tmp_path / "repo"))
    m, _ = backup(repo, src)
    config = json.loads((tmp_path / "repo/config").read_text())
    config[key] = bad
    (tmp_path / "repo/config").write_text(json.dumps(config))
    damaged = Repository.open(DirBackend(tmp_path / "repo"))
    with pytest.raises(DamagedError, match=f"config: {key}: "):
        damaged.chunkers()
    with pytest.raises(DamagedError, match=f"config: {key}: "):
        backup(damaged, src)
    assert [x.id for x in damaged.manifests()] == [m.id]
    restore_tree(damaged, load_tree(damaged, damaged.tree_of(m)), tmp_path / "out")
    assert diff(tree_manifest(src), tree_manifest(tmp_path / "out")) == []


def settle() -> None:
    """Let the files cache trust what was just written (it re-reads entries changed less
    than RACY_NS before a backup: a second change in the same clock tick is invisible)."""
    time.sleep(2 * RACY_NS / 1e9)


def test_second_backup_dedups_and_files_cache_skips_reading(repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    make_rich_tree(src)
    cache_path = tmp_path / "cache" / "101.zst"
    settle()
    m1, s1 = backup(repo, src, cache=FilesCache(cache_path))
    m2, s2 = backup(repo, src, cache=FilesCache(cache_path))
    assert s2.bytes_read == 0, "unchanged files must not be read again"
    assert s2.cache_hits == s1.files
    assert (s2.files, s2.dirs, s2.other, s2.bytes_total) == \
        (s1.files, s1.dirs, s1.other, s1.bytes_total)
    # the same file list, byte for byte (and the same id lists: nothing new stored)
    assert s2.chunks_new == 0 and m2.lists == m1.lists
    # change 1 small file, append to the big one, and metadata only elsewhere:
    # only the two changed files are read, every change is in the snapshot
    (src / "etc/conf7").write_text("changed\n")
    with open(src / "bin/big", "ab") as f:
        f.write(os.urandom(1000))
    os.chmod(src / "etc/conf8", 0o600)
    os.setxattr(src / "etc/conf9", "user.new", b"x")
    os.chown(src / "home/user/file", 4321, 5678)
    (src / "bin/sh").rename(src / "bin/zsh")  # the hardlink pair's first name changes
    os.mkdir(src / "newdir")
    (src / "newdir/f").write_text("new\n")
    m3, s3 = backup(repo, src, cache=FilesCache(cache_path))
    assert 0 < s3.bytes_read < (5 << 20)
    assert s3.bytes_new < s3.bytes_read  # the big file's unchanged chunks dedup
    out = tmp_path / "out"
    restore_tree(repo, load_tree(repo, repo.tree_of(m3)), out)
    assert diff(tree_manifest(src), tree_manifest(out)) == []


def test_files_cache_looks_entries_up_in_their_own_directory(repo: Repository,
                                                            tmp_path: Path):
    """A known directory's names are stat'ed below the tree's root, by their paths in the
    tree (few names) or in the opened directory (more): a change deep down is seen in
    either, and a same-named entry elsewhere (the root's) never stands in for it."""
    src = tmp_path / "src"
    small, big = src / "a/b/small", src / "a/big"
    small.mkdir(parents=True)
    big.mkdir()
    for i in range(STAT_BY_PATH + 1):
        (big / f"f{i}").write_text(f"{i}\n")
    for d, mode in ((src, 0o600), (small, 0o644), (big, 0o640)):
        (d / "x").write_text("the same name\n")
        os.chmod(d / "x", mode)
        os.utime(d / "x", ns=(10**18, 10**18 + mode))
    cache_path = tmp_path / "c.zst"
    settle()
    backup(repo, src, cache=FilesCache(cache_path))
    (small / "x").write_text("changed, and longer\n")
    os.chmod(big / "x", 0o604)
    m, s = backup(repo, src, cache=FilesCache(cache_path))
    # the two changed files alone are read again (a chmod sets the ctime: read, to be safe)
    assert s.bytes_read == len("changed, and longer\n") + len("the same name\n")
    out = tmp_path / "out"
    restore_tree(repo, load_tree(repo, repo.tree_of(m)), out)
    assert diff(tree_manifest(src), tree_manifest(out)) == []


def many_dirs(src: Path, n: int = STAT_AHEAD_MIN_DIRS + 50) -> list[Path]:
    """*n* directories of two small files each below *src*, in walk order."""
    dirs = [src / f"d{i:03}" for i in range(n)]
    for i, d in enumerate(dirs):
        d.mkdir(parents=True)
        (d / "a").write_text(f"{i}\n")
        (d / "b").write_text(f"{i} b\n")
    return dirs


def test_stat_ahead_child_reports_unchanged_directories_from_the_end(repo: Repository,
                                                                    tmp_path: Path):
    """The forked child, left alone, checks every cached directory: unchanged ones are
    SAME; one with a changed entry or a vanished name is not. What the walk asked about is
    the walk's from then on."""
    src = tmp_path / "src"
    dirs = many_dirs(src)
    settle()
    cache_path = tmp_path / "c.zst"
    backup(repo, src, cache=FilesCache(cache_path))
    (dirs[-1] / "a").write_text("changed\n")
    (dirs[100] / "b").unlink()  # (its directory's mtime changes: so the root's entries)
    os.chmod(dirs[5] / "a", 0o600)
    settle()
    cache = FilesCache(cache_path)
    root_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ahead = StatAhead.start(root_fd, os.lstat(src).st_dev, cache.old)
        assert ahead is not None
        deadline = time.monotonic() + 30
        while UNKNOWN in ahead.marks[:] and time.monotonic() < deadline:
            time.sleep(0.01)
        names = ["", *(d.name for d in dirs)]
        assert [n for n in names if not ahead.same(n)] == \
            ["", dirs[5].name, dirs[100].name, dirs[-1].name]
        assert not any(ahead.same(n) for n in names)
        ahead.close()
    finally:
        os.close(root_fd)


def test_incremental_backup_with_stat_ahead_sees_every_change(repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    dirs = many_dirs(src)
    settle()
    cache_path = tmp_path / "c.zst"
    backup(repo, src, cache=FilesCache(cache_path))
    for d in (dirs[0], dirs[len(dirs) // 2], dirs[-1]):  # the walk's part, the middle, the child's
        (d / "a").write_text("changed\n")
    (dirs[-2] / "new").write_text("new\n")  # a name added: the walk lists that directory
    os.chmod(dirs[-3] / "b", 0o600)
    settle()
    m, s = backup(repo, src, cache=FilesCache(cache_path))
    assert s.bytes_read == 3 * len("changed\n") + len("new\n") + len(f"{len(dirs) - 3} b\n")
    out = tmp_path / "out"
    restore_tree(repo, load_tree(repo, repo.tree_of(m)), out)
    assert diff(tree_manifest(src), tree_manifest(out)) == []


def test_files_cache_rereads_what_changed_just_before_a_backup(repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d/old").write_bytes(os.urandom(3000))
    settle()
    (src / "d/new").write_bytes(os.urandom(5000))
    cache_path = tmp_path / "c.zst"
    backup(repo, src, cache=FilesCache(cache_path))  # within RACY_NS of the change
    settle()
    _, s = backup(repo, src, cache=FilesCache(cache_path))
    assert s.bytes_read == 5000  # "new" might have changed again within its clock tick
    _, s = backup(repo, src, cache=FilesCache(cache_path))
    assert s.bytes_read == 0


def test_files_cache_keeps_hardlinks_right_when_the_walk_order_changes(repo: Repository,
                                                                          tmp_path: Path):
    src = tmp_path / "src"
    for d in ("a", "b"):
        (src / d).mkdir(parents=True)
    (src / "a/x").write_bytes(os.urandom(2000))
    os.link(src / "a/x", src / "b/y")  # a/x holds the content, b/y points to it
    settle()
    cache_path = tmp_path / "c.zst"
    backup(repo, src, cache=FilesCache(cache_path))
    (src / "a").rename(src / "c")  # b/y comes first now; b itself did not change
    m, _ = backup(repo, src, cache=FilesCache(cache_path))
    out = tmp_path / "out"
    restore_tree(repo, load_tree(repo, repo.tree_of(m)), out)
    assert diff(tree_manifest(src), tree_manifest(out)) == []
    assert os.stat(out / "b/y").st_ino == os.stat(out / "c/x").st_ino


def test_unchanged_tree_reuses_its_file_list_and_any_change_makes_a_new_one(
        repo: Repository, tmp_path: Path):
    """An unchanged backup takes the last file list's chunks without cutting it; a change
    anywhere (the root's own metadata, an entry added to a directory whose mtime was set
    back, so only its ctime tells) makes a new one that restores as the source is."""
    src = tmp_path / "src"
    make_rich_tree(src)
    cache_path = tmp_path / "c.zst"

    def walk() -> tuple[list[str], TreeWriter]:
        store = ChunkStore(repo, known_chunks(repo), threads=2, stats=Stats())
        cache = FilesCache(cache_path)
        try:
            writer = TreeWriter(repo, store, cache=cache)
            tree = writer.write(src)
            store.finish()
        finally:
            store.close()
        repo.publish(Manifest(id="", ctid=101, time=time.strftime(TIME_FMT, time.gmtime()),
                              tree=tree, refs=sorted(store.refs)), "log\n")
        cache.save()
        return tree, writer

    settle()
    first, _ = walk()
    again, writer = walk()
    assert again == first and not writer.meta.chunks  # reused, nothing cut
    for change in (lambda: os.chmod(src, 0o711),
                   lambda: add_keeping_mtime(src / "etc", "added")):
        change()
        settle()
        tree, writer = walk()
        assert tree != first and writer.meta.chunks
        out = tmp_path / f"out{len(os.listdir(tmp_path))}"
        restore_tree(repo, load_tree(repo, tree), out)
        assert diff(tree_manifest(src), tree_manifest(out)) == []
        first = tree


def test_damaged_files_cache_is_ignored(repo: Repository, tmp_path: Path):
    """Damage anywhere in the files cache (here in its second frame, the directories'
    lines, which an unchanged backup doesn't decode) makes the next backup start over."""
    src = tmp_path / "src"
    make_rich_tree(src)
    cache_path = tmp_path / "c.zst"
    settle()
    m1, s1 = backup(repo, src, cache=FilesCache(cache_path))
    raw = bytearray(cache_path.read_bytes())
    raw[-40] ^= 0xFF
    cache_path.write_bytes(bytes(raw))
    m2, s2 = backup(repo, src, cache=FilesCache(cache_path))
    assert s2.bytes_read == s1.bytes_read > 0 and repo.tree_of(m2) == repo.tree_of(m1)
    _, s3 = backup(repo, src, cache=FilesCache(cache_path))  # rewritten whole
    assert s3.bytes_read == 0


def add_keeping_mtime(d: Path, name: str) -> None:
    st = os.stat(d)
    (d / name).write_text("new\n")
    os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_files_cache_is_dropped_when_the_exclusions_change(repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d/a").write_text("a\n")
    (src / "d/b").write_text("b\n")
    settle()
    cache_path = tmp_path / "c.zst"
    backup(repo, src, cache=FilesCache(cache_path, key="/d/b"))
    m, _ = backup(repo, src, cache=FilesCache(cache_path, key=""))
    assert [e.path for e in load_tree(repo, repo.tree_of(m))] == [".", "d", "d/a", "d/b"]


def test_files_cache_record_with_an_unpackable_signature_matches_nothing():
    """A signature value beyond 64 bits is not packed: the directory is never reused whole
    and its entries count as changed; packed ones come back as they went in."""
    names, lines = ["a", "b"], [b"x\n", b"y\n"]
    bad = [(1, 2, 3, 4), (1 << 64, 2, 3, 4)]
    rec, rec_lines = make_record(names, bad, lines, [(), ()], [], [], (2, 0, 0, 4), [])
    assert packed_sigs(bad) is None and rec.sigs == b""
    assert entries(rec, rec_lines) == {"a": (UNTRUSTED, b"x\n"), "b": (UNTRUSTED, b"y\n")}
    good = [(1, 2, 3, 4), (5, -6, 7, 8)]
    rec, rec_lines = make_record(names, good, lines, [(), ()], [], [], (2, 0, 0, 4), [])
    assert rec.names == "a/b" and rec.sigs == packed_sigs(good)
    assert entries(rec, rec_lines) == {"a": ((1, 2, 3, 4), b"x\n"),
                                       "b": ((5, -6, 7, 8), b"y\n")}


def test_identical_trees_of_two_cts_dedup(repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    make_rich_tree(src)
    _, s1 = backup(repo, src, ctid=101)
    _, s2 = backup(repo, src, ctid=102)
    assert s2.bytes_new * 50 < s1.bytes_new


def test_stale_files_cache_entry_is_not_trusted(repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(5000))
    cache_path = tmp_path / "c.zst"
    settle()
    backup(repo, src, cache=FilesCache(cache_path))
    # same size and mtime, different content and ctime: the inode/ctime check catches it
    st = os.stat(src / "f")
    (src / "f").write_bytes(os.urandom(5000))
    os.utime(src / "f", ns=(st.st_atime_ns, st.st_mtime_ns))
    m, s = backup(repo, src, cache=FilesCache(cache_path))
    assert s.bytes_read == 5000
    out = tmp_path / "out"
    restore_tree(repo, load_tree(repo, repo.tree_of(m)), out)
    assert (out / "f").read_bytes() == (src / "f").read_bytes()


def test_encrypted_repository(tmp_path: Path):
    key = KeyFile.create(tmp_path / "key")
    assert oct(os.stat(tmp_path / "key").st_mode & 0o777) == "0o600"
    with pytest.raises(ConfigError, match="already exists"):
        KeyFile.create(tmp_path / "key")
    be = DirBackend(tmp_path / "repo")
    repo = Repository.init(be, key)
    src = tmp_path / "src"
    src.mkdir()
    secret = b"top secret payroll data " * 50000  # over 1 MiB: chunked on its own
    (src / "payroll").write_bytes(secret)
    m, _ = backup(repo, src)
    # nothing readable on disk: no plaintext, ids keyed (not a plain hash of the data)
    for p in (tmp_path / "repo").rglob("*"):
        if p.is_file():
            assert b"payroll" not in p.read_bytes() and b"top secret" not in p.read_bytes()
    assert file_chunk_ids(repo, m, "payroll", secret, key)
    with pytest.raises(ConfigError, match="encrypted"):
        Repository.open(be)
    other = KeyFile.create(tmp_path / "other")
    with pytest.raises(ConfigError, match="does not belong"):
        Repository.open(be, other)
    repo2 = Repository.open(be, KeyFile.load(tmp_path / "key"))
    out = tmp_path / "out"
    restore_tree(repo2, load_tree(repo2, repo2.tree_of(repo2.latest(101))), out)
    assert (out / "payroll").read_bytes() == secret
    # a tampered chunk fails authentication
    cid = next(c for c in repo.refs_of(m) if c not in repo.tree_of(m))
    key, loc = repo2.locate(cid)
    p = tmp_path / "repo" / key
    blob = bytearray(p.read_bytes())
    blob[loc.offset + 40] ^= 1
    p.write_bytes(bytes(blob))
    with pytest.raises(DamagedError, match="authentication failed"):
        repo2.get_chunk(cid)


def test_corrupt_chunk_is_reported_with_file_path(repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(2 << 20))
    (src / "b").write_text("fine\n")
    m, _ = backup(repo, src)
    entries = {e.path: e for e in load_tree(repo, repo.tree_of(m))}
    cid = entries["a"].chunks[0][0]
    key, loc = repo.locate(cid)
    p = Path(repo.backend.root) / key
    data = bytearray(p.read_bytes())
    end = loc.offset + loc.length
    data[end - 10 : end] = b"0123456789"
    p.write_bytes(bytes(data))
    rep = verify(repo, [m])
    assert not rep.ok
    assert any(f"{m.id}:/a" in w for d in rep.damaged for w in d.where)
    with pytest.raises(DamagedError, match=r"^a: "):
        restore_tree(repo, load_tree(repo, repo.tree_of(m)), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    # a missing chunk as well
    p.unlink()
    rep = verify(repo, [m])
    assert rep.damaged and all("missing" in d.error for d in rep.damaged)


def _flip_in_middle(repo: Repository, cid: str) -> None:
    key, loc = repo.locate(cid)
    p = Path(repo.backend.root) / key
    data = bytearray(p.read_bytes())
    data[loc.offset + loc.length // 2] ^= 0xFF  # random data: a raw block, still a valid frame
    p.write_bytes(bytes(data))


def test_restore_relies_on_the_frame_checksum_and_rehashes_frames_without_one(
        repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "new").write_bytes(os.urandom(1 << 20))
    m, _ = backup(repo, src)
    cid = {e.path: e for e in load_tree(repo, repo.tree_of(m))}["new"].chunks[0][0]
    _flip_in_middle(repo, cid)
    with pytest.raises(DamagedError, match=r"^new: .*corrupt compressed data"):
        restore_tree(repo, load_tree(repo, repo.tree_of(m)), tmp_path / "out")
    # frames written without a checksum (before they had one): the restore hashes them
    compressor = zstandard.ZstdCompressor
    monkeypatch.setattr(zstandard, "ZstdCompressor",
                        lambda **kw: compressor(**{**kw, "write_checksum": False}))
    (src / "new").unlink()
    (src / "old").write_bytes(os.urandom(1 << 20))
    old = Repository.init(DirBackend(tmp_path / "old-repo"))
    m, _ = backup(old, src)
    cid = {e.path: e for e in load_tree(old, old.tree_of(m))}["old"].chunks[0][0]
    key, loc = old.locate(cid)
    blob = old.backend.get_range(key, loc.offset, loc.length)
    assert not old.codec.checks_content(blob)
    _flip_in_middle(old, cid)
    with pytest.raises(DamagedError, match=r"^old: .*does not match its hash"):
        restore_tree(old, load_tree(old, old.tree_of(m)), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_verify_rehashes_what_a_restore_takes_on_the_frame_checksum(repo: Repository,
                                                                     tmp_path: Path):
    """A blob that is intact but not the chunk its id names (a writer's or an index's
    fault, not the storage's) passes a restore's checks; verify computes every id again."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 100_000)
    m, _ = backup(repo, src)
    cid = {e.path: e for e in load_tree(repo, repo.tree_of(m))}["a"].chunks[0][0]
    key, loc = repo.locate(cid)
    p = Path(repo.backend.root) / key
    data = bytearray(p.read_bytes())
    other = repo.codec.seal(cid, b"b" * 100_000)
    assert len(other) == loc.length  # (the same size: the pack's other offsets hold)
    data[loc.offset : loc.offset + loc.length] = other
    p.write_bytes(bytes(data))
    restore_tree(repo, load_tree(repo, repo.tree_of(m)), tmp_path / "out")
    assert (tmp_path / "out/a").read_bytes() == b"b" * 100_000
    rep = verify(repo, [m])
    assert not rep.ok and "does not match its hash" in rep.damaged[0].error
    assert rep.damaged[0].where == [f"{m.id}:/a"]


def test_codec_tells_which_blobs_check_their_content(tmp_path: Path):
    plain = Codec(None)
    assert plain.checks_content(plain.seal("x", b"data" * 100))
    unchecked = bytes((0,)) + zstandard.ZstdCompressor(level=3).compress(b"data" * 100)
    assert plain.open("x", unchecked) == b"data" * 100
    assert not plain.checks_content(unchecked)
    assert not plain.checks_content(b"") and not plain.checks_content(bytes(20))
    encrypted = Codec(KeyFile.create(tmp_path / "key"))
    assert encrypted.checks_content(encrypted.seal("x", b"data"))


def rich_tree_to_split(src: Path) -> None:
    """make_rich_tree and enough files after it to restore in two processes, a hard link
    pair among them."""
    make_rich_tree(src)
    for i in range(SPLIT_MIN_FILES):
        d = src / "zz" / f"d{i // 64}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(1000 + i * 37))
    os.link(src / "zz/d0/f0", src / "zz/d7/link-to-f0")


def test_load_tree_decodes_with_the_cycle_collector_paused_and_restores_it(
        repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    src = tmp_path / "src"
    make_rich_tree(src)
    m, _ = backup(repo, src)
    real, seen = T.decode, []

    def watched(data: bytes):
        seen.append(cycle_gc.isenabled())
        yield from real(data)

    monkeypatch.setattr(T, "decode", watched)
    assert cycle_gc.isenabled()
    assert load_tree(repo, repo.tree_of(m)) and seen == [False] and cycle_gc.isenabled()

    def broken(data: bytes):
        raise ValueError("garbled")
        yield

    monkeypatch.setattr(T, "decode", broken)
    with pytest.raises(DamagedError, match="garbled"):
        load_tree(repo, repo.tree_of(m))
    assert cycle_gc.isenabled()
    cycle_gc.disable()
    try:  # paused by someone else: left so
        monkeypatch.setattr(T, "decode", watched)
        load_tree(repo, repo.tree_of(m))
        assert not cycle_gc.isenabled()
    finally:
        cycle_gc.enable()


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def test_restore_buffers_come_from_the_heap_and_stay_there_then_big_ones_are_mapped_again():
    libc = ctypes.CDLL(None)
    need(hasattr(libc, "mallinfo2"), "glibc >= 2.33 (mallinfo2)")
    libc.mallinfo2.restype = _MallInfo2
    big = 8 << 20

    def mapped_by_one_block() -> int:
        before = libc.mallinfo2().hblkhd  # bytes in blocks malloc mapped for themselves
        block = bytearray(big)
        grown = libc.mallinfo2().hblkhd - before
        del block
        return grown

    with malloc_keeping_freed():
        assert mapped_by_one_block() < big
        assert libc.mallinfo2().fordblks >= big  # freed, kept in the heap for the next one
    assert mapped_by_one_block() >= big


def test_restore_in_two_processes_makes_the_same_tree(repo: Repository, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch):
    src = tmp_path / "src"
    rich_tree_to_split(src)
    m, _ = backup(repo, src)
    entries = load_tree(repo, repo.tree_of(m))
    files = [e for e in entries if e.kind == T.FILE]
    cut = _split_files(repo, entries)
    assert cut is not None and SPLIT_MIN_FILES // 4 < cut < len(files) - SPLIT_MIN_FILES // 4
    out = tmp_path / "out"
    done: list[int] = []
    written = restore_tree(repo, entries, out, progress=done.append)
    assert sum(done) == sum(e.size for e in files)
    assert diff(tree_manifest(src), tree_manifest(out)) == []
    assert dir_times(out) == dir_times(src)  # set last, after both processes' entries
    monkeypatch.setattr(extract, "SPLIT_MIN_FILES", len(files) + 1)  # in one process
    assert restore_tree(repo, entries, tmp_path / "out1") == written
    assert dir_times(tmp_path / "out1") == dir_times(src)
    assert os.stat(out / "zz/d7/link-to-f0").st_ino == os.stat(out / "zz/d0/f0").st_ino


def dir_times(root: Path) -> dict[str, int]:
    """The modification time of each directory under *root*, itself included."""
    return {str(p.relative_to(root)): p.lstat().st_mtime_ns
            for p in [root, *root.rglob("*")] if p.is_dir() and not p.is_symlink()}


def test_restore_in_two_processes_reports_damage_in_the_second(repo: Repository,
                                                                tmp_path: Path):
    src = tmp_path / "src"
    rich_tree_to_split(src)
    m, _ = backup(repo, src)
    entries = load_tree(repo, repo.tree_of(m))
    last = [e for e in entries if e.kind == T.FILE][-1]  # the second process's
    key, loc = repo.locate(last.chunks[0][0])
    p = Path(repo.backend.root) / key
    data = bytearray(p.read_bytes())
    data[loc.offset + loc.length - 10 : loc.offset + loc.length] = b"0123456789"
    p.write_bytes(bytes(data))
    with pytest.raises(DamagedError, match="corrupt") as err:
        restore_tree(repo, entries, tmp_path / "out")
    files = [e.path for e in entries if e.kind == T.FILE]  # (the chunk may start in another)
    assert str(err.value).split(":")[0] in files[_split_files(repo, entries):]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_killed_restore_takes_its_second_process_along(repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    rich_tree_to_split(src)
    m, _ = backup(repo, src)
    entries = load_tree(repo, repo.tree_of(m))
    first_of_child = [e for e in entries if e.kind == T.FILE][_split_files(repo, entries)]
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        from pathlib import Path
        from vzbackup.engine.extract import load_tree, restore_tree
        from vzbackup.engine.repo import Repository
        from vzbackup.storage.local import DirBackend
        repo = Repository.open(DirBackend(Path({str(repo.backend.root)!r})))
        m = [m for m in repo.manifests() if m.id == {m.id!r}][0]
        restore_tree(repo, load_tree(repo, repo.tree_of(m)), Path({str(out)!r}))
    """)
    p = subprocess.Popen([sys.executable, "-c", script])
    child = 0
    try:
        mark = out.with_name("out.partial") / first_of_child.path  # the child runs by then
        deadline = time.monotonic() + 60
        while not mark.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        child = int(Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()[0])
        os.kill(child, signal.SIGSTOP)  # it would finish on its own; stopped, it can't
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        deadline = time.monotonic() + 30
        while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not Path(f"/proc/{child}").exists(), "the second process outlived the restore"
        child = 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if child:
            os.kill(child, signal.SIGKILL)


def _hostile_snapshot(repo: Repository, entries: list[dict]) -> Manifest:
    stats = Stats()
    store = ChunkStore(repo, set(), threads=1, stats=stats)
    data = b"".join(T.encode_lines(entries))
    tree = [store.submit_all([memoryview(data)])[0].result()]
    store.finish()
    m = Manifest(id="", ctid=666, time=time.strftime(TIME_FMT, time.gmtime()), tree=tree,
                 refs=tree)
    return repo.publish(m, "")


@pytest.mark.parametrize(
    "evil",
    [
        [{"p": "../escape", "t": "f", "m": 420, "u": 0, "g": 0, "mt": 0, "s": 0, "c": []}],
        [{"p": "/abs", "t": "f", "m": 420, "u": 0, "g": 0, "mt": 0, "s": 0, "c": []}],
        [{"p": "x", "t": "l", "m": 511, "u": 0, "g": 0, "mt": 0, "l": "CANARY"},
         {"p": "x/planted", "t": "f", "m": 420, "u": 0, "g": 0, "mt": 0, "s": 0, "c": []}],
        [{"p": "h", "t": "h", "m": 420, "u": 0, "g": 0, "mt": 0, "l": "../../etc/passwd"}],
        [{"p": "a/../../b", "t": "d", "m": 493, "u": 0, "g": 0, "mt": 0}],
    ],
    ids=["dotdot", "absolute", "through-symlink", "hardlink-out", "nested-dotdot"],
)
def test_hostile_snapshot_writes_nothing_outside(repo: Repository, tmp_path: Path, evil):
    canary = tmp_path / "canary"
    canary.mkdir()
    for e in evil:
        if e.get("l") == "CANARY":
            e["l"] = str(canary)
    m = _hostile_snapshot(repo, evil)
    target = tmp_path / "deep" / "target"
    with pytest.raises(DamagedError):
        restore_tree(repo, load_tree(repo, repo.tree_of(m)), target)
    assert list(canary.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == []
    assert not (tmp_path / "escape").exists() and not Path("/abs").exists()


def test_prune_keeps_the_right_set_and_gc_frees_space(repo: Repository, tmp_path: Path):
    # every snapshot holds "common" and its own day file: what a pruned snapshot alone
    # referenced is at least its day file, whatever the chunk cuts (the archive stream runs
    # across files, so random data moves them)
    src = tmp_path / "src"
    src.mkdir()
    (src / "common").write_bytes(os.urandom(300_000))
    ids = []
    for day in range(1, 6):
        (src / f"day{day - 1}").unlink(missing_ok=True)
        (src / f"day{day}").write_bytes(os.urandom(300_000))
        m, _ = backup(repo, src, when=f"2026-11-0{day}T02:00:00Z")
        ids.append(m.id)
    repo.set_protected(ids[0], True)
    res = maintenance.prune(repo, KeepPolicy(last=2), dry_run=True)
    assert sorted(d.item.id for d in res[101] if not d.keep) == ids[1:3]
    assert repo.snapshot_ids() == ids  # dry run changed nothing
    maintenance.prune(repo, KeepPolicy(last=2))
    assert repo.snapshot_ids() == [ids[0], ids[3], ids[4]]
    before = len(repo.reload_index())
    rep = maintenance.collect_garbage(repo, grace=0)
    assert rep.packs_deleted + rep.packs_repacked >= 2  # day2's and day3's packs
    assert rep.chunks_deleted == before - len(repo.reload_index()) > 0
    assert verify(repo, repo.manifests()).ok
    # now drop everything but the newest and collect: day1's and day4's data go, common stays
    repo.set_protected(ids[0], False)
    maintenance.prune(repo, KeepPolicy(last=1))
    rep = maintenance.collect_garbage(repo, grace=0)
    assert rep.bytes_deleted >= 2 * 300_000
    assert verify(repo, repo.manifests()).ok
    out = tmp_path / "out"
    restore_tree(repo, load_tree(repo, repo.tree_of(repo.latest(101))), out)
    assert diff(tree_manifest(src), tree_manifest(out)) == []


def test_gc_spares_what_a_running_backup_wrote_or_reuses(repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "old").write_bytes(os.urandom(1 << 20))
    m_old, _ = backup(repo, src)
    # a backup starts (its lock), loads the index with m_old's chunks ...
    with L.RepoLock(repo, L.BACKUP, what="concurrent test backup"):
        known = known_chunks(repo)
        # ... meanwhile m_old is pruned and GC runs: its chunks must survive
        repo.trash(m_old.id)
        rep = maintenance.collect_garbage(repo, grace=0)
        assert rep.running_backups == 1 and rep.chunks_deleted == 0
        # the backup finishes, reusing m_old's chunks, and publishes
        stats = Stats()
        store = ChunkStore(repo, known, threads=2, stats=stats)
        (src / "new").write_bytes(os.urandom(1 << 20))
        tree = TreeWriter(repo, store).write(src)
        store.finish()
        m_new = repo.publish(Manifest(id="", ctid=101, time=time.strftime(TIME_FMT, time.gmtime()),
                                      tree=tree, refs=sorted(store.refs)), "")
        assert stats.bytes_new < (1 << 20) + 100_000  # 'old' was not stored again
    assert verify(repo, [m_new]).ok
    rep = maintenance.collect_garbage(repo, grace=0)  # no backup runs now: trash goes
    assert rep.trash_deleted == [m_old.id]
    assert verify(repo, [m_new]).ok


def test_known_chunks_file_follows_new_and_removed_snapshots(repo: Repository, tmp_path: Path):
    kept = tmp_path / "known-chunks"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(1 << 20))
    m1, _ = backup(repo, src, when="2026-01-01T00:00:00Z")
    assert known_chunks(repo, kept) == set(repo.refs_of(m1)) and kept.exists()
    (src / "a").unlink()
    (src / "b").write_bytes(os.urandom(1 << 20))
    m2, _ = backup(repo, src, when="2026-01-02T00:00:00Z")
    # m2 added to the file
    assert known_chunks(repo, kept) == set(repo.refs_of(m1)) | set(repo.refs_of(m2))
    repo.trash(m1.id)  # gc may now delete m1's chunks: the file must forget them
    assert known_chunks(repo, kept) == set(repo.refs_of(m2)) == known_chunks(repo)
    kept.write_bytes(b"not a known-chunks file")
    assert known_chunks(repo, kept) == set(repo.refs_of(m2))
    # a backup remembers the snapshot it published: the next one reads no manifest
    known, sizes = knowncache.load_known(repo, kept)
    (src / "c").write_bytes(os.urandom(1 << 20))
    m3, _ = backup(repo, src, when="2026-01-03T00:00:00Z")
    knowncache.remember(kept, sizes, known, m3.id, repo.published[m3.id], repo.refs_of(m3))
    read = []
    real_get = repo.backend.get
    repo.backend.get = lambda key: read.append(key) or real_get(key)
    try:
        assert knowncache.load_known(repo, kept)[0] == set(repo.refs_of(m2)) | set(repo.refs_of(m3))
    finally:
        repo.backend.get = real_get
    assert read == []


def test_maintenance_lock_is_exclusive_and_stale_locks_are_broken(repo: Repository):
    with L.RepoLock(repo, L.MAINTENANCE, what="first"), pytest.raises(LockedError, match="first"):
        L.RepoLock(repo, L.MAINTENANCE, what="second", wait=1).acquire()
    # a lock of a dead process on this host is stale
    dead = subprocess.Popen(["true"])
    dead.wait()
    lk = L.RepoLock(repo, L.MAINTENANCE, what="crashed")
    lk.acquire()
    lk._stop.set()
    body = json.loads(repo.backend.get(lk.key))
    body["pid"] = dead.pid
    repo.backend.put(lk.key, json.dumps(body).encode())
    with L.RepoLock(repo, L.MAINTENANCE, what="after crash", wait=2):
        pass
    assert not repo.backend.exists(lk.key)


def test_full_disk_fails_cleanly_and_next_backup_works(tmp_path: Path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=True)
    try:
        repo = Repository.init(DirBackend(mnt / "repo"))
        src = tmp_path / "src"
        src.mkdir()
        (src / "fits").write_bytes(os.urandom(1 << 20))
        backup(repo, src)
        (src / "too-big").write_bytes(os.urandom(4 << 20))
        with pytest.raises(StorageError, match="No space left"):
            backup(repo, src)
        assert len(repo.snapshot_ids()) == 1
        assert verify(repo, repo.manifests()).ok
        (src / "too-big").unlink()
        backup(repo, src)
        assert verify(repo, repo.manifests()).ok
        assert not [p for p in (mnt / "repo").rglob(".tmp-*")]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def resident_bytes(path: Path) -> int:
    """Bytes of *path* in the page cache (util-linux's fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def test_packs_bypass_the_page_cache(repo: Repository, tmp_path: Path):
    need(shutil.which("fincore") is not None, "fincore (util-linux) is missing")
    fs = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(tmp_path)],
                        capture_output=True, text=True, check=True).stdout.strip()
    need(fs not in ("tmpfs", "ramfs"), f"{tmp_path} is on {fs}: its pages are all in memory")
    src = tmp_path / "src"
    make_rich_tree(src)
    (src / "big").write_bytes(os.urandom((5 << 20) + 1234))  # not a whole number of blocks
    m, _ = backup(repo, src)
    assert repo.backend.direct
    packs = [p for p in (tmp_path / "repo/data").rglob("*") if p.is_file()]
    assert packs and sum(p.stat().st_size for p in packs) > 5 << 20
    assert [resident_bytes(p) for p in packs] == [0] * len(packs)
    assert resident_bytes(tmp_path / "repo/config") > 0  # other objects: buffered
    out = tmp_path / "out"
    restore_tree(repo, load_tree(repo, repo.tree_of(m)), out)
    assert diff(tree_manifest(src), tree_manifest(out)) == []
    assert not list((tmp_path / "repo").rglob(".tmp-*"))


@pytest.mark.parametrize("sizes", [[1], [DIRECT_WINDOW], [DIRECT_WINDOW - 1, 1],
                                   [3 * DIRECT_WINDOW + 5, 0, 17, DIRECT_WINDOW - 22],
                                   [100] * 1000])
def test_a_pack_written_a_window_at_a_time_keeps_every_byte(tmp_path: Path, sizes: list[int]):
    backend = DirBackend(tmp_path / "repo")
    parts = [os.urandom(n) for n in sizes]
    backend.put_parts("data/ab/pack", [parts[0], *map(memoryview, parts[1:])], Kind.PACK)
    assert backend.direct
    assert (tmp_path / "repo/data/ab/pack").read_bytes() == b"".join(parts)
    assert os.listdir(tmp_path / "repo/data/ab") == ["pack"]


def test_a_file_system_without_o_direct_gets_buffered_packs(tmp_path: Path):
    mnt = tmp_path / "ramfs"  # ramfs refuses O_DIRECT (EINVAL)
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], check=True)
    try:
        repo = Repository.init(DirBackend(mnt / "repo"))
        src = tmp_path / "src"
        make_rich_tree(src)
        m, _ = backup(repo, src)
        assert repo.backend.direct is False
        out = tmp_path / "out"
        restore_tree(repo, load_tree(repo, repo.tree_of(m)), out)
        assert diff(tree_manifest(src), tree_manifest(out)) == []
        assert verify(repo, repo.manifests()).ok
        assert not list((mnt / "repo").rglob(".tmp-*"))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


KILLED_BACKUP = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from vzbackup.storage.local import DirBackend
    from vzbackup.engine import locks as L
    from vzbackup.engine.archiver import ChunkStore, Stats, TreeWriter
    from vzbackup.engine.repo import Repository
    repo = Repository.open(DirBackend(sys.argv[1]))
    L.RepoLock(repo, L.BACKUP, what="doomed").acquire()
    store = ChunkStore(repo, set(), threads=2, stats=Stats(), bwlimit_kbps=16384)
    print("started", flush=True)
    TreeWriter(repo, store).write(Path(sys.argv[2]))
""")


def test_kill_9_mid_backup_leaves_a_valid_repository(repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "keep").write_bytes(os.urandom(1 << 20))
    good, _ = backup(repo, src)
    # 48 MiB: INDEX_EVERY (2) full packs get written and indexed, the rest is cut short
    for i in range(24):
        (src / f"big{i}").write_bytes(os.urandom(2 << 20))
    p = subprocess.Popen([sys.executable, "-c", KILLED_BACKUP, str(repo.backend.root), str(src)],
                         stdout=subprocess.PIPE, cwd=ROOT)
    assert p.stdout.readline().strip() == b"started"
    index_before = len(repo.index_files())
    deadline = time.monotonic() + 60
    while len(repo.index_files()) <= index_before and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert len(repo.index_files()) > index_before, "the backup never wrote a pack"
    assert repo.snapshot_ids() == [good.id]  # the killed one never appeared
    assert verify(repo, repo.manifests()).ok
    assert L.list_locks(repo), "its lock is left behind ..."
    # ... stale, so GC and the next backup proceed; the next backup reuses stored chunks
    m, s = backup(repo, src)
    assert s.bytes_new < 20 << 20  # the indexed packs' chunks are reused
    assert verify(repo, [m]).ok
    rep = maintenance.collect_garbage(repo, grace=0)
    assert rep.running_backups == 0
    assert L.break_stale(repo) == [] or True
    out = tmp_path / "out"
    restore_tree(repo, load_tree(repo, repo.tree_of(m)), out)
    assert diff(tree_manifest(src), tree_manifest(out)) == []
    assert gc.DEFAULT_GRACE > 0


def write_v1_repository(root: Path, src: Path, ctid: int = 101) -> str:
    """A repository exactly as format version 1 wrote it (FORMAT.md): one object per
    chunk under chunks/; big files cut as today, small ones in one chunk each. Returns
    the snapshot id."""
    import hashlib
    import uuid

    import pyfastcdc

    cdc = pyfastcdc.FastCDC(avg_size=524288, min_size=131072, max_size=2097152)

    be = DirBackend(root)
    codec = Codec(None)
    config = {"format": "vzbackup-repo", "version": 1, "id": uuid.uuid4().hex,
              "chunker": {"min": 131072, "avg": 524288, "max": 2097152},
              "encryption": "none", "key_fingerprint": ""}
    be.put("config", json.dumps(config).encode())
    refs: list[str] = []

    def store(data: bytes) -> str:
        cid = hashlib.sha256(data).hexdigest()
        be.put(f"chunks/{cid[:2]}/{cid}", codec.seal(cid, data))
        refs.append(cid)
        return cid

    entries = []
    for path in [src, *sorted(src.rglob("*"))]:
        st = os.lstat(path)
        rel = "." if path == src else str(path.relative_to(src))
        d = {"p": rel, "m": st.st_mode & 0o7777, "u": st.st_uid, "g": st.st_gid,
             "mt": st.st_mtime_ns}
        if path.is_symlink():
            d.update(t="l", l=os.readlink(path))
        elif path.is_dir():
            d["t"] = "d"
        else:
            data = path.read_bytes()
            cuts = [(c.offset, c.length) for c in cdc.cut_buf(data)] if len(data) > 524288 \
                else [(0, len(data))] if data else []
            d.update(t="f", s=len(data), c=[[store(data[o : o + n]), 0, n] for o, n in cuts])
        entries.append(d)
    tree = store(b"".join(T.encode_lines(entries)))
    sid = f"{ctid}/2026-01-01T00:00:00Z"
    manifest = {"id": sid, "ctid": ctid, "time": sid.split("/")[1], "tree": [tree],
                "refs": sorted(set(refs)), "version": 1, "stats": {}}
    be.put(f"snapshots/{sid}", codec.seal(f"snapshots/{sid}", json.dumps(manifest).encode()))
    return sid


def test_version_1_repository_restores_and_upgrades_on_the_next_backup(tmp_path: Path,
                                                                       monkeypatch):
    from vzbackup.engine import extract

    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc/hosts").write_text("127.0.0.1 localhost\n")
    (src / "big").write_bytes(os.urandom(3 << 20))
    (src / "empty").write_bytes(b"")
    os.symlink("etc/hosts", src / "link")
    old_sid = write_v1_repository(tmp_path / "repo", src)
    repo = Repository.open(DirBackend(tmp_path / "repo"))
    assert repo.version == 1
    restore_tree(repo, load_tree(repo, repo.tree_of(repo.resolve(old_sid))), tmp_path / "v1")
    assert diff(tree_manifest(src), tree_manifest(tmp_path / "v1")) == []
    # its chunk objects (sizes unknown to the index) count against the read-ahead budget too
    monkeypatch.setattr(extract, "PREFETCH_BYTES", 2 * extract.V1_CHUNK_SIZE)
    entries = load_tree(repo, repo.tree_of(repo.resolve(old_sid)))
    reader, held = extract.ChunkReader(repo, entries), 0
    for cid in [c for e in entries for c, _, _ in e.chunks]:
        reader.get(cid)
        held = max(held, len(reader.held))
    reader.close()
    assert 0 < held <= 3 < len(reader.reads)
    monkeypatch.undo()
    # the next backup upgrades it: packs from now on, the old chunks stay readable
    (src / "new").write_bytes(os.urandom(1 << 20))
    m, s = backup(repo, src)
    assert Repository.open(DirBackend(tmp_path / "repo")).version == 2
    assert s.bytes_new < (2 << 20), "the v1 chunks were deduplicated against"
    assert verify(repo, repo.manifests()).ok
    restore_tree(repo, load_tree(repo, repo.tree_of(m)), tmp_path / "v2")
    assert diff(tree_manifest(src), tree_manifest(tmp_path / "v2")) == []
    # gc keeps the v1 chunks the new snapshot needs and drops the rest with the old one
    repo.trash(old_sid)
    v1_before = len(repo.list_chunks())
    rep = maintenance.collect_garbage(repo, grace=0)
    assert 0 < len(repo.list_chunks()) < v1_before and rep.chunks_deleted > 0
    assert verify(repo, repo.manifests()).ok


def file_chunk_ids(repo: Repository, m: Manifest, path: str, data: bytes,
                   key: KeyFile | None = None) -> list[str]:
    """The chunk ids of the file at *path* (content *data*, cut on its own), checked to be
    the repository's hashes of its pieces: BLAKE3 keyed with *key*'s id key (and no plain
    hash), else BLAKE3 (config chunk_ids, versions 3 and 4) or SHA-256 (version 2)."""
    import hashlib

    from blake3 import blake3

    entry = next(e for e in load_tree(repo, repo.tree_of(m)) if e.path == path)
    ids, pos = [], 0
    for cid, off, n in entry.chunks:
        piece = data[pos : pos + n]
        plain = {"blake3": blake3(piece).hexdigest(), "sha256": hashlib.sha256(piece).hexdigest()}
        want = (blake3(piece, key=key.id_key).hexdigest() if key
                else plain[repo.config.get("chunk_ids", "sha256")])
        assert off == 0 and cid == want
        assert not key or cid not in plain.values()
        ids.append(cid)
        pos += n
    assert pos == len(data)
    return ids


def test_chunk_ids_are_blake3_and_a_version_2_repository_keeps_sha256(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(3 << 20)
    (src / "big").write_bytes(data)
    repo = Repository.init(DirBackend(tmp_path / "v3"))
    assert (repo.version, repo.config["chunk_ids"]) == (4, "blake3")
    m, _ = backup(repo, src)
    assert len(file_chunk_ids(repo, m, "big", data)) > 1 and m.version == 4
    assert verify(repo, repo.manifests()).ok
    # a repository as version 2 made it: no chunk_ids in its config
    be = DirBackend(tmp_path / "v2")
    Repository.init(be)
    config = json.loads(be.get("config"))
    config["version"] = 2
    del config["chunk_ids"]
    be.put("config", json.dumps(config).encode())
    v2 = Repository.open(be)
    m1, _ = backup(v2, src)
    ids = file_chunk_ids(v2, m1, "big", data)
    (src / "more").write_bytes(os.urandom(1 << 20))
    m2, s = backup(v2, src)
    assert file_chunk_ids(v2, m2, "big", data) == ids and s.bytes_new < (2 << 20)
    assert v2.load_manifest(m2.id).version == 2 and m2.lists == {} and m2.tree, "ids inline"
    assert json.loads(be.get("config")) == config, "a version 2 repository stays version 2"
    assert verify(v2, v2.manifests()).ok
    restore_tree(v2, load_tree(v2, v2.tree_of(m2)), tmp_path / "out")
    assert diff(tree_manifest(src), tree_manifest(tmp_path / "out")) == []


@pytest.mark.parametrize("change, error", [
    ({"version": 5}, "format version 5 is newer than this vzbackup"),
    ({"chunk_ids": "md5"}, "unknown chunk id hash 'md5'"),
])
def test_a_repository_of_a_later_format_is_refused(tmp_path: Path, change: dict, error: str):
    be = DirBackend(tmp_path / "repo")
    Repository.init(be)
    be.put("config", json.dumps({**json.loads(be.get("config")), **change}).encode())
    with pytest.raises(DamagedError, match=error):
        Repository.open(be)


def test_an_unchanged_snapshot_stores_its_id_lists_once(repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    for d in range(30):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(100):
            (src / f"d{d}/f{f}").write_text(f"file {d}/{f}\n" * (f + 1))
    (src / "big").write_bytes(os.urandom(8 << 20))
    m1, _ = backup(repo, src)
    m2, s2 = backup(repo, src)
    refs = repo.refs_of(m2)
    assert set(m2.lists) == {"tree", "refs"} and m2.tree == m2.refs == []
    assert s2.chunks_new == 0 and m2.lists == m1.lists and refs == repo.refs_of(m1)
    lists = [c for chunks in m2.lists.values() for c in chunks]
    assert set(lists) <= set(refs) and len(refs) > 100
    # the manifest names a few list chunks, not every chunk (inline: 36 bytes per chunk)
    assert repo.published[m2.id] < 2000 < 36 * len(refs)
    fresh = Repository.open(repo.backend)  # read back from the storage alone
    assert fresh.refs_of(fresh.load_manifest(m2.id)) == refs
    out = tmp_path / "out"
    restore_tree(fresh, load_tree(fresh, fresh.tree_of(fresh.load_manifest(m2.id))), out)
    assert diff(tree_manifest(src), tree_manifest(out)) == []
    # a version 3 repository keeps its lists in the manifest, and stays version 3
    be = DirBackend(tmp_path / "v3")
    Repository.init(be)
    config = {**json.loads(be.get("config")), "version": 3}
    be.put("config", json.dumps(config).encode())
    v3 = Repository.open(be)
    m3, _ = backup(v3, src)
    assert m3.lists == {} and m3.tree and set(m3.refs) == set(v3.refs_of(m3)) >= set(m3.tree)
    assert json.loads(be.get("config")) == config and verify(v3, v3.manifests()).ok


def test_id_lists_are_cut_by_their_ids():
    ids = sorted(os.urandom(32).hex() for _ in range(5000))
    chunks = cut_id_list(ids)
    assert b"".join(chunks) == b"".join(bytes.fromhex(c) for c in ids)
    assert all(len(c) % 32 == 0 and len(c) <= 512 * 32 for c in chunks)
    assert 15 < len(chunks) < 80  # ~128 ids per chunk (39 on average)
    # an id added (a 1% change adds them all over) changes the chunk it lands in
    more = sorted([*ids, os.urandom(32).hex()])
    assert len(set(cut_id_list(more)) - set(chunks)) <= 2
    # no cut among 600 ids: one after 512
    runs = cut_id_list(["01" * 32] * 600)
    assert [len(c) // 32 for c in runs] == [512, 88]


def test_a_damaged_id_list_is_reported_by_verify_and_stops_gc(repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(1 << 20))
    m1, _ = backup(repo, src)
    (src / "a").unlink()
    (src / "b").write_bytes(os.urandom(1 << 20))
    (src / "odd").write_bytes(os.urandom(1000))  # the only small file: a 1000-byte chunk
    m2, _ = backup(repo, src)
    repo.trash(m1.id)  # its chunks are garbage now: gc would delete them
    cid = m2.lists["refs"][0]
    key, loc = repo.locate(cid)
    victim = tmp_path / "repo" / key
    data = bytearray(victim.read_bytes())
    data[loc.offset + loc.length // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    rep = verify(Repository.open(repo.backend), [m2])
    assert [(d.chunk, d.where) for d in rep.damaged] == [(cid, [f"{m2.id}:(refs id list)"])]
    packs = sorted(i.key for i in repo.list_packs())
    with pytest.raises(DamagedError, match=f"snapshot {m2.id}: its refs list: chunk {cid[:16]}"):
        maintenance.collect_garbage(Repository.open(repo.backend), grace=0)
    assert sorted(i.key for i in repo.list_packs()) == packs, "gc deleted nothing"
    # intact chunks that don't hold whole ids: a writer's fault, reported all the same
    odd = next(e for e in load_tree(repo, repo.tree_of(m2)) if e.path == "odd").chunks[0][0]
    forged = repo.publish(Manifest(id="", ctid=102, time=m2.time,
                                   lists={**m2.lists, "refs": [odd]}), "")
    rep = verify(Repository.open(repo.backend), [forged])
    assert [(d.chunk, d.where) for d in rep.damaged] == [("", [f"{forged.id}:(id lists)"])]
    assert "not a whole number of 32-byte ids" in rep.damaged[0].error
    # a manifest whose lists lack the file list, or aren't lists of ids
    no_tree = repo.publish(Manifest(id="", ctid=103, time=m2.time,
                                    lists={"refs": m2.lists["refs"]}), "")
    with pytest.raises(DamagedError, match="its manifest has no tree list"):
        repo.tree_of(repo.load_manifest(no_tree.id))
    for i, lists in enumerate(([m2.lists["tree"]], {"tree": "ab"}, {"tree": [1]}, {"x": []})):
        sid = f"104/2026-01-0{i + 1}T00:00:00Z"
        raw = {"id": sid, "ctid": 104, "time": sid[4:], "lists": lists}
        repo.put_object(f"snapshots/{sid}", json.dumps(raw).encode(), Kind.SNAPSHOT)
        with pytest.raises(DamagedError, match=r"unreadable manifest \(its id lists"):
            repo.load_manifest(sid)


SHARED_SEED = 1


def test_gc_repacks_partly_used_packs_and_drops_unused_ones(repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    # 'stays' is the only content m1 and m2 share: seeded so that none of its chunk ids
    # ends an id list chunk (FORMAT.md: a list is cut after an id whose last byte is a
    # multiple of ID_CUT), else m2 could reuse a refs list chunk stored in m1's pack
    (src / "stays").write_bytes(random.Random(SHARED_SEED).randbytes(1 << 20))
    (src / "goes").write_bytes(os.urandom(3 << 20))
    (src / "dir").mkdir()
    (src / "dir/gone").write_bytes(os.urandom(1000))
    m0, _ = backup(repo, src)  # one pack: 1 MiB stays, 3 MiB goes, a file list
    (src / "goes").unlink()
    m1, _ = backup(repo, src)  # one pack: a new file list, its id lists
    (src / "dir/gone").unlink()
    m2, _ = backup(repo, src)  # and another
    shared = set(repo.refs_of(m1)) & set(repo.refs_of(m2))
    assert shared and not any(bytes.fromhex(c)[-1] % ID_CUT == 0 for c in shared)
    repo.trash(m0.id)
    repo.trash(m1.id)
    packs_before = {i.key for i in repo.list_packs()}
    rep = maintenance.collect_garbage(repo, grace=0)
    # m0's pack is mostly garbage: repacked; m1's holds nothing m2 needs: deleted
    assert rep.packs_repacked == 1 and rep.packs_written == 1 and rep.packs_deleted == 1
    assert rep.bytes_deleted > 3 << 20
    packs_after = {i.key for i in repo.list_packs()}
    assert len(packs_after) == 2 and len(packs_after - packs_before) == 1
    assert len(repo.index_files()) == 1  # consolidated
    assert sum(i.size for i in repo.list_packs()) < 1.2 * (1 << 20)
    assert verify(repo, [m2]).ok
    out = tmp_path / "out"
    restore_tree(repo, load_tree(repo, repo.tree_of(m2)), out)
    assert diff(tree_manifest(src), tree_manifest(out)) == []
    # nothing more to do
    rep = maintenance.collect_garbage(repo, grace=0)
    assert rep.packs_deleted == rep.packs_repacked == rep.chunks_deleted == 0


def test_gc_removes_old_temp_files_but_not_a_running_backups(repo: Repository, tmp_path: Path):
    root = Path(repo.backend.root)
    stale = root / "data/ab/.tmp-abc.123.456"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x" * 1000)
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    # a backup's lock before its heartbeat stamps it says it started at 0: gc spares all
    unstamped = root / f"{L.LOCK_PREFIX}backup-unstamped"
    unstamped.parent.mkdir(exist_ok=True)
    unstamped.write_text(json.dumps({"kind": L.BACKUP, "host": os.uname().nodename,
                                     "pid": os.getpid(), "started": 0.0}))
    assert maintenance.collect_garbage(repo, grace=600).incomplete_removed == []
    unstamped.unlink()
    with L.RepoLock(repo, L.BACKUP, what="running") as running:
        # until the heartbeat stamps the lock's start, gc spares everything
        assert running.stamped.wait(10)
        live = root / "data/cd/.tmp-def.789.1"
        live.parent.mkdir(parents=True)
        live.write_bytes(b"y")
        rep = maintenance.collect_garbage(repo, grace=600)
        assert rep.incomplete_removed == ["data/ab/.tmp-abc.123.456"]
        assert live.exists() and not stale.exists()
        rep = maintenance.collect_garbage(repo, grace=0)
        assert live.exists(), "written after the running backup started"
    rep = maintenance.collect_garbage(repo, grace=0)
    assert rep.incomplete_removed == ["data/cd/.tmp-def.789.1"] and not live.exists()


def test_read_range_reads_any_byte_range_of_a_file(repo: Repository, tmp_path: Path):
    from vzbackup.engine.extract import read_range

    src = tmp_path / "src"
    src.mkdir()
    big = os.urandom(3 << 20)
    (src / "big").write_bytes(big)
    with open(src / "sparse", "wb") as f:  # data, a hole, data
        f.write(b"a" * 70000)
        f.seek(5 << 20)
        f.write(b"z" * 1000)
    sparse = (src / "sparse").read_bytes()
    (src / "small").write_bytes(b"tiny file\n")
    m, _ = backup(repo, src)
    entries = {e.path: e for e in load_tree(repo, repo.tree_of(m))}
    assert entries["sparse"].extents is not None
    rng = random.Random(5)
    for name, data in (("big", big), ("sparse", sparse), ("small", b"tiny file\n")):
        for _ in range(20):
            off = rng.randrange(len(data) + 10)
            n = rng.randrange(1, 1 << 20)
            assert read_range(repo, entries[name], off, n) == data[off : off + n], (name, off)


class CountingDirBackend(DirBackend):
    """The real directory backend, counting ranged reads (what an object store bills)."""

    ranged_reads = 0

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self.ranged_reads += 1
        return super().get_range(key, offset, length)


def test_restore_reads_packs_in_few_large_reads_whatever_the_order(tmp_path: Path,
                                                                   monkeypatch):
    from vzbackup.engine import extract

    backend = CountingDirBackend(tmp_path / "repo")
    repo = Repository.init(backend)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    blobs = [os.urandom(1 << 20) for _ in range(30)]
    for i, data in enumerate(blobs):  # the same files, walked in the opposite order
        (first / f"f{i:02d}").write_bytes(data)
        (second / f"f{29 - i:02d}").write_bytes(data)
    first_m, _ = backup(repo, first)
    m, stats = backup(repo, second, ctid=102)
    # only the file list and the id lists are new: the data sits in the first backup's packs
    assert stats.chunks_new == len(set(repo.refs_of(m)) - set(repo.refs_of(first_m)))
    entries = load_tree(repo, repo.tree_of(m))
    chunks = {c for e in entries for c, _, _ in e.chunks}
    packed = sum(i.size for i in repo.list_packs())
    backend.ranged_reads = 0
    restore_tree(repo, entries, tmp_path / "out")
    assert diff(tree_manifest(second), tree_manifest(tmp_path / "out")) == []
    # backwards through the packs, still a few reads of the storage's read size, not one
    # per chunk
    assert backend.ranged_reads <= packed // backend.read_size + 2 * len(repo.list_packs())
    assert backend.ranged_reads < len(chunks) / 3
    # a budget too small to hold any read: chunks whose read was dropped come one by one
    monkeypatch.setattr(extract, "PREFETCH_BYTES", 1)
    restore_tree(repo, entries, tmp_path / "tight")
    assert diff(tree_manifest(second), tree_manifest(tmp_path / "tight")) == []


class BigReadDirBackend(DirBackend):
    """The real directory backend with an object store's read size: reads of several MiB."""

    read_size = 8 << 20


def test_big_reads_are_opened_chunk_by_chunk_just_ahead_of_the_writer(tmp_path: Path,
                                                                      monkeypatch):
    repo = Repository.init(BigReadDirBackend(tmp_path / "repo"))
    src = tmp_path / "src"
    make_rich_tree(src)
    for i in range(48):  # compressible (2:1), many chunks to a read
        (src / f"f{i:02d}").write_bytes(os.urandom(384 << 10).hex().encode())
    (src / "z-same-as-f07").write_bytes((src / "f07").read_bytes())  # used again, later
    m, _ = backup(repo, src)
    entries = load_tree(repo, repo.tree_of(m))
    opened_in: list[str] = []
    open_chunk = repo.open_chunk

    def spy(*args: object, **kw: object) -> bytes:
        opened_in.append(threading.current_thread().name)
        return open_chunk(*args, **kw)

    monkeypatch.setattr(repo, "open_chunk", spy)
    restore_tree(repo, entries, tmp_path / "out", threads=2)
    assert diff(tree_manifest(src), tree_manifest(tmp_path / "out")) == []
    # opened in the unpack threads (or by the writer when none was ahead), not as a
    # whole read came in (only a read up to OPEN_WHOLE_MAX is: a pack's tail)
    unpacked = [t for t in opened_in if t.startswith("unpack")]
    assert len(unpacked) > 0.8 * len(opened_in), sorted(set(opened_in))
    # damage in a chunk opened ahead is the file's own, as with whole reads
    cid = {e.path: e for e in entries}["f30"].chunks[-1][0]
    # a chunk can hold the end of one file and the start of the next: the first one that
    # needs it reports it
    needs = next(e.path for e in entries if cid in {c for c, _, _ in e.chunks})
    _flip_in_middle(repo, cid)
    with pytest.raises(DamagedError, match=rf"^{needs}: .*corrupt"):
        restore_tree(repo, entries, tmp_path / "damaged", threads=2)
    # a budget too small to hold any read: every chunk is read alone, and still opened
    _flip_in_middle(repo, cid)  # flipped back
    monkeypatch.setattr(extract, "PREFETCH_BYTES", 1)
    restore_tree(repo, entries, tmp_path / "tight", threads=2)
    assert diff(tree_manifest(src), tree_manifest(tmp_path / "tight")) == []


def test_rebuild_index_from_the_pack_headers(tmp_path: Path, monkeypatch):
    from vzbackup.engine import rebuild

    key = KeyFile.create(tmp_path / "key")
    backend = DirBackend(tmp_path / "repo")
    repo = Repository.init(backend, key)
    src = tmp_path / "src"
    make_rich_tree(src)
    for i in range(20):
        (src / f"blob{i}").write_bytes(os.urandom(1 << 20))
    m, _ = backup(repo, src)
    where = {c: repo.locate(c) for c in repo.refs_of(m)}
    packs = repo.list_packs()
    assert len(packs) >= 2
    repo.delete_objects([info.key for info in repo.index_files()])
    repo = Repository.open(backend, key)
    # nothing locates a chunk any more, the snapshot's id lists' first
    lists = {c for chunks in m.lists.values() for c in chunks}
    assert {d.chunk for d in verify(repo, [m]).damaged} == lists
    rep = maintenance.rebuild_index(repo)
    assert (rep.packs, rep.index_files_written, rep.unreadable) == (len(packs), 1, {})
    assert {c: repo.locate(c) for c in where} == where
    restore_tree(repo, load_tree(repo, repo.tree_of(m)), tmp_path / "out")
    assert diff(tree_manifest(src), tree_manifest(tmp_path / "out")) == []
    # headers longer than the tail read first take a second read; the old index is replaced
    monkeypatch.setattr(rebuild, "HEADER_TAIL", 64)
    rep = maintenance.rebuild_index(Repository.open(backend, key))
    assert rep.index_files_replaced == 1 and len(repo.index_files()) == 1
    assert {c: Repository.open(backend, key).locate(c) for c in where} == where
    # a pack cut short (its writer crashed before syncing it) is reported, the rest indexed
    victim = tmp_path / "repo" / packs[0].key
    victim.write_bytes(victim.read_bytes()[:1000])
    rep = maintenance.rebuild_index(Repository.open(backend, key))
    assert list(rep.unreadable) == [packs[0].key] and rep.packs == len(packs) - 1


def test_a_backups_index_files_are_merged_into_one(repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(70):  # 5 packs
        (src / f"blob{i}").write_bytes(os.urandom(1 << 20))
    m, _ = backup(repo, src)
    packs = {i.key.rsplit("/", 1)[-1] for i in repo.list_packs()}
    # an index file for every INDEX_EVERY packs while it ran (not for those stored while
    # the packer was flushed), one for all at its end
    files = len(repo.index_files())
    assert len(packs) > 2 * INDEX_EVERY and 2 <= files <= len(packs) // INDEX_EVERY + 1
    assert repo.consolidate_index() == files - 1
    assert len(repo.index_files()) == 1 and repo.consolidate_index() == 0
    fresh = Repository.open(repo.backend)
    assert set(fresh.index.packs) == packs and all(c in fresh.index for c in repo.refs_of(m))
    assert verify(fresh, [m]).ok



def test_a_pack_given_in_pieces_is_stored_as_their_concatenation(tmp_path: Path):
    """Packs are written from their blobs (writev, no joined copy): more pieces than one
    writev takes, empty ones among them, all land in order."""
    be = DirBackend(tmp_path / "r")
    parts = [os.urandom(i % 7) for i in range(3000)]
    be.put_parts("data/ab/pack", parts)
    assert be.get("data/ab/pack") == b"".join(parts)


def test_a_snapshots_log_directory_is_synced_with_its_manifest_or_by_flush(tmp_path: Path):
    """A log's data is synced as it is written and its directory entry by the manifest's
    sync of the same directory right after (one directory sync, not two); a log that no
    manifest followed (a failed publish) has its directory synced by the next flush."""
    be = DirBackend(tmp_path / "r")
    snaps = tmp_path / "r/snapshots/101"
    be.put("snapshots/101/t1.log", b"log", Kind.LOG)
    assert be._unsynced == {snaps}
    assert be.put_if_absent("snapshots/101/t1", b"manifest", Kind.SNAPSHOT)
    assert not be._unsynced
    be.put("snapshots/101/t2.log", b"log", Kind.LOG)
    assert not be.put_if_absent("snapshots/101/t1", b"other", Kind.SNAPSHOT)  # name taken
    assert be._unsynced == {snaps}
    be.flush()
    assert not be._unsynced
    assert be.get("snapshots/101/t1") == b"manifest"
