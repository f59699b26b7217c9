"""The Proxmox section-config grammar of storage.cfg and jobs.cfg, and its value rules.

    TYPE: ID
    <TAB>key value
    <TAB>key value

A section starts with ``TYPE: ID`` at the start of a line; indented ``key value`` lines are
its options; blank lines and lines starting with ``#`` are ignored. This module checks the
syntax and gives every value its ``file:line``; what a TYPE, an ID or a key may be is the
caller's (a storage type, a job kind). One boolean rule serves every config file.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from vzbackup.errors import ConfigError

_HEADER = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*):\s*(\S*)\s*$")
_OPTION = re.compile(r"^\s+([A-Za-z][A-Za-z0-9_-]*)(?:\s+(.*?))?\s*$")

TRUE = ("1", "yes", "on", "true")
FALSE = ("0", "no", "off", "false")


def parse_bool(text: str) -> bool:
    """1/0, yes/no, on/off, true/false (any case); ValueError for anything else."""
    lowered = text.strip().lower()
    if lowered in TRUE:
        return True
    if lowered in FALSE:
        return False
    raise ValueError(f"expected 0 or 1 (or yes/no, on/off, true/false), not {text!r}")


@dataclass
class Section:
    """One ``TYPE: ID`` section; ``options`` maps key -> (value, line), in file order."""

    kind: str
    id: str
    line: int  # 1-based line of the header
    end: int  # 1-based line of its last option (== line if none)
    options: dict[str, tuple[str, int]] = field(default_factory=dict)


def parse_sections(text: str, source: str, *, header: str = "TYPE: ID",
                   label: typing.Callable[[Section], str] = lambda s: s.id) -> list[Section]:
    """The sections of *text* (syntax only); ConfigError ``source:line: ...`` otherwise.

    *header* names the header form in errors; *label* names a section in them."""
    sections: list[Section] = []
    cur: Section | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        where = f"{source}:{n}"
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not raw[0].isspace():
            m = _HEADER.match(raw)
            if not m or not m.group(2):
                raise ConfigError(f"{where}: expected '{header}', got {stripped!r}")
            cur = Section(m.group(1), m.group(2), n, n)
            sections.append(cur)
            continue
        if cur is None:
            raise ConfigError(f"{where}: option {stripped!r} outside a section")
        m = _OPTION.match(raw)
        if not m:
            raise ConfigError(f"{where}: {label(cur)}: malformed line {stripped!r}",
                              hint="expected an indented 'key value'")
        key, value = m.group(1), m.group(2) or ""
        if key in cur.options:
            raise ConfigError(f"{where}: {label(cur)}: {key!r} given twice "
                              f"(first on line {cur.options[key][1]})")
        cur.options[key] = (value, n)
        cur.end = n
    return sections


# ----------------------------------------------------------------------------- typed options

T = typing.TypeVar("T")


def _converter(hint: Any) -> typing.Callable[[str], Any]:
    if typing.get_origin(hint) in (Union, types.UnionType):  # X | None: X
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        return parse_bool
    if hint is int:
        return _whole
    if hint is float:
        return _number
    return str


def _whole(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text):
        raise ValueError(f"expected a whole number, not {text!r}")
    return int(text)


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number, not {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"expected a number of 0 or more, not {text!r}")
    return value


def fill(cls: type[T], section: Section, source: str, what: str) -> T:
    """An instance of the options dataclass *cls* from *section*'s ``key value`` lines.

    A key is a field name with ``-`` for ``_``; a field's type (bool, int, float, str or
    ``X | None``) says how its value reads; fields without a default are required. The
    dataclass validates itself (``__post_init__`` raising ValueError)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, (text, line) in section.options.items():
        where = f"{source}:{line}: {what}"
        name = key.replace("-", "_")
        if name not in fields or not fields[name].init:
            known = ", ".join(f.replace("_", "-") for f, v in fields.items() if v.init)
            raise ConfigError(f"{where}: unknown key {key!r}", hint=f"known: {known}")
        if not text:
            raise ConfigError(f"{where}: {key!r} has no value")
        try:
            values[name] = _converter(hints[name])(text)
        except ValueError as e:
            raise ConfigError(f"{where}: {key}: {e}") from None
    head = f"{source}:{section.line}: {what}"
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.init and required and name not in values:
            raise ConfigError(f"{head}: needs a {name.replace('_', '-')}")
    try:
        return cls(**values)
    except ValueError as e:
        raise ConfigError(f"{head}: {e}") from None
