"""Dump and restore a container's process tree with pycriu (criu swrk RPC).

One fresh ``pycriu.criu()`` per request; images go to a directory, CRIU's log beside them.
A dump can also take callbacks for CRIU's notifications ("post-dump" runs while the tasks are
still frozen): pycriu's ``criu.dump()`` can't answer them, so that request loop is run here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vzbackup import constants as C
from vzbackup.criu import netconf
from vzbackup.criu.cgyard import cgroup_yard
from vzbackup.criu.check import criu_binary, pycriu_module
from vzbackup.errors import CheckpointError

CLONE_NEWNET = 0x40000000
DUMP_LOG = "dump.log"
CGROUP_TREE = "vzbackup-cgroups.json"  # the CT's own cgroup2 tree, as the CT sees it
RESTORE_LOG = "restore.log"


@dataclass
class DumpOptions:
    leave_running: bool = False
    tcp_established: bool = True
    file_locks: bool = True
    external: list[str] = field(default_factory=list)  # e.g. "mnt[/mnt/vol]:vol"
    orphan_pts_master: bool = True  # the console's master is held outside (the supervisor)
    lazy_port: int = 0  # post-copy: keep anonymous memory and serve it on this TCP port
    page_server: tuple[str, int] | None = None  # send memory pages to this CRIU page-server
    tls: TLSFiles | None = None  # encrypt and authenticate the page traffic (both ends)
    # How CRIU keeps the CT's network quiet while frozen: "iptables" (spawns iptables-restore
    # at lock and unlock) or "nftables" (libnftables inside CRIU: no process on the frozen
    # path). A restore takes the method from the images.
    network_lock: str = "iptables"
    # Leave the CT's network configuration (links, addresses, routes, iptables and nftables
    # rules, sysctls) out of the images: restore() re-creates the network itself (empty
    # netns + setup_net) and ignores them. Saves CRIU's ip/iptables-save runs in the freeze.
    # CRIU then refuses a CT with a nested network namespace.
    skip_netns_config: bool = False
    # Empty tmpfs mounts as zero-byte images, full ones as plain tar (no tar + gzip pair per
    # mount in the freeze): only for a restoring CRIU with our "tmpfsplain" fix.
    plain_tmpfs: bool = False
    log_level: int = C.CRIU_LOG_LEVEL  # see log_level()


@dataclass
class TLSFiles:
    """PEM files for CRIU's TLS: our certificate and key, and the CA we trust in the peer."""

    cert: str
    key: str
    cacert: str
    verify_name: bool = False  # off for pinned one-time certificates


@dataclass
class RestoreOptions:
    root: str = ""
    tcp_established: bool = True  # tcp_close instead for a restore from a backup
    file_locks: bool = True
    # The CT's network namespace is restored empty and *setup_net* (called with the restored
    # init's host pid at CRIU's "setup-namespaces", before sockets come back) configures it:
    # CRIU can't create veths for a CT in a user namespace on this kernel (usernsd's
    # RTM_NEWLINK: EOPNOTSUPP; moving a node veth in fails too).
    setup_net: Callable[[int], None] | None = None
    # Called with the restored init's host pid at CRIU's "post-restore": everything is
    # restored, no task runs yet; a failure aborts the restore (CRIU kills the tasks).
    post_restore: Callable[[int], None] | None = None
    # Called with the restored init's host pid at "post-setup-namespaces", once CRIU has
    # locked the restored CT's network (packets are dropped, not reset, until its sockets
    # are back).
    after_net_lock: Callable[[int], None] | None = None
    external: list[str] = field(default_factory=list)
    lazy_pages: bool = False  # missing pages come from a "criu lazy-pages" daemon (images dir)
    cgroup_root: str = ""  # restore the CT's cgroups here, whatever the dump node called them
    orphan_pts_master: bool = True  # a new master for the console comes back (RestoreResult)
    log_level: int = C.CRIU_LOG_LEVEL  # see log_level()
    worker: CriuWorker | None = None  # a criu started ahead to serve it (else one starts now)
    # a cgroup_yard([]) made ahead for a CT in a user namespace (else one is made now)
    cgroup_yard: str | None = None


@dataclass
class RestoreResult:
    pid: int  # host pid of the restored init
    console: int = -1  # master fd of the restored console pty, -1 if the CT had none open


def _log_tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errs = [ln for ln in text if "Error" in ln or "error" in ln]
    return "\n".join((errs or text)[-lines:])


