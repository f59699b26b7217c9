"""What relocking a restored CT rebuilds, carries over and drops, read from mount tables of
the shapes CRIU restores (the real relock runs in tests/test_isolation.py)."""

from __future__ import annotations

import pytest

from vzbackup.config.ct import BindMount
from vzbackup.ct import refence

BINDS = [BindMount("/srv/data", "/mnt/data", readonly=True)]


def table(*rows: tuple[int, int, str, str, str]) -> str:
    """mountinfo lines from (id, parent, mount point, fstype, source)."""
    return "\n".join(
        f"{i} {p} 0:1 / {path} rw,relatime shared:1 - {fstype} {source} rw"
        for i, p, path, fstype, source in rows
    )


ROOT = (10, 1, "/", "ext4", "/dev/vda")
CASES = {
    "first restore": (
        [ROOT, (11, 10, "/proc", "proc", "proc"), (12, 11, "/proc/kmsg", "devtmpfs", "devtmpfs"),
         (13, 11, "/proc/sys", "proc", "proc"), (14, 13, "/proc/sys/net", "proc", "proc"),
         (15, 10, "/sys", "sysfs", "sysfs"), (16, 15, "/sys/fs/cgroup", "cgroup2", "cgroup2"),
         (17, 15, "/sys/firmware", "tmpfs", "tmpfs"), (18, 10, "/dev", "ext4", "/dev/vda"),
         (19, 18, "/dev/pts", "devpts", "devpts"), (20, 10, "/mnt/data", "ext4", "/dev/vdb"),
         (21, 10, "/run", "tmpfs", "tmpfs")],
        refence.Plan(["/proc", "/sys", "/mnt/data"], ["/sys/fs/cgroup"], []),
    ),
    "restore of a relocked CT (carriers)": (
        [ROOT, (11, 10, "/proc", "tmpfs", refence.CARRIER), (12, 11, "/proc", "proc", "proc"),
         (13, 12, "/proc/kmsg", "devtmpfs", "devtmpfs"),
         (15, 10, "/sys", "tmpfs", refence.CARRIER), (16, 15, "/sys", "sysfs", "sysfs"),
         (17, 16, "/sys/fs/cgroup", "cgroup2", "cgroup2")],
        refence.Plan(["/proc", "/sys"], ["/sys/fs/cgroup"], []),
    ),
    "a service's namespace: systemd's overlays": (
        [ROOT, (11, 10, "/proc", "proc", "proc"), (12, 11, "/proc/kmsg", "devtmpfs", "devtmpfs"),
         (13, 12, "/proc/kmsg", "tmpfs", "tmpfs"),  # ProtectKernelLogs: carried
         (14, 11, "/proc/sys", "proc", "proc"),
         (15, 14, "/proc/sys", "proc", "proc"),  # ProtectKernelTunables' bind: dropped
         (16, 11, "/proc", "proc", "proc")],  # ProcSubset=pid: dropped
        refence.Plan(["/proc"], ["/proc/kmsg"], []),
    ),
    "the CT's own proc and sysfs binds elsewhere": (
        [ROOT, (11, 10, "/proc", "proc", "proc"), (12, 10, "/tmp/p", "proc", "proc"),
         (13, 12, "/tmp/p/sys", "proc", "proc"), (14, 10, "/tmp/s", "sysfs", "sysfs"),
         (15, 10, "/tmp/t", "tmpfs", "tmpfs")],
        refence.Plan(["/proc"], [], ["/tmp/p", "/tmp/s"]),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_classify(case: str) -> None:
    rows, plan = CASES[case]
    mounts = refence.parse_mountinfo(table(*rows))
    assert refence.classify(mounts, refence.fence_paths(BINDS)) == plan


def test_mountinfo_escapes_and_fields() -> None:
    (m,) = refence.parse_mountinfo(
        "7 3 0:5 / /mnt/a\\040b rw master:2 shared:3 - tmpfs vzfence rw,size=4k"
    )
    assert (m.id, m.parent, m.path, m.fstype, m.source) == (7, 3, "/mnt/a b", "tmpfs", "vzfence")


def test_every_mask_is_a_fence_path() -> None:
    fences = refence.fence_paths([])
    for path in ("/proc/sysrq-trigger", "/proc/kcore", "/proc/sys", "/sys/firmware", "/proc"):
        assert path in fences
    assert not any(p.startswith("/dev") for p in fences)  # the node's devices: device cgroup
