"""A cgroup yard for CRIU: a directory naming the node's own cgroup mounts.

For every new set of cgroups a dump meets (one per distinct cgroup of the CT's tasks: a
Debian CT has about seven) CRIU mounts a fresh cgroupfs per hierarchy to walk it, 10-20 ms a
set on this node, and a restore mounts every hierarchy once (~20 ms), all inside a
migration's freeze. Given ``cgroup_yard`` CRIU opens ``YARD/<name>`` instead
(criu/cgroup.c, ``collect_cgroups``, ``prepare_cgroup_sfd``): here a symlink per hierarchy to
the node's mount of its root. A restore takes it only for a CT in a user namespace (every CT
vzbackup runs): then CRIU's usernsd, in the node's mount namespace, moves the tasks into
their cgroups; without one each task does, from inside the CT's root, where the node's paths
don't resolve.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vzbackup import syscalls as S

YARD_PARENT = "/run/vzbackup-cgyards"  # one yard per CRIU run: PID-RANDOM


def link_names(hierarchy: str) -> list[str]:
    """The names CRIU looks up in a yard for a hierarchy as ``/proc/PID/cgroup`` names it:
    one per controller (a dump), ``name=`` dropped, ``unified`` for cgroup2; co-mounted
    controllers also joined by commas (a restore)."""
    if not hierarchy:
        return ["unified"]
    names = [n.removeprefix("name=") for n in hierarchy.split(",")]
    return names + ([",".join(names)] if len(names) > 1 else [])


def yard_links(mountinfo: str, cgroups: str) -> dict[str, str]:
    """Link name -> mount point of each hierarchy in *cgroups* (``/proc/self/cgroup``) that
    the node has mounted at its root."""
    mounts: list[tuple[str, set[str], str]] = []  # fstype, super options, mount point
    for line in mountinfo.splitlines():
        f = line.split()
        sep = f.index("-")
        if f[sep + 1] in ("cgroup", "cgroup2") and f[3] == "/" and "\\" not in f[4]:
            mounts.append((f[sep + 1], set(f[sep + 3].split(",")), f[4]))
    links: dict[str, str] = {}
    for line in cgroups.splitlines():
        _, ctrls, _ = line.split(":", 2)
        names = ctrls.split(",") if ctrls else []
        want = "cgroup" if names else "cgroup2"
        point = next((p for t, o, p in mounts if t == want and set(names) <= o), None)
        if point is not None:
            links |= dict.fromkeys(link_names(ctrls), point)
    return links


@contextlib.contextmanager
def cgroup_yard(hierarchies: list[str]) -> Iterator[str | None]:
    """A yard for one CRIU run on tasks in *hierarchies* (``/proc/PID/cgroup`` names),
    removed afterwards; None when one of them isn't mounted at its root (CRIU then mounts
    its own). A hierarchy CRIU finds missing in it (a restore: one the images name) CRIU
    mounts there itself: unmounted here afterwards."""
    try:
        links = yard_links(Path("/proc/self/mountinfo").read_text(),
                           Path("/proc/self/cgroup").read_text())
    except (OSError, ValueError, IndexError):
        links = {}
    if not links or any(n not in links for h in hierarchies for n in link_names(h)):
        yield None
        return
    os.makedirs(YARD_PARENT, mode=0o700, exist_ok=True)
    _sweep()
    yard = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=YARD_PARENT)
    try:
        for name, target in links.items():
            os.symlink(target, os.path.join(yard, name))
        yield yard
    finally:
        _remove(yard)


def _sweep() -> None:
    """Remove the yards of processes that are gone (killed before they removed theirs)."""
    for entry in os.scandir(YARD_PARENT):
        pid = entry.name.split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _remove(entry.path)


def _remove(yard: str) -> None:
    with contextlib.suppress(OSError):
        for entry in os.scandir(yard):
            if not entry.is_symlink() and os.path.ismount(entry.path):
                with contextlib.suppress(OSError):
                    S.umount(entry.path, S.MNT_DETACH)
    shutil.rmtree(yard, ignore_errors=True)
