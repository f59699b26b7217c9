"""Garbage collection of chunks no snapshot needs, safe while backups run.

Under the maintenance lock (one prune/gc at a time; backups keep running):

1. ``start`` = the storage's clock now; list every chunk with its mtime.
2. Live backup locks give ``oldest``, the start of the oldest running backup.
3. Roots = published snapshots, plus pruned ones (trash) pruned after ``oldest``: a running
   backup may have loaded them as its deduplication index.
4. A chunk goes if no root references it and it was last written or touched before
   ``min(start, oldest) - grace``; it is re-checked right before it is deleted.
   A running backup writes new chunks and touches old ones it reuses after it started,
   so nothing it references is ever older than the cutoff.
5. Pruned manifests no running backup can need are deleted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from vzbackup.engine import locks as L
from vzbackup.engine.repo import Repository, chunk_key
from vzbackup.storage.backend import BackendError, ObjectMissing

DEFAULT_GRACE = 300.0  # seconds: a margin for clock rounding between storage and hosts


@dataclass
class GcReport:
    chunks_total: int = 0
    chunks_referenced: int = 0
    chunks_deleted: int = 0
    bytes_deleted: int = 0
    chunks_kept_young: int = 0
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
    chunks = list(repo.list_chunks())
    rep.chunks_total = len(chunks)
    now = start
    live = [lk for lk in L.list_locks(repo) if lk.kind == L.BACKUP and not lk.stale(now)]
    rep.running_backups = len(live)
    oldest = min([lk.started for lk in live], default=start)
    cutoff = min(start, oldest) - grace

    roots = repo.manifests()
    trashed = repo.trashed()
    needed_trash = [sid for sid, t in trashed if live and t >= oldest]
    roots += [repo.load_manifest(sid, trashed=True) for sid in needed_trash]
    referenced: set[str] = set()
    for m in roots:
        referenced.update(m.refs)
    rep.chunks_referenced = len(referenced)
    log(f"gc: {len(chunks)} chunks, {len(referenced)} referenced by {len(roots)} snapshots, "
        f"{len(live)} backup(s) running")

    for cid, mtime, size in chunks:
        if cid in referenced:
            continue
        if mtime >= cutoff:
            rep.chunks_kept_young += 1
            continue
        if dry_run:
            rep.chunks_deleted += 1
            rep.bytes_deleted += size
            continue
        try:
            if repo.backend.stat(chunk_key(cid)).mtime >= cutoff:  # touched meanwhile
                rep.chunks_kept_young += 1
                continue
            repo.delete_chunk(cid)
        except ObjectMissing:
            continue
        rep.chunks_deleted += 1
        rep.bytes_deleted += size

    for sid, _ in trashed:
        if sid in needed_trash:
            continue
        rep.trash_deleted.append(sid)
        if not dry_run:
            try:
                repo.drop_trashed(sid)
            except BackendError:
                continue
    log(f"gc: deleted {rep.chunks_deleted} chunks ({rep.bytes_deleted} bytes), "
        f"kept {rep.chunks_kept_young} recent, dropped {len(rep.trash_deleted)} pruned manifests")
    return rep
