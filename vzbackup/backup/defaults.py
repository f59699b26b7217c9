"""Backup defaults in vzdump.conf's format, and vzdump's path exclusion patterns.

The file (``PREFIX/etc/vzbackup/vzdump.conf``, like Proxmox's ``/etc/vzdump.conf``) holds one
``key: value`` per line; blank lines and lines starting with ``#`` are ignored. A missing file
means the embedded defaults, which are vzdump's, except that the mode defaults to ``stop`` (old
OpenVZ vzdump's choice; Proxmox VE defaults to ``snapshot``) and ``zstd-level`` is ours.

Exclusion patterns follow vzdump's ``exclude-path`` (rsync-like shell globs): a pattern starting
with ``/`` is anchored at the CT root, any other matches at the end of a path at a component
boundary (``*.log`` matches ``var/log/x.log``); ``*`` and ``?`` don't match ``/``, ``**``
does; a trailing ``/`` matches directories only. An excluded directory excludes all below it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from vzbackup.engine.keeppolicy import KeepPolicy
from vzbackup.errors import ConfigError, UsageError, VzError

MODES = ("stop", "suspend", "snapshot", "checkpoint")
# vzdump's stdexcludes for containers: temporary files and pid files.
STD_EXCLUDES = ("/tmp/?*", "/var/tmp/?*", "/var/run/?*.pid")
NOTES_MAX = 1024  # vzdump's limit for notes-template
ZSTD_LEVELS = (1, 19)

# vzdump.conf keys vzbackup knows but does not support, with why (a hint, still an error).
_UNSUPPORTED = {
    "compress": "archives are always zstd; set the level with zstd-level",
    "dumpdir": "backups go to a storage; use storage",
    "maxfiles": "use prune-backups (e.g. keep-last=N)",
    "pigz": "archives are always zstd; use zstd for threads",
    "mailto": "mail notifications are not supported",
    "mailnotification": "mail notifications are not supported",
    "size": "LVM snapshots are not used",
    "performance": "not supported",
    "pool": "not supported",
}


class DumpDefaults(NamedTuple):
    """Typed backup defaults; field ``x_y`` is key ``x-y`` of vzdump.conf."""

    storage: str | None = None
    mode: str = "stop"
    zstd_level: int = 3
    zstd: int = 0  # chunk worker threads (hash, compress, encrypt); 0 = one per CPU
    tmpdir: Path | None = None
    lockwait: int = 180  # minutes
    stopwait: int = 10  # minutes
    bwlimit: int = 0  # KiB/s, 0 = unlimited
    exclude_path: tuple[str, ...] = ()
    stdexcludes: bool = True
    script: Path | None = None
    notes_template: str | None = None
    prune_backups: KeepPolicy = KeepPolicy()
    encryption_key: Path | None = None
    ionice: int = 7
    remove: bool = True

    def excludes(self) -> tuple[str, ...]:
        """All exclusion patterns in effect: exclude-path, then the standard ones if enabled."""
        return self.exclude_path + (STD_EXCLUDES if self.stdexcludes else ())

    def matcher(self) -> ExcludeMatcher:
        return ExcludeMatcher(self.excludes())


# ----------------------------------------------------------------------------- value parsers


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """A parser of whole numbers in low..high (ValueError naming the range otherwise)."""

    def parse(text: str) -> int:
        if not re.fullmatch(r"[0-9]+", text):
            raise ValueError(f"expected a whole number, not {text!r}")
        value = int(text)
        if value < low or (high is not None and value > high):
            upper = f"..{high}" if high is not None else " or more"
            raise ValueError(f"{value} is out of range ({low}{upper})")
        return value

    return parse


def _bool(text: str) -> bool:
    from vzbackup.config.sections import parse_bool  # only when one is given

    return parse_bool(text)


def _mode(text: str) -> str:
    if text not in MODES:
        raise ValueError(f"unknown mode {text!r} (one of {', '.join(MODES)})")
    return text


def _storage(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", text):
        raise ValueError(f"invalid storage name {text!r}")
    return text


def _abspath(text: str) -> Path:
    if not text.startswith("/") or "\0" in text:
        raise ValueError(f"expected an absolute path, not {text!r}")
    return Path(text)


def _notes(text: str) -> str:
    if len(text) > NOTES_MAX:
        raise ValueError(f"longer than {NOTES_MAX} characters")
    return text


def _prune(text: str) -> KeepPolicy:
    try:
        return KeepPolicy.parse(text)
    except UsageError as e:
        raise ValueError(str(e).split("\n")[0]) from None


def check_pattern(pattern: str) -> str:
    """Validate one exclusion pattern (ValueError if it can't be used)."""
    if not pattern or "\0" in pattern:
        raise ValueError(f"invalid exclude pattern {pattern!r}")
    if pattern.strip("/") == "" or pattern.strip("/") in ("*", "**", "."):
        raise ValueError(f"exclude pattern {pattern!r} would exclude the whole CT")
    return pattern


def _patterns(text: str) -> tuple[str, ...]:
    import shlex  # only for exclude-path in vzdump.conf

    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"bad quoting in {text!r}: {e}") from None
    return tuple(check_pattern(w) for w in words)


