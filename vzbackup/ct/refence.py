"""Lock the fences of a restored CT again, before its tasks resume.

At start the node mounts /proc, /sys, their masks and the BINDMOUNTs in a mount namespace of
its own user namespace and the CT's PID 1 copies it from inside the CT's user namespace: the
kernel locks every mount of the copy (see ``runtime``). CRIU can't do that: it clones the
restored init with CLONE_NEWUSER|CLONE_NEWNS together, so the CT's mount namespace belongs to
the CT's user namespace from birth, and then creates every mount fresh from inside it
(criu/mount-v2.c, ``prepare_mnt_ns_v2``). Nothing is locked: the CT's root could unmount a
mask, remount /proc/sys or a read-only BINDMOUNT read-write, or mount a fresh procfs.

The kernel locks mounts in one more case: a tree that *propagates* from a mount namespace of
the node's user namespace into one of another user namespace gets every mount but its top
locked, with the top's flags (read-only, nosuid...) locked too (``attach_recursive_mnt``). So
at CRIU's "post-restore" step (tasks restored, not yet running) a throwaway child of the
supervisor:

1. makes its own mount namespace M0 (the node's user namespace) and builds there, on a
   staging tmpfs, what ``runtime`` builds at start: /proc and /sys with the masks (mounted
   from the CT's pid and net namespaces) and the BINDMOUNTs;
2. per tree, mounts a shared "carrier" tmpfs in M0 and takes a detached clone of it (a peer);
3. enters the CT's mount namespace, clones what the CT mounted below those trees (its
   cgroup2 on /sys/fs/cgroup, ...), detaches CRIU's unlocked trees and attaches the carrier
   clones in their place;
4. back in M0, bind-mounts each staged tree onto its carrier: it propagates into the CT's
   carrier, locked;
5. in the CT's namespace again, cuts the propagation (private) and puts back what the CT
   had mounted below.

This covers every mount namespace of the CT: the one of its init and the nested ones
(systemd's service sandboxes, PrivateTmp=...), which CRIU recreates the same way. One child
does them all: /proc and /sys staged once per pid and network namespace, one carrier per
tree and staging with a peer in each namespace (step 3 in each), one bind per carrier that
propagates into all of them (step 4), then step 5 in each. Of what the
CT mounted inside the node's trees, procfs and sysfs mounts are not put back (a bind of the
old procfs could be remounted read-write): in a service's namespace systemd's own read-only
binds of /proc and /sys paths give way to the CT's fences, which cover the same paths.

The top of each rebuilt tree is not locked (the kernel locks a propagated tree below its
top), but its flags are: the CT's root can detach a whole /proc, /sys or BINDMOUNT (hiding it,
masks included; a fresh procfs or sysfs stays refused, none is left fully visible), never a
mask or a read-only flag.

Any failure aborts the restore (CRIU kills the restored tasks): a CT never runs unfenced.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

from vzbackup import constants as C
from vzbackup import syscalls as S
from vzbackup.config.ct import BindMount
from vzbackup.ct import fencing, fs, runtime
from vzbackup.errors import RuntimeFailure

TREES = ("/proc", "/sys")  # the node's mount trees below the CT's root, with BINDMOUNTs
CARRIER = "vzfence"  # the source name of carrier tmpfs mounts
CARRIER_OPTIONS = "mode=755,size=4k"
MAX_STACKED = 16  # mounts stacked on one tree root that a restore may have left
NOT_CARRIED = ("proc", "sysfs")  # file systems the node's trees show; see the docstring


@dataclass(frozen=True)
class Mount:
    id: int
    parent: int
    path: str
    fstype: str
    source: str = ""

    def holds(self, other: Mount) -> bool:
        """Whether *other* sits on this mount as part of the node's tree: at another path,
        or at the same path on a carrier."""
        return other.path != self.path or self.source == CARRIER


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        f = line.split()
        path = fs.unescape(f[4])
        sep = f.index("-")
        mounts.append(Mount(int(f[0]), int(f[1]), path, f[sep + 1], f[sep + 2]))
    return mounts


def fence_paths(binds: Iterable[BindMount]) -> set[str]:
    """Mount points of the node's mounts in a CT (runtime's steps 1 and 3, /dev aside: its
    device files are the node's, fenced by the device cgroup, not by the mounts)."""
    rel = [
        *TREES,
        *fencing.MASKED_FILES,
        *fencing.MASKED_DIRS,
        *fencing.READONLY_PATHS,
        *fencing.WRITABLE_PATHS,
    ]
    return {"/" + p.strip("/") for p in rel} | {bind_target(b) for b in binds}


def bind_target(b: BindMount) -> str:
    return "/" + b.ct.strip("/")


