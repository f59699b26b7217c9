"""Scheduled jobs in Proxmox's jobs.cfg format (``PREFIX/etc/vzbackup/jobs.cfg``).

The grammar is storage.cfg's (``vzbackup.config.sections``): a header ``KIND: ID`` followed by
indented ``key value`` lines, booleans 1/0, yes/no, on/off or true/false. KIND is one of ``vzdump``
(backup), ``prune``, ``verify`` and ``restore-test``; IDs are unique across kinds. One
optional section ``scheduler: options`` holds the daemon's settings. See ``conf/jobs.cfg``.

Errors are ConfigError as ``file:line: job ID: reason``. The editing functions (for
``vzbackup jobs add/remove/enable/disable``) rewrite the file atomically, keep every other line
(comments included) as it is, and validate the result with :func:`load_jobs` first, so a bad
edit changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apscheduler.triggers.base import BaseTrigger
from vzbackup.scheduler.calendar import ScheduleError, parse_schedule

from vzbackup import constants as C
from vzbackup.backup import defaults as dump_defaults
from vzbackup.config.node import Node
from vzbackup.config.sections import Section, parse_bool, parse_sections
from vzbackup.engine.keeppolicy import KeepPolicy
from vzbackup.errors import ConfigError, ExistsError, NotFoundError, UsageError

JOBS_CFG = "jobs.cfg"
JOB_KINDS = ("vzdump", "prune", "verify", "restore-test")
GLOBAL_KIND, GLOBAL_ID = "scheduler", "options"
NOTIFY = ("failure", "always", "never")

_COMMON_KEYS = ("schedule", "enabled", "comment", "repeat-missed", "jitter", "storage",
                "keyfile")
_SELECT_KEYS = ("vmid", "all", "exclude")
# vzdump options handed on to the backup as they are (validated like vzdump.conf's).
DUMP_OPTION_KEYS = ("mode", "zstd-level", "zstd", "prune-backups", "notes-template", "lockwait")
# lockwait only where a lock is taken: backups, and prune's and gc's maintenance lock
KIND_KEYS: dict[str, tuple[str, ...]] = {
    "vzdump": _COMMON_KEYS + _SELECT_KEYS + DUMP_OPTION_KEYS,
    "prune": _COMMON_KEYS + _SELECT_KEYS + ("prune-backups", "lockwait"),
    "verify": _COMMON_KEYS + _SELECT_KEYS,
    "restore-test": (*_COMMON_KEYS, "vmid", "scratch-ctid"),
}
GLOBAL_KEYS = ("max-workers", "shutdown-timeout", "notify", "mailto", "mail-from",
               "smtp-server", "webhook", "metrics-listen")

_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


@dataclass
class JobDef:
    """One scheduled job; ``source`` is ``file:line`` of its header."""

    id: str
    kind: str
    schedule_text: str
    trigger: BaseTrigger
    enabled: bool = True
    ctids: list[int] = field(default_factory=list)  # vmid (restore-test: exactly one)
    all: bool = False  # every CT (minus exclude); prune/verify without vmid default to it
    exclude: list[int] = field(default_factory=list)
    storage: str | None = None  # None: vzdump.conf's storage, else "local"
    options: dict[str, str] = field(default_factory=dict)  # vzdump keys (DUMP_OPTION_KEYS)
    prune: KeepPolicy | None = None  # prune-backups; None: vzdump.conf's
    repeat_missed: bool = False
    jitter: int = 0  # seconds
    lockwait: int | None = None  # minutes; None: the default
    scratch_ctid: int | None = None  # restore-test only
    keyfile: Path | None = None
    comment: str | None = None
    source: str = ""


@dataclass
class SchedulerOptions:
    """The ``scheduler: options`` section."""

    max_workers: int = 1
    shutdown_timeout: int = 60  # seconds
    notify: str = "failure"  # failure | always | never
    mailto: list[str] = field(default_factory=list)
    mail_from: str | None = None
    smtp_server: str = "localhost:25"
    webhook: str | None = None
    metrics_listen: str = C.METRICS_LISTEN  # host:port of /metrics and the report; "" = off
    source: str | None = None

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        if not self.metrics_listen:
            return None
        host, port = _split_hostport(self.metrics_listen, default_port=None)
        return host, port

    @property
    def smtp_host(self) -> str:
        return _split_hostport(self.smtp_server)[0]

    @property
    def smtp_port(self) -> int:
        return _split_hostport(self.smtp_server)[1]


def jobs_path(node: Node) -> Path:
    return node.vzbackup_confdir / JOBS_CFG


# ----------------------------------------------------------------------------- value parsers


def _ctid(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text.strip()) or not (
        C.MIN_CTID <= int(text) <= C.MAX_CTID
    ):
        raise ValueError(f"invalid CTID {text.strip()!r} ({C.MIN_CTID}..{C.MAX_CTID})")
    return int(text)


def _ctids(text: str) -> list[int]:
    out: list[int] = []
    for item in text.split(","):
        if not item.strip():
            raise ValueError(f"empty item in CTID list {text!r}")
        ctid = _ctid(item)
        if ctid in out:
            raise ValueError(f"CTID {ctid} listed twice")
        out.append(ctid)
    return out


def _abspath(text: str) -> Path:
    if not text.startswith("/") or "\0" in text:
        raise ValueError(f"expected an absolute path, not {text!r}")
    return Path(text)


def _split_hostport(text: str, default_port: str | None = "25") -> tuple[str, int]:
    host, sep, port = text.rpartition(":") if not text.endswith("]") else (text, "", "")
    if not sep:
        if default_port is None:
            raise ValueError(f"expected HOST:PORT, not {text!r}")
        host, port = text, default_port
    host = host.strip("[]")
    if not host or not re.fullmatch(r"[A-Za-z0-9_.:-]+", host):
        raise ValueError(f"invalid host {host!r}")
    low = 1 if default_port is not None else 0  # port 0: any free port (tests)
    return host, dump_defaults.int_range(low, 65535)(port)


def _listen(text: str) -> str:
    if text == "off":
        return ""
    _split_hostport(text, default_port=None)
    return text


def _smtp(text: str) -> str:
    _split_hostport(text)
    return text


def _mailto(text: str) -> list[str]:
    return [_address(a.strip()) for a in text.split(",")]


def _address(text: str) -> str:
    if not re.fullmatch(r"[^@\s,]+@[^@\s,]+", text):
        raise ValueError(f"invalid mail address {text!r}")
    return text


def _url(text: str) -> str:
    if not re.fullmatch(r"https?://[^\s/]+\S*", text):
        raise ValueError(f"expected an http:// or https:// URL, not {text!r}")
    return text


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, not {text!r}")
        return text

    return parse


def _dump_option(key: str) -> Callable[[str], Any]:
    _, parse = dump_defaults._KEYS[key]

    def check(text: str) -> Any:
        try:
            return parse(text)
        except UsageError as e:  # KeepPolicy.parse
            raise ValueError(str(e).split("\n")[0]) from None

    return check


_GLOBAL_PARSERS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "max-workers": ("max_workers", dump_defaults.int_range(1, 64)),
    "shutdown-timeout": ("shutdown_timeout", dump_defaults.int_range(0)),
    "notify": ("notify", _choice(NOTIFY)),
    "mailto": ("mailto", _mailto),
    "mail-from": ("mail_from", _address),
    "smtp-server": ("smtp_server", _smtp),
    "webhook": ("webhook", _url),
    "metrics-listen": ("metrics_listen", _listen),
}


# ----------------------------------------------------------------------------- parsing


def _sections(text: str, source: str) -> list[Section]:
    """The sections of a jobs file: syntax, known kinds, valid and unique ids."""
    sections = parse_sections(text, source, header="KIND: ID", label=_label)
    seen: dict[str, int] = {}
    for section in sections:
        where, kind, id_ = f"{source}:{section.line}", section.kind, section.id
        if kind == GLOBAL_KIND:
            if id_ != GLOBAL_ID:
                raise ConfigError(
                    f"{where}: the global section is '{GLOBAL_KIND}: {GLOBAL_ID}', "
                    f"not '{kind}: {id_}'"
                )
        elif kind not in JOB_KINDS:
            raise ConfigError(
                f"{where}: job {id_}: unknown job type {kind!r}",
                hint=f"known: {', '.join(JOB_KINDS)}",
            )
        elif not _ID.match(id_):
            raise ConfigError(
                f"{where}: job {id_}: invalid job id",
                hint="a letter, then letters, digits, '_', '.', '-' (at most 64)",
            )
        label = f"{kind}:{id_}" if kind == GLOBAL_KIND else id_
        if label in seen:
            what = "section" if kind == GLOBAL_KIND else f"job {id_}"
            raise ConfigError(f"{where}: {what}: defined twice (first on line {seen[label]})")
        seen[label] = section.line
    return sections


def _label(section: Section) -> str:
    return "scheduler options" if section.kind == GLOBAL_KIND else f"job {section.id}"


def parse_jobs(
    text: str, source: str, node: Node | None
) -> tuple[SchedulerOptions, dict[str, JobDef]]:
    """Parse the text of a jobs file; *source* names it in errors. Storage names are checked
    against the node's storages (skipped when *node* is None)."""
    options = SchedulerOptions()
    jobs: dict[str, JobDef] = {}
    known_storages: dict[str, Any] | None = None
    for section in _sections(text, source):
        if section.kind == GLOBAL_KIND:
            options = _global(section, source)
            continue
        job = _job(section, source)
        if job.storage is not None and node is not None:
            if known_storages is None:
                from vzbackup.config.storage import storages  # imports boto3-free backends

                known_storages = storages(node)
            if job.storage not in known_storages:
                line = section.options["storage"][1]
                raise ConfigError(
                    f"{source}:{line}: job {job.id}: unknown storage {job.storage!r}",
                    hint=f"known: {', '.join(sorted(known_storages))}",
                )
        jobs[job.id] = job
    return options, jobs


