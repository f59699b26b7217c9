"""Run one scheduled job: each kind is a vzbackup command run as a child process.

A child process per run keeps the daemon small and lets a shutdown abort a run the way a
user would (SIGTERM to its process group: modes undo freezes and copies, and the repository
never depends on a run finishing). Results come back as the commands' ``--json`` output.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from vzbackup.scheduler.config import JobDef

from vzbackup import constants as C
from vzbackup.backup.defaults import load_defaults
from vzbackup.config.node import Node
from vzbackup.engine.keeppolicy import KeepPolicy
from vzbackup.errors import ConfigError

KILL_AFTER = 15.0  # seconds between SIGTERM and SIGKILL when a run is aborted


@dataclass
class Outcome:
    status: str = "ok"  # ok | failed | aborted
    bytes: int = 0
    snapshots: list[str] = field(default_factory=list)
    error: str | None = None
    details: list[str] = field(default_factory=list)

    def fail(self, msg: str) -> None:
        self.status = "failed" if self.status != "aborted" else self.status
        self.error = f"{self.error}; {msg}" if self.error else msg


class Runner:
    """Runs jobs of one node; ``abort`` stops every run in progress."""

    def __init__(self, node: Node, log: Callable[[str], None]) -> None:
        self.node = node
        self.log = log
        self.aborting = threading.Event()
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def vz(self, *args: str) -> tuple[int, str, str]:
        argv = [sys.executable, "-m", "vzbackup.cli", "--prefix", self.node.prefix, *args]
        if self.aborting.is_set():
            return 143, "", "aborted: the scheduler is stopping"
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, stdin=subprocess.DEVNULL)
        with self._lock:
            self._procs.add(p)
        try:
            out, err = p.communicate()
        finally:
            with self._lock:
                self._procs.discard(p)
        return p.returncode, out, err

    def abort(self) -> None:
        """SIGTERM every running command's process group, SIGKILL what is left later."""
        self.aborting.set()
        with self._lock:
            procs = list(self._procs)
        for p in procs:
            _signal_group(p, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(KILL_AFTER)
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)

    # --- job kinds --------------------------------------------------------------------------
    def run(self, job: JobDef) -> Outcome:
        kind = job.kind.replace("-", "_")
        out = getattr(self, f"_run_{kind}")(job)
        if self.aborting.is_set() and out.status != "ok":
            out.status = "aborted"
        return out

    def _repo_args(self, job: JobDef) -> list[str]:
        args = ["--storage", job.storage] if job.storage else []
        return args + (["--keyfile", str(job.keyfile)] if job.keyfile else [])

    def _run_vzdump(self, job: JobDef) -> Outcome:
        args = ["dump", *map(str, job.ctids)]
        if job.all:
            args += ["--all", *_excludes(job)]
        for key, value in job.options.items():  # prune-backups and lockwait among them
            args += [f"--{key}", str(value)]
        rc, stdout, stderr = self.vz(*args, *self._repo_args(job), "--json")
        out = Outcome()
        try:
            results = json.loads(stdout)["results"]
        except (ValueError, KeyError, TypeError):
            out.fail(_last_line(stderr) or f"vzbackup dump exited with {rc}")
            # the whole dump failed: each CT named by the job did (metrics count per CT)
            out.details += [f"CT {ctid}: FAILED: {out.error}" for ctid in job.ctids]
            return out
        for r in results:
            if r["ok"]:
                s = r["stats"]
                out.snapshots.append(r["snapshot"])
                out.bytes += int(s.get("stored_new", 0))
                out.details.append(f"CT {r['ctid']}: {r['snapshot']} ({s.get('files')} files, "
                                   f"{s.get('bytes_total')} bytes, {s.get('stored_new')} new)")
            else:
                out.fail(f"CT {r['ctid']}: {r['error']}")
                out.details.append(f"CT {r['ctid']}: FAILED: {r['error']}")
        if rc and out.status == "ok":
            out.fail(_last_line(stderr) or f"vzbackup dump exited with {rc}")
        return out

    def _run_prune(self, job: JobDef) -> Outcome:
        out = Outcome()
        try:
            policy = job.prune if job.prune is not None else self._default_prune()
        except ConfigError as e:
            out.fail(str(e))
            return out
        if policy.keep_all:
            out.fail("prune job without a prune-backups rule (in the job or vzdump.conf)")
            return out
        rc, stdout, stderr = self.vz("prune", *map(str, job.ctids), *_excludes(job),
                                     "--prune-backups", policy.to_string(),
                                     *_lockwait(job), *self._repo_args(job), "--json")
        if rc:
            out.fail(_last_line(stderr) or f"prune exited with {rc}")
            return out
        gone = [s["snapshot"] for s in json.loads(stdout)["snapshots"] if not s["keep"]]
        out.details.append(f"pruned {len(gone)} snapshots: {', '.join(gone) or '-'}")
        rc, stdout, stderr = self.vz("gc", *_lockwait(job), *self._repo_args(job), "--json")
        if rc:
            out.fail(_last_line(stderr) or f"gc exited with {rc}")
        else:
            g = json.loads(stdout)
            out.bytes = int(g["bytes_deleted"])
            out.details.append(f"gc deleted {g['chunks_deleted']} chunks ({g['bytes_deleted']} B)")
        return out

    def _default_prune(self) -> KeepPolicy:
        """vzdump.conf's prune-backups: the rule of a prune job that gives none."""
        return load_defaults(self.node.vzbackup_confdir / C.VZDUMP_CONF).prune_backups

    def _run_verify(self, job: JobDef) -> Outcome:
        out = Outcome()
        cts = [a for c in job.ctids for a in ("--ct", str(c))]
        rc, stdout, stderr = self.vz("verify", *cts, *_excludes(job), *self._repo_args(job),
                                     "--json")
        try:
            rep = json.loads(stdout)
        except ValueError:
            out.fail(_last_line(stderr) or f"verify exited with {rc}")
            return out
        out.bytes = int(rep["bytes"])
        out.details.append(f"verified {len(rep['snapshots'])} snapshots, {rep['chunks']} chunks")
        for d in rep["damaged"]:
            out.details.append(f"DAMAGED {d['chunk'][:16]}: {d['error']} ({', '.join(d['where'])})")
        if not rep["ok"]:
            out.fail(f"{len(rep['damaged'])} damaged chunks")
        return out

    def _run_restore_test(self, job: JobDef) -> Outcome:
        out = Outcome()
        source, scratch = job.ctids[0], job.scratch_ctid
        rc, _, stderr = self.vz("status", str(scratch))
        if rc == 0 and " exist " in _:
            out.fail(f"scratch CT {scratch} exists; restore-test never overwrites a CT")
            return out
        rc, stdout, stderr = self.vz("restore", str(source), str(scratch), "--ipadd", "none",
                                     "--start", *self._repo_args(job), "--json")
        try:
            if rc:
                out.fail(_last_line(stderr) or f"restore exited with {rc}")
                return out
            res = json.loads(stdout)
            out.snapshots.append(res["source"])
            if res["status"] != "running":
                out.fail(f"restored CT {scratch} is {res['status']}, not running")
            else:
                rc, _o, e = self.vz("exec", str(scratch), "true")
                out.details.append(f"restored {res['source']} as CT {scratch}: running, "
                                   f"exec {'ok' if rc == 0 else 'FAILED'}")
                if rc:
                    out.fail(f"exec in restored CT {scratch} failed: {_last_line(e)}")
        finally:
            self.vz("stop", str(scratch), "--fast")
            rc, _, e = self.vz("destroy", str(scratch))
            if rc and " exist" in self.vz("status", str(scratch))[1]:
                out.fail(f"could not destroy scratch CT {scratch}: {_last_line(e)}")
        return out


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, sig)


def _last_line(text: str) -> str:
    """The command's error line (not its hint), without the 'vzbackup: error: ' prefix."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("vzbackup: error: ")]
    line = (errors or lines or [""])[-1]
    return line.removeprefix("vzbackup: error: ")


def _excludes(job: JobDef) -> list[str]:
    """The job's ``exclude`` CTIDs as the command's --exclude options."""
    return [a for x in job.exclude for a in ("--exclude", str(x))]


def _lockwait(job: JobDef) -> list[str]:
    """The job's ``lockwait`` (minutes) as the command's option, if set."""
    return [] if job.lockwait is None else ["--lockwait", str(job.lockwait)]
