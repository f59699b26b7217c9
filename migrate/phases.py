"""The source side of a migration, read top to bottom (P.Haul's iters.py style)::

    preflight -> first_sync -> { stopped: register
                               | restart: stop -> final_sync -> start
                               | online:  OnlineDump (migrate.online) }
              -> commit -> cleanup

Every phase is timed and every run appends a record to the node's migration history. Until
DEST commits, any failure rolls back: DEST's agent removes what it created and the CT keeps
(or resumes) running here. The SSH session and the tree pusher are passed in
(migrate.dest.RemoteSession, TreePusher); nothing here imports the DEST agent's module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vzbackup.migrate import changes, history
from vzbackup.migrate.cpuinfo import cpuinfo_dump
from vzbackup.migrate.dest import DestAgent, RemoteSession, TreePusher
from vzbackup.migrate.journal import Journal
from vzbackup.migrate.online import OnlineDump, tls_page_server_problem
from vzbackup.migrate.protocol import PROTOCOL_VERSION
from vzbackup.migrate.sync import remote_has_rsync

from vzbackup import __version__
from vzbackup import constants as C
from vzbackup import errors as E
from vzbackup.criu.blockers import blockers, reopen_detached, tree
from vzbackup.criu.check import criu_binary, criu_version, pycriu_module
from vzbackup.ct import fs, network, ops, registry
from vzbackup.ct.container import Container
from vzbackup.ct.state import read_state

log = logging.getLogger("vzbackup.migrate")

SOURCE_STOP_TIMEOUT = 60.0  # for the source's supervisor to notice its CT is gone


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
    plain_pages: bool = False  # memory pages over plain TCP (trusted links only)


@dataclass
class Report:
    """What happened, for the terminal (``-t``), ``--json`` and the history."""

    ctid: int
    dest: str
    dest_ctid: int
    mode: str = ""  # stopped | restart | online | online+lazy | dry-run
    ok: bool = False
    times: dict[str, float] = field(default_factory=dict)
    frozen: float = 0.0
    total: float = 0.0
    bytes_sent: dict[str, int] = field(default_factory=dict)  # tree, images, pages
    frozen_steps: dict[str, float] = field(default_factory=dict)  # sub-steps of the freeze
    dest_steps: dict[str, float] = field(default_factory=dict)  # as DEST timed them
    final_sync_dirs: int | None = None  # directories the final sync visited (None: all)
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
            "frozen_steps": {k: round(v, 4) for k, v in self.frozen_steps.items()},
            "dest_steps": {k: round(v, 4) for k, v in self.dest_steps.items()},
            "final_sync_dirs": self.final_sync_dirs,
            "total": round(self.total, 4),
            "bytes_sent": self.bytes_sent,
            "preflight": self.preflight,
            "error": self.error,
        }

    def record(self) -> dict[str, Any]:
        """The history line of this run."""
        return history.make_record(
            ctid=self.ctid, new_ctid=self.dest_ctid, mode=self.mode, dest=self.dest,
            ok=self.ok, error=self.error, bytes_sent=self.bytes_sent, phases=self.times,
            frozen=self.frozen, total=self.total,
        )


class Migration:
    """Moves CT *ct* to the node behind *session*."""

    def __init__(
        self,
        ct: Container,
        session: RemoteSession,
        opts: MigrateOptions,
        *,
        push_tree: TreePusher,
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
        self.dest = DestAgent(session, self.dest_ctid)
        self.hello: dict[str, Any] = {}
        self.committed = False
        self.journal = Journal(ct.ctid, "source", peer=self.report.dest,
                               remove_area=opts.remove_area)
        self.changes: changes.ChangeWatch | None = None  # since the first sync
        self._t0 = time.monotonic()

    # ------------------------------------------------------------------ the migration
    def run(self) -> Report:
        """Run the whole migration; the report says where the CT runs afterwards."""
        ct = self.ct
        try:
            with ct.backup_lock(), ct.lock():
                self.preflight()
                if self.opts.dry_run:
                    self.report.mode = "dry-run"
                    self.report.ok = True
                    return self.report
                self.journal.save(ct.node)
                try:
                    self.move()
                finally:
                    if not self.committed:
                        self.journal.remove(ct.node)
        except E.VzError as e:
            self.report.error = str(e)
            raise
        finally:
            self.dest.close(drain=not self.report.ok)
            self.report.total = time.monotonic() - self._t0
            self._record()
        return self.report

    def move(self) -> None:
        """Copy, hand over, commit: DEST owns the CT afterwards."""
        self.dest.call("prepare", keep_private=self.opts.keep_dst)
        try:
            self.watch_changes()
            with self.phase("first_sync"):
                self.push_private()
            if not self.ct.running:
                self.report.mode = "stopped"
                self.dest.call("register")
            elif not self.opts.online:
                self.report.mode = "restart"
                self.restart()
            else:
                lazy = self._lazy_possible()
                self.report.mode = "online+lazy" if lazy else "online"
                OnlineDump(self, lazy=lazy).run()
            if not self.committed:
                with self.phase("commit"):
                    self.commit()
        except BaseException:
            if not self.committed:
                self.dest.abort(keep_private=self.opts.keep_dst)
            raise
        finally:
            if self.changes is not None:
                self.changes.close()
        self.report.runs_on = "dest"
        with self.phase("cleanup"):
            self.cleanup_source()
        self.report.ok = True

    # ------------------------------------------------------------------ phases
    def preflight(self) -> None:
        """Checks at both ends; raises before anything is touched."""
        with self.phase("preflight"):
            problems = self._preflight_local()
            o = self.opts
            cpuinfo = None
            if o.online and not problems:
                with contextlib.suppress(Exception):
                    cpuinfo = cpuinfo_dump()
            self.dest.open()
            self.hello = self.dest.call(
                "hello",
                conf=self.ct.conf_path.read_text(),
                need_bytes=fs.tree_bytes(self.ct.ve_private()),
                online=o.online,
                lazy=o.lazy is not False,
                cpuinfo=cpuinfo,
                protocol=PROTOCOL_VERSION,
            )
            problems += [f"DEST: {p}" for p in self.hello.get("problems", [])]
            if o.online and o.lazy is True and not self.hello.get("lazy_ok"):
                problems.append("DEST: lazy pages (userfaultfd) unavailable; use --no-lazy")
            if o.online and not problems and not self._lazy_possible() and not o.plain_pages:
                why = tls_page_server_problem(self.ct.require_running().init_pid)
                problems += [why] if why else []
            self.report.preflight = {
                "source_version": __version__,
                "dest_version": self.hello.get("version"),
                "source_criu": criu_version() if o.online and not problems else None,
                "dest_criu": self.hello.get("criu"),
                "dest_free_bytes": self.hello.get("free_bytes"),
                "lazy": bool(o.online and self._lazy_possible()),
                "precopy": False,  # no memory tracking (soft-dirty) on this kernel: post-copy only
                "problems": problems,
            }
            if self.hello.get("version") != __version__:
                log.warning("vzbackup versions differ: here %s, DEST %s", __version__,
                            self.hello.get("version"))
            if o.sync_method == "rsync" and not self._rsync_both_ends():
                problems.append("--sync rsync: rsync is missing here or at DEST")
            if problems:
                raise MigrationError(
                    "preflight failed, nothing was changed:\n  " + "\n  ".join(problems)
                )
            if o.sync_method == "auto":  # decided once: no probing while the CT is frozen
                o.sync_method = "rsync" if self._rsync_both_ends() else "stream"
            self.report.preflight["sync"] = o.sync_method

    def _rsync_both_ends(self) -> bool:
        return shutil.which("rsync") is not None and remote_has_rsync(self.session)

    def _lazy_possible(self) -> bool:
        """Lazy pages unless refused or unsupported at DEST (its agent says why)."""
        return (self.opts.lazy is not False and bool(self.hello.get("lazy_ok"))
)

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
            if ct.running:  # what CRIU would fail on, before the first byte is copied
                if not o.dry_run:
                    reopen_detached(ct, ct.require_running().init_pid)
                problems += [f"CRIU can't dump {b}" for b in blockers(ct)]
        return problems

    def restart(self) -> None:
        """Stop here, sync what changed, start at DEST; restart here on failure."""
        ct = self.ct
        t_down = time.monotonic()  # downtime: from the stop until DEST runs it
        with self.phase("stop"):
            ops.stop(ct)
        try:
            with self.phase("final_sync"):
                self.push_private(final=True)
            with self.phase("start"):
                self.dest.call("start")
            with self.phase("commit"):
                self.commit()
        except BaseException as e:
            self.dest.abort(keep_private=self.opts.keep_dst)
            try:
                ops.start(ct)
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

    def commit(self) -> None:
        """DEST owns the CT from here on; the journal says so before anything else."""
        self.dest.call("commit")
        self.committed = True
        self.journal.state = "committed"
        self.journal.save(self.ct.node)
        if self.opts.online:  # DEST announced the addresses: stop answering ARP for them here
            with contextlib.suppress(E.VzError):
                network.withdraw(self.ct.net_config())

    def uncommit(self) -> None:
        """Lazy pages stopped after the commit: the CT is ours again (CRIU resumed it)."""
        self.committed = False
        self.journal.state = "preparing"

    def cleanup_source(self) -> None:
        """DEST owns the CT now: retire the source copy (kept on failure, journal says so)."""
        ct = self.ct
        deadline = time.monotonic() + SOURCE_STOP_TIMEOUT
        while read_state(ct.node, ct.ctid) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        finish_source(ct, remove_area=self.opts.remove_area)
        shutil.rmtree(ct.node.dumpdir / f"Dump.{ct.ctid}.migrate-out", ignore_errors=True)
        self.journal.remove(ct.node)

    # ------------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.monotonic()
        log.info("phase %s", name)
        try:
            yield
        finally:
            self.report.times[name] = self.report.times.get(name, 0.0) + time.monotonic() - t

    def push(self, what: str, src: Path, dst: str, method: str | None = None, *,
             urgent: bool = False, only_dirs: list[str] | None = None) -> None:
        """Push a tree to DEST, counting its bytes as *what* (tree, images); *urgent*: DEST's
        rsync runs at the freeze's priority too (ours inherits it from the calling thread)."""
        stats = self.push_tree(
            self.session, src, dst, method=method or self.opts.sync_method,
            bwlimit_kbps=self.opts.bwlimit_kbps,
            remote_nice=C.FREEZE_NICE if urgent else 0, only_dirs=only_dirs,
        )
        self.count(what, int(getattr(stats, "bytes_sent", 0) or 0))

    def watch_changes(self) -> None:
        """Record what changes in the private area of a running CT from now on, so that the
        final sync (in the freeze) visits only that (migrate.changes)."""
        if self.ct.running and self.opts.sync_method == "rsync":
            self.changes = changes.start(self.ct.ve_private(), self._tasks())

    def push_private(self, *, final: bool = False, urgent: bool = False) -> None:
        """The private area to DEST: all of it, or for the *final* sync (the CT frozen or
        stopped) the directories that changed since the first one where they are known."""
        only = self.changes.changed(self._tasks()) if final and self.changes else None
        if final:
            self.report.final_sync_dirs = None if only is None else len(only)
        self.push("tree", self.ct.ve_private(), self.hello["private"], urgent=urgent,
                  only_dirs=only)

    def _tasks(self) -> list[int]:
        state = self.ct.state()
        return tree(state.init_pid) if state is not None else []

    def count(self, what: str, n: int) -> None:
        self.report.bytes_sent[what] = self.report.bytes_sent.get(what, 0) + n

    def failed(self, msg: str, **kw: Any) -> MigrationError:
        return MigrationError(msg, **kw)

    def _record(self) -> None:
        if self.report.mode in ("", "dry-run"):
            return  # refused by preflight or a dry run: nothing moved, nothing to plot
        try:
            history.append(self.ct.node, self.report.record())
        except OSError as e:
            log.warning("could not record the migration in the history: %s", e)


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
