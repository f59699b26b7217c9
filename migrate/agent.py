"""DEST side of a migration: ``vzbackup migrate-agent CTID`` answering the source on stdin/stdout.

The agent holds the DEST CT lock for its whole life and records what it created in a journal
(``LOCKDIR/CTID.migrate.json``). Until the source sends ``commit``, an ``abort``, the end of
its input (the SSH connection dropped) or a signal removes everything it created again, so a
failed migration never leaves a second copy of the CT. ``vzbackup migrate-cleanup CTID``
does the same from the journal after the agent itself crashed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vzbackup.migrate.cpuinfo import cpuinfo_check
from vzbackup.migrate.journal import Journal
from vzbackup.migrate.priority import urge, urge_session, urgent_sshd_parent
from vzbackup.migrate.protocol import PROTOCOL_VERSION, Link, error_reply
from vzbackup.migrate.tls import Identity

from vzbackup import __version__
from vzbackup import constants as C
from vzbackup import errors as E
from vzbackup.config.ct import CTConfig
from vzbackup.config.node import Node
from vzbackup.config.vzfile import VzFile
from vzbackup.criu.check import (
    criu_binary,
    criu_check,
    criu_fixes,
    criu_version,
    pycriu_module,
)
from vzbackup.criu.driver import log_level
from vzbackup.ct import admission, fs, network, ops, quota, registry
from vzbackup.ct.container import Container
from vzbackup.timer import Timer

log = logging.getLogger("vzbackup.migrate.agent")

LAZY_LOG = "lazy-pages.log"
PAGE_SERVER_LOG = "page-server.log"
DAEMON_READY_TIMEOUT = 30.0
COMMIT_LEASE = 20.0  # a restored, uncommitted CT is removed if the source stays silent this
# long; shorter than the source's dead-peer timeout, after which the source resumes its copy
UNPRIV_UFFD_SYSCTL = "vm.unprivileged_userfaultfd"


def _userns_uffd_ok() -> bool:
    """Whether CRIU may open a userfaultfd inside a restored CT: every CT runs in a user
    namespace, whose root lacks the node's CAP_SYS_PTRACE, so lazy pages need the sysctl."""
    path = "/proc/sys/" + UNPRIV_UFFD_SYSCTL.replace(".", "/")
    try:
        with open(path) as f:
            return f.read().strip() == "1"
    except OSError:
        return True  # kernels without the knob let anyone create one


def _criu_check(features: list[str]) -> list[str]:
    """Problems `criu check` reports for the basic set and each extra feature."""
    problems = []
    for feat in [None, *features]:
        try:
            failed = criu_check(feat)
        except E.DependencyError as e:
            return [str(e)]
        if failed is not None:
            tail = failed.splitlines()[-1]
            problems.append(f"criu check{' --feature ' + feat if feat else ''}: {tail}")
    return problems


