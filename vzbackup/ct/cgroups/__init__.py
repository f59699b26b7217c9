"""One container's cgroups on cgroup v1 (legacy/hybrid) or v2 (unified) hosts.

The version is detected when a set is opened, never configured: a root is pure v2 iff
``<root>/cgroup.controllers`` exists; otherwise it is v1 and every v1 controller hierarchy
mounted under ``<root>`` (found in ``/proc/self/mountinfo``) is used. :func:`open_cgroups`
returns a :class:`V1CgroupSet` or a :class:`V2CgroupSet`; both implement
:class:`CgroupSet`, and nothing outside ``v1.py``/``v2.py`` asks which one it has.

OpenVZ limits map onto the two versions as follows (see :class:`Limits`):

=================  ===================================  ==================================
Limits field       cgroup v1                            cgroup v2
=================  ===================================  ==================================
memory_bytes       memory.limit_in_bytes                memory.max
swap_bytes         memory.memsw.limit_in_bytes          memory.swap.max
                   (= memory + swap; skipped if absent) (swap only; skipped if absent)
cpus               cpuset.cpus                          cpuset.cpus
cpulimit_percent   cpu.cfs_period_us=100000,            cpu.max "quota 100000"
                   cpu.cfs_quota_us=percent*1000
cpuunits           cpu.shares=max(2, units*1024//1000)  cpu.weight=clamp(units//10, 1, 10000)
pids_max           pids.max                             pids.max
devices            devices.deny/devices.allow           BPF device program (devices.py)
=================  ===================================  ==================================

``cpu.weight`` uses ``units // 10`` so that the OpenVZ default of 1000 units lands on the v2
default weight of 100 (and the v1 default shares of 1024), keeping a container with default
units on par with everything else on the host.
"""

from __future__ import annotations

from vzbackup.ct.cgroups.base import (
    DEFAULT_ROOT,
    CgroupSet,
    Limits,
    _format_cpulist,
    _parse_cpulist,
    detect_version,
)
from vzbackup.ct.cgroups.devices import DEVICE_RULES, V1_DEVICE_RULES
from vzbackup.ct.cgroups.v1 import V1CgroupSet, _v1_mounts
from vzbackup.ct.cgroups.v2 import V2CgroupSet

__all__ = [
    "DEFAULT_ROOT",
    "DEVICE_RULES",
    "V1_DEVICE_RULES",
    "CgroupSet",
    "Limits",
    "V1CgroupSet",
    "V2CgroupSet",
    "_format_cpulist",
    "_parse_cpulist",
    "_v1_mounts",
    "detect_version",
    "open_cgroups",
]


def open_cgroups(name: str, *, root: str = DEFAULT_ROOT) -> CgroupSet:
    """The cgroup set *name* (``"vzbackup/101"``) under *root*, of the host's version."""
    cls = V2CgroupSet if detect_version(root) == 2 else V1CgroupSet
    return cls(name, root=root)
