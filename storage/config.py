"""Named storages (Proxmox storage.cfg style).

    dir: local
            path /var/lib/vzbackup/backup

    dir: usb
            path /mnt/usb/vzbackup
            fsync 0

A section starts with ``TYPE: NAME``; indented ``key value`` lines are its options.
Without a file, and unless the file defines it, ``local`` is a dir storage at the node's
default backup directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vzbackup.storage import registry
from vzbackup.storage.backend import Backend

DEFAULT_STORAGE = "local"
BOOL_OPTIONS = {"fsync", "path-style", "disable", "create-bucket", "verify-tls"}
REQUIRED = {"dir": "path", "s3": "bucket"}


class StorageConfigError(Exception):
    """storage.cfg is malformed or names an unknown storage; message is file:line: reason."""


@dataclass
class StorageDef:
    name: str
    kind: str
    options: dict[str, str] = field(default_factory=dict)
    source: str = "built-in"

    def open(self) -> Backend:
        opts: dict[str, object] = {}
        for k, v in self.options.items():
            key = k.replace("-", "_")
            opts[key] = v not in ("0", "no", "false") if k in BOOL_OPTIONS else v
        opts.pop("disable", None)
        try:
            return registry.open_backend(self.kind, self.name, **opts)
        except (KeyError, TypeError) as e:
            raise StorageConfigError(f"{self.source}: storage {self.name!r}: {e}") from None


def parse(text: str, source: str = "storage.cfg") -> dict[str, StorageDef]:
    storages: dict[str, StorageDef] = {}
    cur: StorageDef | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        where = f"{source}:{n}"
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not raw[0].isspace():
            kind, sep, name = line.partition(":")
            kind, name = kind.strip(), name.strip()
            if not sep or not kind or not name or " " in name:
                raise StorageConfigError(f"{where}: expected 'TYPE: NAME', got {line!r}")
            if kind not in registry.kinds():
                raise StorageConfigError(
                    f"{where}: unknown storage type {kind!r} (known: {', '.join(registry.kinds())})"
                )
            if name in storages:
                raise StorageConfigError(f"{where}: storage {name!r} defined twice")
            cur = storages[name] = StorageDef(name, kind, source=where)
            continue
        if cur is None:
            raise StorageConfigError(f"{where}: option outside a storage section")
        key, _, value = line.strip().partition(" ")
        if not value.strip():
            raise StorageConfigError(f"{where}: option {key!r} has no value")
        cur.options[key] = value.strip()
    for s in storages.values():
        need = REQUIRED.get(s.kind)
        if need and need not in s.options:
            raise StorageConfigError(f"{s.source}: {s.kind} storage {s.name!r} needs a {need}")
    return storages


def load(path: Path, default_local_path: Path) -> dict[str, StorageDef]:
    """Storages from *path* (optional file) plus the built-in ``local``."""
    storages: dict[str, StorageDef] = {}
    if path.exists():
        try:
            text = path.read_text()
        except OSError as e:
            raise StorageConfigError(f"{path}: {e.strerror}") from None
        storages = parse(text, str(path))
    storages.setdefault(
        DEFAULT_STORAGE,
        StorageDef(DEFAULT_STORAGE, "dir", {"path": str(default_local_path)}),
    )
    return {k: v for k, v in storages.items() if v.options.get("disable", "0") in ("0", "no")}
