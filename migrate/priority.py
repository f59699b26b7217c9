"""The freeze's CPU priority (``FREEZE_NICE``) for what carries a migration's frozen path."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from vzbackup import autogroup
from vzbackup import constants as C


def urge(who: int = 0) -> int | None:
    """Process or thread *who* (0: this thread) at FREEZE_NICE unless it runs at a higher
    priority already; its nice before, None if that was not allowed or it is gone."""
    try:
        before = os.getpriority(os.PRIO_PROCESS, who)
        os.setpriority(os.PRIO_PROCESS, who, min(before, C.FREEZE_NICE))
    except OSError:
        return None
    return before


@contextlib.contextmanager
def urgent(*tids: int | None) -> Iterator[None]:
    """This thread, and what it starts, and the threads *tids* (native ids) at FREEZE_NICE
    for the duration (Linux: per thread)."""
    before = {tid: urge(tid) for tid in (0, *(t for t in tids if t))}
    try:
        yield
    finally:
        for tid, nice in before.items():
            if nice is not None:
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, tid, nice)


def urge_session(pid: int = 0) -> None:
    """The session of process *pid* (0: ours) at FREEZE_NICE unless higher already, for
    the rest of its life: with scheduler autogroups the sessions share the CPUs evenly and
    a nice ranks a process only within its own. Only for sessions that end with the
    migration: a CT's stay as they are (its tenant must not keep a raised priority), and so
    does the session that runs the migrate command (a kill -9 could not lower it again)."""
    found = autogroup.group(pid)
    if found is not None and found[1] > C.FREEZE_NICE:
        autogroup.set_nice(pid, C.FREEZE_NICE)


def urgent_sshd_parent() -> None:
    """Our parent at FREEZE_NICE if it is the sshd session that carries a migration's data
    in the freeze (DEST's agent and image receiver, started by the source over SSH), and
    its and our scheduler groups (they end with the SSH session)."""
    parent = os.getppid()
    with contextlib.suppress(OSError):
        if Path(f"/proc/{parent}/comm").read_text().startswith("sshd"):
            urge(parent)
            urge_session(parent)
            urge_session()
