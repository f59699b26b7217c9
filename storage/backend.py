"""The backend interface every repository storage implements (duplicity style: tiny).

Keys are relative posix paths ("data/ab/ab12...", "snapshots/101/..."). Every write is
atomic: a reader sees the whole object or none of it. A writer tells the backend what
*kind* of object it stores (:class:`Kind`); backends decide durability and retention by
kind, never by matching key names.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Iterable, Iterator
from typing import NamedTuple


class Kind(enum.StrEnum):
    """What an object is, as far as a backend needs to know."""

    CONFIG = "config"
    PACK = "pack"  # bulk data (a pack file, or a v1 chunk): durable only once flush() returns
    INDEX = "index"
    SNAPSHOT = "snapshot"  # a snapshot manifest: immutable, gets Object Lock retention
    LOG = "log"
    MARKER = "marker"  # e.g. "protected"
    LOCK = "lock"
    OTHER = "other"


BULK_KINDS = frozenset({Kind.PACK})  # synced by flush(), not object by object
RETAINED_KINDS = frozenset({Kind.SNAPSHOT})  # written under an immutability lock if set
# never synced: a lock matters only while its writer lives, and a crash that loses it took
# the writer with it (NFS commits on close anyway)
VOLATILE_KINDS = frozenset({Kind.LOCK})
# written just before the object that names them, into the same directory (a snapshot's
# log, then its manifest): a local directory's entry is made durable with that object's
LEADING_KINDS = frozenset({Kind.LOG})


class ObjectInfo(NamedTuple):
    """An object as a listing reports it (a tuple: made for every object listed, and created
    at import ten times cheaper than a frozen dataclass)."""

    key: str
    size: int
    mtime: float  # seconds since the epoch, set by the storage (server time for S3)


class BackendError(Exception):
    """A storage operation failed (I/O, permissions, network); the message says which."""


class ObjectMissing(BackendError):
    """The key does not exist."""


class Backend(abc.ABC):
    """put/get/list/delete/exists plus create-if-absent (locks, atomic publish) and touch."""

    #: a short human description, e.g. "dir:/var/lib/vz/backup" (never holds secrets)
    url: str = ""
    #: whether the repository should keep a local copy of its metadata (remote storage)
    cache_metadata: bool = False
    #: requests sent to the storage so far (object storage counts them; 0 elsewhere)
    requests: int = 0
    #: how many reads a caller may keep in flight at once (an object store's connections)
    parallel_reads: int = 8
    #: bytes a restore reads at once at most: an object store's request costs a round trip
    #: and a seek (one GET per chunk made a restore from RGW 4x slower), so reads are big
    read_size: int = 4 * 1024 * 1024

    @abc.abstractmethod
    def put(self, key: str, data: bytes, kind: Kind = Kind.OTHER) -> None:
        """Store *data* under *key*, replacing it atomically."""

    def put_parts(self, key: str, parts: list[bytes], kind: Kind = Kind.OTHER,
                  sha256: str | None = None) -> None:
        """``put`` of the concatenation of *parts* (a pack's blobs): a backend that can
        write them as they are overrides this, sparing a copy of the whole object.
        *sha256*: the concatenation's SHA-256 (hex), if the caller knows it (a pack's name)."""
        self.put(key, b"".join(parts), kind)

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: bytes, kind: Kind = Kind.OTHER) -> bool:
        """Store *data* only if *key* does not exist yet; False if it already existed."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; ObjectMissing if there is none."""

    @abc.abstractmethod
    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """*length* bytes of the object from *offset* (one ranged read); ObjectMissing."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose key starts with *prefix*, in no particular order."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove *key*; a missing key is not an error."""

    def delete_many(self, keys: Iterable[str]) -> None:
        """Remove every key of *keys* (object stores: in few requests); missing ones too."""
        for key in keys:
            self.delete(key)

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether *key* exists."""

    @abc.abstractmethod
    def touch(self, key: str) -> None:
        """Set the object's mtime to now (garbage collection spares recently used chunks)."""

    def stat(self, key: str) -> ObjectInfo:
        """Size and mtime of *key* (default: via list)."""
        for info in self.list(key):
            if info.key == key:
                return info
        raise ObjectMissing(f"{self.url}: no object {key}")

    def retained_until(self, key: str) -> float | None:
        """When an immutability lock on *key* ends (epoch seconds); None if it has none."""
        return None

    def remove_incomplete(self, older_than: float) -> list[str]:
        """Remove what killed writers left (temp files, unfinished multipart uploads) that
        was started before *older_than* (storage time); returns what was removed."""
        return []

    def reopened(self) -> Backend:
        """This storage for a forked child process, sharing nothing another thread of this
        process may hold (a connection, a thread pool, a lock): this backend itself where
        reads are plain system calls."""
        return self

    @property
    def shared_by_processes(self) -> bool:
        """Whether two processes may read at once, each through its own ``reopened()``."""
        return True

    def prepare_writes(self) -> None:  # noqa: B027 - nothing to prepare by default
        """A writer is starting: begin, in the background, what its writes will need."""

    def flush(self) -> None:  # noqa: B027 - a no-op where every write is durable
        """Make every object written so far durable (called before a snapshot is published)."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections."""