def log_level(wanted: int) -> int:
    """CRIU's log level: *wanted*, unless CRIU_LOG_LEVEL_ENV forces one (debugging)."""
    forced = os.environ.get(C.CRIU_LOG_LEVEL_ENV, "")
    return int(forced) if forced.isdigit() else wanted


def _criu():
    with contextlib.suppress(OSError):  # gone after a reboot: CRIU would probe every run
        os.mkdir(C.CRIU_RUNDIR, 0o700)
    c = pycriu_module().criu()
    c.use_binary(criu_binary())
    return c


class CriuWorker:
    """A ``criu swrk`` serving one request (a dump or restore). Started ahead (a standby restore),
    its fork, exec and loading (6 ms on an idle node, up to 30 ms on a busy one) stay out
    of a migration's freeze. :meth:`close` ends it, served or not."""

    def __init__(self, criu=None) -> None:
        self.criu = criu if criu is not None else _criu()
        self.sk = self.criu._comm.connect(False)  # forks "criu swrk" as our child
        self._open = True

    def close(self, *, reap: bool = True) -> None:
        """Close the socket and reap criu (idempotent); without *reap* the caller's wait
        loop does (a restore's caller: its CT's supervisor, a subreaper)."""
        if self._open:
            self._open = False
            if reap:
                self.criu._comm.disconnect()
            else:
                self.criu._comm.sk.close()


def _new(images_dir: Path, log_name: str, level: int, worker: CriuWorker | None = None):
    c = worker.criu if worker is not None else _criu()
    fd = os.open(images_dir, os.O_DIRECTORY)
    c.opts.images_dir_fd = fd
    c.opts.log_file = log_name
    c.opts.log_level = log_level(level)
    return c, fd


def dump(
    pid: int,
    images_dir: Path,
    opts: DumpOptions,
    notify: dict[str, Callable[[], None]] | None = None,
) -> float:
    """Checkpoint the tree rooted at host *pid* into *images_dir*; returns seconds taken.

    *notify* maps CRIU notification names ("pre-dump", "network-lock", "post-dump",
    "network-unlock", ...) to callbacks run when CRIU reaches that point. "post-dump" comes
    after the images are written and before the tasks are resumed (``leave_running``) or
    killed. A callback that raises makes CRIU abort the dump (the tasks keep running); the
    dump then raises CheckpointError chained to the callback's exception (a BaseException
    such as KeyboardInterrupt is re-raised as is once CRIU has finished).

    With ``opts.lazy_port`` anonymous memory stays out of the images: after "post-dump" CRIU
    serves it on that port to a restoring node's lazy-pages daemon and returns only when all
    pages were taken (then kills the tasks) or the transfer failed (then resumes them).
    """
    images_dir.mkdir(parents=True, exist_ok=True)
    save_cgroup_tree(pid, images_dir)
    netconf.save(pid, images_dir)  # restore() rebuilds the network: CRIU drops its settings
    hierarchies = own_cgroup_controllers(pid)
    with cgroup_yard(hierarchies) as yard:
        return _dump(pid, images_dir, opts, notify, hierarchies, yard)


def _dump(pid: int, images_dir: Path, opts: DumpOptions,
          notify: dict[str, Callable[[], None]] | None, hierarchies: list[str],
          yard: str | None) -> float:
    c, fd = _new(images_dir, DUMP_LOG, opts.log_level)
    try:
        c.opts.pid = pid
        c.opts.leave_running = opts.leave_running
        c.opts.tcp_established = opts.tcp_established
        c.opts.file_locks = opts.file_locks
        c.opts.manage_cgroups = True
        c.opts.cgroup_dump_controller.extend(hierarchies)
        if yard:
            c.opts.cgroup_yard = yard
        c.opts.orphan_pts_master = opts.orphan_pts_master
        c.opts.external.extend(opts.external)
        if opts.skip_netns_config:
            c.opts.empty_ns = CLONE_NEWNET
        if opts.network_lock == "nftables":
            c.opts.network_lock = pycriu_module().rpc.NFTABLES
        if opts.lazy_port:
            c.opts.lazy_pages = True
            c.opts.ps.port = opts.lazy_port
        elif opts.page_server:
            c.opts.ps.address, c.opts.ps.port = opts.page_server
        if opts.tls:
            c.opts.tls = True
            c.opts.tls_cert, c.opts.tls_key = opts.tls.cert, opts.tls.key
            c.opts.tls_cacert = opts.tls.cacert
            c.opts.tls_no_cn_verify = not opts.tls.verify_name
        t0 = time.monotonic()
        with _ENV_GATE.holding(C.CRIU_TMPFS_PLAIN_ENV if opts.plain_tmpfs else None):
            if notify:
                _dump_with_notify(c, pid, images_dir, notify)
                return time.monotonic() - t0
            _dump_plain(c, pid, images_dir)
        return time.monotonic() - t0
    finally:
        os.close(fd)


