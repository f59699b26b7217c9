"""Consistent sources for backups: vzdump's stop, suspend, snapshot and checkpoint modes.

``consistent_source(ct, mode, tmpdir=...)`` is a context manager that yields a ``Source``: a
directory tree holding the CT's files as of one instant (and, in checkpoint mode, CRIU images
of its processes taken at that same instant). Whatever the mode set up is undone on exit,
also when the body raises or the process gets SIGTERM/SIGINT: the CT is thawed or started
again, temporary copies and snapshots are removed.

- ``stop``: stop the CT, yield its private area, start it again.
- ``suspend``: rsync the private area while the CT runs, freeze it, rsync again, thaw; yield
  the copy (made in *copy_into* when given: the caller keeps it, e.g. ``clone``).
- ``snapshot``: private area must be a btrfs subvolume; freeze, take a read-only snapshot, thaw;
  yield the snapshot.
- ``checkpoint``: CRIU dump with ``leave_running``; the files are copied (rsync) or snapshotted
  (btrfs) from CRIU's post-dump notification, while the tasks are still frozen by CRIU. Restore
  such a pair with ``ops.restore(..., tcp_close=True)``.

A stopped CT is backed up from its private area as is, whatever the mode (``Source.mode`` is
then "stop"). The CT lock is held for the whole ``with`` block, so nobody starts, stops or
suspends the CT meanwhile: the body must not call the locking ``ops`` functions for that CT.

Hook phases (vzdump's): for a running CT ``phase("pre-stop")`` comes before the CT is stopped
or frozen, ``phase("pre-restart")`` while it still is (in checkpoint mode from CRIU's post-dump
notification, after the files were taken), ``phase("post-restart")`` once it runs again. Once
"pre-stop" was called the other two are always called too, also on errors (except
"post-restart" when the CT could not be started again).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from vzbackup import constants as C
from vzbackup import errors as E
from vzbackup.ct import fs
from vzbackup.ct.container import Container
from vzbackup.ct.fs import is_btrfs_subvolume
from vzbackup.syscalls import pid_alive

__all__ = [
    "MODES",
    "RestartError",
    "Source",
    "Terminated",
    "consistent_source",
    "is_btrfs_subvolume",
]

MODES = ("stop", "suspend", "snapshot", "checkpoint")


class Source:
    """A consistent view of a CT's files (and CRIU images) to back up."""

    def __init__(self, root: Path, state_dir: Path | None, was_running: bool, mode: str,
                 same_inodes: bool, frozen_seconds: float) -> None:
        self.root = root  # directory tree to back up (the private area, a copy, or a snapshot)
        self.state_dir = state_dir  # CRIU images taken at the same instant (checkpoint mode)
        self.was_running = was_running
        self.mode = mode  # the mode actually used ("stop" for a CT that was stopped)
        self.same_inodes = same_inodes  # root keeps the private area's inode numbers/ctimes
        # how long the CT's tasks were frozen/stopped (0 for stopped CTs); in stop mode it
        # grows to the whole downtime once the CT was started again
        self.frozen_seconds = frozen_seconds


class RestartError(E.RuntimeFailure):
    """The CT was stopped for a stop-mode backup and could not be started again."""


class Terminated(SystemExit):
    """SIGTERM arrived while a source was set up; raised after everything was undone."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


# --- signals ---------------------------------------------------------------------------------


class _SignalGuard:
    """Turn SIGTERM into an exception (so cleanups run) and hold SIGTERM/SIGINT off while
    undoing. Only in the main thread, and only where the default handlers are in place (a
    caller with its own handlers keeps them)."""

    def __init__(self) -> None:
        self._saved: dict[int, object] = {}
        self._deferring = False
        self._pending: BaseException | None = None

    def __enter__(self) -> _SignalGuard:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig, default in (
            (signal.SIGTERM, signal.SIG_DFL),
            (signal.SIGINT, signal.default_int_handler),
        ):
            if signal.getsignal(sig) is default:
                self._saved[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum: int, frame: object) -> None:
        exc: BaseException = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        if self._deferring:
            self._pending = self._pending or exc
            return
        raise exc

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Run the block without being interrupted; a signal that came meanwhile is raised
        after it (unless nested in another deferred block)."""
        outer = self._deferring
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = outer
            if not outer and self._pending is not None:
                exc, self._pending = self._pending, None
                raise exc

    def __exit__(self, *exc_info: object) -> None:
        for sig, old in self._saved.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._saved.clear()
        if self._pending is not None:
            exc, self._pending = self._pending, None
            raise exc


# --- helpers -------------------------------------------------------------------------------