class Agent:
    """Serves one migration of CT *ctid* into this node."""

    def __init__(self, node: Node, ctid: int, *, source: str = "") -> None:
        self.node = node
        self.ct = Container(node, ctid)
        self.journal = Journal(ctid, "dest", peer=source)
        self.conf_text = ""
        self.lazy_proc: subprocess.Popen[bytes] | None = None
        self.page_server: subprocess.Popen[bytes] | None = None
        self.standby: ops.StandbyRestore | None = None
        self.tls: Identity | None = None
        self.lazy_args: list[str] = []
        self.keep_private = False  # --keep-dst: a rollback keeps the synced private area
        self.lock = None
        self.after_reply: list[Callable[[], object]] = []  # work the source needn't wait for

    # ------------------------------------------------------------------ paths
    def _conf(self) -> CTConfig:
        return CTConfig(self.ct.ctid, VzFile(self.node.ct_conf_path(self.ct.ctid), self.conf_text))

    @property
    def images_dir(self) -> Path:
        return self.node.dumpdir / f"Dump.{self.ct.ctid}.migrate"

    # ------------------------------------------------------------------ requests
    def op_hello(
        self,
        conf: str,
        need_bytes: int = 0,
        online: bool = False,
        lazy: bool = False,
        cpuinfo: str | None = None,
        protocol: int = PROTOCOL_VERSION,
    ) -> dict[str, Any]:
        """Preflight: everything that must hold before anything is touched."""
        self.conf_text = conf
        problems: list[str] = []
        if protocol != PROTOCOL_VERSION:
            problems.append(f"protocol {protocol} unsupported (DEST speaks {PROTOCOL_VERSION})")
        ctid = self.ct.ctid
        conf_obj = self._conf()
        try:
            conf_obj.validate()
        except E.VzError as e:
            problems.append(f"the CT config is not valid here: {e}")
        private = self.ct.ve_private(conf_obj)
        prior = Journal.load(self.node, ctid)
        reusable = prior is not None and prior.state == "kept" and prior.private == str(private)
        problems += [f"{c.message} on this node" for c in admission.clashes(
            self.node, ctid, name=conf_obj.name, ips=conf_obj.ips, host=True,
            private=None if reusable else private, empty_private_ok=True)]
        free = fs.free_bytes(private.parent)
        if need_bytes and free < need_bytes * 1.1:
            problems.append(
                f"not enough space for the private area under {private.parent}: "
                f"{free // 2**20} MiB free, {need_bytes // 2**20} MiB needed"
            )
        if online:
            problems += _criu_check(["uffd-noncoop"] if lazy else [])
            if cpuinfo:
                with contextlib.suppress(E.DependencyError):
                    bad = cpuinfo_check(cpuinfo)
                    if bad:
                        problems.append(bad)
        nft_lock = online and criu_check(C.CRIU_NFT_LOCK_FEATURE) is None
        lazy_ok = online and lazy and not any("uffd" in p for p in problems)
        lazy_why = "" if lazy_ok or not (online and lazy) else "userfaultfd unavailable"
        if lazy_ok and not _userns_uffd_ok():
            lazy_ok = False
            lazy_why = f"CTs in a user namespace need {UNPRIV_UFFD_SYSCTL}=1 (scripts/setup.sh)"
        try:
            cv = criu_version()
        except E.DependencyError:
            cv = None
        return {
            "version": __version__,
            "criu": cv,
            "criu_fixes": sorted(criu_fixes()) if cv else [],
            "problems": problems,
            "lazy_ok": lazy_ok,
            "lazy_why": lazy_why,
            "nft_lock": nft_lock,
            "free_bytes": free,
            "private": str(private),
            "images": str(self.images_dir),
            "reuse_private": reusable,
        }

    def op_prepare(self, keep_private: bool = False) -> dict[str, Any]:
        """Create the empty private area (btrfs subvolume where possible) and image dir;
        *keep_private* (--keep-dst): any rollback keeps it, told or not."""
        self.keep_private = keep_private
        conf = self._conf()
        private = self.ct.ve_private(conf)
        if not private.exists():
            private.parent.mkdir(parents=True, exist_ok=True)
            fs.make_private_area(private)
            quota.prepare(private, self.ct.ctid)  # rsync's files join the CT's project
        self.journal.private = str(private)
        shutil.rmtree(self.images_dir, ignore_errors=True)
        self.images_dir.mkdir(parents=True)
        self.journal.images = str(self.images_dir)
        self.journal.save(self.node)
        return {"private": str(private), "images": str(self.images_dir)}

    def _place_conf(self) -> None:
        if self.journal.conf:
            return
        if self.ct.exists:
            raise E.ExistsError(f"CT {self.ct.ctid} appeared on this node meanwhile")
        conf = self._conf()
        self.journal.conf = True  # journal first: a crash right after leaves it removable
        self.journal.save(self.node)
        self.node.ensure_dirs()
        conf.save()
        if conf.name:
            registry.set_name(self.node, self.ct.ctid, conf.name)
            self.journal.name = conf.name
            self.journal.save(self.node)

    def _start_criu_daemon(self, argv: list[str], log_name: str, env: dict[str, str] | None = None
                           ) -> subprocess.Popen[bytes]:
        """Start a CRIU helper (lazy-pages, page-server), with *env* added to its
        environment, and wait until it is ready."""
        r, w = os.pipe()
        argv = [criu_binary(), *argv, "-D", str(self.images_dir), "-W", str(self.images_dir),
                "-o", log_name, f"-v{log_level(C.CRIU_FREEZE_LOG_LEVEL)}",
                "--status-fd", str(w)]
        if self.tls is not None:
            argv += self.tls.criu_args()
        try:
            proc = subprocess.Popen(
                argv, pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, **env} if env else None,
            )
            urge_session(proc.pid)  # its own session: it serves the freeze's pages
        finally:
            os.close(w)
        try:
            ready, _, _ = select.select([r], [], [], DAEMON_READY_TIMEOUT)
            ok = bool(ready) and os.read(r, 1) == b"\0"
        finally:
            os.close(r)
        if not ok:
            _kill(proc)
            raise E.CheckpointError(f"criu {argv[1]} did not become ready",
                                    hint=f"log: {self.images_dir / log_name}")
        return proc

    def op_stage(
        self, lazy: bool = False, page_address: str = "", page_port: int = 0,
        tls_cert: str | None = None,
    ) -> dict[str, Any]:
        """Before the source freezes: everything a restore needs but the images.

        Registers the CT, makes this side's one-time TLS identity (trusting the source's
        certificate), starts CRIU's ``page-server`` that the source's dump fills (with lazy
        pages: ``lazy-pages`` fetching from *page_address*:*page_port*, now where CRIU reads
        its images when the restore connects, else once they are here) and a restore
        supervisor waiting for the word. Whatever fails here still lets the source
        carry on untouched.
        """
        timer = Timer()
        self._place_conf()
        pycriu_module()
        if tls_cert is not None:
            self.tls = Identity.create("dest", self.node.rundir)
            self.tls.trust(tls_cert)
        timer.lap("conf")
        reply: dict[str, Any] = {"tls_cert": self.tls.cert_pem if self.tls else None}
        if lazy:
            self.lazy_args = ["lazy-pages", "--page-server", "--address", page_address,
                              "--port", str(page_port)]
            if C.CRIU_FIX_LAZY_EARLY in criu_fixes():  # else it waits for the images
                self.lazy_proc = self._start_criu_daemon(
                    self.lazy_args, LAZY_LOG, env={C.CRIU_LAZY_EARLY_ENV: "1"})
                reply["lazy_daemon"] = "running"
        else:
            reply["page_port"] = page_port or _free_port()
            self.page_server = self._start_criu_daemon(
                ["page-server", "--port", str(reply["page_port"])], PAGE_SERVER_LOG)
        timer.lap("page_daemon")
        self.standby = ops.standby_restore(self.ct, str(self.images_dir), keep_dump=True,
                                           lazy=lazy, criu_log_level=C.CRIU_FREEZE_LOG_LEVEL)
        timer.lap("supervisor")
        self.standby.wait_ready(DAEMON_READY_TIMEOUT)  # the source freezes after this reply
        timer.lap("standby")
        return {**reply, "steps": timer.laps}

    def op_put_images(self, names: list[list], blob: bytes = b"", last: bool = True
                      ) -> dict[str, Any]:
        """Some of the source's images, in one payload: ``names`` is ``[[name, size], ...]``
        (sent while its dump writes them). After the *last* ones, with lazy pages, the
        ``lazy-pages`` daemon starts on the complete set."""
        timer = Timer()
        if last and self.page_server is not None:  # the dump has ended: so has its page stream
            rc = self.page_server.wait(DAEMON_READY_TIMEOUT)
            self.page_server = None
            if rc != 0:
                raise E.CheckpointError(f"criu page-server failed (exit {rc})",
                                        hint=f"log: {self.images_dir / PAGE_SERVER_LOG}")
        offset = 0
        for name, size in names:
            if "/" in name or name.startswith("."):
                raise E.UsageError(f"bad image name {name!r}")
            (self.images_dir / name).write_bytes(blob[offset:offset + size])
            offset += size
        timer.lap("write")
        if last and self.lazy_args and self.lazy_proc is None:
            self.lazy_proc = self._start_criu_daemon(self.lazy_args, LAZY_LOG)
            timer.lap("lazy_daemon")
        return {"steps": timer.laps}

    def op_restore(self) -> dict[str, Any]:
        """Restore the CT from the images (with a lazy-pages daemon: post-copy)."""
        t0 = time.monotonic()
        self._place_conf()
        # not saved: on disk "preparing" already has a crash undo the restored copy too, and
        # the fsync (1 ms, 30 ms with other writers) would sit in the freeze
        self.journal.state = "restored"
        steps: dict[str, float] = {}
        if self.standby is not None:
            standby, self.standby = self.standby, None
            pid = standby.go()
            steps = standby.steps
            self.after_reply.append(standby.apply_quota)  # before the next request
        else:
            pid = ops.restore(self.ct, str(self.images_dir), keep_dump=True,
                              lazy=self.lazy_proc is not None,
                              criu_log_level=C.CRIU_FREEZE_LOG_LEVEL)
        return {"pid": pid, "seconds": time.monotonic() - t0, "steps": steps}

    def op_start(self) -> dict[str, Any]:
        t0 = time.monotonic()
        self._place_conf()
        self.journal.state = "restored"
        self.journal.save(self.node)
        pid = ops.start(self.ct)
        return {"pid": pid, "seconds": time.monotonic() - t0}

    def op_register(self) -> dict[str, Any]:
        self._place_conf()
        return {}

    def op_commit(self) -> dict[str, Any]:
        """The source hands the CT over: from now on this node owns it."""
        if self.journal.conf is False:
            raise E.StateError("nothing to commit: the CT was not registered here")
        if self.journal.state == "restored" and not self.ct.running:
            raise E.StateError(f"CT {self.ct.ctid} is not running here any more")
        self.journal.state = "committed"
        self.journal.save(self.node)
        if not self.lazy_proc:
            self._finish()
        return {}

    def op_lazy_wait(self, timeout: float = 3600) -> dict[str, Any]:
        """Wait until the lazy-pages daemon has pulled every page (or failed)."""
        t0 = time.monotonic()
        rc = None
        if self.lazy_proc:
            try:
                rc = self.lazy_proc.wait(timeout)
            except subprocess.TimeoutExpired:
                rc = None
        if rc != 0:
            self.rollback()
            raise E.CheckpointError(
                f"lazy page transfer did not finish (criu lazy-pages: {rc})",
                hint=f"log: {self.images_dir / LAZY_LOG}",
            )
        self.lazy_proc = None
        if self.journal.state == "committed":
            self._finish()
        return {"seconds": time.monotonic() - t0}

    def op_abort(self, keep_private: bool = False) -> dict[str, Any]:
        self.rollback(keep_private=keep_private)
        return {}

    # ------------------------------------------------------------------ outcomes
    def _finish(self) -> None:
        self._drop_helpers()
        shutil.rmtree(self.images_dir, ignore_errors=True)
        self.journal.remove(self.node)

    def _drop_helpers(self) -> None:
        """Stop what was staged for a restore that won't come; forget the TLS identity."""
        if self.standby is not None:
            self.standby.cancel()
            self.standby = None
        _kill(self.page_server)
        self.page_server = None
        if self.tls is not None:
            self.tls.remove()
            self.tls = None

    def _pages_pending(self) -> bool:
        return self.lazy_proc is not None and self.lazy_proc.poll() != 0

    def _report_lazy_failure(self, limit: int = 12) -> None:
        """Log why the lazy-pages daemon ended early (its log goes with the images)."""
        if self.lazy_proc is None or self.lazy_proc.poll() in (None, 0):
            return
        try:
            lines = (self.images_dir / LAZY_LOG).read_text(errors="replace").splitlines()
        except OSError:
            return
        for line in [ln for ln in lines if "Error" in ln or "lazy-pages:" in ln][-limit:]:
            log.warning("criu lazy-pages: %s", line.strip())

    def rollback(self, *, keep_private: bool = False) -> None:
        """Remove everything this migration created here (the CT first, if it runs).

        A committed CT is kept, unless its memory is still arriving by lazy pages: then the
        source resumes its own complete copy when the transfer fails, so this one must go.
        """
        if self.journal.state == "committed" and not self._pages_pending():
            return
        self.journal.state = "preparing"
        log.warning("rolling back the migration of CT %s on this node", self.ct.ctid)
        self._report_lazy_failure()
        _kill(self.lazy_proc)
        self._drop_helpers()
        undo_created(self.node, self.journal, keep_private=keep_private)

    def serve(self, link: Link) -> int:
        """Answer requests until ``bye``, the end of input, or a fatal signal."""
        ops_table = {
            "hello": self.op_hello,
            "prepare": self.op_prepare,
            "stage": self.op_stage,
            "put_images": self.op_put_images,
            "restore": self.op_restore,
            "start": self.op_start,
            "register": self.op_register,
            "commit": self.op_commit,
            "lazy_wait": self.op_lazy_wait,
            "abort": self.op_abort,
        }
        try:
            while True:
                if self.journal.state == "restored" and not link.readable(COMMIT_LEASE):
                    log.warning("no commit from the source within %ss", COMMIT_LEASE)
                    break
                msg = link.recv()
                if msg is None:
                    log.warning("the source went away")
                    break
                op = msg.pop("op", "")
                if op == "bye":
                    link.send({"ok": True})
                    break
                if op == "abort":
                    self.keep_private = bool(msg.get("keep_private"))
                handler = ops_table.get(op)
                try:
                    if handler is None:
                        raise E.UsageError(f"unknown request {op!r}")
                    reply = {"ok": True, **handler(**msg)}
                except Exception as e:
                    log.error("%s failed: %s", op, e)
                    reply = error_reply(e)
                link.send(reply)
                while self.after_reply:
                    self.after_reply.pop(0)()
        except BaseException as e:  # lost link, SIGTERM/SIGHUP: never leave a half copy
            log.error("agent stopping: %s", e)
        finally:
            if self.journal.state != "committed":
                self.rollback(keep_private=self.keep_private)
            elif self.lazy_proc:  # the CT is ours once every page has arrived
                if self.lazy_proc.wait() == 0:
                    self._finish()
                else:
                    self.rollback(keep_private=self.keep_private)
        return 0 if self.journal.state == "committed" else 1


