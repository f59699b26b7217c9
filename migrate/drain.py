"""Drain a node: move every CT to other nodes ("migrate all VEs away, then service the node").

    capacities (each DEST reports free memory and disk) -> place (largest CT first, onto the
    DEST with the most memory left) -> migrate each CT (migrate.phases.Migration, N at a time)
    -> one result per CT and a summary

A CT whose migration fails stays where it was (the migration rolls back) and the others go on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from vzbackup.migrate.dest import RemoteSession, TreePusher
from vzbackup.migrate.phases import MigrateOptions, Migration

from vzbackup import __version__
from vzbackup import constants as C
from vzbackup import errors as E
from vzbackup.config.node import Node
from vzbackup.ct import fs, registry
from vzbackup.ct.container import Container

log = logging.getLogger("vzbackup.migrate")


# --------------------------------------------------------------------------- what DEST reports


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name == key:
                return int(rest.split()[0]) * 1024
    raise E.RuntimeFailure(f"/proc/meminfo has no {key}")


def local_capacity(node: Node) -> dict[str, Any]:
    """What this node can take (``vzbackup node-capacity``, run on DEST over SSH)."""
    private_parent = node.path("VE_PRIVATE", C.MIN_CTID).parent
    return {
        "version": __version__,
        "mem_available": _meminfo("MemAvailable"),
        "disk_free": fs.free_bytes(private_parent),
        "private_parent": str(private_parent),
    }


@dataclass
class Capacity:
    """A DEST and what it reported (or why it could not)."""

    dest: str
    mem_available: int = 0
    disk_free: int = 0
    error: str = ""


def remote_capacity(dest: str, session: RemoteSession) -> Capacity:
    """Ask DEST's vzbackup for its free memory and disk."""
    try:
        _, out, _ = session.run([*session.target.remote_vzbackup, "node-capacity", "--json"],
                                timeout=60)
        data = json.loads(out)
        return Capacity(dest, int(data["mem_available"]), int(data["disk_free"]))
    except (E.VzError, ValueError, KeyError, TypeError) as e:
        return Capacity(dest, error=str(e) or type(e).__name__)


# --------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class Need:
    """What a CT takes at its new node: its memory (0 when stopped) and its files."""

    ctid: int
    mem: int
    disk: int


def need_of(ct: Container) -> Need:
    mem = 0
    if ct.running:
        with contextlib.suppress(Exception):
            mem = ct.cgroup().memory_usage() or 0
    return Need(ct.ctid, mem, fs.tree_bytes(ct.ve_private()))


def place(needs: list[Need], caps: list[Capacity]) -> dict[int, str | None]:
    """CTID -> DEST (None: fits nowhere). Largest memory first; each CT goes to the DEST with
    the most memory left among those with room for its files (spreads the load; ties go to
    the DEST named first)."""
    left = {c.dest: [c.mem_available, c.disk_free] for c in caps if not c.error}
    plan: dict[int, str | None] = {}
    for n in sorted(needs, key=lambda n: (-n.mem, -n.disk, n.ctid)):
        fits = [d for d, (mem, disk) in left.items()
                if mem >= n.mem and disk >= n.disk * C.MIGRATE_DISK_MARGIN]
        best = max(fits, key=lambda d: left[d][0], default=None)
        plan[n.ctid] = best
        if best is not None:
            left[best][0] -= n.mem
            left[best][1] -= n.disk
    return plan


# --------------------------------------------------------------------------- the drain


@dataclass
class CTResult:
    ctid: int
    dest: str | None
    ok: bool = False
    mode: str = ""
    runs_on: str = "source"  # where the CT runs afterwards: source | dest
    seconds: float = 0.0
    frozen: float = 0.0
    times: dict[str, float] = field(default_factory=dict)
    error: str = ""


@dataclass
class DrainReport:
    dests: list[Capacity]
    results: list[CTResult] = field(default_factory=list)
    dry_run: bool = False
    seconds: float = 0.0

    @property
    def failed(self) -> list[CTResult]:
        return [r for r in self.results if not r.ok]

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "dests": [asdict(c) for c in self.dests],
            "results": [asdict(r) for r in self.results],
            "moved": sum(r.ok and r.runs_on == "dest" for r in self.results),
            "failed": len(self.failed),
            "seconds": round(self.seconds, 3),
        }


