"""The control protocol between a migration's source and its DEST agent: JSON lines.

One request per line (``{"op": NAME, ...}``), one reply per request (``{"ok": true, ...}`` or
``{"ok": false, "error": MESSAGE, "kind": VzError subclass name}``). A message with
``"blob": N`` is followed by N raw bytes (CRIU's small images cross the open channel this way,
with no second connection or process). The streams are whatever the transport gives: a
paramiko exec channel's stdin/stdout, or a local pipe pair.
"""

from __future__ import annotations

import json
import select
from typing import IO, Any

from vzbackup import errors as E

PROTOCOL_VERSION = 5  # 4: the images stream into migrate-recv-images, batches acknowledged;
# 5: prepare carries keep_private (--keep-dst), for rollbacks the source can't ask for
BLOB = "blob"  # key of the byte count of a raw payload after the JSON line


class RemoteError(E.RemoteNodeError):
    """The DEST agent refused or failed a request; the message is the agent's."""


class LinkLost(E.RemoteNodeError):
    """The control connection to DEST ended unexpectedly."""


def error_reply(e: BaseException) -> dict[str, Any]:
    kind = type(e).__name__ if isinstance(e, E.VzError) else "RuntimeFailure"
    return {"ok": False, "error": str(e), "kind": kind}


def raise_reply(reply: dict[str, Any], op: str) -> dict[str, Any]:
    """Return *reply* if it says ok, else raise the matching VzError subclass."""
    if reply.get("ok"):
        return reply
    cls = getattr(E, str(reply.get("kind", "")), None)
    if not (isinstance(cls, type) and issubclass(cls, E.VzError)):
        cls = RemoteError
    raise cls(f"DEST {op}: {reply.get('error', 'failed')}")


class Link:
    """A JSON-lines request/reply link over a pair of binary streams."""

    def __init__(self, rfile: IO[bytes], wfile: IO[bytes]) -> None:
        self.rfile = rfile
        self.wfile = wfile

    def send(self, msg: dict[str, Any], data: bytes | None = None) -> None:
        """Send *msg*, then *data* raw (its length goes in the message)."""
        if data is not None:
            msg = {**msg, BLOB: len(data)}
        try:
            self.wfile.write(json.dumps(msg).encode() + b"\n")
            if data:
                self.wfile.write(data)
            self.wfile.flush()
        except (OSError, EOFError, ValueError) as e:
            raise LinkLost(f"control connection lost while sending: {e}") from None

    def readable(self, timeout: float) -> bool:
        """Whether a message arrives within *timeout* seconds (the peer never pipelines
        requests, so nothing waits in our buffer when this is asked)."""
        try:
            ready, _, _ = select.select([self.rfile], [], [], timeout)
        except (OSError, ValueError):
            return True  # let recv() report the broken stream
        return bool(ready)

    def recv(self) -> dict[str, Any] | None:
        """The next message, or None at end of stream."""
        try:
            line = self.rfile.readline()
        except (OSError, EOFError, ValueError) as e:
            raise LinkLost(f"control connection lost while receiving: {e}") from None
        if not line:
            return None
        try:
            msg = json.loads(line)
        except ValueError:
            raise LinkLost(f"garbled message on the control connection: {line[:200]!r}") from None
        if not isinstance(msg, dict):
            raise LinkLost(f"unexpected message on the control connection: {line[:200]!r}")
        if BLOB in msg:
            msg[BLOB] = self._read_exact(int(msg[BLOB]))
        return msg

    def _read_exact(self, n: int) -> bytes:
        try:
            data = self.rfile.read(n)
        except (OSError, EOFError, ValueError) as e:
            raise LinkLost(f"control connection lost while receiving: {e}") from None
        if len(data) != n:
            raise LinkLost(f"control connection ended inside a {n}-byte payload")
        return data

    def call(self, op: str, data: bytes | None = None, **args: Any) -> dict[str, Any]:
        """Send a request (with raw *data*) and return its (ok) reply; raises the agent's
        error otherwise."""
        self.send({"op": op, **args}, data)
        reply = self.recv()
        if reply is None:
            raise LinkLost(f"DEST agent went away during {op!r}")
        return raise_reply(reply, op)
