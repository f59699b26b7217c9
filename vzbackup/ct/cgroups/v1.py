"""cgroup v1 (legacy or hybrid): one hierarchy per controller, each mounted under the root.

Named v1 hierarchies such as ``name=systemd`` and the hybrid ``unified`` cgroup2 mount get a
directory too (no limits there), so every task of a CT sits in the CT's own cgroup
everywhere and CRIU never dumps the host's tree. Devices: the v1 whitelist, plus the BPF
device program on the hybrid cgroup2 directory (the kernel asks both).

On v1 a swap limit needs a memory limit to mean anything (memsw = memory + swap; with
unlimited memory memsw stays unlimited); when only the memory limit changes, the current swap
allowance (memsw - memory) is kept. A memory limit below the current usage fails with EBUSY
(RuntimeFailure).
"""

from __future__ import annotations

import os

from vzbackup.ct import fs
from vzbackup.ct.cgroups import devices
from vzbackup.ct.cgroups.base import (
    CFS_PERIOD_US,
    CgroupSet,
    _errmsg,
    _read,
    _read_opt,
    _write,
)
from vzbackup.errors import RuntimeFailure

MOUNTINFO = "/proc/self/mountinfo"
HYBRID = "unified"  # the controller-less cgroup2 mount of a hybrid host

# v1 controllers used when /proc/cgroups can't be read.
_KNOWN_V1 = frozenset(
    [
        "cpu",
        "cpuacct",
        "cpuset",
        "memory",
        "devices",
        "freezer",
        "blkio",
        "pids",
        "net_cls",
        "net_prio",
        "perf_event",
        "hugetlb",
        "rdma",
        "misc",
    ]
)
_V1_UNLIMITED = 1 << 62  # v1 reports "no limit" as PAGE_COUNTER_MAX * PAGE_SIZE


def _v1_controller_names() -> frozenset[str]:
    text = _read_opt("/proc/cgroups")
    if not text:
        return _KNOWN_V1
    names = {line.split()[0] for line in text.splitlines() if line and not line.startswith("#")}
    return frozenset(names) or _KNOWN_V1


def _v1_mounts(root: str, mountinfo: str = MOUNTINFO) -> dict[str, str]:
    """Map each v1 controller mounted under ``root`` to its mount point (first mount wins)."""
    known = _v1_controller_names()
    root = os.path.normpath(root)
    result: dict[str, str] = {}
    try:
        with open(mountinfo) as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise RuntimeFailure(f"cannot read {mountinfo}: {_errmsg(exc)}") from exc
    for line in lines:
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mountpoint = os.path.normpath(fs.unescape(fields[4]))
        if mountpoint != root and not mountpoint.startswith(root.rstrip("/") + "/"):
            continue
        if tail[0] == "cgroup2":
            result.setdefault(HYBRID, mountpoint)
            continue
        for opt in tail[2].split(","):
            if opt in known or opt.startswith("name="):
                result.setdefault(opt, mountpoint)
    return result


