"""Thin ctypes wrappers for the Linux calls Python 3.11's os module lacks."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import platform
import signal
import struct
from collections.abc import Iterator

# the process's own symbols include libc (find_library("c") would run ldconfig: ~10 ms)
_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWCGROUP = 0x02000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
# syscall numbers differ per architecture (-1: unknown here, the call fails with ENOSYS);
# open_tree and move_mount came after the tables were unified: the same everywhere
_ARCH = platform.machine()
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(_ARCH, -1)
SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(_ARCH, -1)
SYS_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}.get(_ARCH, -1)
IOPRIO_WHO_PROCESS = 1
IOPRIO_CLASS_BE, IOPRIO_CLASS_IDLE = 2, 3
_IOPRIO_CLASS_SHIFT = 13
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
TIOCGPTN = 0x80045430  # the termios module lacks the pty ioctls
TIOCSPTLCK = 0x40045431
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
OPEN_TREE_CLONE = 1
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
SYS_QUOTACTL_FD = 443  # Linux >= 5.14, same number everywhere
PRJQUOTA = 2
Q_GETQUOTA, Q_SETQUOTA = 0x800007, 0x800008
Q_XGETQSTATV = (ord("X") << 8) + 8
QIF_BLIMITS, QIF_ILIMITS = 1, 4
FS_QUOTA_PDQ_ACCT, FS_QUOTA_PDQ_ENFD = 0x10, 0x20  # project quota accounted / enforced
_IF_DQBLK = struct.Struct("<8QI4x")  # struct if_dqblk
_FS_QUOTA_STATV_SIZE = 160
# struct fsxattr and its ioctls (FS_IOC_FSGETXATTR / FS_IOC_FSSETXATTR)
_FSXATTR = struct.Struct("<5I8s")
FS_IOC_FSGETXATTR, FS_IOC_FSSETXATTR = 0x801C581F, 0x401C5820
FS_XFLAG_PROJINHERIT = 0x200
# file_getattr/file_setattr (Linux >= 6.17): the same attributes on any inode by name, symlinks
# and device nodes too; struct file_attr (version 0)
SYS_FILE_GETATTR, SYS_FILE_SETATTR = 468, 469
_FILE_ATTR = struct.Struct("<QIIII")
AT_SYMLINK_NOFOLLOW = 0x100
SYS_MOUNT_SETATTR = 442
MS_SHARED = 1 << 20


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def capbset_drop(cap: int) -> None:
    prctl(PR_CAPBSET_DROP, cap)


def mount(
    source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source} on {target}",
    )


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), ctypes.c_int(flags)), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(SYS_PIVOT_ROOT, new_root.encode(), put_old.encode()), "pivot_root")


def bpf(cmd: int, attr: bytearray) -> int:
    """bpf(2) with *attr* (a union bpf_attr, zero-padded); returns the syscall's result."""
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    ret = _libc.syscall(ctypes.c_long(SYS_BPF), ctypes.c_int(cmd), buf, ctypes.c_uint(len(attr)))
    return _check(ret, f"bpf({cmd})")


def clone_tree_over(fd: int) -> int:
    """Mount a recursive copy of the mount tree at directory *fd* over itself; returns an fd
    of the copy's root. The copy's top is a mount of the caller's namespace, never locked."""
    tree = open_tree("", OPEN_TREE_CLONE | AT_RECURSIVE | AT_EMPTY_PATH, dirfd=fd)
    try:
        move_mount(tree, "", to_fd=fd)
    except BaseException:
        os.close(tree)
        raise
    return tree


def open_tree(path: str, flags: int = 0, *, dirfd: int = _AT_FDCWD) -> int:
    """An fd on the mount at *path* (relative to *dirfd*; "" with AT_EMPTY_PATH: *dirfd*
    itself). With OPEN_TREE_CLONE a detached copy of it, a peer of a shared original;
    AT_RECURSIVE: with its submounts."""
    flags |= os.O_CLOEXEC
    return _check(
        _libc.syscall(SYS_OPEN_TREE, ctypes.c_int(dirfd), path.encode(), ctypes.c_uint(flags)),
        f"open_tree {path or f'fd {dirfd}'}",
    )


