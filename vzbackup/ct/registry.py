"""CTIDs and names: parse, validate, resolve (vzctl's names/ links), list."""

from __future__ import annotations

import os
from pathlib import Path

from vzbackup import constants as C
from vzbackup.config.ct import validate_name
from vzbackup.config.node import Node
from vzbackup.errors import ExistsError, NotFoundError, UsageError


def parse_ctid(text: str | int) -> int:
    """A numeric CTID > 100, or UsageError."""
    s = str(text).strip()
    if not s.isdigit():
        raise UsageError(f"invalid CTID {text!r}: must be a number")
    ctid = int(s)
    if not C.MIN_CTID <= ctid <= C.MAX_CTID:
        raise UsageError(
            f"invalid CTID {ctid}: must be {C.MIN_CTID}..{C.MAX_CTID} (0-100 are reserved)"
        )
    return ctid


def resolve(node: Node, text: str | int) -> int:
    """A CTID from a number or a CT name (names/NAME -> ../conf/CTID.conf)."""
    s = str(text).strip()
    if s.isdigit():
        return parse_ctid(s)
    try:
        validate_name(s)
    except UsageError:
        raise UsageError(f"invalid CTID or name {text!r}") from None
    link = node.namesdir / s
    try:
        target = os.readlink(link)
    except OSError:
        raise NotFoundError(f"no CT named {s!r}") from None
    stem = Path(target).name.removesuffix(".conf")
    return parse_ctid(stem)


def list_ctids(node: Node) -> list[int]:
    """CTIDs that have a config on this node."""
    out = []
    if node.confdir.is_dir():
        for p in node.confdir.glob("*.conf"):
            if p.stem.isdigit() and int(p.stem) >= C.MIN_CTID:
                out.append(int(p.stem))
    return sorted(out)


def name_owner(node: Node, name: str) -> int | None:
    try:
        return resolve(node, name)
    except NotFoundError:
        return None


def set_name(node: Node, ctid: int, name: str) -> None:
    """Point names/NAME at this CT; refuses a name another CT holds."""
    validate_name(name)
    owner = name_owner(node, name)
    if owner is not None and owner != ctid:
        raise ExistsError(f"name {name!r} is already used by CT {owner}")
    node.namesdir.mkdir(parents=True, exist_ok=True)
    link = node.namesdir / name
    tmp = link.with_name(f".{name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(node.ct_conf_path(ctid), node.namesdir), tmp)
    os.replace(tmp, link)


def remove_name(node: Node, name: str) -> None:
    if name:
        (node.namesdir / name).unlink(missing_ok=True)
