"""Start a container init in fresh pid/mount/uts/ipc/net namespaces, pivoted into VE_ROOT.

``spawn`` forks twice: the first child unshares the namespaces and forks the CT's PID 1,
then exits, so PID 1 is re-parented to the calling supervisor (a subreaper). PID 1 builds
/proc, /sys (ro), a minimal /dev with devpts, waits for the supervisor's "go" (sent once
the network is in place), pivots into the root and execs init.
"""

from __future__ import annotations

import contextlib
import os
import stat
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from vzbackup import syscalls as S
from vzbackup.config.ct import BindMount
from vzbackup.errors import RuntimeFailure

NAMESPACES = S.CLONE_NEWNS | S.CLONE_NEWUTS | S.CLONE_NEWIPC | S.CLONE_NEWNET | S.CLONE_NEWPID
INIT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "TERM": "linux",
    "HOME": "/root",
    "container": "vzbackup",
}
# (name, kind, major, minor, mode)
DEVICES = [
    ("null", stat.S_IFCHR, 1, 3, 0o666),
    ("zero", stat.S_IFCHR, 1, 5, 0o666),
    ("full", stat.S_IFCHR, 1, 7, 0o666),
    ("random", stat.S_IFCHR, 1, 8, 0o666),
    ("urandom", stat.S_IFCHR, 1, 9, 0o666),
    ("tty", stat.S_IFCHR, 5, 0, 0o666),
]
DEV_LINKS = {
    "ptmx": "pts/ptmx",
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
}


@dataclass
class InitSpec:
    root: str  # mounted VE_ROOT
    hostname: str
    argv: list[str] = field(default_factory=lambda: ["/sbin/init"])
    attach: Callable[[int], None] | None = None  # puts a pid into the CT's cgroups
    binds: list[BindMount] = field(default_factory=list)


class InitProcess:
    """Handle on a spawned, not yet started, container init."""

    def __init__(self, pid: int, go_w: int, err_r: int) -> None:
        self.pid = pid
        self._go_w = go_w
        self._err_r = err_r

    def go(self) -> None:
        """Let init pivot and exec; raises RuntimeFailure with the child's error if it failed."""
        os.write(self._go_w, b"g")
        os.close(self._go_w)
        msg = _read_all(self._err_r)
        if msg:
            raise RuntimeFailure(f"container init failed: {msg.strip()}")

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._go_w)
        with contextlib.suppress(OSError):
            os.close(self._err_r)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, 9)


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        b = os.read(fd, 4096)
        if not b:
            break
        chunks.append(b)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def spawn(spec: InitSpec) -> InitProcess:
    """Create the namespaces and PID 1; returns once PID 1 waits for ``go``."""
    pid_r, pid_w = os.pipe()
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    first = os.fork()
    if first == 0:  # intermediate child
        try:
            os.close(pid_r)
            os.close(go_w)
            os.close(err_r)
            os.setsid()
            if spec.attach:
                spec.attach(os.getpid())
            S.unshare(NAMESPACES)
            init = os.fork()
            if init == 0:
                os.close(pid_w)
                _init_child(spec, go_r, err_w)  # never returns
            os.write(pid_w, str(init).encode())
            os._exit(0)
        except BaseException:
            with contextlib.suppress(OSError):
                os.write(err_w, traceback.format_exc().encode())
            os._exit(1)
    os.close(pid_w)
    os.close(go_r)
    os.close(err_w)
    raw = _read_all(pid_r)
    _, status = os.waitpid(first, 0)
    if not raw.isdigit() or status != 0:
        msg = _read_all(err_r)
        raise RuntimeFailure(
            f"could not create the container's namespaces: {msg.strip() or status}"
        )
    return InitProcess(int(raw), go_w, err_r)


def _init_child(spec: InitSpec, go_r: int, err_w: int) -> None:
    try:
        S.set_process_name("vzinit")
        root = spec.root
        S.mount("none", "/", None, S.MS_REC | S.MS_PRIVATE)
        _prepare_fs(root)
        for b in spec.binds:
            _bind(root, b)
        S.sethostname(spec.hostname or "localhost")
        if os.read(go_r, 1) != b"g":
            os._exit(1)
        os.close(go_r)
        os.chdir(root)
        S.pivot_root(".", ".")
        S.umount(".", S.MNT_DETACH)
        os.chdir("/")
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, err_w)
        os.closerange(err_w + 1, 65536)
        os.execve(spec.argv[0], spec.argv, INIT_ENV)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.write(err_w, f"{type(e).__name__}: {e}".encode())
        os._exit(127)


def _bind(root: str, b: BindMount) -> None:
    """Bind host dir *b.host* at *b.ct* inside the root, refusing symlinks out of the CT."""
    target = os.path.join(root, b.ct.lstrip("/"))
    os.makedirs(target, exist_ok=True)
    if os.path.realpath(target) != os.path.normpath(target):
        raise RuntimeFailure(f"bind mount target {b.ct} is a symlink inside the CT")
    S.mount(b.host, target, None, S.MS_BIND)
    if b.readonly:
        S.mount(b.host, target, None, S.MS_BIND | S.MS_REMOUNT | S.MS_RDONLY)


def _prepare_fs(root: str) -> None:
    """Mount /proc, /sys (read-only), a tmpfs /dev with devpts and /dev/shm inside *root*."""
    for d in ("proc", "sys", "dev"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    nosuid = S.MS_NOSUID | S.MS_NODEV | S.MS_NOEXEC
    S.mount("proc", f"{root}/proc", "proc", nosuid)
    S.mount("sysfs", f"{root}/sys", "sysfs", nosuid | S.MS_RDONLY)
    dev = f"{root}/dev"
    S.mount("tmpfs", dev, "tmpfs", S.MS_NOSUID | S.MS_NOEXEC, "mode=755,size=4m")
    for name, kind, major, minor, mode in DEVICES:
        os.mknod(f"{dev}/{name}", kind | mode, os.makedev(major, minor))
        os.chmod(f"{dev}/{name}", mode)
    os.mkdir(f"{dev}/pts", 0o755)
    S.mount(
        "devpts",
        f"{dev}/pts",
        "devpts",
        S.MS_NOSUID | S.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
    )
    for name, target in DEV_LINKS.items():
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(f"{dev}/shm", 0o1777)
    S.mount("shm", f"{dev}/shm", "tmpfs", nosuid, "mode=1777,size=65536k")
    # /dev/console must not reach the host's console: it is the CT's own /dev/null.
    open(f"{dev}/console", "w").close()
    S.mount(f"{dev}/null", f"{dev}/console", None, S.MS_BIND)
