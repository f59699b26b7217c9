"""The cgroup yard CRIU opens instead of mounting a cgroupfs per hierarchy (dump and restore)."""

from __future__ import annotations

import os
import subprocess

import pytest

from vzbackup.criu import cgyard
from vzbackup.criu.cgyard import cgroup_yard, link_names, yard_links

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
50 23 0:30 /sub /mnt/memsub rw,relatime - cgroup cgroup rw,memory
"""
CGROUPS = "5:memory:/a\n4:cpu,cpuacct:/\n1:name=systemd:/\n0::/\n"


@pytest.mark.parametrize(("hierarchy", "names"), [
    ("cpu,cpuacct", ["cpu", "cpuacct", "cpu,cpuacct"]), ("name=systemd", ["systemd"]),
    ("", ["unified"]),
])
def test_link_names_are_criu_s(hierarchy: str, names: list[str]) -> None:
    assert link_names(hierarchy) == names


def test_links_point_at_root_mounts_only() -> None:
    links = yard_links(HYBRID, CGROUPS)
    both = "/sys/fs/cgroup/cpu,cpuacct"
    assert links == {"cpu": both, "cpuacct": both, "cpu,cpuacct": both,
                     "systemd": "/sys/fs/cgroup/systemd", "unified": "/sys/fs/cgroup/unified"}
    # memory is mounted only below its root: not in the yard


def test_yard_on_this_node_and_none_for_an_unmounted_hierarchy() -> None:
    with cgroup_yard([""]) as yard:
        assert yard is not None
        assert os.path.samefile(os.path.join(yard, "unified"), _cgroup2_mount())
    assert not os.path.exists(yard)
    with cgroup_yard(["", "no_such_controller"]) as yard:
        assert yard is None


def test_yards_of_dead_processes_are_swept() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    os.makedirs(cgyard.YARD_PARENT, exist_ok=True)
    stale = os.path.join(cgyard.YARD_PARENT, f"{dead.pid}-test")
    os.makedirs(stale, exist_ok=True)
    os.symlink("/sys/fs/cgroup", os.path.join(stale, "unified"))
    with cgroup_yard([]) as yard:
        assert yard is not None and os.path.basename(yard).startswith(f"{os.getpid()}-")
    assert not os.path.exists(stale)


def _cgroup2_mount() -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index("-") + 1] == "cgroup2" and fields[3] == "/":
                return fields[4]
    raise AssertionError("no cgroup2 mount on this node")