# key -> (field, parser); the one table of what vzdump.conf may hold.
_KEYS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "storage": ("storage", _storage),
    "mode": ("mode", _mode),
    "zstd-level": ("zstd_level", int_range(*ZSTD_LEVELS)),
    "zstd": ("zstd", int_range(0, 256)),
    "tmpdir": ("tmpdir", _abspath),
    "lockwait": ("lockwait", int_range(0)),
    "stopwait": ("stopwait", int_range(0)),
    "bwlimit": ("bwlimit", int_range(0)),
    "exclude-path": ("exclude_path", _patterns),  # repeatable; values accumulate
    "stdexcludes": ("stdexcludes", _bool),
    "script": ("script", _abspath),
    "notes-template": ("notes_template", _notes),
    "prune-backups": ("prune_backups", _prune),
    "encryption-key": ("encryption_key", _abspath),
    "ionice": ("ionice", int_range(0, 8)),
    "remove": ("remove", _bool),
}
_LINE = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*)\s*:\s*(.*?)\s*$")


# ----------------------------------------------------------------------------- file, merge


def load_defaults(path: Path | None) -> DumpDefaults:
    """Read *path* (vzdump.conf format) over the embedded defaults; None or missing: defaults.

    Errors are ConfigError as ``file:line: reason``.
    """
    if path is None:
        return DumpDefaults()
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return DumpDefaults()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e.reason})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    values: dict[str, Any] = {}
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{lineno}"
        m = _LINE.match(line)
        if not m:
            raise ConfigError(f"{where}: malformed line {line!r}", hint="expected 'key: value'")
        key, value = m.group(1), m.group(2)
        if key not in _KEYS:
            hint = _UNSUPPORTED.get(key)
            known = None if hint else "known keys: " + ", ".join(_KEYS)
            what = "unsupported" if hint else "unknown"
            raise ConfigError(f"{where}: {what} key {key!r}", hint=hint or known)
        name, parse = _KEYS[key]
        if key in first_line and key != "exclude-path":
            raise ConfigError(f"{where}: {key!r} given twice (first on line {first_line[key]})")
        first_line.setdefault(key, lineno)
        if not value:
            raise ConfigError(f"{where}: {key!r} has no value")
        try:
            parsed = parse(value)
        except ValueError as e:
            raise ConfigError(f"{where}: {key}: {e}") from None
        values[name] = values.get(name, ()) + parsed if key == "exclude-path" else parsed
    return DumpDefaults(**values)


