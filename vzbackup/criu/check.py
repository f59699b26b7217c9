"""Find a usable CRIU (>= 4.2) and pycriu, or say exactly what to install."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from functools import cache

from vzbackup import constants as C
from vzbackup.errors import DependencyError

INSTALL_HINT = "run 'scripts/setup.sh' as root (it builds CRIU >= 4.2 into /usr/local/sbin)"


def _version(binary: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=20
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x) for x in m.groups() if x is not None) if m else None


@cache
def criu_binary() -> str:
    """Path of a CRIU binary new enough for this kernel; DependencyError otherwise."""
    explicit = os.environ.get(C.CRIU_ENV)
    candidates = [explicit] if explicit else [*C.CRIU_SEARCH, shutil.which("criu")]
    found: list[str] = []
    for cand in dict.fromkeys(c for c in candidates if c):
        if not os.access(cand, os.X_OK):
            continue
        ver = _version(cand)
        if ver and ver[:2] >= C.CRIU_MIN_VERSION:
            return cand
        found.append(f"{cand} ({'.'.join(map(str, ver)) if ver else 'unknown version'})")
    need = ".".join(map(str, C.CRIU_MIN_VERSION))
    what = f"found only {', '.join(found)}" if found else "no criu binary found"
    raise DependencyError(f"CRIU >= {need} is required: {what}", hint=INSTALL_HINT)


def pycriu_module():  # -> module
    """Import pycriu (from the CRIU source tree set-up installed)."""
    try:
        import pycriu  # type: ignore[import-not-found]
    except ImportError as e:
        raise DependencyError(f"pycriu is not importable: {e}", hint=INSTALL_HINT) from None
    return pycriu


@cache
def criu_fixes() -> frozenset[str]:
    """Our CRIU patches this binary carries: its GitID is ``vzbackup+NAME+...`` when
    scripts/setup.sh built it (constants.CRIU_FIX_*)."""
    try:
        out = subprocess.run([criu_binary(), "--version"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    m = re.search(r"^GitID:\s*vzbackup((?:\+[\w-]+)*)\s*$", out, re.M)
    return frozenset(m.group(1).split("+")[1:]) if m else frozenset()


def criu_version() -> str:
    ver = _version(criu_binary())
    return ".".join(map(str, ver)) if ver else "?"


@cache
def criu_check(feature: str | None = None) -> str | None:
    """Run ``criu check`` (or ``criu check --feature F``); None if it passes, else its output.
    Asked once per process, like criu_binary (a drain asks for every CT it moves)."""
    argv = [criu_binary(), "check"] + (["--feature", feature] if feature else [])
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return f"{' '.join(argv)} timed out"
    return None if res.returncode == 0 else (res.stdout + res.stderr).strip() or "failed"
