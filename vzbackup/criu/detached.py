"""Open files a restored CT holds on mounts its namespaces no longer have.

After a restore, ``vzbackup.ct.refence`` replaces the mounts CRIU made with locked copies;
tasks that kept files open on the old ones (systemd's mountinfo monitor, journald) would make
the next dump fail, since CRIU can't dump a file whose mount left the namespace. This finds
them (for the checkpointability preflight) and has the usual holders reopen theirs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass


def _mount_ids(mountinfo: str) -> set[int]:
    return {int(ln.split(maxsplit=1)[0]) for ln in mountinfo.splitlines() if ln.strip()}


# Files a restored CT's tasks keep open on the mounts a relock detached (CRIU can't dump an
# open file whose mount left the namespace): who usually holds them and what reopens them.
REOPEN = {
    "systemd": ["systemctl", "daemon-reexec"],  # PID 1's /proc/self/mountinfo monitor
    "systemd-journal": ["systemctl", "restart", "systemd-journald"],  # kernel/hostname watch
}
NOT_ON_A_MOUNT = ("/memfd:", "/SYSV", "/dev/zero (deleted)")  # internal mounts, dumped as such


@dataclass(frozen=True)
class DetachedFile:
    pid: int  # on the node
    comm: str
    fd: int
    path: str


def detached_files(pids: Iterable[int]) -> list[DetachedFile]:
    """Open files of *pids* (a CT's tasks) on mounts none of their namespaces holds."""
    pids = list(pids)
    mounted: set[int] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/mountinfo") as f:
                mounted |= _mount_ids(f.read())
        except OSError:
            continue
    found = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        for fd in fds:
            try:
                path = os.readlink(f"/proc/{pid}/fd/{fd}")
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    info = dict(ln.split(":", 1) for ln in f.read().splitlines() if ":" in ln)
            except OSError:
                continue
            mnt = int(info.get("mnt_id", "-1"))
            if path.startswith("/") and not path.startswith(NOT_ON_A_MOUNT) and mnt not in mounted:
                found.append(DetachedFile(pid, comm, int(fd), path))
    return found


def reopen(exec_in_ct: Callable[[list[str]], object], pids: Iterable[int]) -> None:
    """Have the services that usually hold files on detached mounts reopen them (before a
    dump); *exec_in_ct* runs a command in the CT. Other holders stay: the checkpointability
    preflight names them."""
    held = {d.comm for d in detached_files(pids)}
    for comm, argv in REOPEN.items():
        if comm in held:
            exec_in_ct(argv)