class V1CgroupSet(CgroupSet):
    version = 1
    LIMIT_FILES = {
        "memory": ("memory", "memory.limit_in_bytes"),
        "swap": ("memory", "memory.memsw.limit_in_bytes"),
        "cpus": ("cpuset", "cpuset.cpus"),
        "cpu_quota": ("cpu", "cpu.cfs_quota_us"),
        "cpu_weight": ("cpu", "cpu.shares"),
        "pids_max": ("pids", "pids.max"),
    }
    MEMORY_USAGE = "memory.usage_in_bytes"
    FREEZER = ("freezer", "freezer.state", "FROZEN", "THAWED")

    def _find_mounts(self) -> dict[str, str]:
        return _v1_mounts(self.root)

    def _path(self, controller: str) -> str | None:
        mnt = self._mounts.get(controller)
        return os.path.join(mnt, self.name) if mnt else None

    def _create(self) -> None:
        for mnt in sorted(set(self._mounts.values())):
            ctls = {c for c, m in self._mounts.items() if m == mnt}
            cur = mnt
            for i, part in enumerate(self._parts):
                parent, cur = cur, os.path.join(cur, part)
                self._mkdir(cur, leaf=i == len(self._parts) - 1)
                if "cpuset" in ctls:
                    self._cpuset_inherit(parent, cur)
            if "devices" in ctls:
                self._devices(cur)
            if HYBRID in ctls:
                devices.attach_program(cur)

    @staticmethod
    def _cpuset_inherit(parent: str, child: str) -> None:
        """A new v1 cpuset starts with no cpus/mems, so nothing could be attached: copy."""
        for base in ("cpus", "mems"):
            fname = f"cpuset.{base}"
            if not os.path.exists(os.path.join(child, fname)):
                fname = base  # mounted with noprefix
            if _read(os.path.join(child, fname)):
                continue
            value = _read(os.path.join(parent, fname))
            if value:
                _write(os.path.join(child, fname), value)

    @staticmethod
    def _devices(leaf: str) -> None:
        current = _read_opt(os.path.join(leaf, "devices.list"))
        if current is not None and set(current.splitlines()) == set(devices.V1_DEVICE_RULES):
            return
        _write(os.path.join(leaf, "devices.deny"), "a")
        for rule in devices.V1_DEVICE_RULES:
            _write(os.path.join(leaf, "devices.allow"), rule)

    def _memory(self, memory: int | None, swap: int | None) -> None:
        sw_path = self._file("memory", "memory.memsw.limit_in_bytes")
        has_sw = sw_path is not None and os.path.exists(sw_path)
        if memory is None and not has_sw:
            return  # swap only, without swap accounting: skipped silently
        mem_path = self._need("memory", "memory.limit_in_bytes")
        new_mem = None if memory is None else (-1 if memory == 0 else memory)
        if not has_sw or sw_path is None:
            _write(mem_path, str(new_mem))  # memory is not None here
            return

        def num(v: int) -> float:
            return float("inf") if v < 0 or v >= _V1_UNLIMITED else float(v)

        cur_mem, cur_sw = int(_read(mem_path)), int(_read(sw_path))
        target_mem = new_mem if new_mem is not None else cur_mem
        if num(target_mem) == float("inf"):
            new_sw: int | None = -1
        elif swap is not None:
            new_sw = target_mem + swap
        elif num(cur_sw) == float("inf"):
            new_sw = None  # swap stays unlimited
        else:
            new_sw = target_mem + max(0, cur_sw - cur_mem)  # keep the swap allowance
        if new_sw is not None and num(new_sw) == num(cur_sw):
            new_sw = None
        # memsw must stay >= memory at every step.
        writes = [(mem_path, new_mem), (sw_path, new_sw)]
        if new_mem is not None and num(new_mem) > num(cur_sw):
            writes.reverse()
        for path, value in writes:
            if value is not None:
                _write(path, str(value))

    def _cpulimit(self, percent: int) -> None:
        period = self._need("cpu", "cpu.cfs_period_us")
        quota = self._need("cpu", "cpu.cfs_quota_us")
        _write(period, str(CFS_PERIOD_US))
        _write(quota, "-1" if percent == 0 else str(percent * CFS_PERIOD_US // 100))

    def _cpuunits(self, units: int) -> None:
        _write(self._need("cpu", "cpu.shares"), str(max(2, units * 1024 // 1000)))

    def _available_cpus(self, cpus_file: str) -> str | None:
        parent = os.path.dirname(os.path.dirname(cpus_file))
        return _read_opt(os.path.join(parent, "cpuset.effective_cpus")) or _read_opt(
            os.path.join(parent, "cpuset.cpus")
        )

    def _pids_top(self) -> str | None:
        return next(
            (p for c in ("pids", "memory", "freezer", "cpu") if (p := self._path(c))),
            None,
        ) or next(iter(self._dirs()), None)

    def _freeze_again(self, path: str) -> None:
        _write(path, "FROZEN")  # v1 retries freezing stragglers on each write

    def is_frozen(self) -> bool:
        return _read_opt(self._file("freezer", "freezer.state")) == "FROZEN"