SessionFactory = Callable[[str], contextlib.AbstractContextManager[RemoteSession]]


class Drain:
    """Moves every CT of *node* (but *exclude*) to the DESTs; *connect* opens an SSH session
    to a DEST (migrate.ssh.Session), *opts* are the migration options of every CT."""

    def __init__(self, node: Node, dests: list[str], opts: MigrateOptions, *,
                 connect: SessionFactory, push_tree: TreePusher, parallel: int = 1,
                 exclude: frozenset[int] = frozenset(),
                 say: Callable[[str], None] = lambda _m: None) -> None:
        self.node = node
        self.dests = dests
        self.opts = opts
        self.connect = connect
        self.push_tree = push_tree
        self.parallel = max(1, parallel)
        self.exclude = exclude
        self.say = say

    def run(self) -> DrainReport:
        t0 = time.monotonic()
        caps = [self._capacity(d) for d in self.dests]
        report = DrainReport(caps, dry_run=self.opts.dry_run)
        for c in caps:
            if c.error:
                self.say(f"DEST {c.dest}: unusable ({c.error})")
        if all(c.error for c in caps):
            raise E.RemoteNodeError("no DEST could report its capacity:\n  "
                                    + "\n  ".join(f"{c.dest}: {c.error}" for c in caps))
        needs: list[Need] = []
        cts: dict[int, Container] = {}
        for ctid in registry.list_ctids(self.node):
            if ctid in self.exclude:
                continue
            try:
                cts[ctid] = Container(self.node, ctid)
                needs.append(need_of(cts[ctid]))
            except (E.VzError, OSError) as e:  # e.g. a config that can't be read: not moved
                report.results.append(CTResult(ctid, None, error=str(e)))
                self.say(f"CT {ctid}: not moved: {e}")
        plan = place(needs, caps)  # in placement order: largest first
        with ThreadPoolExecutor(self.parallel, thread_name_prefix="drain") as pool:
            report.results += pool.map(lambda ctid: self._move(cts[ctid], plan[ctid]), plan)
        report.seconds = time.monotonic() - t0
        return report

    def _capacity(self, dest: str) -> Capacity:
        try:
            with self.connect(dest) as session:
                return remote_capacity(dest, session)
        except Exception as e:  # unreachable, refused, bad host key...: this DEST takes nothing
            return Capacity(dest, error=str(e) or type(e).__name__)

    def _move(self, ct: Container, dest: str | None) -> CTResult:
        res = CTResult(ct.ctid, dest)
        if dest is None:
            res.error = "no DEST has room for it (free memory and disk as reported)"
            self.say(f"CT {ct.ctid}: not moved: {res.error}")
            return res
        opts = replace(self.opts, online=self.opts.online and ct.running)
        t = time.monotonic()
        mig: Migration | None = None
        try:
            with self.connect(dest) as session:
                mig = Migration(ct, session, opts, push_tree=self.push_tree)
                mig.run()
        except Exception as e:  # one CT's failure, whatever it is, never stops the drain
            if not isinstance(e, E.VzError):
                log.exception("CT %s: migration to %s failed", ct.ctid, dest)
            res.error = str(e) or type(e).__name__
        finally:
            res.seconds = time.monotonic() - t
        if mig is not None:
            r = mig.report
            res.ok, res.mode, res.runs_on = r.ok, r.mode, r.runs_on
            res.frozen, res.times = r.frozen, {k: round(v, 4) for k, v in r.times.items()}
        res.ok = res.ok and not res.error
        self.say(f"CT {ct.ctid} -> {dest}: " + (
            f"{'checked' if opts.dry_run else 'moved'} ({res.mode}, frozen {res.frozen:.2f}s, "
            f"{res.seconds:.1f}s)" if res.ok else f"FAILED (runs on {res.runs_on}): {res.error}"))
        return res
