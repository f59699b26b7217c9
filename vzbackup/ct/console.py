"""A CT's console: the supervisor serves the pty master, ``vzbackup console`` attaches to it.

The supervisor always drains the master into ``RUNDIR/CTID.console.log`` (rotated to
``.log.1`` at CONSOLE_LOG_MAX, so at most twice that is kept) and relays it to every client
attached to ``RUNDIR/CTID.console.sock``; what a client types goes to the master. A client
detaches with Esc then ``.`` (vzctl console's sequence); the CT never notices.

Client to server frames: one type byte, a 2-byte big-endian length, the payload: ``d`` data
for the console, ``w`` a window size (rows, cols as 2 x 2 bytes). Server to client: raw output.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import signal
import socket
import struct
import sys
import termios
import threading
import tty
from pathlib import Path

from vzbackup import constants as C
from vzbackup import syscalls as S

DETACH = b"\x1b."  # Esc then "."
HUP_RETRY = 0.5  # seconds between looks at a console nobody in the CT has open
_FRAME = struct.Struct(">cH")


def log_path(rundir: Path, ctid: int) -> Path:
    return rundir / C.CONSOLE_LOG.format(ctid=ctid)


def socket_path(rundir: Path, ctid: int) -> Path:
    return rundir / C.CONSOLE_SOCK.format(ctid=ctid)


class ConsoleLog:
    """Append-only log file with one rotation at *cap* bytes."""

    def __init__(self, path: Path, cap: int = C.CONSOLE_LOG_MAX) -> None:
        self.path = path
        self.cap = cap
        self._f = open(path, "ab")  # noqa: SIM115 - lives as long as the console
        self._size = self._f.tell()

    def write(self, data: bytes) -> None:
        if self._size + len(data) > self.cap:
            self._f.close()
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            self._f = open(self.path, "ab")  # noqa: SIM115
            self._size = 0
        self._f.write(data)
        self._f.flush()
        self._size += len(data)

    def close(self) -> None:
        self._f.close()


class ConsoleServer(threading.Thread):
    """Serve the master of a CT's console pty (a daemon thread of the supervisor)."""

    def __init__(self, master: int, rundir: Path, ctid: int) -> None:
        super().__init__(name=f"console-{ctid}", daemon=True)
        self.master = master
        self.log = ConsoleLog(log_path(rundir, ctid))
        self.sock_path = socket_path(rundir, ctid)
        self.sock_path.unlink(missing_ok=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.sock_path))
        os.chmod(self.sock_path, 0o600)
        self.listener.listen(4)
        self.sel = selectors.DefaultSelector()
        self.clients: dict[socket.socket, bytes] = {}  # client -> unparsed input

    def run(self) -> None:
        self.sel.register(self.master, selectors.EVENT_READ, "master")
        self.sel.register(self.listener, selectors.EVENT_READ, "listen")
        hung_up = False
        while True:
            events = self.sel.select(HUP_RETRY if hung_up else None)
            if hung_up and not events:  # look again: init may have reopened the console
                hung_up = False
                self.sel.register(self.master, selectors.EVENT_READ, "master")
                continue
            for key, _ in events:
                if key.data == "master":
                    hung_up = not self._from_master()
                    if hung_up:
                        self.sel.unregister(self.master)
                elif key.data == "listen":
                    conn, _ = self.listener.accept()
                    self.clients[conn] = b""
                    self.sel.register(conn, selectors.EVENT_READ, "client")
                else:
                    self._from_client(key.fileobj)  # type: ignore[arg-type]

    def _from_master(self) -> bool:
        """Relay console output; False when no one in the CT has the console open."""
        try:
            data = os.read(self.master, 65536)
        except OSError as e:
            if e.errno == errno.EIO:
                return False
            raise
        if not data:
            return False
        self.log.write(data)
        for conn in list(self.clients):
            try:
                conn.sendall(data)
            except OSError:
                self._drop(conn)
        return True

    def _from_client(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        buf = self.clients[conn] + data
        while len(buf) >= _FRAME.size:
            kind, size = _FRAME.unpack_from(buf)
            if len(buf) < _FRAME.size + size:
                break
            payload, buf = buf[_FRAME.size : _FRAME.size + size], buf[_FRAME.size + size :]
            with contextlib.suppress(OSError):
                if kind == b"d":
                    os.write(self.master, payload)
                elif kind == b"w" and size == 4:
                    S.set_winsize(self.master, *struct.unpack(">HH", payload))
        self.clients[conn] = buf

    def _drop(self, conn: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn)
        self.clients.pop(conn, None)
        conn.close()

    def close(self) -> None:
        """Keep what the CT wrote last (its halt messages), remove the socket; the thread
        dies with the supervisor."""
        os.set_blocking(self.master, False)
        with contextlib.suppress(OSError):
            while data := os.read(self.master, 65536):
                self.log.write(data)
        self.sock_path.unlink(missing_ok=True)


class _Terminal:
    """This process's terminal in raw mode for a relay (nothing to do when not a tty)."""

    def __init__(self, fd: int, on_resize) -> None:
        self.fd = fd
        self.saved = termios.tcgetattr(fd) if os.isatty(fd) else None
        self.on_resize = on_resize

    def __enter__(self) -> _Terminal:
        if self.saved is not None:
            tty.setraw(self.fd, termios.TCSADRAIN)  # keep what was typed ahead
            self.on_resize()
            signal.signal(signal.SIGWINCH, lambda *_: self.on_resize())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            signal.signal(signal.SIGWINCH, signal.SIG_DFL)
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)


