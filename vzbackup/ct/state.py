"""Runtime state a CT's supervisor records (RUNDIR/CTID.state) and status derived from it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

from vzbackup import constants as C
from vzbackup.config.node import Node
from vzbackup.syscalls import pid_alive


class CTState(NamedTuple):
    """A running CT's runtime state, as its supervisor recorded it."""

    status: str  # starting | running | stopping
    supervisor_pid: int
    init_pid: int = 0  # host PID of the CT's init
    started: float = 0.0
    restored: bool = False


def state_path(node: Node, ctid: int) -> Path:
    return node.rundir / C.STATE_FILE.format(ctid=ctid)


def write_state(node: Node, ctid: int, state: CTState) -> None:
    """Replace the state file at once. Its writer is the CT's one supervisor, so a
    temporary name with its pid is unique (a restore writes it in a migration's freeze)."""
    path = state_path(node, ctid)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(state._asdict(), f)
    os.replace(tmp, path)


def clear_state(node: Node, ctid: int) -> None:
    state_path(node, ctid).unlink(missing_ok=True)


def read_state(node: Node, ctid: int) -> CTState | None:
    """The recorded state if its supervisor is still alive; a stale file is removed."""
    path = state_path(node, ctid)
    try:
        st = CTState(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if not pid_alive(st.supervisor_pid):
        path.unlink(missing_ok=True)
        return None
    return st
