"""The source side of a migration: a small explicit state machine (P.Haul style).

    preflight -> first_sync -> { stopped: register
                               | restart: stop -> final_sync -> start
                               | online:  dump(freeze) -> final_sync -> image_transfer
                                          -> restore -> [lazy_pages] }
              -> commit -> cleanup

Every phase is timed. Until DEST commits, any failure rolls back: DEST's agent removes what
it created and the CT keeps (or resumes) running here. An online dump keeps the tasks frozen
until DEST confirms the restored CT runs: CRIU's "post-dump" step does the final sync, image
transfer and restore, and a failure there makes CRIU resume the tasks. With lazy pages, memory
stays here and CRIU serves it after "post-dump"; the tasks here die only when every page has
arrived, and a failed page transfer resumes them here and removes the DEST copy.

The SSH session and the tree pusher are passed in, not hard-wired.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vzbackup.migrate.agent import Journal, cpuinfo_dump
from vzbackup.migrate.protocol import PROTOCOL_VERSION, Link, LinkLost, raise_reply
from vzbackup.migrate.sync import remote_has_rsync

from vzbackup import __version__
from vzbackup import errors as E
from vzbackup.criu import driver
from vzbackup.criu.check import criu_binary, criu_version, pycriu_module
from vzbackup.ct import network, ops, registry
from vzbackup.ct.container import Container
from vzbackup.ct.state import read_state
from vzbackup.lock import Lock

log = logging.getLogger("vzbackup.migrate")

LISTEN_TIMEOUT = 30.0  # for CRIU's page server to start listening after post-dump


class MigrationError(E.VzError):
    """The migration failed; the message says where the CT runs now."""

    exit_code = 15


@dataclass
class MigrateOptions:
    online: bool = False
    lazy: bool | None = None  # None: lazy when DEST supports userfaultfd
    keep_dst: bool = False
    remove_area: bool = True
    new_id: int | None = None
    bwlimit_kbps: int | None = None
    dry_run: bool = False
    sync_method: str = "auto"  # rsync | stream | auto
    lazy_port: int = 0  # 0: any free port


@dataclass
class Report:
    """What happened, for the terminal (``-t``) and ``--json``."""

    ctid: int
    dest: str
    dest_ctid: int
    mode: str = ""  # stopped | restart | online | online+lazy | dry-run
    ok: bool = False
    times: dict[str, float] = field(default_factory=dict)
    frozen: float = 0.0
    total: float = 0.0
    bytes_sent: dict[str, int] = field(default_factory=dict)
    preflight: dict[str, Any] = field(default_factory=dict)
    runs_on: str = "source"
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "ctid": self.ctid,
            "dest": self.dest,
            "dest_ctid": self.dest_ctid,
            "mode": self.mode,
            "ok": self.ok,
            "runs_on": self.runs_on,
            "times": {k: round(v, 4) for k, v in self.times.items()},
            "frozen": round(self.frozen, 4),
            "total": round(self.total, 4),
            "bytes_sent": self.bytes_sent,
            "preflight": self.preflight,
            "error": self.error,
        }


Pusher = Callable[..., Any]  # migrate.sync.push_tree(session, src, dst, method=, bwlimit_kbps=)


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _listening(port: int) -> bool:
    """Whether something in this network namespace listens on TCP *port*."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class Migration:
    """Moves CT *ct* to the node behind *session*."""

    def __init__(
        self,
        ct: Container,
        session: Any,
        opts: MigrateOptions,
        *,
        push_tree: Pusher,
        say: Callable[[str], None] = lambda _m: None,
    ) -> None:
        self.ct = ct
        self.session = session
        self.opts = opts
        self.push_tree = push_tree
        self.say = say
        self.dest_ctid = opts.new_id or ct.ctid
        self.report = Report(ct.ctid, f"{session.target.user}@{session.target.host}",
                             self.dest_ctid)
        self.link: Link | None = None
        self.chan: Any = None
        self.hello: dict[str, Any] = {}
        self.committed = False
        self.journal = Journal(ct.ctid, "source", peer=self.report.dest,
                               remove_area=opts.remove_area)
        self._t0 = time.monotonic()

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.monotonic()
        log.info("phase %s", name)
        try:
            yield
        finally:
            self.report.times[name] = self.report.times.get(name, 0.0) + time.monotonic() - t

    def _call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.link is not None
        return self.link.call(op, **args)

    def _push(self, what: str, src: Path, dst: str, method: str | None = None) -> None:
        stats = self.push_tree(
            self.session, src, dst, method=method or self.opts.sync_method,
            bwlimit_kbps=self.opts.bwlimit_kbps,
        )  # fmt: skip
        sent = int(getattr(stats, "bytes_sent", 0) or 0)
        self.report.bytes_sent[what] = self.report.bytes_sent.get(what, 0) + sent

    def _open_agent(self) -> None:
        argv = [
            *self.session.target.remote_vzbackup, "migrate-agent", str(self.dest_ctid),
            "--source", socket.gethostname(),
        ]  # fmt: skip
        self.chan = self.session.open_exec(argv)
        self.link = Link(self.chan.makefile("rb"), self.chan.makefile_stdin("wb"))
        threading.Thread(target=self._relay_stderr, daemon=True).start()
        first = self.link.recv()
        if first is None:
            raise LinkLost(
                "DEST agent did not start",
                hint=f"is vzbackup installed on DEST ({' '.join(argv[:2])})?",
            )
        raise_reply(first, "start of the agent")

    def _relay_stderr(self) -> None:
        with contextlib.suppress(Exception):
            for line in self.chan.makefile_stderr("rb"):
                text = line.decode(errors="replace").rstrip()
                if text:
                    log.info("%s", text)

    def _close_agent(self) -> None:
        if self.link is not None:
            with contextlib.suppress(E.VzError):
                self.link.call("bye")
        if self.chan is not None:
            with contextlib.suppress(Exception):
                self.chan.close()
        self.link = self.chan = None

    def _my_address(self) -> str:
        """This node's address as DEST sees it (where DEST fetches lazy pages from)."""
        return self.session.transport.sock.getsockname()[0]

    def _abort_dest(self) -> None:
        if self.link is None:
            return
        try:
            self._call("abort", keep_private=self.opts.keep_dst)
        except E.VzError as e:
            log.warning("DEST abort: %s (the agent rolls back on its own when the link drops)", e)

    # ------------------------------------------------------------------ phases
    def _preflight_local(self) -> list[str]:
        ct, o = self.ct, self.opts
        problems = []
        conf = ct.conf  # NotFoundError for an unknown CT
        if not ct.ve_private(conf).is_dir():
            problems.append(f"private area {ct.ve_private(conf)} does not exist")
        if ct.status() == "suspended":
            problems.append(f"CT {ct.ctid} is suspended; resume it first")
        if o.online and not ct.running:
            problems.append(f"--online needs a running CT; CT {ct.ctid} is stopped")
        if o.online and o.new_id and o.new_id != ct.ctid:
            problems.append("--new-id can't be combined with --online (the CRIU images name "
                            "the CT's cgroups); use a restart migration")
        if o.online:
            try:
                criu_binary()
                pycriu_module()
            except E.DependencyError as e:
                problems.append(str(e))
        return problems

    def preflight(self) -> None:
        """Checks at both ends; raises before anything is touched."""
        with self.phase("preflight"):
            problems = self._preflight_local()
            o = self.opts
            cpuinfo = None
            if o.online and not problems:
                with contextlib.suppress(Exception):
                    cpuinfo = cpuinfo_dump()
            self._open_agent()
            self.hello = self._call(
                "hello",
                conf=self.ct.conf_path.read_text(),
                need_bytes=_tree_bytes(self.ct.ve_private()),
                online=o.online,
                lazy=o.lazy is not False,
                cpuinfo=cpuinfo,
                protocol=PROTOCOL_VERSION,
            )
            problems += [f"DEST: {p}" for p in self.hello.get("problems", [])]
            if o.online and o.lazy is True and not self.hello.get("lazy_ok"):
                problems.append("DEST: lazy pages (userfaultfd) unavailable; use --no-lazy")
            local_criu = criu_version() if o.online and not problems else None
            self.report.preflight = {
                "source_version": __version__,
                "dest_version": self.hello.get("version"),
                "source_criu": local_criu,
                "dest_criu": self.hello.get("criu"),
                "dest_free_bytes": self.hello.get("free_bytes"),
                "lazy": bool(o.online and o.lazy is not False and self.hello.get("lazy_ok")),
                "precopy": False,  # no memory tracking (soft-dirty) on this kernel: post-copy only
                "problems": problems,
            }
            if self.hello.get("version") != __version__:
                log.warning("vzbackup versions differ: here %s, DEST %s", __version__,
                            self.hello.get("version"))
            if problems:
                raise MigrationError(
                    "preflight failed, nothing was changed:\n  " + "\n  ".join(problems)
                )
            if o.sync_method == "auto":  # decided once: no probing while the CT is frozen
                rsync_here = shutil.which("rsync") is not None
                o.sync_method = "rsync" if rsync_here and remote_has_rsync(self.session) \
                    else "stream"
            self.report.preflight["sync"] = o.sync_method

    def run(self) -> Report:
        """Run the whole migration; the report says where the CT runs afterwards."""
        ct = self.ct
        try:
            backup_lock = Lock(ct.node.lockdir / f"{ct.ctid}.backup.lock", what=f"CT {ct.ctid}")
            with backup_lock, ct.lock():
                self.preflight()
                if self.opts.dry_run:
                    self.report.mode = "dry-run"
                    self.report.ok = True
                    return self.report
                self.journal.save(ct.node)
                try:
                    self._migrate()
                finally:
                    if not self.committed:
                        self.journal.remove(ct.node)
        except E.VzError as e:
            self.report.error = str(e)
            raise
        finally:
            self._close_agent()
            self.report.total = time.monotonic() - self._t0
        return self.report

    def _migrate(self) -> None:
        ct, o = self.ct, self.opts
        self._call("prepare")
        private = ct.ve_private()
        running = ct.running
        try:
            with self.phase("first_sync"):
                self._push("private", private, self.hello["private"])
            if not running:
                self.report.mode = "stopped"
                self._call("register")
            elif not o.online:
                self.report.mode = "restart"
                self._restart(private)
            else:
                lazy = o.lazy is not False and bool(self.hello.get("lazy_ok"))
                self.report.mode = "online+lazy" if lazy else "online"
                self._online(private, lazy)
            if not self.committed:
                with self.phase("commit"):
                    self._call("commit")
                    self._committed()
        except BaseException:
            if not self.committed:
                self._abort_dest()
            raise
        self.report.runs_on = "dest"
        with self.phase("cleanup"):
            self._cleanup_source()
        self.report.ok = True

    def _committed(self) -> None:
        self.committed = True
        self.journal.state = "committed"
        self.journal.save(self.ct.node)
        if self.opts.online:  # DEST announced the addresses: stop answering ARP for them here
            with contextlib.suppress(E.VzError):
                network.withdraw(self.ct.net_config())

    def _restart(self, private: Path) -> None:
        ct = self.ct
        t_down = time.monotonic()  # downtime: from the stop until DEST runs it
        with self.phase("stop"):
            ops.stop_locked(ct)
        try:
            with self.phase("final_sync"):
                self._push("private", private, self.hello["private"])
            with self.phase("start"):
                self._call("start")
            with self.phase("commit"):
                self._call("commit")
                self._committed()
        except BaseException as e:
            self._abort_dest()
            try:
                ops.start_locked(ct)
            except E.VzError as e2:
                raise MigrationError(
                    f"migration failed ({e}) and restarting CT {ct.ctid} here failed too: {e2}",
                    hint=f"start it with 'vzbackup start {ct.ctid}'",
                ) from e
            raise MigrationError(
                f"migration failed: {e}; CT {ct.ctid} was restarted here"
            ) from e
        finally:
            self.report.frozen = time.monotonic() - t_down

    def _online(self, private: Path, lazy: bool) -> None:
        ct = self.ct
        st = ct.require_running()
        images = ct.node.dumpdir / f"Dump.{ct.ctid}.migrate-out"
        shutil.rmtree(images, ignore_errors=True)
        port = (self.opts.lazy_port or _free_port()) if lazy else 0
        clock: dict[str, float] = {}
        lazy_failed: list[BaseException] = []
        restorer: threading.Thread | None = None

        sync_failed: list[BaseException] = []
        syncer: threading.Thread | None = None

        def pre_dump() -> None:
            clock["freeze"] = time.monotonic()

        def final_sync() -> None:
            try:
                with self.phase("final_sync"):
                    self._push("private", private, self.hello["private"])
            except BaseException as e:
                sync_failed.append(e)

        def network_lock() -> None:
            # CRIU has seized (frozen) every task: the files are final, so the last sync
            # runs while CRIU writes the images
            nonlocal syncer
            syncer = threading.Thread(target=final_sync, daemon=True)
            syncer.start()

        def post_dump() -> None:
            try:
                _post_dump()
            except BaseException:
                if lazy:  # CRIU starts its page server even after a failed post-dump:
                    # fail it as soon as it listens, or the dump would wait for ever
                    threading.Thread(target=_poke_when_listening, args=(port,),
                                     daemon=True).start()
                raise

        def _post_dump() -> None:
            nonlocal restorer
            now = time.monotonic()
            self.report.times["dump"] = now - clock.get("freeze", now)
            if syncer is None:
                final_sync()
            else:
                syncer.join()
            if sync_failed:
                raise sync_failed[0]
            with self.phase("image_transfer"):
                self._push("images", images, self.hello["images"], method="stream")
            if not lazy:
                with self.phase("restore"):
                    self._call("restore")
                with self.phase("commit"):
                    self._call("commit")
                    self._committed()
                self.report.frozen = time.monotonic() - clock["freeze"]
                return
            with self.phase("restore"):  # everything DEST can do before the pages flow
                self._call("stage_lazy", lazy_address=self._my_address(), lazy_port=port)
            clock["post_dump_done"] = time.monotonic()
            restorer = threading.Thread(target=lazy_restore, daemon=True)
            restorer.start()

        def lazy_restore() -> None:
            try:
                deadline = time.monotonic() + LISTEN_TIMEOUT
                while not _listening(port):
                    if time.monotonic() > deadline:
                        raise E.CheckpointError("CRIU's page server did not start listening")
                    time.sleep(0.002)
                with self.phase("restore"):
                    self._call("restore", lazy_address=self._my_address(), lazy_port=port)
                clock["restored"] = time.monotonic()
                self.report.frozen = clock["restored"] - clock["freeze"]
                with self.phase("commit"):
                    self._call("commit")
                    self._committed()
            except BaseException as e:
                lazy_failed.append(e)
                self._abort_dest()
                _poke(port)  # the page server gets EOF: CRIU resumes the tasks here

        try:
            driver.dump(
                st.init_pid,
                images,
                driver.DumpOptions(external=ops.dump_external(ct.conf), lazy_port=port),
                notify={"pre-dump": pre_dump, "network-lock": network_lock,
                        "post-dump": post_dump},
            )
            t_pages = time.monotonic()
            if restorer is not None:
                restorer.join()
            if lazy_failed:
                raise lazy_failed[0]
            if lazy:
                self.report.times["lazy_pages"] = time.monotonic() - clock.get(
                    "restored", t_pages
                )
                self._call("lazy_wait")
        except BaseException as e:
            if syncer is not None:
                syncer.join()
            if restorer is not None:
                restorer.join()
            if lazy and "post_dump_done" in clock:
                _unlock_network(st.init_pid)
            if lazy and self.committed:
                # Pages stopped flowing after DEST took over: CRIU resumed the tasks here
                # (they hold the only complete memory) and DEST drops its copy on its own.
                self.committed = False
                self.journal.state = "preparing"
            msg = f"online migration failed: {lazy_failed[0] if lazy_failed else e}"
            raise MigrationError(
                f"{msg}; CT {ct.ctid} keeps running here",
                hint=f"CRIU log: {images / driver.DUMP_LOG}",
            ) from e
        finally:
            if not self.committed:
                shutil.rmtree(images, ignore_errors=True)

    def _cleanup_source(self) -> None:
        """DEST owns the CT now: retire the source copy (kept on failure, journal says so)."""
        ct = self.ct
        deadline = time.monotonic() + 60
        while read_state(ct.node, ct.ctid) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        finish_source(ct, remove_area=self.opts.remove_area)
        shutil.rmtree(ct.node.dumpdir / f"Dump.{ct.ctid}.migrate-out", ignore_errors=True)
        self.journal.remove(ct.node)


