"""Per-container supervisor: owns the CT's init (subreaper), records its state, cleans up.

Started detached by ``vzbackup start``/``restore`` as
``python -m vzbackup.ct.supervisor {start|restore} CTID --prefix P --ready-fd N``
(restore: ``--dumpdir D [--keep-dump] [--tcp-close] [--lazy-pages]``).
It reports success or the error on the ready fd, serves the CT's console (console.py), then
waits for init to exit and tears the CT's runtime down (network, cgroups, root mount, state
file, console socket). An init that ended by reboot(2) (SIGHUP, see ``_rebooted``) is started
again, as vzctl does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from vzbackup import autogroup
from vzbackup import constants as C
from vzbackup import syscalls as S
from vzbackup.config.ct import BindMount, CTConfig
from vzbackup.config.node import Node
from vzbackup.criu import driver
from vzbackup.criu.cgyard import cgroup_yard
from vzbackup.criu.check import pycriu_module
from vzbackup.ct import console, fencing, idmap, network, refence, runtime, syscall_filter
from vzbackup.ct.container import Container
from vzbackup.ct.state import CTState, clear_state, write_state
from vzbackup.errors import VzError
from vzbackup.timer import Timer

log = logging.getLogger("vzbackup.supervisor")


class Supervisor:
    def __init__(self, ct: Container) -> None:
        self.ct = ct
        self.init_pid = 0
        self.we_mounted = False
        self.prepared = False  # for a restore: prepare_restore() done
        self.console: console.ConsoleServer | None = None
        self.timer = Timer()  # the restore's sub-steps (a migration's ``-t`` shows them)
        self.worker: driver.CriuWorker | None = None  # a standby's criu, started ahead
        self.yard: str | None = None  # a standby's cgroup yard, made ahead
        self.ahead = contextlib.ExitStack()  # removes it, once the verdict is out

    def _serve_console(self, master: int, *, start: bool = True) -> None:
        """The console's socket; its thread too unless *start* is off (start_console())."""
        if master < 0:
            log.warning("CT %s has no console after restore (nothing held it open)", self.ct.ctid)
            return
        self.console = console.ConsoleServer(master, self.ct.node.rundir, self.ct.ctid)
        if start:
            self.console.start()

    def start_console(self) -> None:
        """The console's thread, for a restore once its verdict is out: a client may
        connect already (the socket listens) and the pty keeps what the CT writes, but the
        thread's start took 9-14 ms on a busy node between the tasks' resume and the
        verdict, which a migration's source waits for."""
        if self.console is not None and self.console.ident is None:
            self.console.start()

    def prepare_restore(self) -> None:
        """What a restore needs besides the images (root mounted, cgroups made, the network
        checked for clashes); a standby supervisor does it before the word, outside a
        migration's freeze."""
        if not self.prepared:
            conf = self.ct.conf
            network.check(self.ct.net_config(conf))
            self._prepare(conf)
            self.prepared = True

    def unprepare(self) -> None:
        """Undo :meth:`prepare_restore` for a restore that was called off."""
        if not self.prepared:
            return
        steps = [("cgroup", lambda: _retry(self.ct.cgroup().destroy)),
                 ("cgroup parents", lambda: self.ct.cgroup().prune_parents())]
        steps += [("umount", self.ct.umount)] if self.we_mounted else []
        for what, fn in steps:
            try:
                fn()
            except Exception as e:
                log.warning("undoing the restore's %s failed: %s", what, e)

    def _prepare(self, conf: CTConfig) -> None:
        self.we_mounted = self.ct.mount()
        self.ct.write_dist_files(conf)
        cg = self.ct.cgroup()
        cg.create()
        cg.apply(self.ct.limits(conf))
        cg.delegate(conf.idmap.root, conf.idmap.root)

    def start(self) -> None:
        conf = self.ct.conf
        self._prepare(conf)
        cg = self.ct.cgroup()
        proc = runtime.spawn(
            runtime.InitSpec(
                root=str(self.ct.ve_root(conf)),
                hostname=conf.hostname or f"ct{self.ct.ctid}",
                attach=cg.attach,
                binds=conf.bindmounts,
                idmap=conf.idmap,
                syscall_filter=syscall_filter.build(),
                env=C.SYSTEMD_CHECKPOINT_ENV if self.ct.systemd_checkpoint(conf) else {},
            )
        )
        self.init_pid = proc.pid
        try:
            self._serve_console(proc.console)
            network.setup(self.ct.net_config(conf), proc.pid)
            proc.go()
        except BaseException:
            proc.abort()
            raise
        log.info("CT %s started, init pid %s", self.ct.ctid, proc.pid)

    def restore(self, images: Path, *, tcp_close: bool = False, lazy: bool = False,
                log_level: int = C.CRIU_LOG_LEVEL) -> None:
        conf = self.ct.conf
        timer = self.timer
        self.prepare_restore()
        timer.lap("prepare")
        idmap.give_images(images, conf.idmap)
        os.chdir("/")
        net = self.ct.net_config(conf)
        t0 = time.monotonic()
        unified = self.ct.cgroup().controller_paths().get("unified")
        if unified:
            driver.make_cgroup_tree(images, unified)
        root = str(self.ct.ve_root(conf))
        timer.lap("images")
        steps = _RestoreSteps(net, conf.bindmounts, timer)
        worker, self.worker = self.worker, None
        with _staged_binds(self.ct.ctid, conf) as sources, _closing(worker):
            try:
                restored = driver.restore(
                    images,
                    driver.RestoreOptions(
                        root=root,
                        setup_net=steps.setup_net,
                        after_net_lock=steps.after_net_lock,
                        post_restore=steps.post_restore,
                        external=[f"mnt[{key}]:{src}" for key, src in sources.items()]
                        + fencing.criu_restore_externals(),
                        tcp_established=not tcp_close,
                        lazy_pages=lazy,
                        cgroup_root="/" + self.ct.cgroup().name,
                        log_level=log_level,
                        worker=worker,
                        cgroup_yard=self.yard,
                    ),
                )
            finally:
                steps.join()  # a failed restore's cleanup must not race the announcement
        self.init_pid = restored.pid
        timer.lap("criu_resume")
        if os.getpriority(os.PRIO_PROCESS, 0) < 0:  # a migration's freeze boost ends here
            os.setpriority(os.PRIO_PROCESS, 0, 0)
            autogroup.set_nice(0, 0)
        self.ct.cgroup().delegate(conf.idmap.root, conf.idmap.root)  # CRIU made them as root
        self._serve_console(restored.console, start=False)
        log.info(
            "CT %s restored from %s in %.3fs, init pid %s",
            self.ct.ctid,
            images,
            time.monotonic() - t0,
            self.init_pid,
        )

    def wait(self) -> int:
        """Reap children until init exits; returns its wait status."""
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                return 0
            except InterruptedError:
                continue
            if pid == self.init_pid:
                return status

    def cleanup(self) -> None:
        """Tear the runtime down; each step runs even if an earlier one failed."""
        ct = self.ct
        steps = [
            ("network", lambda: network.teardown(ct.net_config())),
            ("cgroup kill", lambda: ct.cgroup().kill_all()),
            ("cgroup", lambda: _retry(ct.cgroup().destroy)),
            ("cgroup parents", lambda: ct.cgroup().prune_parents()),
            ("umount", ct.umount),
            ("console", lambda: self.console and self.console.close()),
        ]
        for what, fn in steps:
            try:
                fn()
            except Exception as e:
                log.warning("cleanup of %s failed: %s", what, e)
        clear_state(ct.node, ct.ctid)


