"""Prune (retention), garbage collection and index rebuilds of a repository, under its
maintenance lock."""

from __future__ import annotations

from collections.abc import Callable, Collection

from vzbackup.engine import gc, rebuild
from vzbackup.engine import locks as L
from vzbackup.engine.keeppolicy import KeepPolicy
from vzbackup.engine.prune import Decision, Item, plan
from vzbackup.engine.repo import Repository, snapshot_time


def prune(repo: Repository, policy: KeepPolicy, *, ctids: list[int] | None = None,
          exclude: Collection[int] = (), dry_run: bool = False, lockwait: float = 0.0,
          log: Callable[[str], None] = lambda m: None) -> dict[int, list[Decision]]:
    """Apply *policy* to each CT's snapshots separately (the CTs *ctids*, or every CT but
    those in *exclude*); returns the decisions per CT."""
    out: dict[int, list[Decision]] = {}
    with L.RepoLock(repo, L.MAINTENANCE, what="prune", wait=lockwait):
        protected = repo.protected_ids()
        by_ct: dict[int, list[Item]] = {}
        for sid in repo.snapshot_ids():
            ctid = int(sid.split("/")[0])
            if (ctids and ctid not in ctids) or ctid in exclude:
                continue
            keep = sid in protected or repo.retained(sid)  # retained: under Object Lock
            by_ct.setdefault(ctid, []).append(Item(sid, snapshot_time(sid), keep))
        for ctid, items in sorted(by_ct.items()):
            decisions = plan(items, policy)
            out[ctid] = decisions
            for d in decisions:
                if d.keep:
                    continue
                log(f"prune: {'would remove' if dry_run else 'removing'} {d.item.id}")
                if not dry_run:
                    repo.trash(d.item.id)
    return out


def collect_garbage(repo: Repository, *, grace: float = gc.DEFAULT_GRACE, dry_run: bool = False,
                    lockwait: float = 0.0, log: Callable[[str], None] = lambda m: None
                    ) -> gc.GcReport:
    with L.RepoLock(repo, L.MAINTENANCE, what="gc", wait=lockwait):
        return gc.collect(repo, grace=grace, dry_run=dry_run, log=log)


def rebuild_index(repo: Repository, *, dry_run: bool = False, lockwait: float = 0.0,
                  log: Callable[[str], None] = lambda m: None) -> rebuild.RebuildReport:
    with L.RepoLock(repo, L.MAINTENANCE, what="rebuild-index", wait=lockwait):
        return rebuild.rebuild_index(repo, dry_run=dry_run, log=log)


def upgrade_format(repo: Repository, *, lockwait: float = 0.0) -> int:
    """``Repository.upgrade_format`` under the maintenance lock (no gc or prune of an older
    vzbackup is halfway through it); returns the version the repository had."""
    with L.RepoLock(repo, L.MAINTENANCE, what="upgrade-repo", wait=lockwait):
        return repo.upgrade_format()
