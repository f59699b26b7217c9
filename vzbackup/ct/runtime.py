"""Start a container init in a user namespace with its own pid/mount/uts/ipc/net/cgroup
namespaces, pivoted into VE_ROOT.

Every CT gets a user namespace: an unprivileged CT maps its ids onto the node's IDMAP_BASE..,
a privileged one is identity-mapped (real root file ownership, capabilities relative to the
CT's namespaces). The steps, each in the process that has the right to do it:

1. an intermediate child (node root) joins the CT's cgroups and makes a mount namespace of
   the node's user namespace, "M0", where it prepares the CT's tree: /dev (a tmpfs with the
   node's device files bound in), BINDMOUNTs;
2. a second child unshares the user namespace (the node writes its id maps), becomes its
   root and creates the uts/ipc/net/pid/cgroup namespaces inside it, then forks PID 1;
3. a helper in M0 that joined the CT's pid and net namespaces mounts /proc and /sys (ro)
   for them and the fences of ``fencing`` (masked files and directories, read-only
   /proc/sys except net);
4. PID 1 becomes a session leader inside the CT (CRIU dumps no session led from outside)
   and unshares its own mount namespace: a copy of M0 made from the CT's user namespace,
   so the kernel locks every mount of step 1 and 3 (no umount, no remount rw, no fresh
   proc/sysfs that would reveal what they hide). It mounts what the CT owns: devpts,
   /dev/shm, /sys/fs/cgroup (the CT's own cgroup2 subtree, what systemd expects), /run and
   /run/lock (tmpfs), and the console; waits for the supervisor's "go" (sent once the
   network is in place), pivots into the root, drops ``fencing.CAPS_DROPPED`` from its
   bounding set and execs init with the console as its stdio and controlling tty.

PID 1 is re-parented to the calling supervisor (a subreaper).

The console is pty 0 of the CT's own devpts instance, bound onto /dev/console (what
systemd's console-getty and busybox's init use); its master goes to the supervisor over a
unix socket. Being a pty of the CT's devpts, CRIU dumps it as an orphan slave and hands a
new master back on restore.
"""

from __future__ import annotations

import contextlib
import os
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vzbackup import syscalls as S
from vzbackup.config.ct import BindMount
from vzbackup.ct import fencing
from vzbackup.ct.idmap import IDENTITY, IdMap
from vzbackup.errors import RuntimeFailure

# The user namespace comes first; these are created inside it, so the CT's root owns them.
NAMESPACES = S.CLONE_NEWUTS | S.CLONE_NEWIPC | S.CLONE_NEWNET | S.CLONE_NEWPID | S.CLONE_NEWCGROUP
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
DEV_LINKS = {
    "ptmx": "pts/ptmx",
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
}
NOSUID = S.MS_NOSUID | S.MS_NODEV | S.MS_NOEXEC
DEVPTS_OPTIONS = "newinstance,ptmxmode=0666,mode=0620,gid=5"


@dataclass
class InitSpec:
    root: str  # mounted VE_ROOT
    hostname: str
    argv: list[str] = field(default_factory=lambda: ["/sbin/init"])
    attach: Callable[[int], None] | None = None  # puts a pid into the CT's cgroups
    binds: list[BindMount] = field(default_factory=list)
    idmap: IdMap = IDENTITY
    syscall_filter: Any = None  # a seccomp.SyscallFilter loaded just before exec
    env: dict[str, str] = field(default_factory=dict)  # added to INIT_ENV


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


def _wait_byte(fd: int, what: str) -> None:
    if os.read(fd, 1) != b"1":
        raise RuntimeFailure(f"container setup: {what} did not happen")
    os.close(fd)


def _child(fn: Callable[[], None], err_w: int) -> int:
    """Fork; the child runs *fn* and exits 0, or reports its error on *err_w* and exits 1."""
    pid = os.fork()
    if pid:
        return pid
    try:
        fn()
        os._exit(0)
    except BaseException:
        with contextlib.suppress(OSError):
            os.write(err_w, traceback.format_exc().encode())
        os._exit(1)


def _check_exit(pid: int, what: str) -> None:
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeFailure(f"container setup: {what} failed (status {status:#x})")


def spawn(spec: InitSpec) -> InitProcess:
    """Create the namespaces and PID 1; returns once PID 1 waits for ``go``."""
    pid_r, pid_w = os.pipe()
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    con_parent, con_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def intermediate() -> None:
        os.close(pid_r)
        os.close(go_w)
        os.close(err_r)
        con_parent.close()
        os.setsid()
        if spec.attach:
            spec.attach(os.getpid())
        S.unshare(S.CLONE_NEWNS)
        S.mount("none", "/", None, S.MS_REC | S.MS_PRIVATE)
        _prepare_node_side(spec)
        root_fd = os.open(spec.root, os.O_PATH | os.O_DIRECTORY)
        init = _create_ct_namespaces(spec, _Fds(root_fd, go_r, err_w, con_child.fileno()))
        os.close(go_r)
        _mount_for_ct(spec.root, init, err_w)
        os.write(pid_w, str(init.pid).encode())
        os.write(init.mounted_w, b"1")

    first = _child(intermediate, err_w)
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
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, 9)
        msg = _read_all(err_r).strip()
        proc.abort()
        raise RuntimeFailure(f"container init failed: {msg}")
    proc.console = fds[0]
    return proc


