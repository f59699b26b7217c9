"""Checkpointability preflight: what in a running CT would make a CRIU 4.2 dump fail.

Read from /proc before anything is frozen or copied (CRIU 4.2 has no check-only dump), per
task of the tree CRIU would dump (the CT's init and its descendants):

- namespaces: CRIU dumps nested mount and network namespaces, not nested UTS, IPC, user,
  pid, time or cgroup ones (criu/namespaces.c);
- open files CRIU has no dumper for: BPF programs and links, io_uring, perf events, ...;
- mounts of filesystems CRIU can't re-create (hugetlbfs, configfs, bpffs, ramfs, ...);
- a session or process group led from outside the CT (an init that never called setsid);
- on a node whose root lacks CAP_SYS_RESOURCE: tasks of a privileged CT running under
  another uid (CRIU can't read their rlimits);
- in a restored CT, files still open on the mounts that locking its fences again detached
  (``vzbackup.ct.refence``; ``vzbackup.criu.detached`` finds them and ``reopen_detached``
  has systemd and journald reopen theirs).

The table rows name the systemd settings that usually create each blocker, so a message says
what to change (most are handled by SYSTEMD_CHECKPOINT, see README).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from vzbackup.criu import detached
from vzbackup.ct.container import Container
from vzbackup.errors import CheckpointError

# nested namespace kind -> what usually made it (systemd unit settings)
NESTED_NS = {
    "uts": "ProtectHostname= (turned off by SYSTEMD_CHECKPOINT=yes)",
    "ipc": "PrivateIPC= (turned off by SYSTEMD_CHECKPOINT=yes)",
    "user": "PrivateUsers= (turned off by SYSTEMD_CHECKPOINT=yes)",
    "pid": "a container or sandbox tool inside the CT (unshare -p, bwrap, ...)",
    "pid_for_children": "a container or sandbox tool inside the CT (unshare -p, bwrap, ...)",
    "time": "unshare -T inside the CT",
    "time_for_children": "unshare -T inside the CT",
    "cgroup": "a cgroup namespace made inside the CT (unshare -C)",
}
# anon inode name -> what usually holds it; CRIU 4.2 has no dumper for these
ANON_FILES = {
    "bpf-prog": "a BPF program",
    "bpf_link": "a BPF link",
    "[io_uring]": "io_uring (e.g. MariaDB with liburing)",
    "[perf_event]": "a perf event",
    "[userfaultfd]": "a userfaultfd",
    "[memfd_secret]": "a secret memfd",
}
# BPF program type (linux/bpf.h) -> the systemd setting that loads it
BPF_PROG_TYPES = {
    8: "cgroup_skb: IPAddressDeny=, IPAddressAllow=, IP*FilterPath=, RestrictNetworkInterfaces= "
    "(off with SYSTEMD_CHECKPOINT=yes)",
    15: "cgroup_device: DeviceAllow=/PrivateDevices=/ProtectClock= in a privileged CT on "
    "cgroup v2 (an unprivileged CT can't load it; systemd then skips it)",
    18: "cgroup_sock_addr: SocketBindAllow=/SocketBindDeny= (off with SYSTEMD_CHECKPOINT=yes)",
    29: "lsm: RestrictFileSystems=",
}
# filesystems CRIU 4.2 can't re-create when mounted inside the CT -> usual origin
MOUNT_FSTYPES = {
    "hugetlbfs": "systemd's dev-hugepages.mount (skipped with SYSTEMD_CHECKPOINT=yes)",
    "configfs": "sys-kernel-config.mount",
    "bpf": "a BPF filesystem mounted in the CT",
    "ramfs": "systemd credentials (LoadCredential=) of a running unit",
    "efivarfs": "an EFI variables mount",
    "nfs": "an NFS mount inside the CT",
    "nfs4": "an NFS mount inside the CT",
    "rpc_pipefs": "NFS client support inside the CT",
}
NS_KINDS = ("uts", "ipc", "user", "pid", "pid_for_children", "time", "time_for_children", "cgroup")
CAP_SYS_RESOURCE = 24


@dataclass(frozen=True)
class Blocker:
    """One thing in one task that a CRIU dump would fail on."""

    pid: int  # on the node
    ct_pid: int  # inside the CT
    comm: str
    kind: str  # namespace | file | mount | session | rlimit
    what: str
    why: str  # what usually creates it / what to change

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def __str__(self) -> str:
        return f"pid {self.ct_pid} ({self.comm}): {self.what} [{self.why}]"


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _ns(pid: int, kind: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return ""


def tree(init_pid: int) -> list[int]:
    """*init_pid* and its descendants (the tree CRIU dumps), parents first. A process that
    exits while it is read (a CT's short-lived commands do, at any moment) is listed without
    children; its users skip what is gone."""
    out, todo = [], [init_pid]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:  # gone (ENOENT), or exiting (ESRCH)
            continue
        for tid in tids:
            todo += [int(c) for c in _read(f"/proc/{pid}/task/{tid}/children").split()]
    return out


class _Task:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        status = dict(
            line.split(":\t", 1)
            for line in _read(f"/proc/{pid}/status").splitlines()
            if ":\t" in line
        )
        self.comm = status.get("Name", "?").strip()
        self.ct_pid = int(status.get("NSpid", str(pid)).split()[-1])
        self.uids = {int(x) for x in status.get("Uid", "0").split()}
        stat = _read(f"/proc/{pid}/stat")
        fields = stat[stat.rfind(")") + 2 :].split()
        self.pgid, self.sid = (int(fields[2]), int(fields[3])) if len(fields) > 3 else (0, 0)

    def blocker(self, kind: str, what: str, why: str) -> Blocker:
        return Blocker(self.pid, self.ct_pid, self.comm, kind, what, why)


def _namespaces(task: _Task, init_pid: int) -> Iterator[Blocker]:
    for kind in NS_KINDS:
        mine, root = _ns(task.pid, kind), _ns(init_pid, kind)
        if mine and root and mine != root:
            yield task.blocker("namespace", f"nested {kind} namespace", NESTED_NS[kind])


def _files(task: _Task) -> Iterator[Blocker]:
    fd_dir = f"/proc/{task.pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return
    for fd in fds:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        name = target.removeprefix("anon_inode:")
        if name == target or name not in ANON_FILES:
            continue
        why = ANON_FILES[name]
        if name == "bpf-prog":
            info = dict(ln.split(":", 1) for ln in _read(f"/proc/{task.pid}/fdinfo/{fd}")
                        .splitlines() if ":" in ln)
            ptype = int(info.get("prog_type", "-1").strip() or -1)
            why = BPF_PROG_TYPES.get(ptype, f"BPF program type {ptype}")
        yield task.blocker("file", f"fd {fd} is {target}", why)


def _mounts(task: _Task, seen: set[str]) -> Iterator[Blocker]:
    mntns = _ns(task.pid, "mnt")
    if mntns in seen:
        return
    seen.add(mntns)
    for line in _read(f"/proc/{task.pid}/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fstype = right.split(" ", 1)[0]
        if fstype in MOUNT_FSTYPES:
            point = left.split()[4]
            yield task.blocker("mount", f"{fstype} mounted on {point}", MOUNT_FSTYPES[fstype])


def _session(task: _Task, pids: set[int]) -> Iterator[Blocker]:
    for what, leader in (("session", task.sid), ("process group", task.pgid)):
        if leader and leader not in pids:
            yield task.blocker(
                "session", f"its {what} leader (node pid {leader}) is outside the CT",
                "started from outside without setsid (e.g. a background job of 'vzbackup exec'); "
                "run it under setsid or as a service of the CT",
            )
            return  # one is enough: CRIU reports the session


def _lacks_sys_resource() -> bool:
    caps = next((ln.split()[1] for ln in _read("/proc/self/status").splitlines()
                 if ln.startswith("CapEff:")), "0")
    return not int(caps, 16) & (1 << CAP_SYS_RESOURCE)


def _rlimits(task: _Task) -> Iterator[Blocker]:
    if _ns(task.pid, "user") == _ns(os.getpid(), "user") and task.uids != {os.geteuid()}:
        yield task.blocker(
            "rlimit", f"runs as uid {max(task.uids)} in a privileged CT",
            "root on this node lacks CAP_SYS_RESOURCE, so CRIU can't read the rlimits of another "
            "uid's task; run the CT unprivileged (user namespace)",
        )


def blockers(ct: Container) -> list[Blocker]:
    """What would make a CRIU dump of the running *ct* fail, per task; [] if nothing."""
    st = ct.require_running()
    pids = tree(st.init_pid)
    pid_set = set(pids)
    no_sys_resource = _lacks_sys_resource()
    found: list[Blocker] = []
    seen_mntns: set[str] = set()
    for pid in pids:
        task = _Task(pid)
        if not os.path.isdir(f"/proc/{pid}"):
            continue  # exited meanwhile
        found += _namespaces(task, st.init_pid)
        found += _files(task)
        found += _mounts(task, seen_mntns)
        found += _session(task, pid_set)
        if no_sys_resource:
            found += _rlimits(task)
    found += _detached(pids)
    return found


def _detached(pids: list[int]) -> Iterator[Blocker]:
    for d in detached.detached_files(pids):
        if d.comm not in detached.REOPEN:  # those reopen theirs before a dump
            yield _Task(d.pid).blocker(
                "file", f"fd {d.fd} ({d.path}) is on a mount detached at restore",
                "the restore replaced the CT's /proc and /sys mounts by locked ones; restart "
                "this program (it reopens the file)",
            )


def reopen_detached(ct: Container, init_pid: int) -> None:
    """Before a dump of a restored CT: let systemd and journald reopen files they hold on
    mounts the restore detached (see ``refence``)."""
    detached.reopen(lambda argv: ct.exec(argv, capture=True), tree(init_pid))


def require_checkpointable(ct: Container, what: str = "checkpoint") -> None:
    """Raise CheckpointError listing the blockers, before anything is frozen or copied."""
    found = blockers(ct)
    if found:
        shown = "\n  ".join(map(str, found[:20]))
        more = f"\n  ... and {len(found) - 20} more" if len(found) > 20 else ""
        raise CheckpointError(
            f"CT {ct.ctid} can't be checkpointed ({what}), CRIU would fail on:\n  {shown}{more}",
            hint=f"'vzbackup check {ct.ctid}' lists them; see README 'Checkpointable systemd CTs'",
        )
