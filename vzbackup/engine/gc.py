"""Garbage collection: drop or repack packs by how much of them is still referenced, safe
while backups run.

Under the maintenance lock (one prune/gc at a time; backups keep running):

1. ``start`` = the storage's clock now. Live backup locks give ``oldest``, the start of the
   oldest running backup; ``cutoff = min(start, oldest) - grace``. A running backup only
   writes packs and touches packs it reuses after it started, so nothing it needs is
   older than the cutoff.
2. The index is loaded *before* the packs are listed: a listed pack missing from it is
   either garbage (its writer died before writing its index) or younger than the cutoff.
3. Roots = published snapshots, plus pruned ones (trash) pruned after ``oldest``: a
   running backup may have loaded them as its deduplication index.
4. Per pack older than the cutoff: none of it referenced -> delete; more than
   REPACK_UNUSED of its bytes unreferenced -> copy the referenced blobs (still sealed, no
   re-encryption) into new packs, then delete it; else keep. Version 1 chunk objects go
   when unreferenced and older than the cutoff.
5. A consolidated index of every kept and new pack is written, then the index files read
   in step 2 are deleted, then the packs. Packs touched meanwhile are kept (and indexed);
   a backup that touched one in the last instant notices before it publishes.
6. Temp files and unfinished multipart uploads of killed writers started before the
   cutoff are removed; pruned manifests no running backup can need are deleted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vzbackup.engine import locks as L
from vzbackup.engine.pack import Entries, Packer
from vzbackup.engine.repo import DATA_PREFIX, Repository, chunk_key, pack_key
from vzbackup.errors import StorageError
from vzbackup.storage.backend import BackendError, ObjectInfo, ObjectMissing

DEFAULT_GRACE = 300.0  # seconds: a margin for clock rounding between storage and hosts
REPACK_UNUSED = 0.25  # repack a pack once this share of its bytes is garbage
CONSOLIDATE_INDEX = 32  # rewrite the index as one file once it has this many


@dataclass
class GcReport:
    packs_total: int = 0
    packs_deleted: int = 0
    packs_repacked: int = 0
    packs_written: int = 0
    packs_kept_young: int = 0
    chunks_referenced: int = 0
    chunks_deleted: int = 0  # unreferenced chunks dropped (from packs or v1 objects)
    bytes_deleted: int = 0  # storage freed
    index_files_replaced: int = 0
    incomplete_removed: list[str] = field(default_factory=list)
    trash_deleted: list[str] = field(default_factory=list)
    running_backups: int = 0
    dry_run: bool = False

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def collect(repo: Repository, *, grace: float = DEFAULT_GRACE, dry_run: bool = False,
            log: Callable[[str], None] = lambda m: None) -> GcReport:
    """Run GC; the caller holds the maintenance lock."""
    rep = GcReport(dry_run=dry_run)
    start = L.storage_now(repo)
    live = [lk for lk in L.list_locks(repo) if lk.kind == L.BACKUP and not lk.stale(start)]
    rep.running_backups = len(live)
    oldest = min([lk.started for lk in live], default=start)
    cutoff = min(start, oldest) - grace

    index = repo.reload_index()  # before listing the packs: see the module docstring
    index_keys = list(index.files)
    packs = {i.key[len(DATA_PREFIX):].rsplit("/", 1)[-1]: i for i in repo.list_packs()}
    loose = repo.list_chunks()
    rep.packs_total = len(packs)

    roots = repo.manifests()
    trashed = repo.trashed()
    needed_trash = [sid for sid, t in trashed if live and t >= oldest]
    roots += [repo.load_manifest(sid, trashed=True) for sid in needed_trash]
    referenced: set[str] = set()
    repo.read_lists(roots, ("refs",))
    for m in roots:  # a damaged id list stops gc here, before anything is deleted
        referenced.update(repo.refs_of(m))
    rep.chunks_referenced = len(referenced)
    ref_raw = {bytes.fromhex(c) for c in referenced}
    log(f"gc: {len(packs)} packs, {len(loose)} v1 chunks, {len(referenced)} chunks "
        f"referenced by {len(roots)} snapshots, {len(live)} backup(s) running")

    by_pack = index.by_pack()
    keep: dict[str, Entries] = {}
    drop: dict[str, Entries] = {}  # delete outright
    repack: dict[str, Entries] = {}  # the referenced entries to copy, then delete
    for pack, info in packs.items():
        entries = by_pack.get(pack, [])
        if info.mtime >= cutoff:
            rep.packs_kept_young += 1
            keep[pack] = entries
            continue
        used = [e for e in entries if e[0] in ref_raw]
        used_bytes = sum(e[2] for e in used)
        if not used:
            drop[pack] = entries
        elif info.size - used_bytes > REPACK_UNUSED * info.size:
            repack[pack] = used
        else:
            keep[pack] = entries

    if dry_run:
        _count(rep, packs, drop, repack, by_pack)
        rep.chunks_deleted += sum(1 for i in loose if _v1_garbage(i, referenced, cutoff))
        rep.bytes_deleted += sum(i.size for i in loose if _v1_garbage(i, referenced, cutoff))
        rep.trash_deleted = [sid for sid, _ in trashed if sid not in needed_trash]
        return rep

    # packs touched since they were listed are in use again
    for pack in list(drop) + list(repack):
        try:
            touched = repo.backend.stat(pack_key(pack)).mtime >= cutoff
        except ObjectMissing:
            touched = False
        except BackendError as e:
            raise StorageError(str(e)) from None
        if touched:
            keep[pack] = by_pack.get(pack, [])
            drop.pop(pack, None)
            repack.pop(pack, None)

    written = _repack(repo, repack)
    rep.packs_written = len(written)
    _count(rep, packs, drop, repack, by_pack)
    if drop or repack or written or len(index_keys) >= CONSOLIDATE_INDEX:
        new_index = [(p, e) for p, e in keep.items() if e] + written
        if new_index:
            repo.write_index(new_index)
        repo.delete_objects(index_keys)
        rep.index_files_replaced = len(index_keys)
    repo.delete_objects([pack_key(pack) for pack in list(drop) + list(repack)])

    for info in loose:
        if not _v1_garbage(info, referenced, cutoff):
            continue
        cid = info.key.rsplit("/", 1)[-1]
        try:
            if repo.backend.stat(chunk_key(cid)).mtime >= cutoff:  # touched meanwhile
                continue
            repo.delete_object(chunk_key(cid))
        except ObjectMissing:
            continue
        except BackendError as e:
            raise StorageError(str(e)) from None
        rep.chunks_deleted += 1
        rep.bytes_deleted += info.size

    try:
        rep.incomplete_removed = repo.backend.remove_incomplete(cutoff)
    except BackendError as e:
        log(f"gc: could not remove incomplete uploads: {e}")
    for sid, _ in trashed:
        if sid in needed_trash:
            continue
        rep.trash_deleted.append(sid)
        try:
            repo.drop_trashed(sid)
        except BackendError:
            continue
    repo.reload_index()
    log(f"gc: deleted {rep.packs_deleted} packs, repacked {rep.packs_repacked} into "
        f"{rep.packs_written}, dropped {rep.chunks_deleted} chunks ({rep.bytes_deleted} "
        f"bytes); kept {rep.packs_kept_young} recent packs; removed "
        f"{len(rep.incomplete_removed)} incomplete uploads and {len(rep.trash_deleted)} "
        "pruned manifests")
    return rep


def _v1_garbage(info: ObjectInfo, referenced: set[str], cutoff: float) -> bool:
    return info.key.rsplit("/", 1)[-1] not in referenced and info.mtime < cutoff


def _count(rep: GcReport, packs: dict[str, ObjectInfo], drop: dict[str, Entries],
           repack: dict[str, Entries], by_pack: dict[str, Entries]) -> None:
    rep.packs_deleted = len(drop)
    rep.packs_repacked = len(repack)
    for pack in drop:
        rep.chunks_deleted += len(by_pack.get(pack, []))
        rep.bytes_deleted += packs[pack].size
    for pack, used in repack.items():
        rep.chunks_deleted += len(by_pack.get(pack, [])) - len(used)
        rep.bytes_deleted += packs[pack].size - sum(e[2] for e in used)


def _repack(repo: Repository, repack: dict[str, Entries]) -> list[tuple[str, Entries]]:
    """Copy the given blobs into new packs; returns the new packs with their entries."""
    written: list[tuple[str, Entries]] = []

    def store(pack: str, data: list[bytes], entries: Entries) -> None:
        repo.put_pack(pack, data)
        written.append((pack, entries))

    packer = Packer(repo.codec.seal, store)
    for pack, used in repack.items():
        data = repo.get_object_raw(pack_key(pack))
        for cid, off, ln in sorted(used, key=lambda e: e[1]):
            packer.add(cid.hex(), data[off : off + ln])
    packer.flush()
    if written:
        repo.flush()  # the copies are durable before the originals go
    return written
