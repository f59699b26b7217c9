"""CRIU's images to DEST while the dump still writes them.

An inotify watch on the images directory sees each image CRIU closes after writing it; a
thread sends the closed ones in batches over the agent channel, so at "post-dump" (tasks
frozen) only the last images remain to cross. An image written again after it was sent is
sent again. inotify_simple (a thin, well-kept inotify binding) tells closed files from files
being written, which polling sizes and times can't; without it everything goes at post-dump.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from pathlib import Path

try:
    from inotify_simple import INotify, flags
except ImportError:  # pragma: no cover - an older venv: no streaming, same result
    INotify = None

BATCH_WAIT_MS = 20  # gather what CRIU closes within this long into one request
WAKE_FILE = ".vzbackup-stop"  # written to wake the thread (a dot file: never sent)
SKIP_SUFFIXES = (".log",)  # CRIU's own log stays open and never goes to DEST


def wanted(name: str) -> bool:
    return not name.startswith(".") and not name.endswith(SKIP_SUFFIXES)


class ImageStream:
    """Sends each image CRIU closes in *images* with *send* (names in, bytes sent out)."""

    def __init__(self, images: Path, send: Callable[[list[str]], int]) -> None:
        self.images = images
        self.send = send
        self.sent: set[str] = set()
        self.bytes = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inotify = None
        if INotify is not None:
            self._inotify = INotify()
            self._inotify.add_watch(str(images), flags.CLOSE_WRITE | flags.MOVED_TO)

    def start(self) -> None:
        if self._inotify is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _closed(self, timeout_ms: int | None) -> list[str]:
        if self._inotify is None:
            return []
        names = dict.fromkeys(e.name for e in self._inotify.read(timeout=timeout_ms))
        return [n for n in names if n and wanted(n)]

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self._closed(BATCH_WAIT_MS)
                if batch:
                    self._send(batch)
        except BaseException as e:  # reported by finish()
            self.error = e

    def _send(self, names: list[str]) -> None:
        self.bytes += self.send(names)
        self.sent.update(names)

    def stop(self) -> None:
        """Stop the thread (the dump failed, or it is over). It is woken at once by an event
        of its own (a file it ignores), not at its next timeout: a "post-dump" waits here."""
        self._stop.set()
        if self._thread is not None:
            wake = self.images / WAKE_FILE
            with contextlib.suppress(OSError):
                wake.write_bytes(b"")
            self._thread.join()
            self._thread = None
            wake.unlink(missing_ok=True)

    def rest(self) -> list[str]:
        """After the dump wrote everything: stop, then the images still to send (closed since
        their last send, or never seen)."""
        self.stop()
        if self.error is not None:
            raise self.error
        again = self._closed(0)
        unseen = [f.name for f in sorted(self.images.iterdir())
                  if f.is_file() and wanted(f.name) and f.name not in self.sent]
        return list(dict.fromkeys(again + unseen))

    def close(self) -> None:
        self.stop()
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