def _global(section: Section, source: str) -> SchedulerOptions:
    values: dict[str, Any] = {"source": f"{source}:{section.line}"}
    for key, (value, line) in section.options.items():
        where = f"{source}:{line}: scheduler options"
        if key not in _GLOBAL_PARSERS:
            raise ConfigError(f"{where}: unknown key {key!r}",
                              hint="known: " + ", ".join(GLOBAL_KEYS))
        if not value:
            raise ConfigError(f"{where}: {key!r} has no value")
        name, parse = _GLOBAL_PARSERS[key]
        try:
            values[name] = parse(value)
        except ValueError as e:
            raise ConfigError(f"{where}: {key}: {e}") from None
    return SchedulerOptions(**values)


def _job(section: Section, source: str) -> JobDef:
    kind, id_ = section.kind, section.id
    head = f"{source}:{section.line}: job {id_}"
    parsed = _job_values(section, source)

    def at(key: str) -> str:
        return f"{source}:{section.options[key][1]}: job {id_}" if key in section.options else head

    if "schedule" not in parsed:
        raise ConfigError(f"{head}: no schedule", hint="e.g. 'schedule 02:00'")
    all_ = _takes_all(kind, parsed, at, head)
    ctids: list[int] = parsed.get("vmid", [])
    exclude: list[int] = parsed.get("exclude", [])
    if exclude and not all_:
        raise ConfigError(f"{at('exclude')}: exclude needs 'all 1' (not a vmid list)")
    scratch = parsed.get("scratch-ctid")
    if kind == "restore-test":
        _check_restore_test(ctids, scratch, at, head)
    options = {k: section.options[k][0] for k in DUMP_OPTION_KEYS
               if k in section.options and kind == "vzdump"}
    schedule_text, trigger = parsed["schedule"]
    return JobDef(
        id=id_,
        kind=kind,
        schedule_text=schedule_text,
        trigger=trigger,
        enabled=parsed.get("enabled", True),
        ctids=ctids,
        all=all_,
        exclude=exclude,
        storage=parsed.get("storage"),
        options=options,
        prune=parsed.get("prune-backups"),
        repeat_missed=parsed.get("repeat-missed", False),
        jitter=parsed.get("jitter", 0),
        lockwait=parsed.get("lockwait"),
        scratch_ctid=scratch,
        keyfile=parsed.get("keyfile"),
        comment=parsed.get("comment"),
        source=f"{source}:{section.line}",
    )