def merge(defaults: DumpDefaults, cli_overrides: Mapping[str, Any]) -> DumpDefaults:
    """*defaults* with the command line's values on top (None means "not given").

    Keys are vzdump names (``zstd-level``) or field names (``zstd_level``); values are strings
    (parsed like the file's) or already typed; relative paths are taken from the current
    directory. ``exclude-path`` adds to the file's patterns, as vzdump does; a string there is
    one pattern, a list is several. Errors are UsageError.
    """
    key_of_field = {name: key for key, (name, _) in _KEYS.items()}
    changes: dict[str, Any] = {}
    for given, value in cli_overrides.items():
        if value is None:
            continue
        key = given if given in _KEYS else key_of_field.get(given)
        if key is None:
            raise UsageError(f"unknown backup option {given!r}", hint=_UNSUPPORTED.get(given))
        name, parse = _KEYS[key]
        try:
            if key == "exclude-path":
                items = [value] if isinstance(value, str | Path) else list(value)
                changes[name] = defaults.exclude_path + tuple(check_pattern(str(p)) for p in items)
            elif parse is _abspath and isinstance(value, str | Path) and str(value):
                changes[name] = parse(os.path.abspath(value))  # relative to the cwd here
            else:
                changes[name] = parse(_as_text(value))
        except (ValueError, VzError) as e:
            raise UsageError(f"--{key}: {str(e).splitlines()[0]}") from None
    return defaults._replace(**changes)


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, KeepPolicy):
        return value.to_string()
    if isinstance(value, int | str | Path):
        return str(value)
    raise ValueError(f"unsupported value {value!r}")


# ----------------------------------------------------------------------------- exclusions


def _glob_to_regex(glob: str) -> str:
    """Translate one rsync-style glob (no anchoring) to a regex."""
    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        c = glob[i]
        if c == "*":
            if glob.startswith("**", i):
                out.append(".*")
                i += 2
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 2 if glob[i + 1 : i + 2] in ("!", "^") else i + 1
            end = glob.find("]", j + 1 if glob[j : j + 1] == "]" else j)  # "[]" "[!]": literal ]
            if end < 0:
                out.append(re.escape(c))
            else:
                body = glob[i + 1 : end]
                negate = body[:1] in ("!", "^")
                body = body[1:] if negate else body
                body = re.sub(r"([\\^\[\]])", r"\\\1", body)  # '-' keeps making ranges
                out.append(f"[^/{body}]" if negate else f"[{body}]")
                i = end
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(glob[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


class ExcludeMatcher:
    """Decide whether a path inside the CT is excluded by vzdump-style patterns."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(check_pattern(p) for p in patterns)
        any_kind: list[str] = []
        dirs_only: list[str] = []
        for pattern in self.patterns:
            anchored = pattern.startswith("/")
            dir_only = pattern.endswith("/")
            body = _glob_to_regex(pattern.strip("/"))
            head = "" if anchored else "(?:.*/)?"
            (dirs_only if dir_only else any_kind).append(head + f"(?:{body})")
        # A match followed by "/..." means an ancestor directory matched.
        self._any = _compile(any_kind, "(?:/.*)?")
        self._dir_below = _compile(dirs_only, "/.*")
        self._dir_exact = _compile(dirs_only, "")

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def excluded(self, relpath: str, is_dir: bool) -> bool:
        """True if *relpath* (relative to the CT root, ``./`` or ``/`` prefix allowed) or one
        of its parent directories matches a pattern."""
        path = relpath
        while path.startswith("./"):
            path = path[2:]
        path = path.strip("/")
        if path in ("", "."):
            return False
        return bool(
            (self._any and self._any.fullmatch(path))
            or (self._dir_below and self._dir_below.fullmatch(path))
            or (is_dir and self._dir_exact and self._dir_exact.fullmatch(path))
        )


def _compile(alternatives: list[str], tail: str) -> re.Pattern[str] | None:
    if not alternatives:
        return None
    return re.compile(f"(?:{'|'.join(alternatives)}){tail}", re.DOTALL)
