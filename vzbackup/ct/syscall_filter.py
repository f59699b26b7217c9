"""The seccomp filter of every CT task: a deny-list in the spirit of LXC's and Docker's.

Built with libseccomp's own Python bindings (Debian's ``python3-seccomp``, made importable in
the venv by ``scripts/setup.sh`` like pycriu) rather than hand-written BPF: libseccomp maps
names to numbers per architecture and adds the compat ABIs (i386 and x32 on x86_64), so a
32-bit ``int 0x80`` call can't slip past a 64-bit-only table. The PyPI alternatives are a
ctypes clone unmaintained since 2021 (pyseccomp) and a personal fork.

The filter is loaded into the CT's init just before it execs, and into every ``exec`` and
``enter`` before nsenter joins the CT; children inherit it and can't remove it. CRIU dumps and
restores seccomp filters with the tasks, so a checkpoint, restore, backup with state or
migration keeps it. It is loaded without ``no_new_privs`` (we hold CAP_SYS_ADMIN, in the
CT's user namespace for init), so setuid programs inside the CT keep working.

Not here, on purpose:

- ``reboot``: inside a pid namespace the kernel turns reboot(2) into the end of the CT's init
  (SIGHUP for restart, SIGINT for halt and power off, EINVAL for kexec and the rest); it can't
  touch the node, and it is how ``reboot`` inside a CT works (the supervisor starts a CT
  whose init ended by SIGHUP again).
- ``mount``: the file system type is a string in the caller's memory, which seccomp can't read,
  so devtmpfs, cgroupfs or proc mounts can't be told apart here. The user namespace (no
  devtmpfs, no new cgroup v1 hierarchies, no release_agent outside the initial cgroup
  namespace), read-only /sys and /proc/sys, and the device cgroup fence those.
- ``adjtimex``/``clock_adjtime``: the same call reads the clock state (timedatectl, ntpq) and
  sets it; the capability bounding set (no CAP_SYS_TIME) refuses the setting.
"""

from __future__ import annotations

import errno
import platform
from dataclasses import dataclass
from typing import Any

from vzbackup.errors import DependencyError


@dataclass(frozen=True)
class Deny:
    syscalls: tuple[str, ...]
    errno: int
    why: str


DENY = (
    Deny(("kexec_load", "kexec_file_load"), errno.EPERM, "boot another kernel on the node"),
    Deny(
        ("init_module", "finit_module", "delete_module"),
        errno.EPERM,
        "load or unload node kernel modules",
    ),
    Deny(
        ("open_by_handle_at",),
        errno.EPERM,
        "open a node file by its handle, past the CT's root (the 'shocker' escape)",
    ),
    Deny(("swapon", "swapoff"), errno.EPERM, "change the node's swap"),
    Deny(("acct",), errno.EPERM, "switch process accounting, a node-wide setting"),
    Deny(("settimeofday", "clock_settime"), errno.EPERM, "set the node's clock"),
    Deny(("iopl", "ioperm"), errno.EPERM, "raw I/O port access"),
    Deny(
        ("bpf",),
        errno.EPERM,
        "load BPF programs or detach the CT's device program (also keeps systemd's "
        "per-unit BPF programs, which CRIU can't dump, out of checkpointable CTs)",
    ),
    Deny(("perf_event_open",), errno.EPERM, "profile the node's kernel and other tenants"),
    Deny(
        ("keyctl", "add_key", "request_key"),
        errno.ENOSYS,  # as LXC: callers treat it as "no keyring support" and carry on
        "kernel keyrings are not namespaced",
    ),
    Deny(("lookup_dcookie", "uselib"), errno.EPERM, "obsolete interfaces"),
)

# Compat ABIs a native process can also call (libseccomp arch names).
COMPAT_ARCHES = {"x86_64": ("X86", "X32"), "aarch64": ("ARM",)}


def denied() -> dict[str, int]:
    """Syscall name -> errno the filter answers with."""
    return {name: rule.errno for rule in DENY for name in rule.syscalls}


def _seccomp() -> Any:
    try:
        import seccomp  # libseccomp's bindings (python3-seccomp)
    except ImportError as exc:
        raise DependencyError(
            "libseccomp's Python bindings are not importable",
            hint="run scripts/setup.sh (installs python3-seccomp and links it into the venv)",
        ) from exc
    return seccomp


def build() -> Any:
    """A ``seccomp.SyscallFilter`` with the deny-list; ``.load()`` it in the task to confine."""
    sc = _seccomp()
    filt = sc.SyscallFilter(defaction=sc.ALLOW)
    filt.set_attr(sc.Attr.CTL_NNP, 0)
    for arch in COMPAT_ARCHES.get(platform.machine(), ()):
        filt.add_arch(getattr(sc.Arch, arch))
    for name, err in denied().items():
        filt.add_rule(sc.ERRNO(err), name)
    return filt
