"""cgroup v2 (unified): one hierarchy; controllers enabled in each ancestor's subtree_control.

Devices: the BPF device program (devices.py) on the CT's cgroup. A memory limit below the
current usage is accepted: the kernel reclaims or OOM-kills instead.
"""

from __future__ import annotations

import os

from vzbackup.ct.cgroups import devices
from vzbackup.ct.cgroups.base import CFS_PERIOD_US, CgroupSet, _read_opt, _write

# Controllers enabled in cgroup.subtree_control of each ancestor (those available).
V2_CONTROLLERS = ("memory", "cpu", "pids", "cpuset")
UNIFIED = "unified"


class V2CgroupSet(CgroupSet):
    version = 2
    LIMIT_FILES = {
        "memory": ("memory", "memory.max"),
        "swap": ("memory", "memory.swap.max"),
        "cpus": ("cpuset", "cpuset.cpus"),
        "cpu_quota": ("cpu", "cpu.max"),
        "cpu_weight": ("cpu", "cpu.weight"),
        "pids_max": ("pids", "pids.max"),
    }
    MEMORY_USAGE = "memory.current"
    FREEZER = (UNIFIED, "cgroup.freeze", "1", "0")

    def _find_mounts(self) -> dict[str, str]:
        return {UNIFIED: self.root}

    def _path(self, controller: str) -> str | None:
        return os.path.join(self.root, self.name)

    def _create(self) -> None:
        cur = self.root
        for i, part in enumerate(self._parts):
            self._enable(cur)
            cur = os.path.join(cur, part)
            self._mkdir(cur, leaf=i == len(self._parts) - 1)
        devices.attach_program(cur)

    @staticmethod
    def _enable(path: str) -> None:
        available = set((_read_opt(os.path.join(path, "cgroup.controllers")) or "").split())
        control = os.path.join(path, "cgroup.subtree_control")
        enabled = set((_read_opt(control) or "").split())
        for ctl in V2_CONTROLLERS:
            if ctl in available and ctl not in enabled:
                _write(control, f"+{ctl}")

    def _memory(self, memory: int | None, swap: int | None) -> None:
        if memory is not None:
            _write(self._need("memory", "memory.max"), "max" if memory == 0 else str(memory))
        if swap is not None:
            path = self._file("memory", "memory.swap.max")
            if path and os.path.exists(path):
                _write(path, str(swap))

    def _cpulimit(self, percent: int) -> None:
        quota = "max" if percent == 0 else str(percent * CFS_PERIOD_US // 100)
        _write(self._need("cpu", "cpu.max"), f"{quota} {CFS_PERIOD_US}")

    def _cpuunits(self, units: int) -> None:
        _write(self._need("cpu", "cpu.weight"), str(min(10_000, max(1, units // 10))))

    def _cpus(self, n: int) -> None:
        if n == 0:
            _write(self._need("cpuset", "cpuset.cpus"), "")  # empty = the parent's CPUs
            return
        super()._cpus(n)

    def _available_cpus(self, cpus_file: str) -> str | None:
        parent = os.path.dirname(os.path.dirname(cpus_file))
        return _read_opt(os.path.join(parent, "cpuset.cpus.effective"))

    def _pids_top(self) -> str | None:
        return os.path.join(self.root, self.name)

    def _freeze_again(self, path: str) -> None:
        """v2 freezes new and straggling tasks by itself."""

    def is_frozen(self) -> bool:
        events = _read_opt(os.path.join(self.root, self.name, "cgroup.events")) or ""
        return "frozen 1" in events.splitlines()

    def kill_all(self) -> None:
        """cgroup.kill when the kernel has it (5.14+), else freeze and kill one by one."""
        kill_file = self._file(UNIFIED, "cgroup.kill")
        if not (kill_file and os.path.exists(kill_file)):
            super().kill_all()
            return
        if self.pids():
            _write(kill_file, "1")
        self._wait_empty()