class _RestoreSteps:
    """CRIU's notifications during a restore, timed (a migration's ``-t``): the network set
    up in the restored, empty netns; the addresses announced (proxy ARP, gratuitous ARP: ip
    processes) beside CRIU's own work once CRIU has locked the CT's network, so packets that
    arrive meanwhile are dropped, not answered with resets; the fences relocked once the
    announcement is done, before any task runs. A failing step aborts the restore."""

    def __init__(self, net: network.NetConfig, binds: list[BindMount], timer: Timer) -> None:
        self.net = net
        self.binds = binds
        self.timer = timer
        self._announcer: threading.Thread | None = None
        self._announce_error: BaseException | None = None

    def setup_net(self, pid: int) -> None:
        self.timer.lap("criu_namespaces")
        network.setup(self.net, pid, announce_now=False, checked=True)  # prepare_restore
        self.timer.lap("network")

    def after_net_lock(self, _pid: int) -> None:
        self.timer.lap("criu_net_lock")
        self._announcer = threading.Thread(target=self._announce, daemon=True)
        self._announcer.start()

    def _announce(self) -> None:
        try:
            network.announce(self.net)
        except BaseException as e:
            self._announce_error = e

    def post_restore(self, pid: int) -> None:
        self.timer.lap("criu_restore")
        self.join()
        self.timer.lap("announce_wait")
        if self._announce_error is not None:
            raise self._announce_error
        refence.relock(pid, self.binds)
        self.timer.lap("refence")

    def join(self) -> None:
        if self._announcer is not None:
            self._announcer.join()


