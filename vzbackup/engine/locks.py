"""Repository locks that work on any backend (a directory or an S3 bucket).

Two kinds:

- ``backup``: any number at once. Each records when it started (storage time) so garbage
  collection spares everything a running backup may still reference.
- ``maintenance`` (prune, gc): one at a time. Taken by writing a lock object and then
  listing; if an older live maintenance lock exists, ours is withdrawn and we wait.

A lock is refreshed (touched) by a heartbeat thread. It is stale when its holder is on this
host and the process is gone, or when it was not refreshed for ``LEASE`` seconds; stale
locks are removed by whoever finds them, so a crashed holder never blocks the repository.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from types import TracebackType
from typing import NamedTuple

from vzbackup.engine.repo import Repository
from vzbackup.errors import LockedError, StorageError
from vzbackup.storage.backend import BackendError, Kind, ObjectMissing
from vzbackup.syscalls import pid_alive

LOCK_PREFIX = "locks/"
LEASE = 900.0  # seconds without refresh after which another host's lock is stale
REFRESH = 60.0
BACKUP, MAINTENANCE = "backup", "maintenance"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


class LockInfo(NamedTuple):
    """A repository lock as its object records it."""

    key: str
    kind: str
    host: str
    boot: str
    pid: int
    what: str
    started: float  # storage time
    mtime: float  # last refresh (storage time)

    def stale(self, now: float, lease: float = LEASE) -> bool:
        if self.host == os.uname().nodename and self.boot == _boot_id():
            return not pid_alive(self.pid)
        return now - self.mtime > lease

    def describe(self) -> str:
        return f"{self.kind} lock of {self.what} (pid {self.pid} on {self.host})"


def list_locks(repo: Repository) -> list[LockInfo]:
    out = []
    try:
        for info in repo.backend.list(LOCK_PREFIX):
            with contextlib.suppress(ObjectMissing, ValueError, KeyError):
                d = json.loads(repo.backend.get(info.key))
                out.append(
                    LockInfo(
                        info.key,
                        d["kind"],
                        d["host"],
                        d.get("boot", ""),
                        int(d["pid"]),
                        d.get("what", ""),
                        float(d.get("started", info.mtime)),
                        info.mtime,
                    )
                )
    except BackendError as e:
        raise StorageError(str(e)) from None
    return out


def storage_now(repo: Repository) -> float:
    """The storage's clock (mtime of a fresh object), so hosts with skewed clocks agree."""
    key = f"{LOCK_PREFIX}clock-{uuid.uuid4().hex}"
    try:
        repo.backend.put(key, b"", Kind.LOCK)
        return repo.backend.stat(key).mtime
    finally:
        with contextlib.suppress(BackendError):
            repo.backend.delete(key)


def break_stale(repo: Repository, lease: float = LEASE) -> list[LockInfo]:
    """Remove stale locks; returns what was removed."""
    now = storage_now(repo)
    gone = []
    for lk in list_locks(repo):
        if lk.stale(now, lease):
            with contextlib.suppress(BackendError):
                repo.backend.delete(lk.key)
            gone.append(lk)
    return gone


class RepoLock:
    """``with RepoLock(repo, BACKUP, what="CT 101"):`` — see the module docstring."""

    def __init__(self, repo: Repository, kind: str, *, what: str = "", wait: float = 0.0) -> None:
        self.repo = repo
        self.kind = kind
        self.what = what
        self.wait = wait
        self.key = f"{LOCK_PREFIX}{kind}-{uuid.uuid4().hex}"
        self.started = 0.0
        self.stamped = threading.Event()  # set once ``started`` is recorded in the lock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps(
            {
                "kind": self.kind,
                "host": os.uname().nodename,
                "boot": _boot_id(),
                "pid": os.getpid(),
                "what": self.what,
                "started": self.started,
            }
        ).encode()

    def acquire(self) -> RepoLock:
        deadline = time.monotonic() + self.wait
        be = self.repo.backend
        while True:
            try:
                be.put(self.key, self._body(), Kind.LOCK)
                if self.kind == MAINTENANCE:  # its start decides which lock wins: now
                    self._stamp()
            except BackendError as e:
                raise StorageError(f"cannot write a lock to {be.url}: {e}") from None
            blocker = self._blocker() if self.kind == MAINTENANCE else None
            if blocker is None:
                break
            with contextlib.suppress(BackendError):
                be.delete(self.key)
            if time.monotonic() >= deadline:
                raise LockedError(
                    f"the repository {be.url} is busy: {blocker.describe()}",
                    hint="wait, or pass a longer --lockwait; stale locks are removed automatically",
                )
            time.sleep(0.5)
        self._thread = threading.Thread(target=self._refresh, daemon=True, name="repo-lock")
        self._thread.start()
        return self

    def _blocker(self) -> LockInfo | None:
        locks = list_locks(self.repo)
        now = max([lk.mtime for lk in locks] + [self.started])
        mine = next((lk for lk in locks if lk.key == self.key), None)
        for lk in locks:
            if lk.key == self.key or lk.kind != MAINTENANCE:
                continue
            if lk.stale(now):
                with contextlib.suppress(BackendError):
                    self.repo.backend.delete(lk.key)
                continue
            # the older lock wins; equal times are ordered by key
            if mine is None or (lk.started, lk.key) < (mine.started, mine.key):
                return lk
        return None

    def _stamp(self) -> None:
        """Record the lock's start, in storage time (its first write's mtime), in it."""
        self.started = self.repo.backend.stat(self.key).mtime
        self.repo.backend.put(self.key, self._body(), Kind.LOCK)
        self.stamped.set()

    def _refresh(self) -> None:
        """The heartbeat; a backup lock is stamped here first, off the backup's path (two
        round trips to an object store). Until then its body says it started at 0, so gc
        spares everything meanwhile."""
        if not self.started:
            with contextlib.suppress(BackendError):
                self._stamp()
            if self._stop.is_set():  # released while stamping: don't leave it behind
                with contextlib.suppress(BackendError):
                    self.repo.backend.delete(self.key)
        while not self._stop.wait(REFRESH):
            with contextlib.suppress(BackendError):
                self.repo.backend.touch(self.key)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        with contextlib.suppress(BackendError):
            self.repo.backend.delete(self.key)

    def __enter__(self) -> RepoLock:
        return self.acquire()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
