"""What a CT's root is fenced from, in one place: dropped capabilities and masked paths.

Both modes run in a user namespace (see ``idmap``), so capabilities already only act on the
CT's own namespaces; these tables are the second line, the same for privileged and
unprivileged CTs (compare LXC's ``lxc.cap.drop`` and ``proc:mixed``/``sys:ro``, and Docker's
masked and read-only paths). ``runtime`` mounts them from the node's side before the CT's
mount namespace exists, so the kernel locks them: the CT's root can neither unmount them nor
remount them read-write.
"""

from __future__ import annotations

import os

from vzbackup import constants as C

# Capability numbers (linux/capability.h) removed from the bounding set of the CT's init
# (and so of everything it starts).
CAPS_DROPPED: dict[str, int] = {
    "SYS_MODULE": 16,  # load kernel modules
    "SYS_RAWIO": 17,  # iopl, /dev/mem, raw SCSI
    "SYS_TIME": 25,  # set the clock
    "AUDIT_CONTROL": 30,  # audit rules
    "MAC_OVERRIDE": 32,  # bypass an LSM
    "MAC_ADMIN": 33,  # configure an LSM
    "SYSLOG": 34,  # the node's kernel log
    "WAKE_ALARM": 35,  # wake the node
    "BLOCK_SUSPEND": 36,  # keep the node from suspending
}

# /proc and /sys files that show or control the node: the node's /dev/null is bound over
# them, read-only. Missing ones are skipped.
MASKED_FILES = (
    "proc/sysrq-trigger",
    "proc/kcore",
    "proc/kmsg",
    "proc/timer_list",
    "proc/timer_stats",
    "proc/sched_debug",
    "proc/latency_stats",
    "proc/keys",
    "proc/key-users",
    "proc/kallsyms",
    "proc/config.gz",
)
# Directories hidden under an empty read-only tmpfs.
MASKED_DIRS = (
    "proc/acpi",
    "proc/scsi",
    "proc/asound",
    "proc/driver",
    "sys/firmware",
    "sys/kernel/security",
    "sys/devices/virtual/powercap",
)
# Bound read-only over themselves (proc is otherwise read-write; sysfs is mounted read-only).
READONLY_PATHS = ("proc/sys", "proc/bus", "proc/fs", "proc/irq")
# Below a read-only path, what the CT's own namespaces own stays writable.
WRITABLE_PATHS = ("proc/sys/net",)

# The node's device files bound into the CT's /dev (a tmpfs): name -> node path.
DEVICES = {
    "null": "/dev/null",
    "zero": "/dev/zero",
    "full": "/dev/full",
    "random": "/dev/random",
    "urandom": "/dev/urandom",
    "tty": "/dev/tty",
}


def node_file_binds() -> list[tuple[str, str]]:
    """(path in the CT, node file) of every node file bound into a CT: devices and masks.

    Deterministic for a kernel, so a dump and a restore agree on CRIU's external keys."""
    binds = [(f"dev/{name}", src) for name, src in DEVICES.items()]
    binds += [(p, "/dev/null") for p in MASKED_FILES if _on_node(p)]
    return binds


def _on_node(ct_path: str) -> bool:
    return os.path.exists("/" + ct_path)


def external_key(ct_path: str) -> str:
    """CRIU's external-mount key for a node file bound at *ct_path*."""
    return "vz_" + ct_path.strip("/").replace("/", "_").replace("-", "_")


def criu_dump_externals() -> list[str]:
    """CRIU ``external`` entries for the node's mounts in a CT: its files by key, and the
    MASKED_DIRS' empty tmpfs mounts too, or CRIU would run tar to dump each one's (empty)
    contents and again to restore it, ~15 ms a mount at each end of a migration's freeze."""
    paths = [p for p, _ in node_file_binds()] + [p for p in MASKED_DIRS if _on_node(p)]
    return [f"mnt[/{p}]:{external_key(p)}" for p in paths]


def criu_restore_externals() -> list[str]:
    """The keys of criu_dump_externals, bound to the node's files again; a masked directory
    to an empty one (``EMPTY_DIR``): the relock replaces the restored /proc and /sys trees,
    masks included, before any task runs (``refence``). Keys an image lacks are ignored
    (images of older dumps hold the masks' tmpfs contents)."""
    os.makedirs(C.EMPTY_DIR, mode=0o555, exist_ok=True)
    return ([f"mnt[{external_key(p)}]:{src}" for p, src in node_file_binds()]
            + [f"mnt[{external_key(p)}]:{C.EMPTY_DIR}" for p in MASKED_DIRS])
