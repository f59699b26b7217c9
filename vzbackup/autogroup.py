"""The scheduler's autogroups (``/proc/PID/autogroup``).

With them (CONFIG_SCHED_AUTOGROUP, on by default in most distributions) every session is
one scheduling group, the groups share the CPUs evenly, and a task's nice only ranks it
within its own session. A process that must win the CPUs against other sessions (a
migration's freeze: DEST's agent, receivers, page daemons and restore) needs its session's
group raised as a whole (``vzbackup.migrate.priority``). CRIU neither dumps nor restores it.
"""

from __future__ import annotations

import contextlib


def _path(pid: int) -> str:
    return f"/proc/{pid or 'self'}/autogroup"


def group(pid: int = 0) -> tuple[str, int] | None:
    """(group name, nice) of *pid*'s autogroup (0: ours); None without autogroups, or if
    the process is gone."""
    try:
        with open(_path(pid)) as f:
            name, _, nice = f.read().split()  # "/autogroup-123 nice 0"
        return name, int(nice)
    except (OSError, ValueError):
        return None


def set_nice(pid: int, nice: int) -> bool:
    """Set the nice of *pid*'s autogroup (0: ours); False if not allowed or it is gone."""
    with contextlib.suppress(OSError):
        with open(_path(pid), "w") as f:
            f.write(str(nice))
        return True
    return False