@contextlib.contextmanager
def _staged_binds(ctid: int, conf: CTConfig) -> Iterator[dict[str, str]]:
    """BINDMOUNT sources, by CRIU key, bound under BIND_STAGE_DIR while CRIU restores: CRIU
    opens them from inside the CT's user namespace, whose root may not be allowed to search
    the path to a source (e.g. below a 0700 directory); the stage is searchable by anyone."""
    if not conf.bindmounts:
        yield {}
        return
    stage = Path(C.BIND_STAGE_DIR, f"{ctid}-{os.getpid()}")
    stage.mkdir(mode=0o711, parents=True, exist_ok=True)
    os.chmod(stage.parent, 0o711)
    sources: dict[str, str] = {}
    try:
        for b in conf.bindmounts:
            target = stage / b.key
            target.mkdir(mode=0o700, exist_ok=True)
            sources[b.key] = str(target)
            S.mount(b.host, str(target), None, S.MS_BIND)
        yield sources
    finally:
        for target in sources.values():
            with contextlib.suppress(OSError):
                S.umount(target, S.MNT_DETACH)
        for target in [*sources.values(), str(stage)]:  # rmdir: never a source's files
            with contextlib.suppress(OSError):
                os.rmdir(target)


@contextlib.contextmanager
def _closing(worker: driver.CriuWorker | None) -> Iterator[None]:
    """Ends a criu started ahead that the restore did not reach (it failed before)."""
    try:
        yield
    finally:
        if worker is not None:
            worker.close()


def _retry(fn, attempts: int = 20) -> None:
    for i in range(attempts):
        try:
            return fn()
        except Exception:
            if i == attempts - 1:
                raise
            time.sleep(0.1)


def _report(fd: int, payload: dict) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, json.dumps(payload).encode())
        os.close(fd)