def move_mount(fd: int, target: str, *, to_fd: int = _AT_FDCWD) -> None:
    """Attach (or move) the mount tree held by *fd* at *target* (relative to *to_fd*; "":
    over *to_fd* itself)."""
    flags = MOVE_MOUNT_F_EMPTY_PATH | (0 if target else MOVE_MOUNT_T_EMPTY_PATH)
    _check(
        _libc.syscall(
            SYS_MOVE_MOUNT, ctypes.c_int(fd), b"", ctypes.c_int(to_fd), target.encode(),
            ctypes.c_uint(flags),
        ),
        f"move_mount to {target or f'fd {to_fd}'}",
    )


def make_private(fd: int) -> None:
    """Make the mount held by *fd* and its submounts private (mount_setattr)."""
    attr = struct.pack("QQQQ", 0, 0, MS_PRIVATE, 0)  # attr_set, attr_clr, propagation, userns_fd
    buf = ctypes.create_string_buffer(attr, len(attr))
    flags = AT_EMPTY_PATH | AT_RECURSIVE
    _check(
        _libc.syscall(
            SYS_MOUNT_SETATTR, ctypes.c_int(fd), b"", ctypes.c_uint(flags), buf,
            ctypes.c_size_t(len(attr)),
        ),
        "mount_setattr",
    )


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), "sethostname")


def prctl(option: int, arg: int | bytes = 0) -> None:
    _check(_libc.prctl(option, arg, 0, 0, 0), f"prctl({option})")


def set_child_subreaper() -> None:
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent, *parent*, ends (at once if it already has)."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def set_process_name(name: str) -> None:
    prctl(PR_SET_NAME, name.encode()[:15])


def open_pty(ptmx: str) -> tuple[int, int]:
    """A new pty pair from the devpts instance of *ptmx*: (master fd, index of the slave)."""
    master = os.open(ptmx, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        index = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))[0]
    except BaseException:
        os.close(master)
        raise
    return master, index


def set_winsize(fd: int, rows: int, cols: int) -> None:
    import termios  # (a shared library) only for a terminal

    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def get_winsize(fd: int) -> tuple[int, int]:
    import termios

    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return rows, cols


def set_controlling_tty(fd: int) -> None:
    import termios

    fcntl.ioctl(fd, termios.TIOCSCTTY, 0)


def is_mountpoint(path: str) -> bool:
    """True if *path* is a mount point, judged by /proc/self/mountinfo (bind mounts too)."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].encode().decode("unicode_escape")
            if mnt == real:
                return True
    return False


def ioprio_set(ioclass: int, level: int = 0) -> bool:
    """Set this process's I/O scheduling class and level (threads started later inherit
    it); False if the kernel refused."""
    prio = (ioclass << _IOPRIO_CLASS_SHIFT) | level
    return _libc.syscall(SYS_IOPRIO_SET, IOPRIO_WHO_PROCESS, 0, prio) == 0


def rename_exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
    """Swap two directory entries atomically (renameat2 with RENAME_EXCHANGE)."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b),
                       _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fspath(b))


