"""Rebuild the index from the packs alone (restic's ``rebuild-index``).

Every pack ends with a sealed header listing its chunks (FORMAT.md), so a lost, deleted or
damaged index comes back from one ranged read of each pack's end (two when its header is
longer than HEADER_TAIL). Under the maintenance lock (no prune or gc meanwhile; backups may
run): the index files are listed before the packs, the new index is written, and only then
are the listed index files deleted. A pack written by a running backup after the listing
has an index file of its own, written after the pack, which stays.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from vzbackup.engine.pack import HEADER_AAD, TRAILER, Entries, decode_entries, header_span
from vzbackup.engine.repo import DATA_PREFIX, Repository
from vzbackup.errors import DamagedError, StorageError
from vzbackup.storage.backend import BackendError, ObjectInfo

HEADER_TAIL = 64 * 1024  # bytes read from a pack's end: its header and trailer, mostly
INDEX_FILE_PACKS = 4096  # packs listed per index file written (~160 bytes per chunk)
READERS = 8  # packs read at once


@dataclass
class RebuildReport:
    packs: int = 0
    chunks: int = 0
    index_files_written: int = 0
    index_files_replaced: int = 0
    unreadable: dict[str, str] = field(default_factory=dict)  # pack key -> why

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def read_entries(repo: Repository, info: ObjectInfo) -> Entries:
    """The chunks a pack's header lists; DamagedError if it has no readable header."""
    size = info.size
    try:
        tail = repo.backend.get_range(info.key, max(0, size - HEADER_TAIL), min(size, HEADER_TAIL))
        start, hlen = header_span(tail, size)
        if start >= size - len(tail):
            sealed = tail[start - (size - len(tail)) : len(tail) - TRAILER.size]
        else:
            sealed = repo.backend.get_range(info.key, start, hlen)
        entries = decode_entries(repo.codec.open(HEADER_AAD, sealed))
    except BackendError as e:
        raise StorageError(str(e)) from None
    except (ValueError, TypeError, DamagedError) as e:
        raise DamagedError(f"{info.key}: no readable header ({e})") from None
    if any(off + ln > start for _, off, ln in entries):
        raise DamagedError(f"{info.key}: its header lists chunks beyond its data")
    return entries


def rebuild_index(repo: Repository, *, dry_run: bool = False,
                  log: Callable[[str], None] = lambda m: None) -> RebuildReport:
    """Replace the index by one read from the packs; the caller holds the maintenance lock."""
    rep = RebuildReport()
    old = [i.key for i in repo.index_files()]
    packs = repo.list_packs()
    log(f"rebuild-index: reading the headers of {len(packs)} packs")

    def read(info: ObjectInfo) -> tuple[ObjectInfo, Entries | str]:
        try:
            return info, read_entries(repo, info)
        except DamagedError as e:
            return info, str(e)

    found: list[tuple[str, Entries]] = []
    with ThreadPoolExecutor(READERS) as pool:
        for info, got in pool.map(read, packs):
            if isinstance(got, str):
                rep.unreadable[info.key] = got
                log(f"rebuild-index: skipping {got}")
                continue
            found.append((info.key[len(DATA_PREFIX):].rsplit("/", 1)[-1], got))
            rep.chunks += len(got)
    rep.packs = len(found)
    if dry_run:
        return rep
    for n in range(0, len(found), INDEX_FILE_PACKS):
        repo.write_index(found[n : n + INDEX_FILE_PACKS])
        rep.index_files_written += 1
    repo.delete_objects(old)
    rep.index_files_replaced = len(old)
    repo.reload_index()
    log(f"rebuild-index: {rep.chunks} chunks of {rep.packs} packs in "
        f"{rep.index_files_written} index files (replacing {len(old)}); "
        f"{len(rep.unreadable)} packs unreadable")
    return rep
