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
import os
import re
import select
import shlex
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from vzbackup.migrate.priority import urge, urge_session, urgent_sshd_parent

from vzbackup import constants as C
from vzbackup import errors as E

try:
    from inotify_simple import INotify, flags
except ImportError:  # pragma: no cover - an older venv: no streaming, same result
    INotify = None

BATCH_WAIT_MS = 20  # gather what CRIU closes within this long into one request
BATCH_END = b".\n"  # ends a batch of images in an ImagePipe stream
ACK = b"ok\n"  # DEST's receiver wrote a batch
READY = b"ready\n"  # DEST's receiver runs (its start-up is over)
READY_TIMEOUT = 30.0  # for DEST's receiver to start
END_TIMEOUT = 10.0  # for an ImagePipe's ssh to end once every image is acknowledged
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
    """One ``vzbackup migrate-recv-images`` at DEST over the OpenSSH client, started before
    the freeze and fed the images as they close: C crypto, and no ssh process per big image
    in the freeze (the Debian CT's 20-30 MB of non-lazy images, PostgreSQL's shared memory
    among them, crossed as 4-6 ``ssh cat`` runs at "post-dump": 0.05-0.7 s of its freeze on a
    busy node). Each batch is acknowledged once written, so :meth:`finish` waits only for the
    batches still in flight, not for the transfer's end: a ``tar -x`` there, whose end (the
    ssh session's teardown through the master connection) the freeze waited for, took 8-57
    ms of it on the busy bed with nothing left to send."""

    def __init__(self, ssh: list[str], receiver: list[str], images: Path) -> None:
        self.ssh = ssh
        self.images = images
        self.bytes = 0
        self._unacked = 0  # batches sent and not yet acknowledged
        self._ready = False
        self._finished = False
        remote = f"exec nice -n {C.FREEZE_NICE} {shlex.join(receiver)}"
        self._proc = subprocess.Popen([*ssh, remote], stdin=subprocess.PIPE, bufsize=0,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        urge(self._proc.pid)  # it carries frozen-path data

    def boost_master(self) -> None:
        """The OpenSSH master connection (ControlMaster: the final sync and the images
        cross it in the freeze) at FREEZE_NICE too; it ends with the session."""
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            res = subprocess.run([*self.ssh[:-1], "-O", "check", self.ssh[-1]],
                                 capture_output=True, text=True, timeout=10, check=False)
            m = re.search(r"pid=(\d+)", res.stderr)
            if m:
                master = int(m.group(1))
                urge(master)
                if os.getsid(master) != os.getsid(0):  # a daemon: as it should be
                    urge_session(master)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Return once DEST's receiver runs. Started before the stage and awaited before the
        freeze, its start-up (ssh session, Python, ~0.1 s of CPU) stays out of the dump."""
        if self._ready:
            return
        if not select.select([self._proc.stdout], [], [], timeout)[0]:
            self.close()
            raise E.RuntimeFailure("DEST's image receiver did not start")
        if self._proc.stdout.readline() != READY:
            raise self._failure()
        self._ready = True

    def send(self, names: list[str]) -> int:
        """Send the images *names* as one batch (a name sent again replaces the earlier
        copy); the bytes sent."""
        self.wait_ready()
        n = 0
        try:
            for name in names:
                if not IMAGE_NAME.fullmatch(name):
                    raise E.UsageError(f"bad image name {name!r}")
                data = (self.images / name).read_bytes()  # one size, whatever CRIU does next
                self._proc.stdin.write(f"{name} {len(data)}\n".encode())
                self._proc.stdin.write(data)
                n += len(data)
            self._proc.stdin.write(BATCH_END)
        except BrokenPipeError:
            raise self._failure() from None
        self._unacked += 1
        self.bytes += n
        return n

    def finish(self, timeout: float = 600) -> None:
        """Return once DEST has written every image sent (each batch acknowledged); the
        receiver then ends on its own."""
        ready = True
        while self._unacked and ready:
            ready = bool(select.select([self._proc.stdout], [], [], timeout)[0])
            if ready and self._proc.stdout.readline() != ACK:
                raise self._failure()
            self._unacked -= ready
        if self._unacked:
            self.close()
            raise E.RuntimeFailure("sending the images to DEST timed out")
        self._finished = True
        with contextlib.suppress(OSError):
            self._proc.stdin.close()

    def _failure(self) -> E.RuntimeFailure:
        """The receiver or ssh ended early: why."""
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        try:
            rc = self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            rc = self._proc.wait()
        err = self._proc.stderr.read().decode(errors="replace").strip()
        return E.RuntimeFailure(f"sending the images to DEST failed (exit {rc}): {err[-500:]}")

    def close(self) -> None:
        """End the transfer: after :meth:`finish` the receiver is given END_TIMEOUT to end
        (its input closed), else (a failed migration) it is killed."""
        with contextlib.suppress(OSError):
            self._proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(END_TIMEOUT if self._finished else 0)
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for f in (self._proc.stdout, self._proc.stderr):
            with contextlib.suppress(OSError):
                f.close()


def receive_images(inp: BinaryIO, out: BinaryIO, where: Path) -> None:
    """DEST's end of an :class:`ImagePipe`: batches of ``NAME SIZE`` lines, each followed
    by SIZE bytes and ended by BATCH_END, written into *where* and acknowledged on *out*.
    The sshd session carrying them runs at the freeze's priority too."""
    urgent_sshd_parent()
    out.write(READY)
    out.flush()
    while line := inp.readline():
        if line == BATCH_END:
            out.write(ACK)
            out.flush()
            continue
        name, _, size = line.decode().rstrip("\n").partition(" ")
        if not IMAGE_NAME.fullmatch(name) or not size.isdigit():
            raise E.UsageError(f"bad image header {line[:200]!r}")
        data = inp.read(int(size))
        if len(data) != int(size):
            raise E.RuntimeFailure(f"image {name}: the stream ended inside it")
        fd = os.open(where / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, IMAGE_MODE)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, IMAGE_MODE)  # not the umask's
            f.write(data)
