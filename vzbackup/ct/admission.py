"""Can this CT land here? One check for ``create``, a restore from a backup and a migration.

What can clash on a node: the CTID (a config exists), the NAME (another CT's link), an
address (in another CT's IP_ADDRESS, or, with *host*, configured on the host already) and
the private area (a directory is there). :func:`clashes` finds every clash; the caller
decides what is fatal: ``create`` refuses the first, a restore drops a taken name with a
warning, the DEST of a migration reports them all at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from vzbackup import errors as E
from vzbackup.config.net import ip_addr
from vzbackup.config.node import Node
from vzbackup.ct import registry
from vzbackup.ct.container import Container


@dataclass(frozen=True)
class Clash:
    what: str  # "ctid", "name", "ip" or "private"
    message: str
    hint: str | None = None

    def error(self) -> E.ExistsError:
        return E.ExistsError(self.message, hint=self.hint)


def ips_of_other_cts(node: Node, ctid: int) -> dict[str, int]:
    """Bare address -> CTID, over every CT of the node but *ctid* (unreadable configs skipped)."""
    used: dict[str, int] = {}
    for other in registry.list_ctids(node):
        if other == ctid:
            continue
        with contextlib.suppress(E.VzError):
            for ip in Container(node, other).conf.ips:
                used[ip_addr(ip)] = other
    return used


def _network() -> ModuleType:
    """``vzbackup.ct.network``, imported when the host's addresses are asked about: it brings
    hashlib, socket and subprocess (~6 ms of imports a restore never needs)."""
    from vzbackup.ct import network

    return network


def clashes(node: Node, ctid: int, *, new: bool = True, name: str = "",
            ips: Iterable[str] = (), host: bool = False, private: Path | None = None,
            empty_private_ok: bool = False) -> list[Clash]:
    """What stops CT *ctid* (*new*: it must not exist yet) with *name*, *ips* and the
    *private* area from landing on *node*; *host*: addresses in use on the host count too."""
    found: list[Clash] = []
    ct = Container(node, ctid)
    if new and ct.exists:
        found.append(Clash("ctid", f"CT {ctid} already exists ({ct.conf_path})"))
    owner = registry.name_owner(node, name) if name else None
    if owner is not None and owner != ctid:
        found.append(Clash("name", f"name {name!r} is already used by CT {owner}"))
    ips = list(ips)
    others = ips_of_other_cts(node, ctid) if ips else {}
    on_host = set(_network().ips_in_use_on_host(ips)) if host and ips else set()
    for ip in ips:
        addr = ip_addr(ip)
        if addr in others:
            found.append(Clash("ip", f"IP {ip} is already used by CT {others[addr]}"))
        elif ip in on_host:
            found.append(Clash("ip", f"IP {ip} is already in use on this host"))
    if private is not None and private.exists() and not (empty_private_ok and _empty_dir(private)):
        found.append(Clash("private", f"private area {private} already exists",
                           hint="remove it, or destroy the CT that owns it"))
    return found


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())
