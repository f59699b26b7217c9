"""rsync's remote shell when rsync runs over vzbackup's own SSH session (see migrate.sync).

    python -m vzbackup.migrate.rsh_bridge SOCKET [-l USER] HOST COMMAND...

Instead of opening an SSH connection it connects to SOCKET, where the migrating process runs
COMMAND (joined with spaces, as ssh does) on a new exec channel of its authenticated paramiko
transport. Protocol: one JSON line ``{"host", "cmd"}`` then raw stdin bytes up (half-close at
EOF); frames down, ``>cI`` type + length + payload: ``o`` stdout, ``e`` stderr, ``x`` the
remote exit status (``>i``). Exits with that status, 255 if the relay went away.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading

FRAME = struct.Struct(">cI")
STATUS = struct.Struct(">i")
_OPTS_WITH_ARG = ("-l", "-p", "-o", "-i", "-e")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _pump_stdin(sock: socket.socket) -> None:
    try:
        while data := os.read(0, 1 << 16):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print("usage: rsh_bridge SOCKET [-l USER] HOST COMMAND...", file=sys.stderr)
        return 255
    sock_path, rest = argv[0], list(argv[1:])
    while rest and rest[0].startswith("-"):
        if rest.pop(0) in _OPTS_WITH_ARG and rest:
            rest.pop(0)
    if len(rest) < 2:
        print("rsh_bridge: no host or command", file=sys.stderr)
        return 255
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sock_path)
    sock.sendall(json.dumps({"host": rest[0], "cmd": " ".join(rest[1:])}).encode() + b"\n")
    threading.Thread(target=_pump_stdin, args=(sock,), daemon=True).start()
    while head := _recv_exact(sock, FRAME.size):
        kind, size = FRAME.unpack(head)
        payload = _recv_exact(sock, size) if size else b""
        if payload is None:
            break
        if kind == b"x":
            return STATUS.unpack(payload)[0] & 0xFF
        _write_all(1 if kind == b"o" else 2, payload)
    print("rsh_bridge: relay closed without an exit status", file=sys.stderr)
    return 255


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
