"""vzdump ``--script`` hooks: ``SCRIPT PHASE`` for job phases, ``SCRIPT PHASE MODE CTID`` per CT.

The environment is the caller's ``base_env`` (typically ``STOREID`` and, for a directory
storage, ``DUMPDIR``, its path, which vzdump sets in every phase) plus, per CT,
``VMTYPE=openvz`` and what the caller passes as ``extra_env``: ``HOSTNAME`` (the CT's),
``TARGET`` in backup-end (also exported under its old name ``TARFILE``), ``LOGFILE`` in
log-end. A failure in a phase that comes before work (job-init, job-start, backup-start,
pre-stop, pre-restart) aborts with HookError; in the others (job-end, job-abort, backup-end,
backup-abort, log-end, post-restart) it is a warning, since there is nothing left to stop.
The script's output goes to the log line by line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

from vzbackup.errors import ConfigError, RuntimeFailure

log = logging.getLogger("vzbackup.hooks")

JOB_PHASES = ("job-init", "job-start", "job-end", "job-abort")
CT_PHASES = (
    "backup-start",
    "backup-end",
    "backup-abort",
    "log-end",
    "pre-stop",
    "pre-restart",
    "post-restart",
)
PHASES = JOB_PHASES + CT_PHASES
ABORTING_PHASES = frozenset({"job-init", "job-start", "backup-start", "pre-stop", "pre-restart"})
DEFAULT_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
STDERR_TAIL_LINES = 10
STDERR_TAIL_CHARS = 500  # per line


class HookError(RuntimeFailure):
    """The hook script failed in a phase that aborts the job or the CT's backup."""


class HookScript:
    """A vzdump hook script, checked when created; with path None every call does nothing.

    *log_line* receives each line the script prints (default: this module's logger, INFO);
    *on_warning* receives the message of a failure that doesn't abort (default: logger
    WARNING). *timeout* (seconds) bounds one call; the script's process group is then killed.
    """

    def __init__(
        self,
        path: str | Path | None,
        base_env: Mapping[str, str] | None = None,
        *,
        log_line: Callable[[str], None] | None = None,
        on_warning: Callable[[str], None] | None = None,
        timeout: float | None = None,
    ) -> None:
        self.path = _checked(path) if path is not None and str(path) != "" else None
        self.base_env = dict(base_env or {})
        self._log_line = log_line or (lambda line: log.info("hook: %s", line))
        self._on_warning = on_warning or (lambda msg: log.warning("%s", msg))
        self.timeout = timeout

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def call(
        self,
        phase: str,
        *,
        ctid: int | None = None,
        mode: str | None = None,
        extra_env: Mapping[str, str | int | None] | None = None,
    ) -> bool:
        """Run the script for *phase*; False if it failed in a phase where that is a warning.

        Raises HookError when it fails in an aborting phase. A None value in *extra_env*
        removes that variable.
        """
        if phase not in PHASES:
            raise ValueError(f"unknown hook phase {phase!r}")
        per_ct = phase in CT_PHASES
        if per_ct and (ctid is None or not mode):
            raise ValueError(f"hook phase {phase} needs the CT's mode and ID")
        if not per_ct and (ctid is not None or mode is not None):
            raise ValueError(f"hook phase {phase} is for the whole job, not one CT")
        if self.path is None:
            return True
        argv = [str(self.path), phase] + ([mode, str(ctid)] if per_ct else [])
        env = {"PATH": DEFAULT_PATH, **self.base_env}
        if per_ct:
            env["VMTYPE"] = "openvz"
        extra = dict(extra_env or {})
        if "TARGET" in extra and "TARFILE" not in extra:
            extra["TARFILE"] = extra["TARGET"]  # vzdump's name for it before PVE 7
        for key, value in extra.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        failure = self._run(argv, env)
        if failure is None:
            return True
        what = f"hook script {self.path} failed in phase {phase}"
        if per_ct:
            what += f" for CT {ctid}"
        message = f"{what}: {failure}"
        if phase in ABORTING_PHASES:
            raise HookError(message)
        self._on_warning(message)
        return False

    def _run(self, argv: list[str], env: dict[str, str]) -> str | None:
        """Run to completion; None on success, else what went wrong (with the stderr tail).

        Output goes to files, not pipes, so a daemon the script leaves behind with our
        stdout can't keep the call from returning.
        """
        import subprocess  # only with a hook script (most jobs have none)
        import tempfile

        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(
                    argv,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                )
            except OSError as e:
                return f"cannot execute it: {e.strerror}"
            try:
                code = proc.wait(timeout=self.timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the group we started with it
                code = proc.wait()
                timed_out = True
            stdout, stderr = _lines(out), _lines(err)
        for line in stdout + stderr:
            self._log_line(line)
        if timed_out:
            failure = f"timed out after {self.timeout:g} s and was killed"
        elif code == 0:
            return None
        elif code < 0:
            failure = f"killed by signal {_signal_name(-code)}"
        else:
            failure = f"exit code {code}"
        tail = [line[-STDERR_TAIL_CHARS:] for line in stderr[-STDERR_TAIL_LINES:]]
        return "\n".join([failure, *(f"  stderr: {line}" for line in tail)])


def _checked(path: str | Path) -> Path:
    """The script as an absolute path, after checking it can be run (ConfigError if not)."""
    script = Path(path).absolute()
    hint = "set 'script' in vzdump.conf or --script to an executable file"
    if not script.exists():
        raise ConfigError(f"hook script {script} does not exist", hint=hint)
    if not script.is_file():
        raise ConfigError(f"hook script {script} is not a regular file", hint=hint)
    if not os.access(script, os.X_OK):
        raise ConfigError(f"hook script {script} is not executable", hint=f"chmod +x {script}")
    return script


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _lines(f: IO[bytes]) -> list[str]:
    f.seek(0)
    return f.read().decode(errors="replace").splitlines()
