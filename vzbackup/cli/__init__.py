"""The ``vzbackup`` command (the click group and its plumbing: group.py, common.py)."""

from __future__ import annotations

import gc
import sys


def main() -> None:
    # no collector passes while starting: importing the CLI and a command allocates ~100k
    # objects, all alive until exit (the group enables it again, see group.cli)
    gc.disable()
    from vzbackup.cli.common import run_guarded
    from vzbackup.cli.group import cli

    try:
        run_guarded(cli)
    except SystemExit as e:
        exit_now(e.code)
    exit_now(0)


def exit_now(code: int | str | None) -> None:
    """Exit with *code* (as ``sys.exit`` reads it) after the exit handlers and a flush of the
    standard streams, without tearing the interpreter down: freeing every module and object
    still alive took 3-4 ms of each command. Only when no other thread runs (an exit waits
    for those)."""
    import atexit
    import os
    import threading

    gc.freeze()  # (if Python exits after all: no collector pass over everything alive)
    if threading.active_count() > 1:
        sys.exit(code)
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()  # logging's flush and close among them
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe, as Python's own exit reports it
            code = code or 120
    os._exit(code)
