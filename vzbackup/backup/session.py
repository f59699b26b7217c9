"""Open the repository a command works on: named storage, key file, compression level."""

from __future__ import annotations

from pathlib import Path

from vzbackup import constants as C
from vzbackup.config.node import Node
from vzbackup.config.storage import DEFAULT_STORAGE, storages
from vzbackup.engine.crypto import KeyFile
from vzbackup.engine.metacache import ObjectCache
from vzbackup.engine.repo import Repository
from vzbackup.errors import NotFoundError, StorageError
from vzbackup.storage.backend import Backend, BackendError


def open_backend(node: Node, name: str | None) -> Backend:
    all_ = storages(node)
    name = name or DEFAULT_STORAGE
    if name not in all_:
        raise NotFoundError(
            f"no storage named {name!r}",
            hint=f"known: {', '.join(sorted(all_))} (see {node.vzbackup_confdir / C.STORAGE_CFG})",
        )
    try:
        return all_[name].open()
    except BackendError as e:
        raise StorageError(str(e)) from None


def open_repository(node: Node, storage: str | None, keyfile: str | Path | None, *,
                    create: bool = False, level: int = 3) -> Repository:
    """The repository on *storage*; with *create*, a first backup initialises it."""
    key = KeyFile.load(Path(keyfile)) if keyfile else None
    backend = open_backend(node, storage)
    repo = Repository.open(backend, key, level, create=create)
    if backend.cache_metadata:
        repo.manifest_cache = ObjectCache(node.cachedir / repo.id / "manifests")
        repo.index_cache = ObjectCache(node.cachedir / repo.id / "index")
    return repo


def files_cache_path(node: Node, repo: Repository, ctid: int) -> Path:
    return node.cachedir / repo.id / "files" / f"{ctid}.zst"


def known_chunks_path(node: Node, repo: Repository) -> Path:
    return node.cachedir / repo.id / "known-chunks"