def pid_alive(pid: int) -> bool:
    """Whether process *pid* exists and is not a zombie (in this pid namespace)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def syncfs(fd: int) -> None:
    """Commit the filesystem holding *fd* (btrfs updates qgroup counters at commit)."""
    _check(_libc.syncfs(ctypes.c_int(fd)), "syncfs")


def _quotactl(fd: int, cmd: int, qtype: int, qid: int, buf: ctypes.Array | None) -> None:
    ret = _libc.syscall(SYS_QUOTACTL_FD, ctypes.c_uint(fd), ctypes.c_uint((cmd << 8) | qtype),
                        ctypes.c_uint(qid), buf)
    _check(ret, "quotactl_fd")


def project_quota_flags(fd: int) -> int:
    """FS_QUOTA_* state flags of the filesystem holding *fd* (Q_XGETQSTATV); OSError
    (ENOSYS, ENOTSUP...) when it has no quota support."""
    buf = ctypes.create_string_buffer(_FS_QUOTA_STATV_SIZE)
    buf[0] = 1  # FS_QSTATV_VERSION1
    _quotactl(fd, Q_XGETQSTATV, PRJQUOTA, 0, buf)
    return struct.unpack_from("<H", buf.raw, 2)[0]


def get_project_quota(fd: int, projid: int) -> tuple[int, int, int, int, int, int]:
    """(block hard, block soft in KiB, bytes used, inode hard, inode soft, inodes used)."""
    buf = ctypes.create_string_buffer(_IF_DQBLK.size)
    _quotactl(fd, Q_GETQUOTA, PRJQUOTA, projid, buf)
    return _IF_DQBLK.unpack(buf.raw)[:6]  # type: ignore[return-value]


def set_project_quota(fd: int, projid: int, *, space_soft: int, space_hard: int,
                      inodes_soft: int, inodes_hard: int) -> None:
    """Set project *projid*'s limits (KiB and inodes, 0 = none) on *fd*'s filesystem."""
    raw = _IF_DQBLK.pack(space_hard, space_soft, 0, inodes_hard, inodes_soft, 0, 0, 0,
                         QIF_BLIMITS | QIF_ILIMITS)
    _quotactl(fd, Q_SETQUOTA, PRJQUOTA, projid, ctypes.create_string_buffer(raw, len(raw)))


def get_project(fd: int) -> tuple[int, int]:
    """(project id, xflags) of the inode *fd* refers to."""
    raw = fcntl.ioctl(fd, FS_IOC_FSGETXATTR, bytes(_FSXATTR.size))
    xflags, _, _, projid, _, _ = _FSXATTR.unpack(raw)
    return projid, xflags


def set_project(fd: int, projid: int, *, inherit: bool) -> None:
    """Give the inode *fd* refers to project *projid* (and, for a directory, the flag that
    makes what is created in it inherit the id); the other attributes are kept."""
    raw = bytearray(_FSXATTR.size)
    fcntl.ioctl(fd, FS_IOC_FSGETXATTR, raw)
    xflags, extsize, _, _, cowext, pad = _FSXATTR.unpack(raw)
    if inherit:
        xflags |= FS_XFLAG_PROJINHERIT
    # nextents is output only (ext4 refuses it set)
    fcntl.ioctl(fd, FS_IOC_FSSETXATTR, _FSXATTR.pack(xflags, extsize, 0, projid, cowext, pad))


def _file_attr(call: int, dirfd: int, name: str, buf: ctypes.Array) -> None:
    ret = _libc.syscall(call, ctypes.c_int(dirfd), os.fsencode(name), buf,
                        ctypes.c_size_t(_FILE_ATTR.size), ctypes.c_uint(AT_SYMLINK_NOFOLLOW))
    _check(ret, "file_getattr" if call == SYS_FILE_GETATTR else "file_setattr")


def get_project_at(dirfd: int, name: str) -> int:
    """Project id of *name* in directory *dirfd*, not following a symlink (file_getattr)."""
    buf = ctypes.create_string_buffer(_FILE_ATTR.size)
    _file_attr(SYS_FILE_GETATTR, dirfd, name, buf)
    return _FILE_ATTR.unpack(buf.raw)[3]


def set_project_at(dirfd: int, name: str, projid: int) -> None:
    """Give *name* in directory *dirfd* (a symlink, device node, fifo... itself) project
    *projid* (file_setattr); OSError ENOSYS before Linux 6.17, EOPNOTSUPP where the
    filesystem can't."""
    buf = ctypes.create_string_buffer(_FILE_ATTR.size)
    _file_attr(SYS_FILE_GETATTR, dirfd, name, buf)
    xflags, extsize, _, _, cowext = _FILE_ATTR.unpack(buf.raw)
    new = _FILE_ATTR.pack(xflags, extsize, 0, projid, cowext)
    _file_attr(SYS_FILE_SETATTR, dirfd, name, ctypes.create_string_buffer(new, len(new)))


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
TRIM_THRESHOLD_DEFAULT = 128 * 1024  # glibc's
HEAP_BLOCK_MAX = 32 << 20  # the largest block glibc's malloc may serve from its heaps
TRIM_NEVER = 1 << 30  # a trim threshold no heap of ours reaches: nothing is trimmed