def _standby(sup: Supervisor, go_fd: int, ready_fd: int) -> bool:
    """Started ahead of a migration's restore: load CRIU's bindings and prepare what needs
    no images (a failure there is reported after the word, by the restore that retries it),
    say so on *ready_fd* (before the verdict), then wait for the word (a byte
    on *go_fd*; EOF: the restore was called off, and what was prepared is undone). The
    restore's clock starts at the word. Started at a raised priority (a migration's), its
    session takes it too: against other sessions only that counts."""
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    if nice < 0:
        autogroup.set_nice(0, nice)
    with contextlib.suppress(VzError):
        pycriu_module()
    try:
        sup.prepare_restore()
    except Exception as e:
        log.warning("preparing the restore ahead failed (retried at the word): %s", e)
    os.chdir("/")  # where the restore runs criu from
    try:
        sup.worker = driver.CriuWorker()
    except Exception as e:  # the restore starts its own
        log.warning("starting criu ahead of the restore failed: %s", e)
    with contextlib.suppress(OSError):  # else the restore makes its own
        sup.yard = sup.ahead.enter_context(cgroup_yard([]))
    with contextlib.suppress(OSError):  # our caller gone: the go pipe tells
        os.write(ready_fd, C.SUPERVISOR_STANDING_BY)
    go = os.read(go_fd, 1)
    os.close(go_fd)
    sup.timer = Timer()
    if go != b"g":
        if sup.worker is not None:
            sup.worker.close()
        sup.ahead.close()
        sup.unprepare()
    return go == b"g"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vzbackup-supervisor")
    ap.add_argument("mode", choices=["start", "restore"])
    ap.add_argument("ctid", type=int)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--ready-fd", type=int, required=True)
    ap.add_argument("--dumpdir")
    ap.add_argument("--keep-dump", action="store_true")
    ap.add_argument(
        "--tcp-close", action="store_true", help="restore TCP connections closed (from a backup)"
    )
    ap.add_argument(
        "--lazy-pages", action="store_true", help="memory comes from a criu lazy-pages daemon"
    )
    ap.add_argument("--criu-log-level", type=int, default=C.CRIU_LOG_LEVEL)
    ap.add_argument(
        "--go-fd", type=int, help="wait for a byte on this fd before acting (EOF: exit)"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s CT {args.ctid} supervisor[%(process)d]: %(message)s",
    )
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    S.set_child_subreaper()
    S.set_process_name(f"vzsup-{args.ctid}")
    ct = Container(Node.load(args.prefix), args.ctid)
    sup = Supervisor(ct)
    if args.go_fd is not None and not _standby(sup, args.go_fd, args.ready_fd):
        return 0
    write_state(ct.node, ct.ctid, CTState("starting", os.getpid(), started=time.time()))
    try:
        if args.mode == "start":
            sup.start()
        else:
            sup.restore(Path(args.dumpdir), tcp_close=args.tcp_close, lazy=args.lazy_pages,
                        log_level=args.criu_log_level)
    except BaseException as e:
        _failed(sup, args.mode, e)
        kind = type(e).__name__ if isinstance(e, VzError) else "RuntimeFailure"
        _report(args.ready_fd, {"ok": False, "error": str(e), "kind": kind})
        sup.ahead.close()
        return 1
    _running(sup, restored=args.mode == "restore")
    if args.mode == "restore" and not args.keep_dump:
        shutil.rmtree(args.dumpdir, ignore_errors=True)
    sup.timer.lap("after")
    _report(args.ready_fd, {"ok": True, "pid": sup.init_pid, "steps": sup.timer.laps})
    sup.start_console()
    sup.ahead.close()
    while _rebooted(_serve(sup)):
        log.info("CT %s rebooted itself: starting it again", ct.ctid)
        sup = Supervisor(Container(Node.load(args.prefix), args.ctid))  # the config as it is now
        write_state(ct.node, ct.ctid, CTState("starting", os.getpid(), started=time.time()))
        try:
            sup.start()
        except BaseException as e:
            _failed(sup, "restart after reboot", e)
            return 1
        _running(sup, restored=False)
    return 0


def _serve(sup: Supervisor) -> int:
    """Wait for the CT's init to exit, tear the CT down; the init's wait status."""
    status = sup.wait()
    log.info("CT %s init exited (status %#x)", sup.ct.ctid, status)
    sup.cleanup()
    return status


def _rebooted(status: int) -> bool:
    """reboot(2) in a pid namespace ends its init with SIGHUP (restart) or SIGINT (halt,
    power off): like vzctl, a CT's reboot restarts the CT, the node is untouched."""
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGHUP


def _running(sup: Supervisor, *, restored: bool) -> None:
    ct = sup.ct
    write_state(
        ct.node,
        ct.ctid,
        CTState("running", os.getpid(), sup.init_pid, started=time.time(), restored=restored),
    )


def _failed(sup: Supervisor, what: str, e: BaseException) -> None:
    log.error("%s failed: %s", what, e)
    if sup.init_pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(sup.init_pid, signal.SIGKILL)
        sup.wait()
    sup.cleanup()


if __name__ == "__main__":
    sys.exit(main())