def _job_values(section: Section, source: str) -> dict[str, Any]:
    """The job's options parsed, each checked against its kind's keys."""
    kind, id_ = section.kind, section.id
    allowed = KIND_KEYS[kind]
    parsed: dict[str, Any] = {}
    for key, (value, line) in section.options.items():
        where = f"{source}:{line}: job {id_}"
        if key not in allowed:
            known = any(key in keys for keys in KIND_KEYS.values())
            reason = f"{key!r} is not valid for {kind} jobs" if known else f"unknown key {key!r}"
            raise ConfigError(f"{where}: {reason}", hint="known: " + ", ".join(allowed))
        if not value:
            raise ConfigError(f"{where}: {key!r} has no value")
        try:
            parsed[key] = _parse_job_value(key, value)
        except ScheduleError as e:
            raise ConfigError(f"{where}: schedule: {e}") from None
        except ValueError as e:
            raise ConfigError(f"{where}: {key}: {e}") from None
    return parsed


def _takes_all(kind: str, parsed: dict[str, Any], at: Callable[[str], str], head: str) -> bool:
    """Whether the job takes every CT: a vzdump job says so ('all 1') or names its CTs,
    a prune or verify job takes every CT unless it names some."""
    all_ = parsed.get("all", False)
    if "vmid" in parsed and all_:
        raise ConfigError(f"{at('all')}: give either vmid or 'all 1', not both")
    if kind == "vzdump" and "vmid" not in parsed and not all_:
        raise ConfigError(f"{head}: no CTs to back up", hint="give vmid CTID,... or 'all 1'")
    if kind in ("prune", "verify"):
        if "all" in parsed and not all_ and "vmid" not in parsed:
            raise ConfigError(f"{at('all')}: 'all 0' needs a vmid list",
                              hint=f"without vmid a {kind} job takes every CT")
        all_ = "vmid" not in parsed
    return all_


