"""A local copy of a remote repository's snapshot manifests (CACHEDIR/REPO-ID/manifests).

Only an optimisation: listing, incremental backups (their dedup index) and GC read every
manifest, which from object storage means one request each. Manifests never change once
published, so a cached blob is valid while the storage lists the same key with the same
size; anything else is fetched again, and entries whose snapshot is gone are dropped. The
blobs are stored as they are in the repository (sealed: encrypted when the repository is),
and every read goes through the same authentication as a download. A lost or damaged
cache is simply rebuilt.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class ManifestCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, sid: str) -> Path:
        ctid, _, stamp = sid.partition("/")
        return self.root / ctid / stamp

    def get(self, sid: str, size: int) -> bytes | None:
        """The cached blob of *sid* if it has the *size* the storage lists."""
        try:
            blob = self._path(sid).read_bytes()
        except OSError:
            return None
        return blob if len(blob) == size else None

    def put(self, sid: str, blob: bytes) -> None:
        path = self._path(sid)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        with contextlib.suppress(OSError):  # a cache that can't be written is just no cache
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(blob)
            os.replace(tmp, path)

    def retain(self, sids: set[str]) -> None:
        """Drop the entries of snapshots that no longer exist."""
        if not self.root.is_dir():
            return
        for path in self.root.glob("*/*"):
            if f"{path.parent.name}/{path.name}" not in sids:
                with contextlib.suppress(OSError):
                    path.unlink()