def relay_pty(master: int, stdin: int = 0, stdout: int = 1) -> None:
    """Relay the terminal to a pty master until its last slave closes (the session ended).

    End of input sends ^D (EOF for a shell on the pty) and output is relayed to the end."""

    def resize() -> None:
        with contextlib.suppress(OSError):
            S.set_winsize(master, *S.get_winsize(stdin))

    sel = selectors.DefaultSelector()
    sel.register(master, selectors.EVENT_READ, "pty")
    sel.register(stdin, selectors.EVENT_READ, "in")
    with _Terminal(stdin, resize):
        while True:
            for key, _ in sel.select():
                if key.data == "pty":
                    try:
                        data = os.read(master, 65536)
                    except OSError as e:
                        if e.errno != errno.EIO:
                            raise
                        data = b""
                    if not data:
                        return
                    os.write(stdout, data)
                    continue
                data = os.read(stdin, 4096)
                if not data:
                    sel.unregister(stdin)
                    data = b"\x04"
                os.write(master, data)


def frame(kind: bytes, payload: bytes) -> bytes:
    return _FRAME.pack(kind, len(payload)) + payload


def attach(sock_path: Path, banner: str = "", stdin: int = 0, stdout: int = 1) -> None:
    """Relay the terminal to a console until Esc . or the CT stops (its socket closes);
    *banner* is shown once connected and in raw mode (what is typed from then on counts)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(sock_path))

    def resize() -> None:
        with contextlib.suppress(OSError):
            conn.sendall(frame(b"w", struct.pack(">HH", *S.get_winsize(stdin))))

    sel = selectors.DefaultSelector()
    sel.register(stdin, selectors.EVENT_READ, "in")
    sel.register(conn, selectors.EVENT_READ, "ct")
    prev = b""  # the last byte typed, for an escape split across reads
    try:
        with _Terminal(stdin, resize):
            os.write(2, banner.encode())
            while True:
                for key, _ in sel.select():
                    if key.data == "ct":
                        data = conn.recv(65536)
                        if not data:
                            return
                        os.write(stdout, data)
                        continue
                    data = os.read(stdin, 4096)
                    if not data:
                        return
                    seen = prev + data
                    if DETACH in seen:
                        keep = data[: max(0, seen.index(DETACH) - len(prev))]
                        if keep:
                            conn.sendall(frame(b"d", keep))
                        return
                    prev = data[-1:]
                    conn.sendall(frame(b"d", data))
    finally:
        conn.close()
        sys.stdout.flush()