@dataclass
class Plan:
    """What relocking does in one mount namespace of the CT (paths inside the CT)."""

    trees: list[str]  # roots of the node's trees: rebuilt
    carried: list[str]  # the CT's mounts inside them, parents first: put back on the new ones
    strays: list[str]  # procfs and sysfs mounts elsewhere: detached


def classify(mounts: list[Mount], fences: set[str]) -> Plan:
    """Plan the relock from a mount table of the CT. A mount at a fence path is the node's if
    it sits on the root or holds on a node mount; anything else inside a node tree is the
    CT's, carried over unless it is a procfs or sysfs (one stacked on a fence path too). A
    procfs or sysfs elsewhere (the CT's bind of its /proc, /sys) goes: CRIU made it unlocked,
    and a read-write remount would reach the node's sysctls."""
    root_ids = {m.id for m in mounts if m.path == "/"}
    if not root_ids:
        raise RuntimeFailure("the restored CT has no root mount")
    children: dict[int, list[Mount]] = {}
    for m in mounts:
        if m.path != "/":
            children.setdefault(m.parent, []).append(m)
    plan = Plan([], [], [])
    node: set[int] = set()
    # (mount, the mount it sits on, whether that one is inside a node tree)
    pending = [(c, None, False) for r in root_ids for c in children.get(r, [])]
    while pending:
        m, parent, in_tree = pending.pop(0)
        on_node = parent is None or (parent.id in node and parent.holds(m))
        if m.path in fences and on_node:
            node.add(m.id)
            if parent is None and m.path not in plan.trees:
                plan.trees.append(m.path)
            in_tree = True
        elif in_tree and m.fstype not in NOT_CARRIED:
            if m.path not in plan.carried:  # the topmost of a stack: open_tree finds it
                plan.carried.append(m.path)
        elif not in_tree and m.fstype in NOT_CARRIED:
            plan.strays.append(m.path)
            continue  # detached with everything on it
        pending += [(c, m, in_tree) for c in children.get(m.id, [])]
    return plan


def mount_namespaces(init_pid: int) -> list[int]:
    """One host pid per mount namespace of the CT whose init is *init_pid*, init first."""
    pidns = os.readlink(f"/proc/{init_pid}/ns/pid")
    seen = {os.readlink(f"/proc/{init_pid}/ns/mnt"): init_pid}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry.name}/ns/pid") == pidns:
                seen.setdefault(os.readlink(f"/proc/{entry.name}/ns/mnt"), int(entry.name))
        except OSError:
            continue  # gone, or a kernel thread
    return list(seen.values())


@dataclass
class Namespace:
    """One mount namespace of the CT to relock: a task in it, its plan, and which staged
    /proc and /sys it gets (one per pair of pid and network namespaces among the tasks)."""

    pid: int
    plan: Plan
    view: str


def relock(init_pid: int, binds: list[BindMount]) -> None:
    """Rebuild the node's mounts of the restored CT whose init is host pid *init_pid* so the
    kernel locks them, in each of its mount namespaces (see the module docstring); raises
    RuntimeFailure on failure. One throwaway child does every namespace, staging /proc and
    /sys once per pid and network namespace (the Debian CT's systemd sandboxes share
    both): a child and two helpers per namespace cost 10-40 ms each in the freeze."""
    fences = fence_paths(binds)
    namespaces = []
    for pid in mount_namespaces(init_pid):
        with open(f"/proc/{pid}/mountinfo") as f:
            plan = classify(parse_mountinfo(f.read()), fences)
        view = " ".join(os.readlink(f"/proc/{pid}/ns/{ns}") for ns in ("pid", "net"))
        namespaces.append(Namespace(pid, plan, view))
    os.makedirs(C.FENCE_STAGE_DIR, mode=0o700, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=f"{init_pid}-", dir=C.FENCE_STAGE_DIR)
    err_r, err_w = os.pipe()
    try:
        pid = runtime._child(lambda: _relock(stage, namespaces, binds, err_w), err_w)
        os.close(err_w)
        err_w = -1
        _, status = os.waitpid(pid, 0)
        msg = runtime._read_all(err_r)
        err_r = -1
        if status != 0:
            raise RuntimeFailure(f"locking the restored CT's mounts failed: {msg.strip()}")
    finally:
        for fd in (err_r, err_w):
            if fd >= 0:
                os.close(fd)
        os.rmdir(stage)


