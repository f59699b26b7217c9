"""CRIU's images to DEST while the dump still writes them.

An inotify watch on the images directory sees each image CRIU closes after writing it; a
thread sends the closed ones in batches (into an :class:`ImagePipe`, or over the agent
channel without an OpenSSH client), so at "post-dump" (tasks frozen) only the last images
remain to cross. An image written again after it was sent is
sent again. inotify_simple (a thin, well-kept inotify binding) tells closed files from files
being written, which polling sizes and times can't; without it everything goes at post-dump.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

from vzbackup import constants as C
from vzbackup import errors as E

try:
    from inotify_simple import INotify, flags
except ImportError:  # pragma: no cover - an older venv: no streaming, same result
    INotify = None

BATCH_WAIT_MS = 20  # gather what CRIU closes within this long into one request
WAKE_FILE = ".vzbackup-stop"  # written to wake the thread (a dot file: never sent)
SKIP_SUFFIXES = (".log",)  # CRIU's own log stays open and never goes to DEST
IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# DEST's images, as the agent and ``cat`` always wrote them: a restored task may open one
# before its credentials are the CT root's (timens-*.img: EACCES with 0600)
IMAGE_MODE = 0o644


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


class ImagePipe:
    """One ``tar -x`` into DEST's image dir over the OpenSSH client, started before the
    freeze and fed the images as they close: C crypto, no Python copies on DEST, and no
    ssh process per big image in the freeze (the Debian CT's 20-30 MB of non-lazy pages,
    PostgreSQL's shared memory among them, crossed as 4-6 ``ssh cat`` runs at "post-dump":
    0.05-0.7 s of its freeze on a busy node). :meth:`finish` returns once DEST has every
    image written (tar ended)."""

    def __init__(self, ssh: list[str], where: str, images: Path) -> None:
        self.images = images
        self.bytes = 0
        remote = f"exec nice -n {C.FREEZE_NICE} tar -x -m -o -f - -C {shlex.quote(where)}"
        self._proc = subprocess.Popen([*ssh, remote], stdin=subprocess.PIPE, bufsize=0,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        with contextlib.suppress(OSError):  # it carries frozen-path data (else: as we run)
            os.setpriority(os.PRIO_PROCESS, self._proc.pid, C.FREEZE_NICE)
        self._tar = tarfile.open(  # noqa: SIM115 - closed by finish()
            fileobj=self._proc.stdin, mode="w|", format=tarfile.GNU_FORMAT)

    def send(self, names: list[str]) -> int:
        """Append the images *names* (a name sent again replaces the earlier copy)."""
        n = 0
        for name in names:
            if not IMAGE_NAME.fullmatch(name):
                raise E.UsageError(f"bad image name {name!r}")
            data = (self.images / name).read_bytes()  # one size, whatever CRIU does next
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), IMAGE_MODE
            self._tar.addfile(info, io.BytesIO(data))
            n += len(data)
        self.bytes += n
        return n

    def finish(self, timeout: float = 600) -> None:
        """End the archive and wait until DEST's tar has written it all."""
        try:
            self._tar.close()
            self._proc.stdin.close()
        except OSError:  # ssh or tar died: its status and message say why
            pass
        try:
            rc = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise E.RuntimeFailure("sending the images to DEST timed out") from None
        err = self._proc.stderr.read().decode(errors="replace").strip()
        if rc != 0:
            raise E.RuntimeFailure(f"sending the images to DEST failed (exit {rc}): "
                                   + err[-500:])

    def close(self) -> None:
        """Stop the transfer (a failed migration); nothing is waited for."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for f in (self._proc.stdin, self._proc.stderr):
            with contextlib.suppress(OSError):
                f.close()