def _check_restore_test(ctids: list[int], scratch: int | None, at: Callable[[str], str],
                        head: str) -> None:
    """A restore-test job names one CT and a different scratch CT to restore it into."""
    if len(ctids) != 1:
        raise ConfigError(
            f"{at('vmid')}: restore-test needs exactly one vmid (the CT whose newest "
            "snapshot is restored)"
        )
    if scratch is None:
        raise ConfigError(f"{head}: no scratch-ctid",
                          hint="the CTID to restore into (it is overwritten)")
    if scratch == ctids[0]:
        raise ConfigError(f"{at('scratch-ctid')}: scratch-ctid must differ from vmid")


def _parse_job_value(key: str, value: str) -> Any:
    if key == "schedule":
        return value, parse_schedule(value)
    if key in ("enabled", "repeat-missed", "all"):
        return parse_bool(value)
    if key in ("vmid", "exclude"):
        return _ctids(value)
    if key == "scratch-ctid":
        return _ctid(value)
    if key == "jitter":
        return dump_defaults.int_range(0, 86400)(value)
    if key == "lockwait":
        return dump_defaults.int_range(0)(value)
    if key == "storage":
        return dump_defaults._storage(value)
    if key == "keyfile":
        return _abspath(value)
    if key in ("mode", "zstd-level", "zstd", "prune-backups", "notes-template"):
        return _dump_option(key)(value)
    return value  # comment


def load_jobs(path: Path, node: Node | None) -> tuple[SchedulerOptions, dict[str, JobDef]]:
    """The scheduler options and jobs (by id, in file order) of *path*; a missing file means
    no jobs and the default options. Raises ConfigError (``file:line: job ID: reason``)."""
    return parse_jobs(_read(Path(path)), str(path), node)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e.reason})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None


