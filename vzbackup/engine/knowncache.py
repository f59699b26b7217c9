"""The chunks the repository's published snapshots reference, kept on this host between
backups (CACHEDIR/REPO-ID/known-chunks), so a backup reads the manifests published since
the last one instead of every manifest (the cost grew with the number of snapshots).

Manifests never change once published, so the kept union stays right while every snapshot
it was built from is still listed with the same manifest size: snapshots added since only
add their references. When one of them is gone (pruned, trashed; gc may then have removed
its chunks) the union is built again from every manifest. A backup adds the snapshot it
published itself (``remember``), so the next one reads only other writers' manifests.
Only an optimisation: a missing, unreadable or foreign file is rebuilt.

The file is ``MAGIC`` + marshal(({snapshot id: manifest size}, (chunk id, ...))).
"""

from __future__ import annotations

import contextlib
import marshal
import os
from pathlib import Path

from vzbackup.engine.repo import Repository
from vzbackup.errors import DamagedError

MAGIC = b"vzbackup-known-chunks\x01"


def known_chunks(repo: Repository, path: Path | None = None) -> set[str]:
    """Every chunk a published snapshot references (using and updating the file *path*)."""
    return load_known(repo, path)[0]


def load_known(repo: Repository, path: Path | None = None
               ) -> tuple[set[str], dict[str, int]]:
    """:func:`known_chunks`, and the manifest size of every snapshot it covers (for
    :func:`remember`)."""
    sizes = {} if repo.fresh else repo.snapshot_listing()[0]
    kept = _load(path) if path is not None else None
    if kept is not None and all(sizes.get(sid) == n for sid, n in kept[0].items()):
        known = set(kept[1])
        new = {sid: n for sid, n in sizes.items() if sid not in kept[0]}
    else:
        known, new = set(), sizes
    manifests = repo.load_manifests(new)
    repo.read_lists(manifests, ("refs",))
    for m in manifests:
        # what an unreadable id list names is only not known: the writer finds such a chunk
        # in the index and touches its pack, as it does a pruned snapshot's
        with contextlib.suppress(DamagedError):
            known.update(repo.refs_of(m))
    if path is not None and (kept is None or new or len(kept[0]) != len(sizes)):
        _save(path, sizes, known)
    return known, sizes


def remember(path: Path, sizes: dict[str, int], known: set[str], sid: str, size: int,
             refs: list[str]) -> None:
    """Add the snapshot *sid* (manifest *size*, *refs*) that this host just published to
    the kept union *known* of the snapshots *sizes* (from :func:`load_known`)."""
    _save(path, {**sizes, sid: size}, known.union(refs))


def _load(path: Path) -> tuple[dict[str, int], tuple[str, ...]] | None:
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if not raw.startswith(MAGIC):
        return None
    try:
        sizes, chunks = marshal.loads(raw[len(MAGIC):])
    except (ValueError, EOFError, TypeError):
        return None
    if not isinstance(sizes, dict) or not isinstance(chunks, tuple):
        return None
    return sizes, chunks


def _save(path: Path, sizes: dict[str, int], known: set[str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(OSError):  # a cache that can't be written is just no cache
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(MAGIC + marshal.dumps((sizes, tuple(known))))
        os.replace(tmp, path)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