def _mallopt(param: int, value: int) -> None:
    if hasattr(_libc, "mallopt"):  # glibc only; elsewhere a no-op
        _libc.mallopt(ctypes.c_int(param), ctypes.c_int(value))


def malloc_large_with_mmap(threshold: int = 1 << 20) -> None:
    """Have glibc's malloc serve blocks of *threshold* bytes and more with mmap, so a freed
    buffer goes back to the kernel. By default the threshold grows to the largest block
    freed (up to 32 MiB): the 8-16 MiB buffers of a backup then come from per-thread
    arenas that keep their memory (a full backup peaked at 265 MB RSS instead of 124)."""
    _mallopt(M_MMAP_THRESHOLD, threshold)


@contextlib.contextmanager
def malloc_keeping_freed() -> Iterator[None]:
    """While the block runs, glibc's malloc serves blocks up to HEAP_BLOCK_MAX from its
    heaps and keeps what is freed there for the next ones, instead of mapping each big
    block afresh (every page of it faulted in and zeroed again); afterwards big blocks are
    mapped again (``malloc_large_with_mmap``) and the heaps' free memory is returned."""
    _mallopt(M_MMAP_THRESHOLD, HEAP_BLOCK_MAX)
    _mallopt(M_TRIM_THRESHOLD, TRIM_NEVER)
    try:
        yield
    finally:
        malloc_large_with_mmap()
        _mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_DEFAULT)
        if hasattr(_libc, "malloc_trim"):
            _libc.malloc_trim(ctypes.c_size_t(0))


# fanotify (Linux >= 5.9 for directory file handles with names)
FAN_CLOEXEC, FAN_NONBLOCK, FAN_UNLIMITED_QUEUE = 0x1, 0x2, 0x10
FAN_REPORT_DFID_NAME = 0xC00  # FAN_REPORT_DIR_FID | FAN_REPORT_NAME
FAN_MARK_ADD, FAN_MARK_FILESYSTEM = 0x1, 0x100
FAN_MODIFY, FAN_ATTRIB, FAN_CLOSE_WRITE = 0x2, 0x4, 0x8
FAN_MOVED_FROM, FAN_MOVED_TO, FAN_CREATE, FAN_DELETE = 0x40, 0x80, 0x100, 0x200
FAN_DELETE_SELF, FAN_MOVE_SELF, FAN_Q_OVERFLOW, FAN_ONDIR = 0x400, 0x800, 0x4000, 0x40000000
FAN_EVENT_METADATA = struct.Struct("=IBBHQii")  # struct fanotify_event_metadata
FAN_EVENT_INFO_HEADER = struct.Struct("=BBH")  # struct fanotify_event_info_header
FAN_EVENT_INFO_TYPE_DFID_NAME = 2
_FILE_HANDLE = struct.Struct("=Ii")  # struct file_handle without f_handle[]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]


def fanotify_init(flags: int, event_f_flags: int = os.O_RDONLY) -> int:
    return _check(_libc.fanotify_init(ctypes.c_uint(flags), ctypes.c_uint(event_f_flags)),
                  "fanotify_init")


def fanotify_mark(fd: int, flags: int, mask: int, path: str) -> None:
    _check(_libc.fanotify_mark(fd, flags, mask, _AT_FDCWD, os.fsencode(path)),
           f"fanotify_mark {path}")


def open_by_handle_at(mount_fd: int, handle: bytes, flags: int = os.O_PATH) -> int:
    """Open the object of *handle* (struct file_handle: its header, then f_handle) on the
    filesystem of *mount_fd*."""
    buf = ctypes.create_string_buffer(handle, len(handle))
    return _check(_libc.open_by_handle_at(ctypes.c_int(mount_fd), buf, ctypes.c_int(flags)),
                  "open_by_handle_at")