@dataclass
class _Fds:
    """What PID 1 inherits: VE_ROOT (O_PATH), "go", errors, the console socket."""

    root: int
    go: int
    err: int
    console: int


@dataclass
class _Init:
    pid: int
    mounted_w: int  # one byte: the node has mounted /proc, /sys and the fences


def _create_ct_namespaces(spec: InitSpec, fds: _Fds) -> _Init:
    """Fork the user namespace's creator, map its ids, and get the PID 1 it forks."""
    mapped_r, mapped_w = os.pipe()
    unshared_r, unshared_w = os.pipe()
    mounted_r, mounted_w = os.pipe()
    pid_r, pid_w = os.pipe()

    def creator() -> None:
        for fd in (mapped_w, unshared_r, mounted_w, pid_r):
            os.close(fd)
        S.unshare(S.CLONE_NEWUSER)
        os.write(unshared_w, b"1")
        _wait_byte(mapped_r, "the id mapping")
        os.setgroups([])
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
        S.unshare(NAMESPACES)
        init = os.fork()
        if init == 0:
            os.close(pid_w)
            _init_child(spec, fds, mounted_r)  # never returns
        os.write(pid_w, str(init).encode())

    pid = _child(creator, fds.err)
    for fd in (mapped_r, unshared_w, mounted_r, pid_w):
        os.close(fd)
    try:
        _wait_byte(unshared_r, "the user namespace")
        for f in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{f}", "w") as fh:
                fh.write(spec.idmap.proc_map())
        os.write(mapped_w, b"1")
        os.close(mapped_w)
        raw = _read_all(pid_r)
        _check_exit(pid, "creating the namespaces")
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
        raise
    return _Init(int(raw), mounted_w)


def _prepare_node_side(spec: InitSpec) -> None:
    """Step 1, in M0: the node's device files bound over files of the CT's /dev, and the
    BINDMOUNTs. /dev is the private area's own directory, not a tmpfs (CRIU restores a
    tmpfs's content with tar inside the CT's user namespace, where mknod is refused), bound
    onto itself: systemd mounts devtmpfs on a /dev that isn't a mount point (refused)."""
    root, owner = spec.root, spec.idmap.root
    for d in ("proc", "sys", "dev", "run", "dev/pts", "dev/shm"):
        _mkdir_in(root, d, owner)
    dev = f"{root}/dev"
    S.mount(dev, dev, None, S.MS_BIND)
    for name, target in DEV_LINKS.items():
        if not os.path.lexists(f"{dev}/{name}"):
            os.symlink(target, f"{dev}/{name}")
            os.chown(f"{dev}/{name}", owner, owner, follow_symlinks=False)
    for ct_path, node_file in fencing.node_file_binds():
        if ct_path.startswith("dev/"):
            _mount_point_file(f"{root}/{ct_path}", owner)
            _bind_file(node_file, f"{root}/{ct_path}", readonly=False)
    _mount_point_file(f"{dev}/console", owner)  # for the console pty
    for b in spec.binds:
        _bind(root, b)


def _mount_point_file(path: str, owner: int) -> None:
    """Make *path* a file to bind over (a device node from a template is fine), replacing a
    symlink the CT may have planted."""
    if os.path.islink(path):
        os.unlink(path)
    if not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        os.fchown(fd, owner, owner)
        os.close(fd)


def _mount_for_ct(root: str, init: _Init, err_w: int) -> None:
    """Step 3: a child in the CT's pid and net namespaces mounts /proc, /sys and the fences."""
    for ns in ("pid", "net"):
        fd = os.open(f"/proc/{init.pid}/ns/{ns}", os.O_RDONLY)
        try:
            S.setns(fd)
        finally:
            os.close(fd)
    helper = _child(lambda: _mount_proc_sys(root), err_w)
    _check_exit(helper, "mounting /proc and /sys")


def _mount_proc_sys(root: str) -> None:
    S.mount("proc", f"{root}/proc", "proc", NOSUID)
    S.mount("sysfs", f"{root}/sys", "sysfs", NOSUID | S.MS_RDONLY)
    for ct_path, node_file in fencing.node_file_binds():
        if not ct_path.startswith("dev/") and os.path.exists(f"{root}/{ct_path}"):
            _bind_file(node_file, f"{root}/{ct_path}", readonly=True)
    for ct_path in fencing.MASKED_DIRS:
        target = f"{root}/{ct_path}"
        if os.path.isdir(target):
            S.mount("tmpfs", target, "tmpfs", NOSUID | S.MS_RDONLY, "mode=555,size=0")
    for ct_path in fencing.READONLY_PATHS:
        _rebind(f"{root}/{ct_path}", readonly=True)
    for ct_path in fencing.WRITABLE_PATHS:
        _rebind(f"{root}/{ct_path}", readonly=False)


