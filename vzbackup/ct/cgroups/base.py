"""What both cgroup versions share: limits, file helpers and the :class:`CgroupSet` interface.

:meth:`CgroupSet.destroy` removes the leaf (and any sub-cgroups the container made below it),
then the intermediate directories that *this object's* :meth:`CgroupSet.create` made, if they
are empty; intermediates that already existed are never removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from vzbackup.errors import RuntimeFailure

DEFAULT_ROOT = "/sys/fs/cgroup"
ONLINE_CPUS = "/sys/devices/system/cpu/online"

CFS_PERIOD_US = 100_000
CPUUNITS_MIN = 8
CPUUNITS_MAX = 500_000

_RMDIR_RETRIES = 10  # x 50 ms
_KILL_WAIT = 5.0  # seconds kill_all waits for the set to empty


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


def _read_opt(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


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


class CgroupSet(ABC):
    """One container's cgroups across all controllers of one cgroup version.

    ``name`` is a path relative to each hierarchy's root, e.g. ``"vzbackup/101"``.
    A subclass supplies the mounts, the per-version files (:attr:`LIMIT_FILES`, freezer,
    memory usage) and the steps that differ: create, memory, CPU and the freezer.
    """

    version: ClassVar[int]
    # read_limits() key -> (controller, file)
    LIMIT_FILES: ClassVar[dict[str, tuple[str, str]]]
    MEMORY_USAGE: ClassVar[str]  # file of the memory controller
    FREEZER: ClassVar[tuple[str, str, str, str]]  # controller, file, frozen, thawed

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
        self._mounts: dict[str, str] = self._find_mounts()  # controller -> mount point
        self._created: list[str] = []  # intermediate dirs made by create(), outermost first

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, root={self.root!r})"

    # -- what a version supplies

    @abstractmethod
    def _find_mounts(self) -> dict[str, str]:
        """Controller -> mount point of its hierarchy."""

    @abstractmethod
    def _path(self, controller: str) -> str | None:
        """This set's directory for *controller*, or None if it isn't mounted."""

    @abstractmethod
    def _create(self) -> None:
        """Make the directories and their per-version setup (devices, cpuset, controllers)."""

    @abstractmethod
    def _memory(self, memory: int | None, swap: int | None) -> None: ...

    @abstractmethod
    def _cpulimit(self, percent: int) -> None: ...

    @abstractmethod
    def _cpuunits(self, units: int) -> None: ...

    @abstractmethod
    def _available_cpus(self, cpus_file: str) -> str | None:
        """Cpulist the parent lets this set use, or None to fall back to online CPUs."""

    @abstractmethod
    def _pids_top(self) -> str | None:
        """The directory whose subtree holds every process of the set."""

    # -- paths

    def controller_paths(self) -> dict[str, str]:
        """Controller -> absolute directory of this set (v2: ``{"unified": path}``)."""
        return {ctl: os.path.join(mnt, self.name) for ctl, mnt in sorted(self._mounts.items())}

    DELEGATED_FILES = ("cgroup.procs", "cgroup.threads", "cgroup.subtree_control")

    def delegate(self, uid: int, gid: int) -> None:
        """Hand the set's cgroup2 subtree (what the CT sees on /sys/fs/cgroup) to the CT's
        root, so systemd inside can manage it: directories and the files of delegation."""
        top = self.controller_paths().get("unified")
        if not top or not os.path.isdir(top):
            return
        for d in _walk_dirs(top):
            os.chown(d, uid, gid)
            for f in self.DELEGATED_FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.chown(os.path.join(d, f), uid, gid)

    def _dirs(self) -> list[str]:
        """Distinct leaf directories (v1 co-mounted controllers share one)."""
        return sorted(set(self.controller_paths().values()))

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
        """Make the cgroup in every controller (idempotent); see the module docstring."""
        if not self._mounts:
            raise RuntimeFailure(f"no cgroup controllers mounted under {self.root}")
        for attempt in range(3):
            try:
                self._create()
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

    # -- limits

    def apply(self, limits: Limits) -> None:
        """Write the limits that are not None (0 = unlimited for memory, pids, cpulimit)."""
        if limits.memory_bytes is not None or limits.swap_bytes is not None:
            self._memory(limits.memory_bytes, limits.swap_bytes)
        if limits.cpus is not None:
            self._cpus(limits.cpus)
        if limits.cpulimit_percent is not None:
            self._cpulimit(limits.cpulimit_percent)
        if limits.cpuunits is not None:
            self._cpuunits(limits.cpuunits)
        if limits.pids_max is not None:
            value = "max" if limits.pids_max == 0 else str(limits.pids_max)
            _write(self._need("pids", "pids.max"), value)

    def _cpus(self, n: int) -> None:
        path = self._need("cpuset", "cpuset.cpus")
        avail = _parse_cpulist(self._available_cpus(path) or _read(ONLINE_CPUS))
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
        return {
            key: _read_opt(self._file(ctl, fname)) or ""
            for key, (ctl, fname) in self.LIMIT_FILES.items()
        }

    def memory_usage(self) -> int | None:
        """Current memory use in bytes, or None without a memory controller."""
        value = _read_opt(self._file("memory", self.MEMORY_USAGE))
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
        top = self._pids_top()
        found: set[int] = set()
        if not top or not os.path.isdir(top):
            return []
        for d in _walk_dirs(top):
            text = _read_opt(os.path.join(d, "cgroup.procs")) or ""
            found.update(int(x) for x in text.split() if x.isdigit())
        return sorted(found)

    # -- freezer

    def _freezer_file(self) -> str:
        return self._need(*self.FREEZER[:2])

    def freeze(self, timeout: float = 10.0) -> None:
        """Freeze every process and wait until the kernel reports the set frozen.

        On timeout the set is thawed again and RuntimeFailure is raised.
        """
        path = self._freezer_file()
        _write(path, self.FREEZER[2])
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
            self._freeze_again(path)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    @abstractmethod
    def _freeze_again(self, path: str) -> None:
        """Called while a freeze is still in progress (v1 retries the stragglers)."""

    def thaw(self) -> None:
        """Let the processes run again."""
        _write(self._freezer_file(), self.FREEZER[3])

    @abstractmethod
    def is_frozen(self) -> bool:
        """True if the whole set is frozen (False if there is no freezer)."""

    def kill_all(self) -> None:
        """SIGKILL every process in the set and wait (briefly) until it is empty."""
        can_freeze = self._file(*self.FREEZER[:2]) is not None
        for _ in range(5):
            if not self.pids():
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
        self._wait_empty()

    def _wait_empty(self) -> None:
        deadline = time.monotonic() + _KILL_WAIT
        while pids := self.pids():
            if time.monotonic() >= deadline:
                raise RuntimeFailure(f"processes {pids} in cgroup {self.name} survived SIGKILL")
            time.sleep(0.02)

    # -- destroy

    def destroy(self) -> None:
        """Remove the set (see the module docstring); tolerate it being gone already.

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
