"""One container's cgroups on cgroup v1 (legacy/hybrid) or v2 (unified) hosts.

The version is detected, never configured: a host is pure v2 iff ``<root>/cgroup.controllers``
exists; otherwise it is treated as v1 and every v1 controller hierarchy mounted under ``<root>``
(found in ``/proc/self/mountinfo``) is used.  Named v1 hierarchies such as ``name=systemd``
and the hybrid ``unified`` cgroup2 mount get a directory too (no limits there), so every task
of a CT sits in the CT's own cgroup everywhere and CRIU never dumps the host's tree.

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
=================  ===================================  ==================================

``cpu.weight`` uses ``units // 10`` so that the OpenVZ default of 1000 units lands on the v2
default weight of 100 (and the v1 default shares of 1024), keeping a container with default
units on par with everything else on the host.

On v1 a swap limit needs a memory limit to mean anything (memsw = memory + swap; with
unlimited memory memsw stays unlimited); when only the memory limit changes, the current swap
allowance (memsw - memory) is kept.  On v1 a memory limit below the current usage fails with
EBUSY (RuntimeFailure); v2 accepts it and reclaims or OOM-kills instead.

Device access control is v1 only: v2 has no devices files (it needs a BPF program), so on
v2 :meth:`CgroupSet.create` does no device filtering at all.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

from vzbackup.errors import RuntimeFailure

__all__ = ["CgroupSet", "Limits", "detect_version"]

DEFAULT_ROOT = "/sys/fs/cgroup"
MOUNTINFO = "/proc/self/mountinfo"
ONLINE_CPUS = "/sys/devices/system/cpu/online"

CFS_PERIOD_US = 100_000
CPUUNITS_MIN = 8
CPUUNITS_MAX = 500_000

# Controllers enabled in cgroup.subtree_control of each ancestor on v2 (those available).
V2_CONTROLLERS = ("memory", "cpu", "pids", "cpuset")

# Devices a container may use on v1 (everything else is denied).
V1_DEVICE_RULES = (
    "c 1:3 rwm",  # null
    "c 1:5 rwm",  # zero
    "c 1:7 rwm",  # full
    "c 1:8 rwm",  # random
    "c 1:9 rwm",  # urandom
    "c 5:0 rwm",  # tty
    "c 5:1 rwm",  # console
    "c 5:2 rwm",  # ptmx
    "c 136:* rwm",  # pts
)

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

_RMDIR_RETRIES = 10  # x 50 ms
_KILL_WAIT = 5.0  # seconds kill_all waits for the set to empty
_V1_UNLIMITED = 1 << 62  # v1 reports "no limit" as PAGE_COUNTER_MAX * PAGE_SIZE


@dataclass(frozen=True)
class Limits:
    """Resource limits for a container; ``None`` leaves a limit as it is.

    A value of 0 for ``memory_bytes``, ``pids_max`` or ``cpulimit_percent`` means unlimited;
    ``cpus=0`` means all CPUs of the parent cgroup; ``swap_bytes=0`` means no swap.
    Negative values, and ``cpuunits`` outside 8..500000, raise :class:`ValueError`.
    """

    memory_bytes: int | None = None
    swap_bytes: int | None = None
    cpus: int | None = None
    cpulimit_percent: int | None = None
    cpuunits: int | None = None
    pids_max: int | None = None

    def __post_init__(self) -> None:
        for field in (
            "memory_bytes",
            "swap_bytes",
            "cpus",
            "cpulimit_percent",
            "cpuunits",
            "pids_max",
        ):
            value = getattr(self, field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{field} must be an integer, not {value!r}")
            if value < 0:
                raise ValueError(f"{field} must not be negative: {value}")
        if self.cpuunits is not None and not CPUUNITS_MIN <= self.cpuunits <= CPUUNITS_MAX:
            raise ValueError(
                f"cpuunits must be within {CPUUNITS_MIN}..{CPUUNITS_MAX}: {self.cpuunits}"
            )


def detect_version(root: str = DEFAULT_ROOT) -> int:
    """Return 2 if ``root`` is a pure cgroup v2 mount (has cgroup.controllers), else 1."""
    return 2 if os.path.exists(os.path.join(root, "cgroup.controllers")) else 1


# ---------------------------------------------------------------------------- file helpers


def _errmsg(exc: OSError) -> str:
    code = exc.errno or 0
    return f"errno {code} {errno.errorcode.get(code, '?')}: {exc.strerror or exc}"


def _write(path: str, value: str, *, hint: str | None = None) -> None:
    """Write ``value`` to a cgroup file in a single write(2); raise RuntimeFailure on error."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        if hint is None and exc.errno == errno.EBUSY and "memory" in os.path.basename(path):
            hint = "the limit is probably below the container's current memory usage"
        raise RuntimeFailure(
            f"cannot write {value!r} to {path}: {_errmsg(exc)}", hint=hint
        ) from exc


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError as exc:
        raise RuntimeFailure(f"cannot read {path}: {_errmsg(exc)}") from exc


