"""Advisory locks on files (flock): a crashed holder's lock is released by the kernel.

The lock file records who holds it (pid, command, time) so a waiting user sees why.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path
from types import TracebackType

from vzbackup.errors import LockedError

_HELD: set[Path] = set()  # paths this process holds a lock on (flock is per process here)


class Lock:
    """An exclusive lock on *path*, waited for up to *wait* seconds."""

    def __init__(self, path: str | Path, *, wait: float = 0.0, what: str = "") -> None:
        self.path = Path(path)
        self.wait = wait
        self.what = what or self.path.name
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this process holds the lock on the path (through any Lock object)."""
        return self.path in _HELD

    def holder(self) -> dict[str, object]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> Lock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    h = self.holder()
                    who = f"pid {h.get('pid')} ({h.get('cmd', '?')})" if h else "another process"
                    raise LockedError(
                        f"{self.what} is locked by {who}",
                        hint="wait for it to finish or pass a longer --lockwait",
                    ) from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "cmd": " ".join(sys.argv[:4]), "since": time.time()}
        os.write(fd, json.dumps(info).encode())
        self._fd = fd
        _HELD.add(self.path)
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            _HELD.discard(self.path)

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
