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


@dataclass
class _Plan:
    """What step 4 decided per pack: pack name -> its index entries (for ``repack``: the
    referenced ones, to copy)."""

    keep: dict[str, Entries] = field(default_factory=dict)
    drop: dict[str, Entries] = field(default_factory=dict)
    repack: dict[str, Entries] = field(default_factory=dict)

    def keep_again(self, pack: str, entries: Entries) -> None:
        self.keep[pack] = entries
        self.drop.pop(pack, None)
        self.repack.pop(pack, None)


def collect(repo: Repository, *, grace: float = DEFAULT_GRACE, dry_run: bool = False,
            log: Callable[[str], None] = lambda m: None) -> GcReport:
    """Run GC (the steps of the module docstring); the caller holds the maintenance lock."""
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

    trashed = repo.trashed()
    needed_trash = {sid for sid, t in trashed if live and t >= oldest}
    unneeded_trash = [sid for sid, _ in trashed if sid not in needed_trash]
    referenced, n_roots = _referenced(repo, needed_trash)
    rep.chunks_referenced = len(referenced)
    log(f"gc: {len(packs)} packs, {len(loose)} v1 chunks, {len(referenced)} chunks "
        f"referenced by {n_roots} snapshots, {len(live)} backup(s) running")

    by_pack = index.by_pack()
    plan = _plan(packs, by_pack, {bytes.fromhex(c) for c in referenced}, cutoff, rep)
    v1_garbage = [i for i in loose if _v1_garbage(i, referenced, cutoff)]
    if dry_run:
        _count(rep, packs, plan, by_pack)
        rep.chunks_deleted += len(v1_garbage)
        rep.bytes_deleted += sum(i.size for i in v1_garbage)
        rep.trash_deleted = unneeded_trash
        return rep

    _keep_touched(repo, plan, by_pack, cutoff)
    written = _repack(repo, plan.repack)
    rep.packs_written = len(written)
    _count(rep, packs, plan, by_pack)
    if plan.drop or plan.repack or written or len(index_keys) >= CONSOLIDATE_INDEX:
        new_index = [(p, e) for p, e in plan.keep.items() if e] + written
        if new_index:
            repo.write_index(new_index)
        repo.delete_objects(index_keys)
        rep.index_files_replaced = len(index_keys)
    repo.delete_objects([pack_key(pack) for pack in (*plan.drop, *plan.repack)])
    _delete_v1(repo, v1_garbage, cutoff, rep)
    _remove_leftovers(repo, unneeded_trash, cutoff, rep, log)
    repo.reload_index()
    log(f"gc: deleted {rep.packs_deleted} packs, repacked {rep.packs_repacked} into "
        f"{rep.packs_written}, dropped {rep.chunks_deleted} chunks ({rep.bytes_deleted} "
        f"bytes); kept {rep.packs_kept_young} recent packs; removed "
        f"{len(rep.incomplete_removed)} incomplete uploads and {len(rep.trash_deleted)} "
        "pruned manifests")
    return rep


def _referenced(repo: Repository, needed_trash: set[str]) -> tuple[set[str], int]:
    """Step 3: every chunk the roots reference, and how many roots there are. A damaged
    id list stops gc here, before anything is deleted."""
    roots = repo.manifests()
    roots += [repo.load_manifest(sid, trashed=True) for sid in sorted(needed_trash)]
    referenced: set[str] = set()
    repo.read_lists(roots, ("refs",))
    for m in roots:
        referenced.update(repo.refs_of(m))
    return referenced, len(roots)


def _plan(packs: dict[str, ObjectInfo], by_pack: dict[str, Entries], ref_raw: set[bytes],
          cutoff: float, rep: GcReport) -> _Plan:
    """Step 4 for the packs: keep the young and the mostly used, drop the unused, repack
    the rest."""
    plan = _Plan()
    for pack, info in packs.items():
        entries = by_pack.get(pack, [])
        if info.mtime >= cutoff:
            rep.packs_kept_young += 1
            plan.keep[pack] = entries
            continue
        used = [e for e in entries if e[0] in ref_raw]
        used_bytes = sum(e[2] for e in used)
        if not used:
            plan.drop[pack] = entries
        elif info.size - used_bytes > REPACK_UNUSED * info.size:
            plan.repack[pack] = used
        else:
            plan.keep[pack] = entries
    return plan


def _keep_touched(repo: Repository, plan: _Plan, by_pack: dict[str, Entries],
                  cutoff: float) -> None:
    """Keep the packs to drop or repack that were touched since they were listed: they
    are in use again."""
    for pack in [*plan.drop, *plan.repack]:
        try:
            touched = repo.backend.stat(pack_key(pack)).mtime >= cutoff
        except ObjectMissing:
            touched = False
        except BackendError as e:
            raise StorageError(str(e)) from None
        if touched:
            plan.keep_again(pack, by_pack.get(pack, []))


def _delete_v1(repo: Repository, garbage: list[ObjectInfo], cutoff: float,
               rep: GcReport) -> None:
    """Delete the unreferenced version 1 chunk objects not touched meanwhile."""
    for info in garbage:
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


def _remove_leftovers(repo: Repository, trash: list[str], cutoff: float, rep: GcReport,
                      log: Callable[[str], None]) -> None:
    """Step 6: killed writers' temp files and multipart uploads, and the pruned manifests
    *trash* no running backup can need."""
    try:
        rep.incomplete_removed = repo.backend.remove_incomplete(cutoff)
    except BackendError as e:
        log(f"gc: could not remove incomplete uploads: {e}")
    for sid in trash:
        rep.trash_deleted.append(sid)
        try:
            repo.drop_trashed(sid)
        except BackendError:
            continue


def _v1_garbage(info: ObjectInfo, referenced: set[str], cutoff: float) -> bool:
    return info.key.rsplit("/", 1)[-1] not in referenced and info.mtime < cutoff


def _count(rep: GcReport, packs: dict[str, ObjectInfo], plan: _Plan,
           by_pack: dict[str, Entries]) -> None:
    rep.packs_deleted = len(plan.drop)
    rep.packs_repacked = len(plan.repack)
    for pack in plan.drop:
        rep.chunks_deleted += len(by_pack.get(pack, []))
        rep.bytes_deleted += packs[pack].size
    for pack, used in plan.repack.items():
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