class _Run:
    """What one consistent_source call works with."""

    def __init__(
        self,
        ct: Container,
        private: Path,
        tmpdir: Path,
        guard: _SignalGuard,
        phase: Callable[[str], None],
        log: Callable[[str], None],
        bwlimit_kbps: int | None,
        copy_into: Path | None = None,
    ) -> None:
        self.ct = ct
        self.copy_into = copy_into
        self.private = private
        self.tmpdir = tmpdir
        self.guard = guard
        self._phase = phase
        self._log = log
        self.bwlimit_kbps = bwlimit_kbps
        self.phases: list[str] = []

    def log(self, msg: str) -> None:
        self._log(f"CT {self.ct.ctid}: {msg}")

    def phase(self, name: str) -> None:
        self.phases.append(name)
        self._phase(name)

    def mkdtemp(self, what: str) -> Path:
        import tempfile  # suspend/checkpoint only: stop mode (the common one) needs neither

        self.tmpdir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"vzbackup-{what}-{self.ct.ctid}-", dir=self.tmpdir))

    def rsync(self, dest: Path, *, first: bool) -> None:
        """Mirror the private area into *dest*."""
        import subprocess

        argv = ["rsync", *C.RSYNC_OPTS, "--delete"]
        if self.bwlimit_kbps:
            argv.append(f"--bwlimit={int(self.bwlimit_kbps)}")
        argv += [f"{self.private}/", f"{dest}/"]
        t0 = time.monotonic()
        try:
            res = subprocess.run(argv, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise E.DependencyError("rsync is missing", hint="apt-get install rsync") from None
        ok = res.returncode == 0 or (first and res.returncode == C.RSYNC_VANISHED)
        if not ok:
            err = (res.stderr or res.stdout).strip().splitlines()[-3:]
            raise E.RuntimeFailure(
                f"CT {self.ct.ctid}: rsync of {self.private} to {dest} failed "
                f"(exit {res.returncode}): {' / '.join(err)}"
            )
        which = "first" if first else "second"
        self.log(f"{which} rsync of {self.private} to {dest}: {time.monotonic() - t0:.2f}s")

    def remove(self, path: Path, what: str) -> None:
        if not os.path.lexists(path):
            return
        t0 = time.monotonic()
        fs.remove_tree(path)
        self.log(f"removed {what} {path}: {time.monotonic() - t0:.2f}s")

    def snapshot(self, dest: Path) -> None:
        t0 = time.monotonic()
        fs.snapshot(self.private, dest, readonly=True)
        self.log(f"read-only snapshot {dest}: {time.monotonic() - t0:.3f}s")

    def delete_snapshot(self, snap: Path) -> None:
        if not os.path.lexists(snap):
            return
        t0 = time.monotonic()
        fs.delete_subvolume(snap)
        self.log(f"deleted snapshot {snap}: {time.monotonic() - t0:.2f}s")

    def thaw(self) -> None:
        try:
            self.ct.cgroup().thaw()
        except (OSError, E.VzError) as e:
            if self.ct.running:
                raise E.RuntimeFailure(f"CT {self.ct.ctid}: could not thaw it: {e}") from e
            self.log(f"not thawed: it is no longer running ({e})")


def _require_snapshottable(private: Path) -> None:
    """UsageError unless *private* is a btrfs subvolume we can snapshot next to itself."""
    others = "use mode stop, suspend or checkpoint instead"
    fstype = fs.fs_type(private)
    if fstype != "btrfs":
        raise E.UsageError(
            f"snapshot mode needs the private area {private} to be a btrfs subvolume, "
            f"but it is on {fstype}: {others}"
        )
    if not is_btrfs_subvolume(private) or fs.is_mount_point(private):
        raise E.UsageError(
            f"snapshot mode needs the private area {private} to be a btrfs subvolume below a "
            f"btrfs directory; it is on btrfs but "
            f"{'a mount point' if fs.is_mount_point(private) else 'a plain directory'}: {others}",
            hint="CTs created on btrfs get a subvolume; convert this one by copying it into "
            "a new subvolume ('btrfs subvolume create') while the CT is stopped",
        )


def _remove_stale_snapshots(run: _Run) -> None:
    """Snapshots of this CT left by a backup process that died (we hold the CT lock)."""
    if fs.fs_type(run.private.parent) != "btrfs":
        return
    for snap in fs.leftover_snapshots(run.private, run.ct.ctid):
        pid = int(snap.name.rsplit("-", 1)[1])
        if pid != os.getpid() and Path(f"/proc/{pid}").exists():
            continue
        run.delete_snapshot(snap)


@contextmanager
def _frozen(run: _Run, src_times: list[float]) -> Iterator[None]:
    """Phases pre-stop / pre-restart / post-restart around a cgroup freeze of the CT.

    A CT the user suspended stays frozen. The frozen time is appended to *src_times*.
    """
    cg = run.ct.cgroup()
    run.phase("pre-stop")
    user_frozen = cg.is_frozen()
    t0 = time.monotonic()
    try:
        if user_frozen:
            run.log("already suspended: it stays frozen")
        else:
            cg.freeze()
            run.log(f"frozen in {time.monotonic() - t0:.3f}s")
        yield
    finally:
        with run.guard.deferred():
            try:
                run.phase("pre-restart")
            finally:
                if not user_frozen:
                    run.thaw()
                took = time.monotonic() - t0
                src_times.append(took)
                if not user_frozen:
                    run.log(f"thawed after {took:.3f}s frozen")
                run.phase("post-restart")


# --- the modes -----------------------------------------------------------------------------


# CRIU and the CT runtime are imported by the modes that use them: backing up a stopped CT
# (the common case, and the whole of an unchanged one) doesn't load them


def _stop_mode(run: _Run, undo: ExitStack, stopwait: int | None) -> Source:
    from vzbackup.ct import ops

    src = Source(run.private, None, True, "stop", True, 0.0)
    t0 = time.monotonic()

    def restart() -> None:
        try:
            run.phase("pre-restart")
        finally:
            if not run.ct.running:
                t1 = time.monotonic()
                try:
                    ops.start(run.ct)
                except E.VzError as e:
                    raise RestartError(
                        f"CT {run.ct.ctid} was stopped for the backup and could not be started "
                        f"again: {e}",
                        hint=f"the backup of its files is not affected; start it by hand: "
                        f"vzbackup start {run.ct.ctid}",
                    ) from e
                run.log(f"started again in {time.monotonic() - t1:.2f}s")
            src.frozen_seconds = time.monotonic() - t0
            run.log(f"was down for {src.frozen_seconds:.2f}s")
        run.phase("post-restart")

    run.phase("pre-stop")
    undo.callback(restart)
    ops.stop(run.ct, timeout=stopwait)
    src.frozen_seconds = time.monotonic() - t0
    run.log(f"stopped in {src.frozen_seconds:.2f}s")
    return src


def _suspend_mode(run: _Run, undo: ExitStack) -> Source:
    copy = run.copy_into
    if copy is None:
        copy = run.mkdtemp("copy")
        undo.callback(run.remove, copy, "copy")
    run.rsync(copy, first=True)
    times: list[float] = []
    with _frozen(run, times):
        run.rsync(copy, first=False)
    return Source(copy, None, True, "suspend", False, sum(times))


def _snapshot_mode(run: _Run, undo: ExitStack) -> Source:
    _require_snapshottable(run.private)
    _remove_stale_snapshots(run)
    snap = fs.snapshot_path(run.private, run.ct.ctid)
    undo.callback(run.delete_snapshot, snap)
    times: list[float] = []
    with _frozen(run, times):
        run.snapshot(snap)
    return Source(snap, None, True, "snapshot", True, sum(times))


def _checkpoint_mode(run: _Run, undo: ExitStack, init_pid: int) -> Source:
    from vzbackup.criu import driver
    from vzbackup.criu.check import criu_binary, pycriu_module
    from vzbackup.ct import ops

    criu_binary()
    pycriu_module()
    ct = run.ct
    conf = ct.conf
    btrfs = is_btrfs_subvolume(run.private) and not fs.is_mount_point(run.private)
    state_dir = run.mkdtemp("state")
    undo.callback(run.remove, state_dir, "CRIU images")
    if btrfs:
        _remove_stale_snapshots(run)
        root = fs.snapshot_path(run.private, ct.ctid)
        undo.callback(run.delete_snapshot, root)
    else:
        root = run.mkdtemp("copy")
        undo.callback(run.remove, root, "copy")
        run.rsync(root, first=True)
    took_files: list[bool] = []

    def post_dump() -> None:
        # CRIU has written the images and the tasks are still frozen: take the files now.
        if btrfs:
            run.snapshot(root)
        else:
            run.rsync(root, first=False)
        took_files.append(True)
        run.phase("pre-restart")

    run.phase("pre-stop")
    cg = ct.cgroup()
    user_frozen = cg.is_frozen()
    try:
        if user_frozen:  # CRIU seizes the tasks itself; a frozen cgroup would stall it
            run.thaw()
            run.log("thawed the suspended CT for CRIU; it is frozen again after the dump")
        opts = driver.DumpOptions(leave_running=True, external=ops.dump_external(conf))
        try:
            frozen = driver.dump(init_pid, state_dir, opts, notify={"post-dump": post_dump})
        except E.CheckpointError as e:
            raise _keep_failed_log(run, state_dir, e) from e.__cause__
        if not took_files:
            raise E.CheckpointError(
                f"CT {ct.ctid}: CRIU never sent its post-dump notification: no files taken"
            )
        run.log(f"CRIU dump with the CT left running: tasks frozen for {frozen:.2f}s")
    finally:
        with run.guard.deferred():
            try:
                if "pre-restart" not in run.phases:
                    run.phase("pre-restart")
            finally:
                if user_frozen and ct.running:
                    cg.freeze()
                    run.log("frozen again (it was suspended)")
                run.phase("post-restart")
    if not ct.running or not pid_alive(init_pid):
        raise E.CheckpointError(f"CT {ct.ctid} is no longer running after the CRIU dump")
    return Source(root, state_dir, True, "checkpoint", btrfs, frozen)


def _keep_failed_log(run: _Run, state_dir: Path, err: E.CheckpointError) -> E.CheckpointError:
    """Copy CRIU's log out of the images directory (removed on exit); the error names it."""
    from vzbackup.criu import driver

    kept = run.tmpdir / f"vzbackup-dump-{run.ct.ctid}.failed.log"
    import shutil  # only here: an unchanged backup's start stays short

    try:
        shutil.copy(state_dir / driver.DUMP_LOG, kept)
    except OSError:
        return err
    first = str(err).split("\n  hint:")[0]
    return E.CheckpointError(first, hint=f"the CT kept running; CRIU log: {kept}")


# --- entry point ---------------------------------------------------------------------------


@contextmanager
def consistent_source(
    ct: Container,
    mode: str,
    *,
    tmpdir: Path,
    stopwait: int | None = None,
    phase: Callable[[str], None] = lambda p: None,
    log: Callable[[str], None] = lambda m: None,
    bwlimit_kbps: int | None = None,
    copy_into: Path | None = None,
) -> Iterator[Source]:
    """Yield a consistent view of CT *ct*'s files taken with backup mode *mode*.

    *tmpdir* holds the temporary copy (suspend, checkpoint without btrfs) and the CRIU images;
    *stopwait*: seconds a clean halt may take in stop mode (default: the node's STOP_TIMEOUT);
    *phase*: called with "pre-stop", "pre-restart", "post-restart" (hook points); *log*: one
    line per step with timings; *bwlimit_kbps*: rsync's --bwlimit (KiB/s) for the copies;
    *copy_into*: an empty directory that suspend mode copies into and leaves to the caller.
    """
    if mode not in MODES:
        raise E.UsageError(f"unknown backup mode {mode!r}: use one of {', '.join(MODES)}")
    conf = ct.conf  # NotFoundError for an unknown CT
    private = ct.ve_private(conf)
    tmpdir = Path(tmpdir).absolute()
    if tmpdir.resolve().is_relative_to(private.resolve()):
        raise E.UsageError(f"the temporary directory {tmpdir} is inside the private area")
    with _SignalGuard() as guard, ct.lock():
        run = _Run(ct, private, tmpdir, guard, phase, log, bwlimit_kbps, copy_into)
        if not private.is_dir():
            raise E.NotFoundError(f"CT {ct.ctid}: private area {private} is missing")
        undo = ExitStack()
        try:
            st = ct.state()
            t0 = time.monotonic()
            if st is None:
                run.log(f"stopped: backing up its private area {private} as is ({mode} mode)")
                src = Source(private, None, False, "stop", True, 0.0)
            elif mode == "stop":
                src = _stop_mode(run, undo, stopwait)
            elif mode == "suspend":
                src = _suspend_mode(run, undo)
            elif mode == "snapshot":
                src = _snapshot_mode(run, undo)
            else:
                if not st.init_pid:
                    raise E.StateError(f"CT {ct.ctid} is {st.status}: no init to checkpoint")
                from vzbackup.criu.blockers import reopen_detached, require_checkpointable

                reopen_detached(ct, st.init_pid)
                require_checkpointable(ct, "backup mode checkpoint")  # before anything is copied
                src = _checkpoint_mode(run, undo, st.init_pid)
            run.log(f"{src.mode} mode source ready in {time.monotonic() - t0:.2f}s: {src.root}")
            yield src
        finally:
            with guard.deferred():
                t1 = time.monotonic()
                undo.close()
                run.log(f"{mode} mode cleaned up in {time.monotonic() - t1:.2f}s")