class _EnvGate:
    """The environment CRIU starts with, shared by the dumps of one process.

    pycriu forks criu with our environment, so a flag for one dump is an environment
    variable of the whole process. Dumps that want the same flags run at the same time
    (drain's parallel migrations); a dump that wants other flags waits until they end."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._flag: str | None = None
        self._users = 0

    @contextlib.contextmanager
    def holding(self, flag: str | None):
        """*flag* (or none) set in the environment criu starts with while the block runs."""
        with self._cond:
            self._cond.wait_for(lambda: self._users == 0 or self._flag == flag)
            if self._users == 0:
                self._set(flag)
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                if self._users == 0:
                    self._set(None)
                    self._cond.notify_all()

    def _set(self, flag: str | None) -> None:
        if self._flag:
            os.environ.pop(self._flag, None)
        self._flag = flag
        if flag:
            os.environ[flag] = "1"


_ENV_GATE = _EnvGate()


class _PromptReplies:
    """Python's thread switch interval at C.NOTIFY_SWITCH_INTERVAL while CRIU waits on our
    replies to its notifications (the tasks frozen): the relaying thread gets the GIL back
    within that, where another thread of ours (a sync started at "network-lock", the image
    stream, the address announcement beside a restore) could keep it for the default 5 ms at every
    step. Process-wide: overlapping dumps and restores share it, the last restores it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved = 0.0

    def __enter__(self) -> None:
        with self._lock:
            if self._users == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, C.NOTIFY_SWITCH_INTERVAL))
            self._users += 1

    def __exit__(self, *_exc: object) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                sys.setswitchinterval(self._saved)


_PROMPT_REPLIES = _PromptReplies()


def _dump_plain(c, pid: int, images_dir: Path) -> None:
    try:
        c.dump()
    except Exception as e:
        raise CheckpointError(
            f"CRIU dump of pid {pid} failed: {e}\n{_log_tail(images_dir / DUMP_LOG)}",
            hint=f"full log: {images_dir / DUMP_LOG}",
        ) from None


def save_cgroup_tree(pid: int, images_dir: Path) -> None:
    """Record every directory of the cgroup2 tree *pid* sees on /sys/fs/cgroup.

    CRIU dumps only the cgroups that hold tasks (and creates only those on restore), but
    systemd watches the cgroup.events of empty slices too (system-getty.slice, ...): their
    fsnotify marks can't be restored unless the directories exist. restore() makes them."""
    top = Path(f"/proc/{pid}/root/sys/fs/cgroup")
    dirs = []
    with contextlib.suppress(OSError):
        for here, subdirs, _ in os.walk(top):
            dirs += [str(Path(here, d).relative_to(top)) for d in subdirs]
    (images_dir / CGROUP_TREE).write_text(json.dumps(sorted(dirs)))


def make_cgroup_tree(images_dir: Path, cgroup_dir: str) -> None:
    """Create the recorded cgroup2 tree below *cgroup_dir* (the CT's cgroup on this node)."""
    try:
        dirs = json.loads((images_dir / CGROUP_TREE).read_text())
    except (OSError, ValueError):
        return
    for rel in dirs:
        if ".." not in Path(rel).parts:
            os.makedirs(os.path.join(cgroup_dir, rel), exist_ok=True)


def own_cgroup_controllers(pid: int) -> list[str]:
    """The hierarchies (as /proc/PID/cgroup names them; "" is cgroup2) where *pid* sits in
    a cgroup of its own. Only these are dumped: in a v1 hierarchy nobody set up for the CT
    (one that systemd or another tool mounted somewhere) it sits at the root, and CRIU would
    dump, and every restore re-create below the CT's cgroup, the node's whole tree there."""
    names = []
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, name, path = line.split(":", 2)
            if path != "/":
                names.append(name)
    return names


