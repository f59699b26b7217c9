"""The backup repository on a storage backend: config, packs, index, snapshot manifests.

The layout and every encoding are specified in FORMAT.md next to this file (format
version 4; versions 1 to 3 are read and written, version 1 upgraded by its first new
backup).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from vzbackup.engine.crypto import BLAKE3, CHUNK_IDS, ENCRYPTION, SHA256, Codec, KeyFile
from vzbackup.engine.metacache import ObjectCache
from vzbackup.engine.pack import Entries, Index, Location, Packer, decode_index, encode_index
from vzbackup.errors import ConfigError, DamagedError, NotFoundError, StorageError, UsageError
from vzbackup.storage.backend import Backend, BackendError, Kind, ObjectInfo, ObjectMissing

T = TypeVar("T")
K = TypeVar("K")

FORMAT = "vzbackup-repo"
VERSION = 4  # FORMAT.md; 3: id lists in the manifest; 2: SHA-256 chunk ids; 1: one object
#               per chunk (chunks/); all read
PACKED = 2  # the first version with packs (a version 1 repository's next backup upgrades it)
LISTED = 4  # the first version storing a manifest's id lists as chunks
ID_LISTS = ("tree", "state_tree", "refs")  # a manifest's lists of chunk ids
ID_SIZE = 32  # bytes of a chunk id in a stored id list
# an id list is cut after each id whose last byte is a multiple of ID_CUT (ids are hashes:
# 128 ids, 4 KiB, per chunk on average; an id added or gone changes one chunk; not the first
# byte: a sorted list's ids share theirs in runs), and after ID_RUN_MAX ids without a cut
ID_CUT = 128
ID_RUN_MAX = 512
CONFIG_KEY = "config"
SNAP_PREFIX = "snapshots/"
TRASH_PREFIX = "trash/"
DATA_PREFIX = "data/"
INDEX_PREFIX = "index/"
CHUNK_PREFIX = "chunks/"  # version 1: one object per chunk
LOG_SUFFIX = ".log"
PROTECTED_SUFFIX = ".protected"
TIME_FMT = "%Y-%m-%dT%H:%M:%SZ"

# The stream of small files (and where a file counts as large: CHUNK_AVG): 1 MiB on
# average compresses like a tar (zstd sees more context); only changed files are read again,
# so its size costs nothing when a few of them change
CHUNK_MIN = 256 * 1024
CHUNK_AVG = 1024 * 1024
CHUNK_MAX = 4 * 1024 * 1024
# Large files are cut finer: a scattered small write (a database's 64 KiB page run)
# re-stores about 180 KiB instead of 720 KiB at 512 KiB on average
FILE_CHUNK_MIN = 32 * 1024
FILE_CHUNK_AVG = 128 * 1024
FILE_CHUNK_MAX = 512 * 1024
# The file list finer still: 1% of a Debian rootfs's files changed (every 100th, a line
# appended) touched each of its 14 chunks at 128 KiB (374 KB re-stored per backup); at 4 KiB,
# 143 of 490 (160 KB; the whole list stores 452 KB instead of 374 KB)
TREE_CHUNK_MIN = 1024
TREE_CHUNK_AVG = 4 * 1024
TREE_CHUNK_MAX = 16 * 1024
# what repositories made before "file_chunker" existed cut everything with
OLD_CHUNKER = (128 * 1024, 512 * 1024, 2 * 1024 * 1024)


# what FastCDC (pyfastcdc) cuts with: (lowest, highest) of each parameter, min <= avg <= max
CHUNKER_BOUNDS = {"min": (64, 1 << 20), "avg": (256, 4 << 20), "max": (1024, 16 << 20)}


def _chunker(c: Any, default: tuple[int, int, int], where: str) -> tuple[int, int, int]:
    """(min, avg, max) of a config's chunker *c* (absent: *default*); DamagedError naming
    *where* if it is not one FastCDC can cut with (a writer would fail, or map a buffer as
    big as a damaged max, only after reading data)."""
    if not c:
        return default
    try:
        mn, avg, mx = (int(c[k]) for k in CHUNKER_BOUNDS)
    except (KeyError, TypeError, ValueError):
        raise DamagedError(f"{where}: not {{min, avg, max}} in bytes: {repr(c)[:200]}") from None
    got = (mn, avg, mx)
    if not all(lo <= n <= hi for n, (lo, hi) in zip(got, CHUNKER_BOUNDS.values(), strict=True)) \
            or not mn <= avg <= mx:
        raise DamagedError(f"{where}: {got} is not a chunker FastCDC can cut with "
                           f"(min <= avg <= max, each within {list(CHUNKER_BOUNDS.values())})")
    return got


def chunk_key(cid: str) -> str:
    """Where a version 1 repository keeps a chunk."""
    return f"{CHUNK_PREFIX}{cid[:2]}/{cid}"


def pack_key(pack: str) -> str:
    return f"{DATA_PREFIX}{pack[:2]}/{pack}"


def snapshot_time(sid: str) -> datetime:
    return datetime.strptime(sid.split("/", 1)[1], TIME_FMT).replace(tzinfo=UTC)


def parse_snapshot_id(text: str) -> tuple[int, str]:
    """'101/2026-11-21T02:00:00Z' -> (101, the id); UsageError otherwise."""
    ctid, sep, stamp = text.strip("/").partition("/")
    try:
        if not sep:
            raise ValueError
        datetime.strptime(stamp, TIME_FMT)
        return int(ctid), f"{int(ctid)}/{stamp}"
    except ValueError:
        raise UsageError(
            f"{text!r} is not a snapshot id", hint="ids look like 101/2026-11-21T02:00:00Z"
        ) from None


@dataclass
class Manifest:
    """What a snapshot is: the CT, when, how, its tree, its state and what it references."""

    id: str
    ctid: int
    time: str
    hostname: str = ""
    mode: str = ""
    notes: str = ""
    ct_config: str = ""
    tree: list[str] = field(default_factory=list)  # chunk ids of the metadata stream
    state_tree: list[str] | None = None  # CRIU images (checkpoint mode)
    refs: list[str] = field(default_factory=list)  # every chunk the snapshot needs, sorted
    stats: dict[str, Any] = field(default_factory=dict)
    node: str = ""
    version: int = VERSION
    # version 4: the chunk ids of each of ID_LISTS stored as chunks (read them with
    # Repository.tree_of, state_tree_of, refs_of); the fields above are then left empty
    lists: dict[str, list[str]] = field(default_factory=dict)
    protected: bool = False  # filled in from the marker when listing

    def to_json(self) -> bytes:
        d = dict(self.__dict__)
        d.pop("protected")
        for k in ID_LISTS if self.lists else ("lists",):
            d.pop(k)
        return json.dumps(d, sort_keys=True).encode()

    @property
    def has_state(self) -> bool:
        """Whether the snapshot holds CRIU images (known without reading any list)."""
        return self.state_tree is not None or "state_tree" in self.lists

    @property
    def list_chunks(self) -> list[str]:
        """The chunk ids of the id lists stored as chunks (version 4), in ID_LISTS order."""
        return [c for name in ID_LISTS for c in self.lists.get(name, ())]

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        d = json.loads(data)
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        lists = known.get("lists", {})
        if not isinstance(lists, dict) or not all(
                k in ID_LISTS and isinstance(v, list) and all(isinstance(c, str) for c in v)
                for k, v in lists.items()):
            raise ValueError("its id lists are not {name: [chunk id, ...]}")
        return cls(**known)

    @property
    def size(self) -> int:
        return int(self.stats.get("bytes_total", 0))


class Repository:
    """Open with ``Repository.open`` (or ``init`` for a new one); thread-safe for chunk I/O."""

    def __init__(self, backend: Backend, config: dict[str, Any], key: KeyFile | None, level: int):
        self.backend = backend
        self.config = config
        self.key = key
        self.codec = Codec(key, level, config.get("chunk_ids", SHA256))
        self.manifest_cache: ObjectCache | None = None  # set for remote storage
        self.index_cache: ObjectCache | None = None
        self._index: Index | None = None
        self._index_lock = threading.Lock()
        self._packs_written: dict[str, list[tuple[str, Entries]]] = {}  # index file -> packs
        self._superseded: list[str] = []  # index files a later one lists all packs of
        self.published: dict[str, int] = {}  # snapshot id -> its manifest's stored size
        self.created = False  # by this process (``init``)
        self._list_chunks: dict[str, bytes] = {}  # read for manifests' id lists

    # --- life cycle --------------------------------------------------------------------
    def reopened(self) -> Repository:
        """This repository for a forked child process: on ``backend.reopened()`` (its own
        connections), with the loaded index and none of this one's locks or caches."""
        repo = Repository(self._call(self.backend.reopened), self.config, self.key,
                          self.codec.level)
        repo._index = self._index
        return repo

    @property
    def id(self) -> str:
        return str(self.config["id"])

    @property
    def encrypted(self) -> bool:
        return self.config.get("encryption", "none") != "none"

    @classmethod
    def init(cls, backend: Backend, key: KeyFile | None = None, level: int = 3) -> Repository:
        config = {
            "format": FORMAT,
            "version": VERSION,
            "chunk_ids": BLAKE3,
            "id": uuid.uuid4().hex,
            "created": time.strftime(TIME_FMT, time.gmtime()),
            "chunker": {"min": CHUNK_MIN, "avg": CHUNK_AVG, "max": CHUNK_MAX},
            "file_chunker": {"min": FILE_CHUNK_MIN, "avg": FILE_CHUNK_AVG,
                             "max": FILE_CHUNK_MAX},
            "tree_chunker": {"min": TREE_CHUNK_MIN, "avg": TREE_CHUNK_AVG,
                             "max": TREE_CHUNK_MAX},
            "encryption": ENCRYPTION if key else "none",
            "key_fingerprint": key.fingerprint if key else "",
        }
        try:
            created = backend.put_if_absent(CONFIG_KEY, json.dumps(config, indent=1).encode(),
                                            Kind.CONFIG)
        except BackendError as e:
            raise StorageError(str(e)) from None
        if not created:
            return cls.open(backend, key, level)
        repo = cls(backend, config, key, level)
        repo.created = True
        repo._index = Index()
        return repo

    @classmethod
    def open(
        cls, backend: Backend, key: KeyFile | None = None, level: int = 3, *, create: bool = False
    ) -> Repository:
        if create:  # a writer (a backup): e.g. an object store's probe, meanwhile
            backend.prepare_writes()
        try:
            raw = backend.get(CONFIG_KEY)
        except ObjectMissing:
            if create:
                return cls.init(backend, key, level)
            raise NotFoundError(
                f"no backup repository at {backend.url}",
                hint="a first 'vzbackup dump' creates it",
            ) from None
        except BackendError as e:
            raise StorageError(str(e)) from None
        try:
            config = json.loads(raw)
            if config.get("format") != FORMAT:
                raise ValueError("not a vzbackup repository")
            if int(config.get("version", 0)) not in range(1, VERSION + 1):
                raise ValueError(f"format version {config['version']} is newer than this vzbackup")
            if config.get("chunk_ids", SHA256) not in CHUNK_IDS:
                raise ValueError(f"unknown chunk id hash {config['chunk_ids']!r}")
        except (ValueError, TypeError) as e:
            raise DamagedError(f"{backend.url}/{CONFIG_KEY}: {e}") from None
        if config.get("encryption", "none") != "none":
            if key is None:
                raise ConfigError(
                    f"the repository at {backend.url} is encrypted",
                    hint="pass --keyfile (or set encryption-key in vzdump.conf)",
                )
            if key.fingerprint != config.get("key_fingerprint"):
                want = str(config.get("key_fingerprint", ""))[:12]
                raise ConfigError(
                    f"the key file does not belong to the repository at {backend.url} "
                    f"(fingerprint {key.fingerprint[:12]} != {want})"
                )
        elif key is not None:
            raise ConfigError(
                f"the repository at {backend.url} is not encrypted; don't pass a key for it"
            )
        return cls(backend, config, key, level)

    @property
    def fresh(self) -> bool:
        """Whether this process created the repository and has published nothing into it:
        a writer need not list its snapshots or index (what another writer stored since
        then is only missed for dedup)."""
        return self.created and not self.published

    def _chunker_of(self, key: str, default: tuple[int, int, int]) -> tuple[int, int, int]:
        return _chunker(self.config.get(key), default, f"{self.backend.url}/{CONFIG_KEY}: {key}")

    @property
    def chunker_params(self) -> tuple[int, int, int]:
        """(min, avg, max) of the small files' stream; files of avg bytes or more are large."""
        return self._chunker_of("chunker", OLD_CHUNKER)

    @property
    def file_chunker_params(self) -> tuple[int, int, int]:
        """(min, avg, max) of large files (an older repository: the stream's, so its chunks
        keep deduplicating)."""
        return self._chunker_of("file_chunker", self.chunker_params)

    @property
    def tree_chunker_params(self) -> tuple[int, int, int]:
        """(min, avg, max) of the file list (an older repository: its large files', so its
        file lists keep deduplicating)."""
        return self._chunker_of("tree_chunker", self.file_chunker_params)

    def chunkers(self) -> tuple[tuple[int, int, int], ...]:
        """The stream's, large files' and file list's (min, avg, max): DamagedError if the
        config's are unusable (a writer calls it before it changes anything)."""
        return self.chunker_params, self.file_chunker_params, self.tree_chunker_params

    @property
    def version(self) -> int:
        return int(self.config.get("version", 1))

    def upgrade(self) -> bool:
        """Make a version 1 repository version 2 (its chunks stay readable where they are);
        False if it has packs already. Older vzbackup refuse the upgraded repository. Its
        chunk ids stay SHA-256 (version 3's BLAKE3 would name every stored chunk anew)."""
        if self.version >= PACKED:
            return False
        self._set_version(PACKED)
        return True

    def upgrade_format(self) -> int:
        """Make the repository the current version (the caller holds the maintenance lock):
        its next snapshots store their id lists as chunks; the ones stored stay readable as
        they are, chunk ids keep their hash. Older vzbackup refuse the repository from then
        on. Returns the version it had."""
        old = self.version
        if old < VERSION:
            self._set_version(VERSION)
        return old

    def _set_version(self, version: int) -> None:
        """Store the config as *version*, noting when it was upgraded."""
        self.config["version"] = version
        self.config["upgraded"] = time.strftime(TIME_FMT, time.gmtime())
        self._call(lambda: self.backend.put(CONFIG_KEY, json.dumps(self.config, indent=1)
                                            .encode(), Kind.CONFIG))

    def _fetch_all(self, fetch: Callable[[K], T], keys: list[K]) -> list[T]:
        """*fetch* of every key, in parallel; a single one in this thread (an unchanged
        backup reads one new manifest: starting and joining a thread costs more)."""
        if len(keys) < 2:
            return [fetch(k) for k in keys]
        with ThreadPoolExecutor(self.backend.parallel_reads) as pool:
            return list(pool.map(fetch, keys))

    def _any_exists(self, keys: list[str]) -> bool:
        """Whether one of *keys* exists: remote storage asked in parallel (a round trip
        each), a directory one after the other."""
        if self.backend.cache_metadata:
            return any(self._fetch_all(self.backend.exists, keys))
        return any(self.backend.exists(k) for k in keys)

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except BackendError as e:
            raise StorageError(str(e)) from None

    # --- the index ---------------------------------------------------------------------
    @property
    def index(self) -> Index:
        with self._index_lock:
            if self._index is None:
                self._index = self._load_index()
            return self._index

    def prefetch_index(self) -> None:
        """Start loading the index in the background (a restore finds its snapshot
        meanwhile; ``index`` waits for it). A failure is left for ``index`` to report."""

        def load() -> None:
            with contextlib.suppress(Exception):
                self.index  # noqa: B018 - loads it

        threading.Thread(target=load, name="index", daemon=True).start()

    def reload_index(self) -> Index:
        with self._index_lock:
            self._index = self._load_index()
            return self._index

    def index_files(self) -> list[ObjectInfo]:
        return self._call(lambda: list(self.backend.list(INDEX_PREFIX)))

    def _load_index(self) -> Index:
        infos = self.index_files()
        cache = self.index_cache
        names = {i.key[len(INDEX_PREFIX):]: i.size for i in infos}
        blobs = {n: cache.get(n, size) for n, size in names.items()} if cache else {}
        missing = [n for n in names if blobs.get(n) is None]

        def fetch(name: str) -> bytes | None:
            try:
                return self.backend.get(INDEX_PREFIX + name)
            except ObjectMissing:
                return None  # replaced by a gc meanwhile: the new one is listed too
            except BackendError as e:
                raise StorageError(str(e)) from None

        for name, blob in zip(missing, self._fetch_all(fetch, missing), strict=True):
            blobs[name] = blob
            if cache and blob is not None:
                cache.put(name, blob)
        if cache:
            cache.retain(set(names))
        index = Index()
        for name in sorted(names):
            blob = blobs.get(name)
            if blob is None:
                continue
            key = INDEX_PREFIX + name
            try:
                index.add_file(key, list(decode_index(self.codec.open(key, blob))))
            except (ValueError, TypeError) as e:
                raise DamagedError(f"index file {name[:16]}: unreadable ({e})") from None
        return index

    def write_index(self, packs: list[tuple[str, Entries]]) -> str:
        """Write an index file listing *packs*; returns its key (also added in memory)."""
        name = uuid.uuid4().hex
        key = INDEX_PREFIX + name
        blob = self.codec.seal(key, encode_index(packs))
        self._call(lambda: self.backend.put(key, blob, Kind.INDEX))
        if self.index_cache:
            self.index_cache.put(name, blob)
        with self._index_lock:
            if self._index is not None:
                self._index.add_file(key, packs)
        return key

    # --- chunks ---------------------------------------------------------------------------
    def packer(self) -> Packer:
        """A packer whose packs get an index file every INDEX_EVERY packs (an interrupted
        backup leaves most of its packs indexed, for the next one to reuse) and, once
        flushed, one listing all of them (:meth:`_index_packs`)."""
        return Packer(self.codec.seal, self._store_pack, self._index_packs)

    def _store_pack(self, pack: str, parts: list[bytes], entries: Entries) -> None:
        self.put_pack(pack, parts)

    def _index_packs(self, packs: list[tuple[str, Entries]], flushed: bool) -> None:
        """An index file for *packs* as they are stored; once the packer is *flushed*, one
        for all of this process's packs (since the last :meth:`consolidate_index`), which
        replaces those (a cold index load, a disaster restore, costs a request per index
        file) and is written before a snapshot can refer to them. ``consolidate_index``
        deletes the replaced ones."""
        with self._index_lock:
            written = self._packs_written
        if flushed:
            if not packs and len(written) < 2:
                return
            packs = [p for batch in written.values() for p in batch] + packs
        key = self.write_index(packs)
        with self._index_lock:
            if flushed:
                self._superseded.extend(written)
                self._packs_written = {key: packs}
            else:
                self._packs_written[key] = packs

    def consolidate_index(self) -> int:
        """Delete the index files that the last one of this process's packs replaced
        (:meth:`_index_packs`). Returns how many. Safe alongside gc and rebuild-index: the
        new file exists before the old ones go."""
        with self._index_lock:
            old, self._superseded, self._packs_written = self._superseded, [], {}
        if not old:
            return 0
        self.delete_objects(old)
        with self._index_lock:
            if self._index is not None:
                for key in old:
                    self._index.files.pop(key, None)
        return len(old)

    @contextlib.contextmanager
    def consolidating_index(self) -> Iterator[None]:
        """Run :meth:`consolidate_index` in a thread while the body runs (publishing a
        snapshot: their round trips overlap); a failure leaves the replaced index files,
        which only list the packs again."""
        with self._index_lock:
            needed = bool(self._superseded)
        if not needed:
            yield
            return
        pool = ThreadPoolExecutor(1, thread_name_prefix="index")
        fut = pool.submit(self.consolidate_index)
        try:
            yield
        finally:
            with contextlib.suppress(StorageError):
                fut.result()
            pool.shutdown()

    def put_pack(self, pack: str, parts: list[bytes]) -> None:
        """Store a pack given as the pieces it is the concatenation of (*pack*, its name,
        is their SHA-256)."""
        self._call(lambda: self.backend.put_parts(pack_key(pack), parts, Kind.PACK, pack))

    def get_object_raw(self, key: str) -> bytes:
        """An object's stored bytes (a pack, say), unopened."""
        try:
            return self.backend.get(key)
        except ObjectMissing:
            raise DamagedError(f"{key} is missing from the repository") from None
        except BackendError as e:
            raise StorageError(str(e)) from None

    def delete_object(self, key: str) -> None:
        self._call(lambda: self.backend.delete(key))

    def delete_objects(self, keys: list[str]) -> None:
        """Delete *keys* (on an object store in one request per thousand)."""
        if keys:
            self._call(lambda: self.backend.delete_many(keys))

    def flush(self) -> None:
        """Make everything written so far durable."""
        self._call(self.backend.flush)

    def locate(self, cid: str) -> tuple[str, Location | None]:
        """(object key, where in it) of a chunk: a pack and a Location, or a version 1
        chunk object and None."""
        loc = self.index.lookup(cid)
        return (pack_key(loc.pack), loc) if loc else (chunk_key(cid), None)

    def has_chunk(self, cid: str) -> bool:
        """Whether the chunk's object exists on the storage (not only in the index)."""
        key, _ = self.locate(cid)
        return self._call(lambda: self.backend.exists(key))

    def touch_pack(self, cid: str) -> bool:
        """Mark the object holding a chunk as just used (gc spares it); False if gone."""
        key, loc = self.locate(cid)
        try:
            self.backend.touch(key)
            # False if truncated by a crash before its writer synced it
            return loc is None or self.backend.stat(key).size >= loc.offset + loc.length
        except ObjectMissing:
            return False
        except BackendError as e:
            raise StorageError(str(e)) from None

    def get_chunk(self, cid: str, rehash: bool = True) -> bytes:
        """The chunk's plaintext; DamagedError if missing, corrupt or not matching its id
        (see ``open_chunk`` for *rehash*)."""
        for attempt in (0, 1):
            key, loc = self.locate(cid)
            try:
                if loc is None:
                    blob = self.backend.get(key)
                else:
                    blob = self.backend.get_range(key, loc.offset, loc.length)
                break
            except ObjectMissing:
                if attempt == 0 and self.version >= PACKED:
                    self.reload_index()  # a gc repacked it meanwhile
                    continue
                raise DamagedError(f"chunk {cid[:16]} is missing from the repository") from None
            except BackendError as e:
                raise StorageError(str(e)) from None
        return self.open_chunk(cid, blob, rehash)

    def open_chunk(self, cid: str, blob: bytes, rehash: bool = True) -> bytes:
        """The plaintext of chunk *cid*'s *blob*, checked: its id is computed again from it,
        unless *rehash* is False and opening the blob checked its content already
        (``Codec.checks_content``; a restore, which need not hash it again)."""
        data = self.codec.open(cid, blob, f"chunk {cid[:16]}")
        if (rehash or not self.codec.checks_content(blob)) and self.codec.chunk_id(data) != cid:
            raise DamagedError(f"chunk {cid[:16]} does not match its hash (corrupt)")
        return data

    def list_packs(self) -> list[ObjectInfo]:
        return self._call(lambda: list(self.backend.list(DATA_PREFIX)))

    def list_chunks(self) -> list[ObjectInfo]:
        """Version 1 chunk objects (a repository upgraded to version 2 may still have them)."""
        return self._call(lambda: list(self.backend.list(CHUNK_PREFIX)))

    def stored_bytes(self) -> int:
        return sum(i.size for i in self.list_packs()) + sum(i.size for i in self.list_chunks())

    # --- small encrypted objects ----------------------------------------------------------
    def put_object(self, key: str, data: bytes, kind: Kind, *, exclusive: bool = False) -> bool:
        return self._put_sealed(key, self.codec.seal(key, data), kind, exclusive)

    def _put_sealed(self, key: str, blob: bytes, kind: Kind, exclusive: bool = False) -> bool:
        try:
            if exclusive:
                return self.backend.put_if_absent(key, blob, kind)
            self.backend.put(key, blob, kind)
            return True
        except BackendError as e:
            raise StorageError(str(e)) from None

    def get_object(self, key: str) -> bytes:
        try:
            blob = self.backend.get(key)
        except ObjectMissing:
            raise NotFoundError(f"{key} does not exist in {self.backend.url}") from None
        except BackendError as e:
            raise StorageError(str(e)) from None
        return self.codec.open(key, blob)

    # --- snapshots -------------------------------------------------------------------------
    def free_time(self, ctid: int, stamp: datetime) -> datetime:
        """The first time from *stamp* on, by seconds, that names no snapshot of *ctid*,
        published or in the trash (a snapshot's id is its time)."""
        for _ in range(60):
            sid = f"{ctid}/{stamp.strftime(TIME_FMT)}"
            if not self._any_exists([SNAP_PREFIX + sid, TRASH_PREFIX + sid]):
                return stamp
            stamp = stamp.fromtimestamp(stamp.timestamp() + 1, UTC)
        raise StorageError(f"could not find a free snapshot name for CT {ctid}")

    def publish(self, manifest: Manifest, log_text: str, *, free: bool = False) -> Manifest:
        """Write the log, then the manifest (create-if-absent, a clash moves the time on).
        *free*: ``manifest.time`` was just found free by :meth:`free_time` (a writer checks
        it while its last pack is written)."""
        stamp = datetime.fromisoformat(manifest.time)  # TIME_FMT (no strptime: its import
        #                                                 is ~2 ms of an unchanged backup)
        self.flush()  # the packs are durable before anything refers to them
        manifest.version = self.version  # the format its chunk ids and packs follow
        for _ in range(60):
            if not free:
                stamp = self.free_time(manifest.ctid, stamp)
            free = False
            manifest.time = stamp.strftime(TIME_FMT)
            manifest.id = f"{manifest.ctid}/{manifest.time}"
            key = SNAP_PREFIX + manifest.id
            self.put_object(key + LOG_SUFFIX, log_text.encode(), Kind.LOG)
            blob = self.codec.seal(key, manifest.to_json())
            if self._put_sealed(key, blob, Kind.SNAPSHOT, exclusive=True):
                self.published[manifest.id] = len(blob)
                return manifest
            stamp = stamp.fromtimestamp(stamp.timestamp() + 1, UTC)
        raise StorageError(f"could not find a free snapshot name for CT {manifest.ctid}")

    def snapshot_ids(self, ctid: int | None = None) -> list[str]:
        prefix = SNAP_PREFIX + (f"{ctid}/" if ctid is not None else "")
        ids = []
        try:
            for info in self.backend.list(prefix):
                sid = info.key[len(SNAP_PREFIX) :]
                if sid.endswith((LOG_SUFFIX, PROTECTED_SUFFIX)):
                    continue
                ids.append(sid)
        except BackendError as e:
            raise StorageError(str(e)) from None
        return sorted(ids, key=lambda s: (int(s.split("/")[0]), s))

    def protected_ids(self) -> set[str]:
        return {
            info.key[len(SNAP_PREFIX) : -len(PROTECTED_SUFFIX)]
            for info in self.backend.list(SNAP_PREFIX)
            if info.key.endswith(PROTECTED_SUFFIX)
        }

    def load_manifest(self, sid: str, *, trashed: bool = False, marked: bool = True
                      ) -> Manifest:
        """A snapshot's manifest; with *marked*, whether it is protected too (a request
        more on an object store: a restore doesn't need to know)."""
        key = (TRASH_PREFIX if trashed else SNAP_PREFIX) + sid
        try:
            m = self._parse_manifest(sid, self.get_object(key))
        except NotFoundError:
            raise NotFoundError(f"snapshot {sid} does not exist in {self.backend.url}") from None
        if not trashed and marked:
            m.protected = self.backend.exists(key + PROTECTED_SUFFIX)
        return m

    def _parse_manifest(self, sid: str, data: bytes) -> Manifest:
        try:
            return Manifest.from_json(data)
        except (ValueError, TypeError) as e:
            raise DamagedError(f"snapshot {sid}: unreadable manifest ({e})") from None

    def manifests(self, ctid: int | None = None) -> list[Manifest]:
        """Every snapshot (of *ctid*), from one listing; manifests come from the local
        cache where it holds them, the others are downloaded in parallel."""
        sizes, protected = self.snapshot_listing(ctid)
        return self.load_manifests(sizes, protected, retain=ctid is None)

    def snapshot_listing(self, ctid: int | None = None) -> tuple[dict[str, int], set[str]]:
        """One listing: the size of every snapshot's manifest (of *ctid*), and which are
        protected."""
        sizes: dict[str, int] = {}
        protected: set[str] = set()
        prefix = SNAP_PREFIX + (f"{ctid}/" if ctid is not None else "")
        try:
            for info in self.backend.list(prefix):
                sid = info.key[len(SNAP_PREFIX):]
                if sid.endswith(PROTECTED_SUFFIX):
                    protected.add(sid[: -len(PROTECTED_SUFFIX)])
                elif not sid.endswith(LOG_SUFFIX):
                    sizes[sid] = info.size
        except BackendError as e:
            raise StorageError(str(e)) from None
        return sizes, protected

    def load_manifests(self, sizes: dict[str, int],
                       protected: set[str] | frozenset[str] = frozenset(), *,
                       retain: bool = False) -> list[Manifest]:
        """The manifests of the snapshots in *sizes* (from :meth:`snapshot_listing`); with
        *retain*, the listing was complete and the local cache drops what it lacks."""
        cache = self.manifest_cache
        blobs = {sid: cache.get(sid, size) for sid, size in sizes.items()} if cache else {}
        missing = [sid for sid in sizes if blobs.get(sid) is None]

        def fetch(sid: str) -> bytes:
            try:
                return self.backend.get(SNAP_PREFIX + sid)
            except ObjectMissing:
                raise NotFoundError(f"snapshot {sid} vanished while listing") from None
            except BackendError as e:
                raise StorageError(str(e)) from None

        for sid, blob in zip(missing, self._fetch_all(fetch, missing), strict=True):
            blobs[sid] = blob
            if cache:
                cache.put(sid, blob)
        if cache and retain:
            cache.retain(set(sizes))
        out = []
        for sid in sorted(sizes, key=lambda s: (int(s.split("/")[0]), s)):
            m = self._parse_manifest(sid, self.codec.open(SNAP_PREFIX + sid, blobs[sid]))
            m.protected = sid in protected
            out.append(m)
        return out

    def latest(self, ctid: int, *, marked: bool = True) -> Manifest:
        ids = self.snapshot_ids(ctid)
        if not ids:
            raise NotFoundError(f"no snapshot of CT {ctid} in {self.backend.url}")
        return self.load_manifest(max(ids, key=snapshot_time), marked=marked)

    def resolve(self, text: str, *, marked: bool = True) -> Manifest:
        """A snapshot by id, or the latest of a CT given as 'CTID' or 'CTID/latest'
        (*marked*: see :meth:`load_manifest`)."""
        head = text.strip("/").split("/")
        if head[0].isdigit() and (len(head) == 1 or head[1] == "latest"):
            return self.latest(int(head[0]), marked=marked)
        return self.load_manifest(parse_snapshot_id(text)[1], marked=marked)

    # --- a manifest's id lists (version 4 stores them as chunks) ------------------------
    def tree_of(self, m: Manifest) -> list[str]:
        """The chunk ids of *m*'s file list."""
        return self._id_list(m, "tree") if m.lists else m.tree

    def state_tree_of(self, m: Manifest) -> list[str] | None:
        """The chunk ids of the file list of *m*'s CRIU images (None: it has none)."""
        if not m.lists:
            return m.state_tree
        return self._id_list(m, "state_tree") if "state_tree" in m.lists else None

    def refs_of(self, m: Manifest) -> list[str]:
        """Every chunk *m* needs: its files', its file lists' and its id lists' own."""
        if not m.lists:
            return m.refs
        return self._id_list(m, "refs") + m.list_chunks

    def read_lists(self, manifests: list[Manifest], names: tuple[str, ...] = ID_LISTS) -> None:
        """Read the chunks of *manifests*' id lists *names* not read yet, neighbours in one
        ranged read, in parallel (before asking for the lists of many snapshots); a damaged
        one is an error when its list is used (not kept: a rebuilt index may find it)."""
        want = dict.fromkeys(c for m in manifests for name in names
                             for c in m.lists.get(name, ()) if c not in self._list_chunks)
        if not want:  # (an unchanged backup's: no new snapshot to learn the refs of)
            return
        from vzbackup.engine.extract import fetch, plan_reads  # (extract imports this module)

        for got in self._fetch_all(lambda r: fetch(self, r), plan_reads(self, want)):
            self._list_chunks.update((c, bytes(d)) for c, d in got.items()
                                     if not isinstance(d, DamagedError))

    def _id_list(self, m: Manifest, name: str) -> list[str]:
        """The list *name* of a manifest that stores its lists as chunks."""
        chunks = m.lists.get(name)
        if chunks is None:
            raise DamagedError(f"snapshot {m.id}: its manifest has no {name} list")
        self.read_lists([m], (name,))
        data = bytearray()
        for c in chunks:
            part = self._list_chunks.get(c)
            if part is None:
                try:
                    part = self.get_chunk(c)  # fails again, saying why
                except DamagedError as e:
                    raise DamagedError(f"snapshot {m.id}: its {name} list: {e}") from None
            data += part
        if len(data) % ID_SIZE:
            raise DamagedError(f"snapshot {m.id}: its {name} list has {len(data)} bytes, "
                               f"not a whole number of {ID_SIZE}-byte ids")
        text = data.hex()
        step = 2 * ID_SIZE
        return [text[i : i + step] for i in range(0, len(text), step)]

    def read_log(self, sid: str) -> str:
        return self.get_object(SNAP_PREFIX + sid + LOG_SUFFIX).decode(errors="replace")

    def set_protected(self, sid: str, on: bool) -> None:
        self.load_manifest(sid)
        key = SNAP_PREFIX + sid + PROTECTED_SUFFIX
        try:
            if on:
                self.backend.put(key, b"1", Kind.MARKER)
            else:
                self.backend.delete(key)
        except BackendError as e:
            raise StorageError(str(e)) from None

    def retained(self, sid: str) -> bool:
        """Whether an immutability lock (S3 Object Lock) still holds the snapshot."""
        try:
            until = self.backend.retained_until(SNAP_PREFIX + sid)
        except BackendError as e:
            raise StorageError(str(e)) from None
        return until is not None and until > time.time()

    def trash(self, sid: str) -> None:
        """Move a snapshot to the trash (prune); GC deletes it once no backup can need it."""
        if self.backend.exists(SNAP_PREFIX + sid + PROTECTED_SUFFIX):
            raise UsageError(f"snapshot {sid} is protected")
        if self.retained(sid):
            raise UsageError(f"snapshot {sid} is under Object Lock retention")
        key = SNAP_PREFIX + sid
        try:
            blob = self.backend.get(key)
            # the blob is bound to its key: re-seal under the trash key
            data = self.codec.open(key, blob)
            self.put_object(TRASH_PREFIX + sid, data, Kind.OTHER)
            self.backend.delete(key)
            with contextlib.suppress(BackendError):
                self.backend.delete(key + LOG_SUFFIX)
        except ObjectMissing:
            raise NotFoundError(f"snapshot {sid} does not exist") from None
        except BackendError as e:
            raise StorageError(str(e)) from None

    def trashed(self) -> list[tuple[str, float]]:
        """(snapshot id, time it was trashed) of pruned manifests still kept."""
        return [(i.key[len(TRASH_PREFIX) :], i.mtime) for i in self.backend.list(TRASH_PREFIX)]

    def drop_trashed(self, sid: str) -> None:
        self.backend.delete(TRASH_PREFIX + sid)
