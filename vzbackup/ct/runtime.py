"""Start a container init in fresh pid/mount/uts/ipc/net/cgroup namespaces, pivoted into VE_ROOT.

``spawn`` forks twice: the first child unshares the namespaces and forks the CT's PID 1,
then exits, so PID 1 is re-parented to the calling supervisor (a subreaper). PID 1 becomes
a session leader inside the CT (CRIU dumps no session led from outside), builds /proc,
/sys (ro), /sys/fs/cgroup (the CT's own cgroup2 subtree, what systemd expects), /run and
/run/lock (tmpfs), a minimal /dev with devpts and the console, waits for the supervisor's
"go" (sent once the network is in place), pivots into the root and execs init with the
console as its stdio and controlling tty.

The console is pty 0 of the CT's own devpts instance, bound onto /dev/console (what
systemd's console-getty and busybox's init use); its master goes to the supervisor over a
unix socket. Being a pty of the CT's devpts, CRIU dumps it as an orphan slave and hands a
new master back on restore.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from vzbackup import syscalls as S
from vzbackup.config.ct import BindMount
from vzbackup.errors import RuntimeFailure

NAMESPACES = (
    S.CLONE_NEWNS
    | S.CLONE_NEWUTS
    | S.CLONE_NEWIPC
    | S.CLONE_NEWNET
    | S.CLONE_NEWPID
    | S.CLONE_NEWCGROUP
)
CONSOLE_SIZE = (24, 80)  # rows, columns until someone attaches and resizes
# (relative path, tmpfs options) mounted in this order
RUN_TMPFS = (
    ("run", "mode=755,size=20%"),
    ("run/lock", "mode=1777,size=5m"),
)
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

    def __init__(self, pid: int, go_w: int, err_r: int, console: int) -> None:
        self.pid = pid
        self.console = console  # master of the CT's console pty
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
        with contextlib.suppress(OSError):
            os.close(self.console)
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
    con_parent, con_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    first = os.fork()
    if first == 0:  # intermediate child
        try:
            os.close(pid_r)
            os.close(go_w)
            os.close(err_r)
            con_parent.close()
            os.setsid()
            if spec.attach:
                spec.attach(os.getpid())
            S.unshare(NAMESPACES)
            init = os.fork()
            if init == 0:
                os.close(pid_w)
                _init_child(spec, go_r, err_w, con_child)  # never returns
            os.write(pid_w, str(init).encode())
            os._exit(0)
        except BaseException:
            with contextlib.suppress(OSError):
                os.write(err_w, traceback.format_exc().encode())
            os._exit(1)
    os.close(pid_w)
    os.close(go_r)
    os.close(err_w)
    con_child.close()
    raw = _read_all(pid_r)
    _, status = os.waitpid(first, 0)
    if not raw.isdigit() or status != 0:
        con_parent.close()
        msg = _read_all(err_r)
        raise RuntimeFailure(
            f"could not create the container's namespaces: {msg.strip() or status}"
        )
    proc = InitProcess(int(raw), go_w, err_r, -1)
    with con_parent:
        _, fds, _, _ = socket.recv_fds(con_parent, 1, 1)
    if not fds:
        proc.abort()
        raise RuntimeFailure(f"container init failed: {_read_all(err_r).strip()}")
    proc.console = fds[0]
    return proc


def _init_child(spec: InitSpec, go_r: int, err_w: int, con: socket.socket) -> None:
    try:
        S.set_process_name("vzinit")
        os.setsid()  # PID 1 leads its own session inside the CT, whatever init does
        root = spec.root
        S.mount("none", "/", None, S.MS_REC | S.MS_PRIVATE)
        _prepare_fs(root)
        for b in spec.binds:
            _bind(root, b)
        S.sethostname(spec.hostname or "localhost")
        master = _make_console(root)
        socket.send_fds(con, [b"c"], [master])
        os.close(master)
        con.close()
        if os.read(go_r, 1) != b"g":
            os._exit(1)
        os.close(go_r)
        os.chdir(root)
        S.pivot_root(".", ".")
        S.umount(".", S.MNT_DETACH)
        os.chdir("/")
        console = os.open("/dev/console", os.O_RDWR)
        S.set_controlling_tty(console)
        for fd in (0, 1, 2):
            os.dup2(console, fd)
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


def _make_console(root: str) -> int:
    """Pty 0 of the CT's devpts bound onto /dev/console; returns its master."""
    master, index = S.open_pty(f"{root}/dev/pts/ptmx")
    S.set_winsize(master, *CONSOLE_SIZE)
    S.mount(f"{root}/dev/pts/{index}", f"{root}/dev/console", None, S.MS_BIND)
    return master


def _prepare_fs(root: str) -> None:
    """Mount /proc, /sys (read-only) with the CT's cgroup2 subtree, /run, /run/lock, and a
    tmpfs /dev with devpts and /dev/shm inside *root*."""
    for d in ("proc", "sys", "dev", "run"):
        _mkdir_in(root, d)
    nosuid = S.MS_NOSUID | S.MS_NODEV | S.MS_NOEXEC
    S.mount("proc", f"{root}/proc", "proc", nosuid)
    S.mount("sysfs", f"{root}/sys", "sysfs", nosuid | S.MS_RDONLY)
    # The CT's cgroup namespace root, read-write: systemd runs in unified mode on v1-hybrid
    # and v2 hosts alike (the node's v1 hierarchies stay out of the CT).
    S.mount("cgroup2", f"{root}/sys/fs/cgroup", "cgroup2", nosuid)
    for rel, opts in RUN_TMPFS:
        _mkdir_in(root, rel)
        S.mount("tmpfs", f"{root}/{rel}", "tmpfs", nosuid, opts)
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
    open(f"{dev}/console", "w").close()  # the mount point of the console pty


def _mkdir_in(root: str, rel: str) -> None:
    """Create directory *rel* under *root*, refusing a symlink the CT may have planted."""
    path = os.path.join(root, rel)
    if os.path.islink(path):
        raise RuntimeFailure(f"/{rel} in the CT is a symlink; it must be a directory")
    os.makedirs(path, exist_ok=True)