def _recv(sk: socket.socket, fds: list[int] | None = None):
    """One criu_resp from the swrk socket (SOCK_SEQPACKET: one message per packet); a file
    descriptor CRIU sends along (the "orphan-pts-master" notification) goes to *fds*."""
    rpc = pycriu_module().rpc
    size = len(sk.recv(1, socket.MSG_TRUNC | socket.MSG_PEEK))  # real length, as pycriu does
    if size == 0:
        raise EOFError("criu closed the connection")
    data, got, _, _ = socket.recv_fds(sk, size, 1)
    if fds is not None:
        fds.extend(got)
    else:
        for fd in got:
            os.close(fd)
    resp = rpc.criu_resp()
    resp.ParseFromString(data)
    return resp


def _relay(sk: socket.socket, req, on_notify: Callable[[Any, list[int]], Callable[[], None] | None]
           ) -> tuple[Any, BaseException | None, str]:
    """Send *req* to criu swrk and answer each of its notifications until its final
    response. *on_notify* sees each notification and the file descriptors it carried (those
    it leaves in the list are closed) and returns the step's callback, if any. Returns the
    response and the first callback that failed with its step (CRIU heard of it: it aborts,
    and no later callback runs)."""
    rpc = pycriu_module().rpc
    failed: BaseException | None = None
    failed_step = ""
    with _PROMPT_REPLIES:  # CRIU waits on each reply
        sk.send(req.SerializeToString())
        while True:
            fds: list[int] = []
            resp = _recv(sk, fds)
            if resp.type != rpc.NOTIFY:
                return resp, failed, failed_step
            callback = on_notify(resp.notify, fds)
            for fd in fds:
                os.close(fd)
            ok = True
            if callback is not None and failed is None:
                try:
                    callback()
                except BaseException as e:  # CRIU must hear about any failure
                    failed, failed_step, ok = e, resp.notify.script, False
            sk.send(rpc.criu_req(type=rpc.NOTIFY, notify_success=ok).SerializeToString())


def _dump_with_notify(c, pid: int, images_dir: Path, notify: dict[str, Callable[[], None]]):
    """criu.dump() with notify_scripts on: answer each NOTIFY, running *notify*'s callbacks."""
    pycriu = pycriu_module()
    rpc = pycriu.rpc
    c.opts.notify_scripts = True
    req = rpc.criu_req(type=rpc.DUMP)
    req.opts.MergeFrom(c.opts)
    log = images_dir / DUMP_LOG
    try:
        worker = CriuWorker(c)  # forks "criu swrk" as our child, like criu.dump() does
    except Exception as e:
        raise CheckpointError(f"CRIU dump of pid {pid} failed: cannot start criu: {e}") from None
    try:
        resp, failed, failed_step = _relay(worker.sk, req, lambda n, _fds: notify.get(n.script))
    except (OSError, EOFError, ValueError) as e:  # ValueError covers protobuf's DecodeError
        raise CheckpointError(
            f"CRIU dump of pid {pid} failed: lost the connection to criu: {e}\n{_log_tail(log)}",
            hint=f"full log: {log}",
        ) from None
    finally:
        worker.close()  # closes the socket and reaps criu: the tasks run again by now
    if failed is not None:
        if not isinstance(failed, Exception):
            raise failed
        raise CheckpointError(
            f"CRIU dump of pid {pid} aborted: the {failed_step} step failed: {failed}",
            hint=f"the tasks were left running; CRIU log: {log}",
        ) from failed
    if resp.type != rpc.DUMP or not resp.success:
        why = str(pycriu.CRIUExceptionExternal(req.type, resp.type, resp.cr_errno))
        if resp.cr_errmsg:
            why += f" ({resp.cr_errmsg})"
        raise CheckpointError(
            f"CRIU dump of pid {pid} failed: {why}\n{_log_tail(log)}", hint=f"full log: {log}"
        )


def restore(images_dir: Path, opts: RestoreOptions) -> RestoreResult:
    """Restore the tree from *images_dir* as a child of the caller (host pid in the result);
    the caller reaps the criu it leaves (a CT's supervisor reaps every child).

    With ``orphan_pts_master`` CRIU recreates the console pty and sends its new master in
    the "orphan-pts-master" notification; it is returned as ``console``."""
    in_userns = any(images_dir.glob("userns-*.img"))  # see criu/cgyard.py
    if not in_userns or opts.cgroup_yard is not None:
        return _restore(images_dir, opts, opts.cgroup_yard if in_userns else None)
    with cgroup_yard([]) as yard:
        return _restore(images_dir, opts, yard)