def _rebind(path: str, *, readonly: bool) -> None:
    if not os.path.isdir(path):
        return
    S.mount(path, path, None, S.MS_BIND | S.MS_REC)
    S.mount(path, path, None, S.MS_BIND | S.MS_REMOUNT | NOSUID | (S.MS_RDONLY if readonly else 0))


def _bind_file(source: str, target: str, *, readonly: bool) -> None:
    S.mount(source, target, None, S.MS_BIND)
    flags = S.MS_BIND | S.MS_REMOUNT | S.MS_NOSUID | S.MS_NOEXEC
    S.mount(source, target, None, flags | (S.MS_RDONLY if readonly else 0))


def _init_child(spec: InitSpec, fds: _Fds, mounted_r: int) -> None:
    """Step 4: PID 1 of the CT.

    It works from *fds.root*, opened by the node: the path to VE_ROOT may not be searchable
    by the CT's root."""
    try:
        _close_except({fds.root, fds.go, fds.err, fds.console, mounted_r})
        S.set_process_name("vzinit")
        os.setsid()  # PID 1 leads its own session inside the CT, whatever init does
        _wait_byte(mounted_r, "mounting /proc and /sys")
        os.fchdir(fds.root)  # unshare moves the cwd to its copy in the new namespace
        S.unshare(S.CLONE_NEWNS)  # a copy made from the CT's user namespace: mounts locked
        os.close(fds.root)
        root_fd = os.open(".", os.O_PATH | os.O_DIRECTORY)
        S.sethostname(spec.hostname or "localhost")
        # pivot_root refuses a locked new root: a recursive copy of it mounted over it has an
        # unlocked top, and its copies of the node's mounts stay locked.
        os.fchdir(S.clone_tree_over(root_fd))
        _mount_ct_owned()
        master = _make_console()
        con = socket.socket(fileno=fds.console)
        socket.send_fds(con, [b"c"], [master])
        os.close(master)
        con.close()
        if os.read(fds.go, 1) != b"g":
            os._exit(1)
        os.close(fds.go)
        S.pivot_root(".", ".")
        S.umount(".", S.MNT_DETACH)
        os.chdir("/")
        console = os.open("/dev/console", os.O_RDWR)
        S.set_controlling_tty(console)
        for fd in (0, 1, 2):
            os.dup2(console, fd)
        _close_except({fds.err})
        for cap in fencing.CAPS_DROPPED.values():
            S.capbset_drop(cap)
        if spec.syscall_filter is not None:
            spec.syscall_filter.load()
        os.execve(spec.argv[0], spec.argv, {**INIT_ENV, **spec.env})
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.write(fds.err, f"{type(e).__name__}: {e}".encode())
        os._exit(127)


def _mount_ct_owned() -> None:
    """Mounts of the CT's own (relative to the new root, the cwd): the CT may change them."""
    S.mount("devpts", "dev/pts", "devpts", S.MS_NOSUID | S.MS_NOEXEC, DEVPTS_OPTIONS)
    S.mount("shm", "dev/shm", "tmpfs", NOSUID, "mode=1777,size=65536k")
    # The CT's cgroup namespace root, read-write: systemd runs in unified mode on v1-hybrid
    # and v2 hosts alike (the node's v1 hierarchies stay out of the CT).
    S.mount("cgroup2", "sys/fs/cgroup", "cgroup2", NOSUID)
    for rel, opts in RUN_TMPFS:
        os.makedirs(rel, exist_ok=True)  # run/lock: inside the fresh run tmpfs
        S.mount("tmpfs", rel, "tmpfs", NOSUID, opts)


def _make_console() -> int:
    """Pty 0 of the CT's devpts bound onto /dev/console; returns its master."""
    master, index = S.open_pty("dev/pts/ptmx")
    S.set_winsize(master, *CONSOLE_SIZE)
    S.mount(f"dev/pts/{index}", "dev/console", None, S.MS_BIND)
    return master


def _mkdir_in(root: str, rel: str, owner: int) -> None:
    """Create directory *rel* under *root* for the CT's root (node id *owner*), refusing a
    symlink the CT may have planted."""
    path = os.path.join(root, rel)
    if os.path.islink(path):
        raise RuntimeFailure(f"/{rel} in the CT is a symlink; it must be a directory")
    if not os.path.isdir(path):
        os.makedirs(path, 0o755)
        os.chown(path, owner, owner)


def _close_except(keep: set[int]) -> None:
    """Close every fd above 2 but those in *keep*."""
    low = 3
    for fd in [*sorted(keep), 65536]:
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1


def _bind(root: str, b: BindMount) -> None:
    """Bind host dir *b.host* at *b.ct* inside the root, refusing symlinks out of the CT."""
    target = os.path.join(root, b.ct.lstrip("/"))
    os.makedirs(target, exist_ok=True)
    if os.path.realpath(target) != os.path.normpath(target):
        raise RuntimeFailure(f"bind mount target {b.ct} is a symlink inside the CT")
    S.mount(b.host, target, None, S.MS_BIND)
    if b.readonly:
        S.mount(b.host, target, None, S.MS_BIND | S.MS_REMOUNT | S.MS_RDONLY)
