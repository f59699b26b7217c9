"""The source's handle on DEST: the agent started over SSH, spoken to in JSON lines.

Also the two seams of the source side, typed as Protocols so that tests and benchmarks can
pass their own: the SSH session (:class:`RemoteSession`) and the tree pusher
(:class:`TreePusher`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from vzbackup.migrate.protocol import Link, LinkLost, raise_reply

from vzbackup import errors as E

log = logging.getLogger("vzbackup.migrate")

RELAY_DRAIN = 2.0  # s: for the agent's last log lines after "bye"


class Target(Protocol):
    user: str
    host: str
    port: int
    remote_vzbackup: list[str]


class RemoteSession(Protocol):
    """An authenticated connection to DEST that runs commands (migrate.ssh.Session)."""

    target: Target

    @property
    def transport(self) -> Any: ...

    def open_exec(self, argv: list[str]) -> Any: ...

    def run(self, argv: list[str], *, input_: bytes | None = None,
            timeout: float | None = 60, check: bool = True) -> tuple[int, bytes, bytes]: ...

    def openssh_command(self) -> list[str] | None: ...


class PushStats(Protocol):
    bytes_sent: int


class TreePusher(Protocol):
    """Makes remote directory *dst* a copy of local *src* (migrate.sync.push_tree)."""

    def __call__(self, session: RemoteSession, src: Path, dst: str, *, method: str = ...,
                 bwlimit_kbps: int | None = ..., remote_nice: int = ...,
                 only_dirs: list[str] | None = ...) -> PushStats: ...


class DestAgent:
    """``vzbackup migrate-agent`` on DEST, on one exec channel; its stderr becomes our log."""

    def __init__(self, session: RemoteSession, dest_ctid: int) -> None:
        self.session = session
        self.dest_ctid = dest_ctid
        self.link: Link | None = None
        self.chan: Any = None
        self.relay: threading.Thread | None = None
        self.silent = ""  # why the agent is no longer asked anything (a reply came too late)

    def open(self) -> None:
        argv = [
            *self.session.target.remote_vzbackup, "migrate-agent", str(self.dest_ctid),
            "--source", socket.gethostname(),
        ]
        self.chan = self.session.open_exec(argv)
        self.link = Link(self.chan.makefile("rb"), self.chan.makefile_stdin("wb"))
        self.relay = threading.Thread(target=self._relay_stderr, daemon=True)
        self.relay.start()
        first = self.link.recv()
        if first is None:
            raise LinkLost(
                "DEST agent did not start",
                hint=f"is vzbackup installed on DEST ({' '.join(argv[:2])})?",
            )
        raise_reply(first, "start of the agent")

    def _relay_stderr(self) -> None:
        with contextlib.suppress(Exception):
            for line in self.chan.makefile_stderr("rb"):
                text = line.decode(errors="replace").rstrip()
                if text:  # DEST's warnings and errors as ours (run_agent's log format)
                    serious = text.startswith(("DEST WARNING", "DEST ERROR"))
                    log.log(logging.WARNING if serious else logging.INFO, "%s", text)

    def call(self, op: str, *, reply_within: float | None = None, **args: Any) -> dict[str, Any]:
        """Request *op* and wait for its reply; with *reply_within* (seconds) at most that
        long (:meth:`_deadline`)."""
        if self.link is None:
            raise LinkLost(f"DEST agent is not connected (during {op!r})")
        if self.silent:
            raise LinkLost(f"DEST agent stopped answering ({self.silent}; during {op!r})")
        if reply_within is None:
            return self.link.call(op, **args)
        with self._deadline(op, reply_within):
            return self.link.call(op, **args)

    @contextlib.contextmanager
    def _deadline(self, op: str, seconds: float) -> Iterator[None]:
        """No reply *seconds* after the request: close the channel (the waiting read ends;
        DEST's agent removes what it made once it finds the link closed) and raise LinkLost.
        The agent is asked nothing more: a late reply would answer the next request."""
        lock, finished = threading.Lock(), False

        def give_up() -> None:
            with lock:
                if finished:
                    return
                self.silent = f"no answer to {op!r} within {seconds:g} s"
            with contextlib.suppress(Exception):
                self.chan.close()

        timer = threading.Timer(seconds, give_up)
        timer.daemon = True
        timer.start()
        try:
            yield
        except E.VzError:
            if not self.silent:
                raise
        finally:
            timer.cancel()
            with lock:
                finished = True
        if self.silent:
            raise LinkLost(f"DEST did not answer {op!r} within {seconds:g} s",
                           hint="its agent rolls back on its own (keeping the private area "
                           "with --keep-dst); see DEST's log")

    def abort(self, *, keep_private: bool) -> None:
        """Ask DEST to remove what it created (it also does so when the link drops)."""
        if self.link is None:
            return
        if self.silent:
            log.warning("DEST did not answer in time: its agent removes what it created%s "
                        "when it finds the link closed",
                        " but the private area (--keep-dst)" if keep_private else "")
            return
        try:
            self.call("abort", keep_private=keep_private)
        except E.VzError as e:
            log.warning("DEST abort: %s (the agent rolls back on its own when the link drops)", e)

    def close(self, *, drain: bool = False) -> None:
        """Say bye; *drain*: wait (briefly) for the agent's last log lines, e.g. why it
        rolled back."""
        if self.link is not None and not self.silent:
            with contextlib.suppress(E.VzError):
                self.link.call("bye")
            if drain and self.relay is not None:
                self.relay.join(RELAY_DRAIN)
        if self.chan is not None:
            with contextlib.suppress(Exception):
                self.chan.close()
        self.link = self.chan = None

    def my_address(self) -> str:
        """This node's address as DEST sees it."""
        return self.session.transport.sock.getsockname()[0]

    def peer_address(self) -> str:
        """DEST's address (numeric) on the SSH connection."""
        return self.session.transport.sock.getpeername()[0]
