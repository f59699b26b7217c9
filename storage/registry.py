"""Storage types by name: a backend registers itself, configs name the type."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vzbackup.storage.backend import Backend

_TYPES: dict[str, Callable[..., Backend]] = {}


def register(kind: str, factory: Callable[..., Backend]) -> None:
    _TYPES[kind] = factory


def kinds() -> list[str]:
    return sorted(_TYPES)


def open_backend(kind: str, name: str = "", **options: Any) -> Backend:
    """Instantiate the backend of type *kind* (storage *name*) with its config options."""
    if kind not in _TYPES:
        raise KeyError(f"unknown storage type {kind!r} (known: {', '.join(kinds())})")
    return _TYPES[kind](name=name, **options)


def _register_builtin() -> None:
    from vzbackup.storage.local import DirBackend

    register("dir", lambda path, name="", **kw: DirBackend(path, **kw))
    register("s3", _open_s3)


def _open_s3(bucket: str, **options: Any) -> Backend:
    from vzbackup.storage.s3 import S3Backend  # boto3 takes a while to import: only when used

    return S3Backend(bucket, **options)


_register_builtin()
