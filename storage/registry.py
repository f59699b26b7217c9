"""Storage types by name: each registers its options dataclass and how to open one.

Like restic's backend registry (``ParseConfig`` plus ``Open``): a config names the type,
``vzbackup.config.storage`` fills the type's options from the section, ``open_backend``
hands them to the backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from vzbackup.storage.backend import Backend
from vzbackup.storage.options import DirOptions

if TYPE_CHECKING:
    from vzbackup.storage.s3options import S3Options


class StorageType(NamedTuple):
    """A storage type: its options dataclass and how to open a backend."""

    kind: str
    load_options: Callable[[], type]  # its options dataclass (the section's keys, validated
    #                                   in __post_init__), imported when first needed
    open: Callable[[str, Any], Backend]  # (storage name, options) -> backend


_TYPES: dict[str, StorageType] = {}


def register(storage_type: StorageType) -> None:
    _TYPES[storage_type.kind] = storage_type


def kinds() -> list[str]:
    return sorted(_TYPES)


def storage_type(kind: str) -> StorageType:
    if kind not in _TYPES:
        raise KeyError(f"unknown storage type {kind!r} (known: {', '.join(kinds())})")
    return _TYPES[kind]


def options_class(kind: str) -> type:
    """The options dataclass of the storage type *kind*."""
    return storage_type(kind).load_options()


def open_backend(kind: str, name: str, options: Any) -> Backend:
    """The backend of type *kind* for storage *name*, from its options dataclass."""
    return storage_type(kind).open(name, options)


def _open_dir(_name: str, o: DirOptions) -> Backend:
    from vzbackup.storage.local import DirBackend

    return DirBackend(o.path, fsync=o.fsync)


def _open_s3(name: str, o: S3Options) -> Backend:
    from vzbackup.storage.s3 import S3Backend  # boto3 takes a while to import: only when used

    return S3Backend(o, name=name)


def _s3_options() -> type:
    from vzbackup.storage.s3options import S3Options

    return S3Options


register(StorageType("dir", lambda: DirOptions, _open_dir))
register(StorageType("s3", _s3_options, _open_s3))
