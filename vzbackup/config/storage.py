"""Named storages: ``PREFIX/etc/vzbackup/storage.cfg`` (Proxmox style, see conf/storage.cfg).

    dir: usb
            path /mnt/usb/vzbackup
            fsync 0

A section is ``TYPE: NAME``; its keys are the fields of the type's options dataclass
(``vzbackup.storage.options``, ``s3options``) plus ``disable``, common to all. The whole
file is validated when it is read. Without a file, and unless the file defines it, ``local``
is a dir storage at the node's backup directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from vzbackup import constants as C
from vzbackup.config.node import Node
from vzbackup.errors import ConfigError
from vzbackup.storage import registry
from vzbackup.storage.backend import Backend
from vzbackup.storage.options import DirOptions

if TYPE_CHECKING:
    from vzbackup.config.sections import Section

DEFAULT_STORAGE = "local"


class StorageDef(NamedTuple):
    """A storage from storage.cfg (or the built-in one): its type and options."""

    name: str
    kind: str
    options: Any  # the type's options dataclass
    source: str = "built-in"  # file:line of its header
    disabled: bool = False

    def open(self) -> Backend:
        return registry.open_backend(self.kind, self.name, self.options)


def parse(text: str, source: str = C.STORAGE_CFG) -> dict[str, StorageDef]:
    """Every storage of a storage.cfg text, validated; ConfigError ``file:line: ...``."""
    from vzbackup.config.sections import parse_sections  # only with a storage.cfg

    storages: dict[str, StorageDef] = {}
    for section in parse_sections(text, source, header="TYPE: NAME",
                                  label=lambda s: f"storage {s.id!r}"):
        storage = _storage(section, source)
        if storage.name in storages:
            first = storages[storage.name].source.rsplit(":", 1)[1]
            raise ConfigError(f"{storage.source}: storage {storage.name!r} defined twice "
                              f"(first on line {first})")
        storages[storage.name] = storage
    return storages


def _storage(section: Section, source: str) -> StorageDef:
    from vzbackup.config.sections import fill, parse_bool

    where = f"{source}:{section.line}"
    if section.kind not in registry.kinds():
        raise ConfigError(f"{where}: unknown storage type {section.kind!r}",
                          hint=f"known: {', '.join(registry.kinds())}")
    what = f"{section.kind} storage {section.id!r}"
    disabled = False
    if "disable" in section.options:
        text, line = section.options.pop("disable")
        try:
            disabled = parse_bool(text)
        except ValueError as e:
            raise ConfigError(f"{source}:{line}: {what}: disable: {e}") from None
    options = fill(registry.options_class(section.kind), section, source, what)
    return StorageDef(section.id, section.kind, options, where, disabled)


def load(path: Path, default_local_path: Path) -> dict[str, StorageDef]:
    """The enabled storages of *path* (an optional file) plus the built-in ``local``."""
    storages: dict[str, StorageDef] = {}
    if path.exists():
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a text file ({e.reason})") from None
        storages = parse(text, str(path))
    storages.setdefault(DEFAULT_STORAGE, StorageDef(
        DEFAULT_STORAGE, "dir", DirOptions(str(default_local_path))))
    return {name: s for name, s in storages.items() if not s.disabled}


def storages(node: Node) -> dict[str, StorageDef]:
    """The node's enabled storages by name."""
    return load(node.vzbackup_confdir / C.STORAGE_CFG, node.backupdir)