def _restore(images_dir: Path, opts: RestoreOptions, yard: str | None) -> RestoreResult:
    c, fd = _new(images_dir, RESTORE_LOG, opts.log_level, opts.worker)
    try:
        if yard:
            c.opts.cgroup_yard = yard
        c.opts.root = opts.root
        c.opts.rst_sibling = True
        c.opts.tcp_established = opts.tcp_established
        c.opts.tcp_close = not opts.tcp_established
        c.opts.file_locks = opts.file_locks
        c.opts.manage_cgroups = True
        c.opts.orphan_pts_master = opts.orphan_pts_master
        c.opts.notify_scripts = True
        if opts.setup_net:
            c.opts.empty_ns = CLONE_NEWNET
        c.opts.external.extend(opts.external)
        c.opts.lazy_pages = opts.lazy_pages
        if opts.cgroup_root:
            c.opts.cg_root.add(path=opts.cgroup_root)
        setup = opts.setup_net and _with_netconf(opts.setup_net, images_dir)
        hooks = {"setup-namespaces": setup, "post-setup-namespaces": opts.after_net_lock,
                 "post-restore": opts.post_restore}
        return _restore_with_notify(c, images_dir, {k: v for k, v in hooks.items() if v},
                                    opts.worker)
    finally:
        os.close(fd)


def _with_netconf(setup_net: Callable[[int], None], images_dir: Path
                   ) -> Callable[[int], None]:
    """The setup-namespaces step: the caller's network, then the CT's saved firewall and
    sysctls (``netconf``)."""
    def step(pid: int) -> None:
        setup_net(pid)
        netconf.load(pid, images_dir)
    return step


def _restore_with_notify(
    c, images_dir: Path, hooks: dict[str, Callable[[int], None]],
    worker: CriuWorker | None = None,
) -> RestoreResult:
    """criu.restore() answering CRIU's notifications and keeping the console master it sends;
    *hooks* maps a notification to a callback taking the restored init's host pid (CRIU sends
    it with "setup-namespaces"); a failing callback aborts the restore."""
    pycriu = pycriu_module()
    rpc = pycriu.rpc
    req = rpc.criu_req(type=rpc.RESTORE)
    req.opts.MergeFrom(c.opts)
    log = images_dir / RESTORE_LOG
    hint = f"the images are kept; full log: {log}"
    console: list[int] = []
    init_pid = 0
    try:
        worker = worker if worker is not None else CriuWorker(c)
    except Exception as e:
        raise CheckpointError(f"CRIU restore from {images_dir} failed: {e}", hint=hint) from None

    def on_notify(n, fds: list[int]) -> Callable[[], None] | None:
        nonlocal init_pid
        if n.script == "orphan-pts-master":
            console.extend(fds)
            fds.clear()
        init_pid = n.pid or init_pid
        hook = hooks.get(n.script)
        return None if hook is None else functools.partial(hook, init_pid)

    try:
        resp, failed, failed_step = _relay(worker.sk, req, on_notify)
    except (OSError, EOFError, ValueError) as e:
        for extra in console:
            os.close(extra)
        raise CheckpointError(
            f"CRIU restore from {images_dir} failed: lost the connection to criu: {e}\n"
            f"{_log_tail(log)}",
            hint=hint,
        ) from None
    finally:
        # criu exits after its answer: our caller reaps it (its wait of 1-8 ms on a busy
        # node sat between the restored tasks' resume and the verdict)
        worker.close(reap=False)
    if failed is not None:
        for extra in console:
            os.close(extra)
        if not isinstance(failed, Exception):
            raise failed
        raise CheckpointError(
            f"CRIU restore from {images_dir} aborted: the {failed_step} step failed: {failed}",
            hint=hint,
        ) from failed
    if resp.type != rpc.RESTORE or not resp.success:
        for extra in console:
            os.close(extra)
        why = str(pycriu.CRIUExceptionExternal(req.type, resp.type, resp.cr_errno))
        if resp.cr_errmsg:
            why += f" ({resp.cr_errmsg})"
        raise CheckpointError(
            f"CRIU restore from {images_dir} failed: {why}\n{_log_tail(log)}", hint=hint
        )
    for extra in console[1:]:
        os.close(extra)
    return RestoreResult(int(resp.restore.pid), console[0] if console else -1)
