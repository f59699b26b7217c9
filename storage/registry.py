"""Storage types by name: a backend registers itself, configs name the type."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from storage.backend import Backend

_TYPES: dict[str, Callable[..., Backend]] = {}


def register(kind: str, factory: Callable[..., Backend]) -> None:
    _TYPES[kind] = factory


def kinds() -> list[str]:
    return sorted(_TYPES)


def open_backend(kind: str, **options: Any) -> Backend:
    """Instantiate the backend of type *kind* with its options from the storage config."""
    if kind not in _TYPES:
        raise KeyError(f"unknown storage type {kind!r} (known: {', '.join(kinds())})")
    return _TYPES[kind](**options)


def _register_builtin() -> None:
    from storage.local import DirBackend

    register("dir", lambda path, **kw: DirBackend(path, **kw))


_register_builtin()
