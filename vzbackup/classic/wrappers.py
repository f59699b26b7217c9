"""Opt-in wrappers for the classic names: small shell scripts in a bin directory that run
``python -P -m vzbackup.classic NAME "$@"`` with this installation's Python (-P: a
``vzbackup`` directory where the command is run from is never imported).

They are never put where they would shadow a real command: ``install`` refuses (and writes
nothing) when a name is found on the search path or in the bin directory and is not one of
our wrappers, and ``remove`` deletes only files that are (recognised by their marker line).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

from vzbackup.classic.syntax import PROGRAMS
from vzbackup.errors import ExistsError, UsageError

MARKER = "# vzbackup classic wrapper"
DEFAULT_BINDIR = "/usr/local/sbin"
# where a real vzctl may live beside $PATH: root's usual sbin directories
SYSTEM_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
NAMES = tuple(PROGRAMS)


def is_wrapper(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return MARKER.encode() in f.read(512)
    except OSError:
        return False


def search_path() -> str:
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    return os.pathsep.join(dict.fromkeys([*dirs, *SYSTEM_DIRS]))


def _names(names: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise UsageError(f"not a classic command: {', '.join(unknown)}",
                         hint=f"the classic commands: {', '.join(NAMES)}")
    return names or NAMES


def taken(name: str, bindir: Path) -> Path | None:
    """A command called *name* that is not our wrapper: on the search path or in *bindir*."""
    for candidate in (shutil.which(name, path=search_path()), bindir / name):
        if candidate and os.path.lexists(candidate) and not is_wrapper(Path(candidate)):
            return Path(candidate)
    return None


def script(name: str, prefix: str | None) -> str:
    env = "" if not prefix or prefix == "/" else (
        f'VZBACKUP_PREFIX="${{VZBACKUP_PREFIX:-{prefix}}}"; export VZBACKUP_PREFIX\n')
    return (f"#!/bin/sh\n{MARKER}: {name}'s syntax for vzbackup "
            f"('vzbackup classic remove' deletes it)\n{env}"
            f"exec {shlex.quote(sys.executable)} -P -m vzbackup.classic {name} \"$@\"\n")


def install(bindir: Path, names: tuple[str, ...] = (), prefix: str | None = None) -> list[Path]:
    """Write the wrappers for *names* (default all) into *bindir*; refuses, writing nothing,
    if any of them would shadow a command that exists. Returns the files written."""
    names = _names(names)
    clashes = {n: p for n in names if (p := taken(n, bindir))}
    if clashes:
        found = ", ".join(f"{n} ({p})" for n, p in clashes.items())
        raise ExistsError(
            f"not installing the classic commands: would shadow {found}",
            hint="the real commands stay; install the others by name "
                 "(vzbackup classic install NAME...)")
    bindir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        path = bindir / name
        tmp = path.with_name(f".{name}.vzbackup-{os.getpid()}")
        tmp.write_text(script(name, prefix))
        tmp.chmod(0o755)
        os.replace(tmp, path)
        written.append(path)
    return written


def remove(bindir: Path, names: tuple[str, ...] = ()) -> list[Path]:
    """Delete our wrappers for *names* (default all) from *bindir*; other files stay."""
    removed = []
    for name in _names(names):
        path = bindir / name
        if is_wrapper(path) and not path.is_symlink():
            path.unlink()
            removed.append(path)
    return removed


def on_search_path(bindir: Path) -> bool:
    return str(bindir) in os.environ.get("PATH", "").split(os.pathsep)