# ----------------------------------------------------------------------------- editing


def add_job(path: Path, kind: str, id: str, settings: Mapping[str, str], node: Node | None
            ) -> JobDef:
    """Append job ``KIND: ID`` with *settings* (key -> value as in the file) to *path*.

    ExistsError if the id is taken; ConfigError if the result would not load."""
    path = Path(path)
    if kind not in JOB_KINDS:
        raise ConfigError(f"job {id}: unknown job type {kind!r}",
                          hint=f"known: {', '.join(JOB_KINDS)}")
    text = _read(path)
    if any(s.kind != GLOBAL_KIND and s.id == id for s in _sections(text, str(path))):
        raise ExistsError(f"job {id!r} already exists in {path}")
    body = [f"{kind}: {id}"]
    for key, value in sorted(settings.items(), key=lambda kv: kv[0] != "schedule"):
        value = _as_text(value).strip()
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key):
            raise ConfigError(f"job {id}: invalid key {key!r}")
        if "\n" in value or "\r" in value:
            raise ConfigError(f"job {id}: {key}: value must be one line")
        body.append(f"\t{key} {value}")
    lines = text.splitlines()
    if lines and lines[-1].strip():
        lines.append("")
    new = "\n".join([*lines, *body]) + "\n"
    _, jobs = _validated(path, new, node)
    _replace(path, new)
    return jobs[id]


def remove_job(path: Path, id: str, node: Node | None = None) -> None:
    """Remove job *id* (its header and option lines; comments above it stay)."""
    path = Path(path)
    text = _read(path)
    section = _find(text, path, id)
    lines = text.splitlines()
    start, end = section.line - 1, section.end  # lines[start:end] is the section
    if start > 0 and not lines[start - 1].strip() and (end >= len(lines) or not lines[end].strip()):
        start -= 1  # drop one of the blank lines around it
    new_lines = lines[:start] + lines[end:]
    new = "\n".join(new_lines) + "\n" if new_lines else ""
    _validated(path, new, node)
    _replace(path, new)


def set_enabled(path: Path, id: str, on: bool, node: Node | None = None) -> None:
    """Set ``enabled`` of job *id* (the line is changed in place or added)."""
    path = Path(path)
    text = _read(path)
    section = _find(text, path, id)
    lines = text.splitlines()
    value = "1" if on else "0"
    if "enabled" in section.options:
        index = section.options["enabled"][1] - 1
        m = re.match(r"^(\s+enabled)(\s+)", lines[index])
        indent, gap = (m.group(1), m.group(2)) if m else ("\tenabled", " ")
        lines[index] = f"{indent}{gap}{value}"
    else:
        first = min((ln for _, ln in section.options.values()), default=0)
        m = re.match(r"^\s+", lines[first - 1]) if first else None
        indent = m.group(0) if m else "\t"
        lines.insert(section.end, f"{indent}enabled {value}")
    new = "\n".join(lines) + "\n"
    if new == text:
        return
    _validated(path, new, node)
    _replace(path, new)


def _find(text: str, path: Path, id: str) -> Section:
    for section in _sections(text, str(path)):
        if section.kind != GLOBAL_KIND and section.id == id:
            return section
    raise NotFoundError(f"no job {id!r} in {path}")


def _validated(path: Path, text: str, node: Node | None
               ) -> tuple[SchedulerOptions, dict[str, JobDef]]:
    return parse_jobs(text, str(path), node)


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, KeepPolicy):
        return value.to_string()
    return str(value)


def _replace(path: Path, text: str) -> None:
    """Write *text* to *path* atomically (temporary file in the same directory, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dirfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)


__all__ = [
    "DUMP_OPTION_KEYS",
    "JOB_KINDS",
    "JobDef",
    "SchedulerOptions",
    "add_job",
    "jobs_path",
    "load_jobs",
    "parse_jobs",
    "remove_job",
    "set_enabled",
]
