"""A cgroup yard for CRIU's dump: a directory naming the node's own cgroup mounts.

For every new set of cgroups a dump meets (one per distinct cgroup of the CT's tasks: a
Debian CT has about seven) CRIU mounts a fresh cgroupfs per hierarchy to walk it, 10-20 ms a
set on this node, all inside the freeze. Given ``cgroup_yard`` it opens ``YARD/<name>``
instead (criu/cgroup.c, ``collect_cgroups``): here a symlink per hierarchy to the node's
mount of its root. Only the dump takes it: a restore moves tasks into their cgroups from
inside the CT's mount namespace, where the node's paths don't resolve.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

YARD_PARENT = "/run"


def link_names(hierarchy: str) -> list[str]:
    """The names CRIU looks up in a yard for a hierarchy as ``/proc/PID/cgroup`` names it:
    one per controller, ``name=`` dropped, ``unified`` for cgroup2."""
    return [n.removeprefix("name=") for n in hierarchy.split(",")] if hierarchy else ["unified"]


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
    """A yard for one CRIU dump of tasks in *hierarchies* (``/proc/PID/cgroup`` names),
    removed afterwards; None when one of them isn't mounted at its root (CRIU then mounts
    its own)."""
    try:
        links = yard_links(Path("/proc/self/mountinfo").read_text(),
                           Path("/proc/self/cgroup").read_text())
    except (OSError, ValueError, IndexError):
        links = {}
    if not links or any(n not in links for h in hierarchies for n in link_names(h)):
        yield None
        return
    yard = tempfile.mkdtemp(prefix="vzbackup-cgyard-", dir=YARD_PARENT)
    try:
        for name, target in links.items():
            os.symlink(target, os.path.join(yard, name))
        yield yard
    finally:
        shutil.rmtree(yard, ignore_errors=True)