def _relock(stage: str, namespaces: list[Namespace], binds: list[BindMount],
            err_w: int) -> None:
    """The throwaway child: steps 1-5 of the module docstring, every namespace at once: one
    carrier per tree and view, a peer of it attached in each namespace, one bind of the
    staged tree that propagates into all of them (so a dump meets one carrier superblock
    per tree, not one per namespace: CRIU opens each overmounted tmpfs through a helper)."""
    ct_ns = [os.open(f"/proc/{ns.pid}/ns/mnt", os.O_RDONLY) for ns in namespaces]
    S.unshare(S.CLONE_NEWNS)
    S.mount("none", "/", None, S.MS_REC | S.MS_PRIVATE)
    node_ns = os.open("/proc/self/ns/mnt", os.O_RDONLY)
    S.mount("vzstage", stage, "tmpfs", runtime.NOSUID, "mode=700")
    views: dict[str, dict[str, str]] = {}
    for ns in namespaces:
        if ns.view not in views:
            views[ns.view] = _stage_trees(f"{stage}/view{len(views)}", ns.pid, err_w)
    wanted = {t for ns in namespaces for t in ns.plan.trees}
    bind_trees = _stage_binds(stage, [b for b in binds if bind_target(b) in wanted])
    carriers: dict[tuple[str, str], tuple[str, str]] = {}  # (view, tree) -> carrier, staged
    attached = []
    for ns, ct_fd in zip(namespaces, ct_ns, strict=True):
        staged = views[ns.view] | bind_trees
        missing = [t for t in ns.plan.trees if t not in staged]
        if missing:
            raise RuntimeFailure(f"no node mount known for {', '.join(missing)}")
        peers = {}
        for tree in ns.plan.trees:
            key = (ns.view if tree in TREES else "", tree)
            if key not in carriers:
                carriers[key] = (_carrier(f"{stage}/carrier{len(carriers)}"), staged[tree])
            peers[tree] = S.open_tree(carriers[key][0], S.OPEN_TREE_CLONE)
        attached.append((ct_fd, peers, _attach(ns.plan, peers, ct_fd, node_ns)))
    for carrier, staged_tree in carriers.values():  # step 4: into every namespace at once
        S.mount(staged_tree, carrier, None, S.MS_BIND | S.MS_REC)
    for ct_fd, peers, kept in attached:  # step 5
        S.setns(ct_fd, S.CLONE_NEWNS)
        for fd in peers.values():
            S.make_private(fd)
            os.close(fd)
        for path, fd in kept:
            S.move_mount(fd, path)
            os.close(fd)
        S.setns(node_ns, S.CLONE_NEWNS)


def _carrier(path: str) -> str:
    """Step 2: a shared, read-only, empty tmpfs at *path* in the child's namespace."""
    os.mkdir(path)
    S.mount(CARRIER, path, "tmpfs", runtime.NOSUID | S.MS_RDONLY, CARRIER_OPTIONS)
    S.mount("none", path, None, S.MS_SHARED)
    return path


def _attach(plan: Plan, peers: dict[str, int], ct_ns: int, node_ns: int
            ) -> list[tuple[str, int]]:
    """Step 3 in one mount namespace of the CT: clone what the CT mounted below the trees,
    detach CRIU's trees and strays, attach the carriers' *peers*; the clones kept."""
    S.setns(ct_ns, S.CLONE_NEWNS)
    kept = [(path, S.open_tree(path, S.OPEN_TREE_CLONE)) for path in plan.carried]
    for path in plan.strays:
        _detach_all(path)
    for tree in plan.trees:
        _detach_all(tree)
        S.move_mount(peers[tree], tree)
    S.setns(node_ns, S.CLONE_NEWNS)
    return kept


def _stage_trees(root: str, pid: int, err_w: int) -> dict[str, str]:
    """/proc and /sys as ``runtime`` builds them at start, seen from the pid and network
    namespaces of host *pid*, under *root*; tree -> staged path."""
    for d in ("", "/proc", "/sys"):
        os.mkdir(root + d)
    helper = runtime._child(lambda: runtime._mount_for_ct(root, runtime._Init(pid, -1), err_w),
                            err_w)
    runtime._check_exit(helper, "mounting /proc and /sys for the restored CT")
    return {t: root + t for t in TREES}


def _stage_binds(stage: str, binds: list[BindMount]) -> dict[str, str]:
    """The BINDMOUNTs as ``runtime`` mounts them at start; CT path -> staged path."""
    staged = {}
    for i, b in enumerate(binds):
        target = f"{stage}/bind{i}"
        os.mkdir(target)
        S.mount(b.host, target, None, S.MS_BIND)
        if b.readonly:
            S.mount(b.host, target, None, S.MS_BIND | S.MS_REMOUNT | S.MS_RDONLY)
        staged[bind_target(b)] = target
    return staged


def _detach_all(path: str) -> None:
    """Detach every mount stacked on *path* (umount answers EINVAL once none is left)."""
    for _ in range(MAX_STACKED):
        try:
            S.umount(path, S.MNT_DETACH)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return
            raise
    raise RuntimeFailure(f"{path}: more than {MAX_STACKED} mounts stacked")
