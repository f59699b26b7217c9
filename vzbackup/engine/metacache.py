"""A local copy of a remote repository's immutable metadata: snapshot manifests
(CACHEDIR/REPO-ID/manifests) and index files (CACHEDIR/REPO-ID/index).

Only an optimisation: listing, incremental backups (their dedup index) and GC read every
manifest and index file, which from object storage means one request each. Both never
change once written, so a cached blob is valid while the storage lists the same key with
the same size; anything else is fetched again, and entries whose snapshot is gone are dropped. The
blobs are stored as they are in the repository (sealed: encrypted when the repository is),
and every read goes through the same authentication as a download. A lost or damaged
cache is simply rebuilt.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class ObjectCache:
    """Blobs by name (a relative path such as ``101/2026-11-21T02:00:00Z``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        return self.root / name

    def get(self, name: str, size: int) -> bytes | None:
        """The cached blob of *name* if it has the *size* the storage lists."""
        try:
            blob = self._path(name).read_bytes()
        except OSError:
            return None
        return blob if len(blob) == size else None

    def put(self, name: str, blob: bytes) -> None:
        path = self._path(name)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        with contextlib.suppress(OSError):  # a cache that can't be written is just no cache
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(blob)
            os.replace(tmp, path)

    def retain(self, names: set[str]) -> None:
        """Drop the entries of objects that no longer exist."""
        if not self.root.is_dir():
            return
        for dirpath, _dirs, files in os.walk(self.root):
            for f in files:
                path = os.path.join(dirpath, f)
                if os.path.relpath(path, self.root) not in names:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
