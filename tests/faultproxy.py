"""A TCP proxy on loopback that injects faults between an S3 client and the server.

Per client connection, at random (seeded): answer the first request with a bare HTTP 503
and close, or forward a random number of bytes and then reset both sides (RST), or pass
through. With ``cut_after`` set, once that many request bytes went through, every
connection is reset and new ones are refused: the network dies in the middle of a backup.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading

SERVICE_UNAVAILABLE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                       b"Connection: close\r\n\r\n")


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


class FaultProxy:
    def __init__(self, upstream_port: int, *, error_rate: float = 0.0, reset_rate: float = 0.0,
                 cut_after: int | None = None, seed: int = 1) -> None:
        self.upstream_port = upstream_port
        self.error_rate = error_rate
        self.reset_rate = reset_rate
        self.cut_after = cut_after
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.sent = 0  # request bytes forwarded
        self.faults = {"503": 0, "reset": 0, "cut": 0}
        self.conns: set[socket.socket] = set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dead(self) -> bool:
        return self.cut_after is not None and self.sent >= self.cut_after

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self.lock:
            roll = self.rng.random()
            budget = self.rng.randrange(1, 4 << 20)
        if self.dead:
            self.faults["cut"] += 1
            _reset(client)
            return
        if roll < self.error_rate:
            self.faults["503"] += 1
            with contextlib.suppress(OSError):
                client.recv(65536)
                client.sendall(SERVICE_UNAVAILABLE)
            client.close()
            return
        limit = budget if roll < self.error_rate + self.reset_rate else None
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            _reset(client)
            return
        with self.lock:
            self.conns.update((client, upstream))
        threading.Thread(target=self._pump, args=(upstream, client, False, None),
                         daemon=True).start()
        self._pump(client, upstream, True, limit)

    def _pump(self, src: socket.socket, dst: socket.socket, upward: bool,
              limit: int | None) -> None:
        """Copy src to dst; requests (*upward*) count, may hit *limit* or the cut."""
        passed = 0
        try:
            while data := src.recv(65536):
                if upward:
                    passed += len(data)
                    with self.lock:
                        self.sent += len(data)
                    if limit is not None and passed > limit:
                        self.faults["reset"] += 1
                        break
                    if self.dead:
                        self.faults["cut"] += 1
                        break
                dst.sendall(data)
            else:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
        except OSError:
            pass
        _reset(src)
        _reset(dst)

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        with self.lock:
            for s in self.conns:
                _reset(s)