def _kill(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def undo_created(node: Node, journal: Journal, *, keep_private: bool = False) -> None:
    """Undo what a DEST journal records: stop the CT, remove config, name, private area."""
    ct = Container(node, journal.ctid)
    if journal.conf and ct.running:
        # network first: the restored copy must not close the CT's connections (FIN/RST to
        # its peers) that the source's copy, resumed, still holds
        with contextlib.suppress(E.VzError):
            network.teardown(ct.net_config())
        with contextlib.suppress(E.VzError):
            ops.stop(ct, fast=True)
    if journal.name:
        registry.remove_name(node, journal.name)
    if journal.conf:
        ct.conf_path.unlink(missing_ok=True)
    if journal.images:
        shutil.rmtree(journal.images, ignore_errors=True)
    if journal.private and not keep_private:
        fs.remove_tree(Path(journal.private), ignore_errors=True)
    if journal.private and keep_private:
        journal.state, journal.conf, journal.name, journal.images = "kept", False, "", ""
        journal.save(node)
    else:
        journal.remove(node)


def run_agent(node: Node, ctid: int, source: str = "") -> int:
    """Entry point of ``vzbackup migrate-agent``: lock, serve stdin/stdout, clean up."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="DEST %(levelname)s: %(message)s"
    )

    def _term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _term)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    urge()  # its page daemons and restore run inside the freeze
    urgent_sshd_parent()  # it carries the source's requests and our answers
    link = Link(sys.stdin.buffer, sys.stdout.buffer)
    agent = Agent(node, ctid, source=source)
    try:
        lock = agent.ct.lock()
        lock.acquire()
    except E.VzError as e:
        link.send(error_reply(e))
        return e.exit_code
    try:
        prior = Journal.load(node, ctid)
        if prior and prior.role == "dest" and prior.state in ("preparing", "restored"):
            undo_created(node, prior)  # a crashed earlier attempt: its lock is ours now
        if prior and prior.state == "kept":
            agent.journal.private = prior.private
        link.send({"ok": True, "ready": True, "pid": os.getpid()})
        return agent.serve(link)
    finally:
        lock.release()