def _poke_when_listening(port: int) -> None:
    deadline = time.monotonic() + LISTEN_TIMEOUT
    while not _listening(port) and time.monotonic() < deadline:
        time.sleep(0.005)
    _poke(port)


def _poke(port: int) -> None:
    """Fail CRIU's lazy page server (a torn request, not a clean EOF, which it would take
    for success): the dump then resumes the tasks here instead of killing them."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 2) as sk:
        sk.sendall(b"\0")


def _unlock_network(pid: int) -> None:
    """Drop CRIU's network lock in the CT's netns. CRIU leaves it in place when a lazy page
    transfer fails after "post-dump" (it resumes the tasks but skips its own unlock)."""
    for tool in ("iptables", "ip6tables"):
        for rule in (["-D", "INPUT", "-j", "CRIU"], ["-D", "OUTPUT", "-j", "CRIU"],
                     ["-F", "CRIU"], ["-X", "CRIU"]):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", tool, "-w", *rule],
                               capture_output=True, timeout=30, check=False)


def finish_source(ct: Container, *, remove_area: bool) -> None:
    """Retire a migrated CT here: config kept as ``CTID.conf.migrated``, name link removed,
    private area removed (``--remove-area yes``) or kept beside the config."""
    if ct.running:
        raise E.StateError(f"CT {ct.ctid} still runs here; not removing it")
    conf = ct.conf
    ct.umount()
    if remove_area:
        ct.remove_private()
    registry.remove_name(ct.node, conf.name)
    os.replace(ct.conf_path, ct.conf_path.with_suffix(".conf.migrated"))