def _read_opt(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` for a space, ...)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _parse_cpulist(text: str) -> list[int]:
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def _format_cpulist(cpus: list[int]) -> str:
    ranges: list[str] = []
    for cpu in sorted(set(cpus)):
        if ranges and cpu == int(ranges[-1].rpartition("-")[2]) + 1:
            ranges[-1] = f"{ranges[-1].partition('-')[0]}-{cpu}"
        else:
            ranges.append(str(cpu))
    return ",".join(ranges)


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
        mountpoint = os.path.normpath(_unescape(fields[4]))
        if mountpoint != root and not mountpoint.startswith(root.rstrip("/") + "/"):
            continue
        if tail[0] == "cgroup2":  # hybrid layout: the controller-less unified hierarchy
            result.setdefault("unified", mountpoint)
            continue
        for opt in tail[2].split(","):
            if opt in known or opt.startswith("name="):
                result.setdefault(opt, mountpoint)
    return result


def _walk_dirs(top: str) -> Iterator[str]:
    """``top`` and every cgroup below it, deepest first; nothing if ``top`` is gone.

    Unlike os.walk this does not hide errors: a directory that can't be listed raises.
    """
    try:
        with os.scandir(top) as it:
            subdirs = [e.path for e in it if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return
    except OSError as exc:
        raise RuntimeFailure(f"cannot list cgroup {top}: {_errmsg(exc)}") from exc
    for sub in subdirs:
        yield from _walk_dirs(sub)
    yield top


# ---------------------------------------------------------------------------- CgroupSet


class CgroupSet:
    """One container's cgroups across all controllers.

    ``name`` is a path relative to each hierarchy's root, e.g. ``"vzbackup/101"``.
    :meth:`destroy` removes the leaf (and any sub-cgroups the container made below it), then
    the intermediate directories that *this object's* :meth:`create` made, if they are
    empty; intermediates that already existed are never removed.
    """

    def __init__(self, name: str, *, root: str = DEFAULT_ROOT) -> None:
        parts = name.strip("/").split("/") if name else []
        if (
            not name
            or name.startswith("/")
            or not parts
            or any(p in ("", ".", "..") for p in parts)
        ):
            raise ValueError(f"invalid cgroup name {name!r}: need a relative path like 'a/b'")
        self.name = "/".join(parts)
        self.root = os.path.normpath(root)
        self._parts = parts
        self.version: int = detect_version(self.root)
        # v1: controller -> mount point; v2: {"unified": root}
        self._mounts: dict[str, str] = (
            {"unified": self.root} if self.version == 2 else _v1_mounts(self.root)
        )
        self._created: list[str] = []  # intermediate dirs made by create(), outermost first

    def __repr__(self) -> str:
        return f"CgroupSet({self.name!r}, root={self.root!r}, version={self.version})"

    # -- paths

    def controller_paths(self) -> dict[str, str]:
        """Controller -> absolute directory of this set (v2: ``{"unified": path}``)."""
        return {ctl: os.path.join(mnt, self.name) for ctl, mnt in sorted(self._mounts.items())}

    def _dirs(self) -> list[str]:
        """Distinct leaf directories (v1 co-mounted controllers share one)."""
        return sorted(set(self.controller_paths().values()))

    def _path(self, controller: str) -> str | None:
        if self.version == 2:
            return os.path.join(self.root, self.name)
        mnt = self._mounts.get(controller)
        return os.path.join(mnt, self.name) if mnt else None

    def _file(self, controller: str, filename: str) -> str | None:
        """Path of a controller file of this set, or None if that controller isn't mounted."""
        d = self._path(controller)
        return os.path.join(d, filename) if d else None

    def _need(self, controller: str, filename: str) -> str:
        path = self._file(controller, filename)
        if path is None or not os.path.exists(path):
            where = path or f"{self.root} (v1 {controller} hierarchy not mounted)"
            raise RuntimeFailure(
                f"{controller} controller not available for cgroup {self.name}: no {where}",
                hint=None if self.version == 1 else "is the controller enabled on this host?",
            )
        return path

    # -- create

    def create(self) -> None:
        """Make the cgroup in every controller (idempotent); see the class docstring."""
        if not self._mounts:
            raise RuntimeFailure(f"no cgroup controllers mounted under {self.root}")
        for attempt in range(3):
            try:
                if self.version == 2:
                    self._create_v2()
                else:
                    self._create_v1()
                return
            except FileNotFoundError:
                # A concurrent destroy() removed an empty parent between our steps: redo.
                if attempt == 2:
                    raise RuntimeFailure(
                        f"cannot create cgroup {self.name}: parent keeps disappearing"
                    ) from None

    def _mkdir(self, path: str, *, leaf: bool) -> None:
        """mkdir one level; remember intermediates we made so destroy() can tidy them."""
        try:
            os.mkdir(path)
        except FileExistsError:
            return
        except FileNotFoundError:
            raise  # parent vanished: create() retries
        except OSError as exc:
            raise RuntimeFailure(f"cannot create cgroup {path}: {_errmsg(exc)}") from exc
        if not leaf and path not in self._created:
            self._created.append(path)

    def _create_v1(self) -> None:
        for mnt in sorted(set(self._mounts.values())):
            ctls = {c for c, m in self._mounts.items() if m == mnt}
            cur = mnt
            for i, part in enumerate(self._parts):
                parent, cur = cur, os.path.join(cur, part)
                self._mkdir(cur, leaf=i == len(self._parts) - 1)
                if "cpuset" in ctls:
                    self._v1_cpuset_inherit(parent, cur)
            if "devices" in ctls:
                self._v1_devices(cur)

    @staticmethod
    def _v1_cpuset_inherit(parent: str, child: str) -> None:
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
    def _v1_devices(leaf: str) -> None:
        current = _read_opt(os.path.join(leaf, "devices.list"))
        if current is not None and set(current.splitlines()) == set(V1_DEVICE_RULES):
            return
        _write(os.path.join(leaf, "devices.deny"), "a")
        for rule in V1_DEVICE_RULES:
            _write(os.path.join(leaf, "devices.allow"), rule)

    def _create_v2(self) -> None:
        cur = self.root
        for i, part in enumerate(self._parts):
            self._v2_enable(cur)
            cur = os.path.join(cur, part)
            self._mkdir(cur, leaf=i == len(self._parts) - 1)

    @staticmethod
    def _v2_enable(path: str) -> None:
        available = set((_read_opt(os.path.join(path, "cgroup.controllers")) or "").split())
        control = os.path.join(path, "cgroup.subtree_control")
        enabled = set((_read_opt(control) or "").split())
        for ctl in V2_CONTROLLERS:
            if ctl in available and ctl not in enabled:
                _write(control, f"+{ctl}")

    # -- limits

    def apply(self, limits: Limits) -> None:
        """Write the limits that are not None (0 = unlimited for memory, pids, cpulimit)."""
        if limits.memory_bytes is not None or limits.swap_bytes is not None:
            if self.version == 2:
                self._memory_v2(limits.memory_bytes, limits.swap_bytes)
            else:
                self._memory_v1(limits.memory_bytes, limits.swap_bytes)
        if limits.cpus is not None:
            self._cpus(limits.cpus)
        if limits.cpulimit_percent is not None:
            pct = limits.cpulimit_percent
            if self.version == 2:
                quota = "max" if pct == 0 else str(pct * CFS_PERIOD_US // 100)
                _write(self._need("cpu", "cpu.max"), f"{quota} {CFS_PERIOD_US}")
            else:
                period = self._need("cpu", "cpu.cfs_period_us")
                quota_file = self._need("cpu", "cpu.cfs_quota_us")
                _write(period, str(CFS_PERIOD_US))
                _write(quota_file, "-1" if pct == 0 else str(pct * CFS_PERIOD_US // 100))
        if limits.cpuunits is not None:
            units = limits.cpuunits
            if self.version == 2:
                weight = min(10_000, max(1, units // 10))
                _write(self._need("cpu", "cpu.weight"), str(weight))
            else:
                _write(self._need("cpu", "cpu.shares"), str(max(2, units * 1024 // 1000)))
        if limits.pids_max is not None:
            value = "max" if limits.pids_max == 0 else str(limits.pids_max)
            _write(self._need("pids", "pids.max"), value)

    def _memory_v2(self, memory: int | None, swap: int | None) -> None:
        if memory is not None:
            _write(self._need("memory", "memory.max"), "max" if memory == 0 else str(memory))
        if swap is not None:
            path = self._file("memory", "memory.swap.max")
            if path and os.path.exists(path):
                _write(path, str(swap))

    def _memory_v1(self, memory: int | None, swap: int | None) -> None:
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

    def _cpus(self, n: int) -> None:
        path = self._need("cpuset", "cpuset.cpus")
        parent = os.path.dirname(os.path.dirname(path))
        if self.version == 2:
            if n == 0:
                _write(path, "")  # empty = inherit the parent's effective CPUs
                return
            avail_text = _read_opt(os.path.join(parent, "cpuset.cpus.effective"))
        else:
            avail_text = _read_opt(os.path.join(parent, "cpuset.effective_cpus")) or _read_opt(
                os.path.join(parent, "cpuset.cpus")
            )
        avail = _parse_cpulist(avail_text or _read(ONLINE_CPUS))
        if not avail:
            raise RuntimeFailure(f"no CPUs available to {path}")
        chosen = avail if n == 0 else avail[:n]
        _write(path, _format_cpulist(chosen))

    def read_limits(self) -> dict[str, str]:
        """Raw contents of the limit files (``""`` where the file is unavailable).

        On v1 ``swap`` is memory.memsw.limit_in_bytes (memory + swap), ``cpu_quota`` is
        cpu.cfs_quota_us and ``cpu_weight`` is cpu.shares; on v2 they are memory.swap.max,
        cpu.max ("quota period") and cpu.weight.
        """
        if self.version == 2:
            files = {
                "memory": ("memory", "memory.max"),
                "swap": ("memory", "memory.swap.max"),
                "cpus": ("cpuset", "cpuset.cpus"),
                "cpu_quota": ("cpu", "cpu.max"),
                "cpu_weight": ("cpu", "cpu.weight"),
                "pids_max": ("pids", "pids.max"),
            }
        else:
            files = {
                "memory": ("memory", "memory.limit_in_bytes"),
                "swap": ("memory", "memory.memsw.limit_in_bytes"),
                "cpus": ("cpuset", "cpuset.cpus"),
                "cpu_quota": ("cpu", "cpu.cfs_quota_us"),
                "cpu_weight": ("cpu", "cpu.shares"),
                "pids_max": ("pids", "pids.max"),
            }
        out: dict[str, str] = {}
        for key, (ctl, fname) in files.items():
            path = self._file(ctl, fname)
            out[key] = (_read_opt(path) if path else None) or ""
        return out

    def memory_usage(self) -> int | None:
        """Current memory use in bytes, or None without a memory controller."""
        fname = "memory.current" if self.version == 2 else "memory.usage_in_bytes"
        path = self._file("memory", fname)
        value = _read_opt(path) if path else None
        return int(value) if value and value.isdigit() else None

    # -- processes

    def attach(self, pid: int, *, existing_only: bool = False) -> None:
        """Move process ``pid`` (all its threads) into this set in every hierarchy.

        ``existing_only`` skips hierarchies where the set has no directory (a CT started by
        an older version may lack some); by default a missing one is an error.
        """
        for d in self._dirs():
            if existing_only and not os.path.isdir(d):
                continue
            _write(os.path.join(d, "cgroup.procs"), str(pid))

    def pids(self) -> list[int]:
        """Sorted pids of all processes in the set, including sub-cgroups."""
        if self.version == 2:
            top = os.path.join(self.root, self.name)
        else:
            top = next(
                (p for c in ("pids", "memory", "freezer", "cpu") if (p := self._path(c))),
                None,
            ) or next(iter(self._dirs()), "")
        found: set[int] = set()
        if not top or not os.path.isdir(top):
            return []
        for d in _walk_dirs(top):
            text = _read_opt(os.path.join(d, "cgroup.procs")) or ""
            found.update(int(x) for x in text.split() if x.isdigit())
        return sorted(found)

    # -- freezer

    def _freezer_file(self) -> str:
        if self.version == 2:
            return self._need("unified", "cgroup.freeze")
        return self._need("freezer", "freezer.state")

    def freeze(self, timeout: float = 10.0) -> None:
        """Freeze every process and wait until the kernel reports the set frozen.

        On timeout the set is thawed again and RuntimeFailure is raised.
        """
        path = self._freezer_file()
        _write(path, "1" if self.version == 2 else "FROZEN")
        deadline = time.monotonic() + timeout
        delay = 0.005
        while not self.is_frozen():
            if time.monotonic() >= deadline:
                with contextlib.suppress(RuntimeFailure):
                    self.thaw()
                raise RuntimeFailure(
                    f"cgroup {self.name} did not freeze within {timeout:g}s ({path})",
                    hint="a process may be stuck in uninterruptible sleep (D state)",
                )
            if self.version == 1:
                _write(path, "FROZEN")  # v1 retries freezing stragglers on each write
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def thaw(self) -> None:
        """Let the processes run again."""
        _write(self._freezer_file(), "0" if self.version == 2 else "THAWED")

    def is_frozen(self) -> bool:
        """True if the whole set is frozen (False if there is no freezer)."""
        if self.version == 2:
            events = _read_opt(os.path.join(self.root, self.name, "cgroup.events")) or ""
            return "frozen 1" in events.splitlines()
        path = self._file("freezer", "freezer.state")
        return path is not None and _read_opt(path) == "FROZEN"

    def kill_all(self) -> None:
        """SIGKILL every process in the set and wait (briefly) until it is empty."""
        kill_file = self._file("unified", "cgroup.kill") if self.version == 2 else None
        if kill_file and os.path.exists(kill_file):
            if self.pids():
                _write(kill_file, "1")
        else:
            can_freeze = self.version == 2 or self._file("freezer", "freezer.state") is not None
            for _ in range(5):
                pids = self.pids()
                if not pids:
                    break
                # Freeze first so nothing can fork while we go through the list.
                frozen = False
                if can_freeze:
                    try:
                        self.freeze(timeout=1.0)
                        frozen = True
                    except RuntimeFailure:
                        pass
                for pid in self.pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                if frozen:
                    self.thaw()
                time.sleep(0.02)
        deadline = time.monotonic() + _KILL_WAIT
        while pids := self.pids():
            if time.monotonic() >= deadline:
                raise RuntimeFailure(f"processes {pids} in cgroup {self.name} survived SIGKILL")
            time.sleep(0.02)

    # -- destroy

    def destroy(self) -> None:
        """Remove the set (see the class docstring); tolerate it being gone already.

        Raises RuntimeFailure if a directory is still busy after ~0.5 s of retries.
        """
        for leaf in self._dirs():
            for d in _walk_dirs(leaf):
                self._rmdir(d)
        for d in reversed(self._created):
            try:
                os.rmdir(d)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
                    raise RuntimeFailure(f"cannot remove cgroup {d}: {_errmsg(exc)}") from exc
        self._created.clear()

    def prune_parents(self) -> None:
        """Remove this set's ancestors that are now empty (e.g. a node's parent after its
        last CT stopped); a parent still in use is left alone. create() retries on a race."""
        for mnt in set(self._mounts.values()):
            parts = self._parts[:-1]
            while parts:
                try:
                    os.rmdir(os.path.join(mnt, *parts))
                except OSError:
                    break
                parts = parts[:-1]

    @staticmethod
    def _rmdir(path: str) -> None:
        for attempt in range(_RMDIR_RETRIES + 1):
            try:
                os.rmdir(path)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY) or attempt == _RMDIR_RETRIES:
                    raise RuntimeFailure(
                        f"cannot remove cgroup {path}: {_errmsg(exc)}",
                        hint="processes are still inside; kill_all() first",
                    ) from exc
                time.sleep(0.05)
