"""Verify snapshots: re-read, decrypt and re-hash every chunk they reference (ranged
reads of their packs, neighbours together).

Damaged or missing chunks are reported with the snapshots and file paths that need them.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from vzbackup.engine import tree as T
from vzbackup.engine.extract import Read, fetch, load_tree, plan_reads
from vzbackup.engine.repo import Manifest, Repository
from vzbackup.errors import DamagedError, StorageError


@dataclass
class Damage:
    chunk: str
    error: str
    where: list[str] = field(default_factory=list)  # "SNAPSHOT:path" (or ":file list")


@dataclass
class VerifyReport:
    snapshots: list[str] = field(default_factory=list)
    chunks: int = 0
    bytes: int = 0
    damaged: list[Damage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "snapshots": self.snapshots,
            "chunks": self.chunks,
            "bytes": self.bytes,
            "damaged": [d.__dict__ for d in self.damaged],
        }


def verify(repo: Repository, manifests: list[Manifest], *, threads: int = 4,
           progress: Callable[[int], None] | None = None) -> VerifyReport:
    report = VerifyReport(snapshots=[m.id for m in manifests])
    bad: dict[str, Damage] = {}
    needed: dict[str, None] = {}
    lists_bad: dict[str, tuple[Manifest, str]] = {}  # snapshot id -> (it, why its lists fail)
    readable: list[tuple[Manifest, list[str], list[str] | None]] = []  # with its file lists
    repo.read_lists(manifests)
    for m in manifests:
        needed.update(dict.fromkeys(m.list_chunks))
        try:
            needed.update(dict.fromkeys(repo.refs_of(m)))
            readable.append((m, repo.tree_of(m), repo.state_tree_of(m)))
        except DamagedError as e:  # its list chunks are checked below with the others
            lists_bad[m.id] = (m, str(e))

    def check(r: Read) -> list[tuple[str, int, str | None]]:
        try:
            data = fetch(repo, r)
        except StorageError as e:
            return [(cid, 0, str(e)) for cid, _, _ in r.chunks]
        return [(cid, 0, str(d)) if isinstance(d := data[cid], DamagedError)
                else (cid, len(d), None) for cid, _, _ in r.chunks]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for results in pool.map(check, plan_reads(repo, needed)):
            for cid, size, err in results:
                report.chunks += 1
                report.bytes += size
                if err:
                    bad[cid] = Damage(cid, err)
                if progress:
                    progress(1)
    _name_damage(repo, bad, manifests, readable)
    for m, why in lists_bad.values():  # intact chunks, yet no list: a writer's fault
        if not any(c in bad for c in m.list_chunks):
            bad[f"lists of {m.id}"] = Damage("", why, [f"{m.id}:(id lists)"])
    report.damaged = sorted(bad.values(), key=lambda d: d.chunk)
    return report


def _name_damage(repo: Repository, bad: dict[str, Damage], manifests: list[Manifest],
                 readable: list[tuple[Manifest, list[str], list[str] | None]]) -> None:
    """Name the snapshots' lists and files that need each damaged chunk."""
    for m in manifests:
        for name, chunks in m.lists.items():
            for cid in chunks:
                if cid in bad:
                    bad[cid].where.append(f"{m.id}:({name} id list)")
    for m, tree, state_tree in readable:
        for label, chunks in (("file list", tree), ("state file list", state_tree or [])):
            for cid in chunks:
                if cid in bad:
                    bad[cid].where.append(f"{m.id}:({label})")
        for chunks, prefix in ((tree, ""), (state_tree, "[state] ")):
            if not chunks or any(c in bad for c in chunks):
                continue
            for e in load_tree(repo, chunks):
                if e.kind != T.FILE:
                    continue
                for cid, _, _ in e.chunks:
                    if cid in bad:
                        bad[cid].where.append(f"{m.id}:{prefix}/{e.path}")
                        break
