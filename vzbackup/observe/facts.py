"""What the metrics and the report show, gathered from where it is recorded on this node:
the repositories (snapshot manifests), the scheduler's run history and the migration log.

Reading never creates anything: a node without a scheduler database or migration log just
has no runs or migrations.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vzbackup import constants as C
from vzbackup.backup import defaults as D
from vzbackup.backup import session
from vzbackup.config.node import Node
from vzbackup.errors import VzError
from vzbackup.migrate import history as migrations_log
from vzbackup.observe import engine_view
from vzbackup.observe.engine_view import Snapshot
from vzbackup.scheduler.history import History, Run

# how the scheduler's runner words a CT's result in a vzdump run's details
_CT_RESULT = re.compile(r"^CT (\d+): (FAILED)?")


@dataclass
class RepoFacts:
    """One storage's repository: its snapshots and what they take."""

    storage: str
    url: str = ""
    up: bool = False
    error: str | None = None
    snapshots: list[Snapshot] = field(default_factory=list)
    stored_bytes: int = 0

    @property
    def logical_bytes(self) -> int:
        return sum(s.size for s in self.snapshots)

    @property
    def dedup_ratio(self) -> float | None:
        """Logical bytes of every snapshot over stored bytes (dedup and compression)."""
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else None

    def latest_per_ct(self) -> dict[int, Snapshot]:
        out: dict[int, Snapshot] = {}
        for s in self.snapshots:
            if s.ctid not in out or s.time > out[s.ctid].time:
                out[s.ctid] = s
        return out


def watched_storages(node: Node, only: str | None = None) -> dict[str, Path | None]:
    """Storage name -> key file: the default storage and every storage a job names (with the
    job's key file, else vzdump.conf's), or just *only*."""
    defaults = D.load_defaults(node.vzbackup_confdir / C.VZDUMP_CONF)
    default_key = defaults.encryption_key
    out: dict[str, Path | None] = {}
    if only:
        return {only: default_key}
    out[defaults.storage or "local"] = default_key
    from vzbackup.scheduler.config import load_jobs

    try:
        _, jobs = load_jobs(node.vzbackup_confdir / C.JOBS_CFG, node)
    except VzError:
        jobs = {}
    for j in jobs.values():
        name = j.storage or defaults.storage or "local"
        if out.get(name) is None:
            out[name] = j.keyfile or default_key
    return out


def repo_facts(node: Node, storage: str, keyfile: Path | None) -> RepoFacts:
    """The repository on *storage*; ``up`` False (with the error) when it can't be read."""
    facts = RepoFacts(storage)
    try:
        repo = session.open_repository(node, storage, keyfile)
        facts.url = repo.backend.url
        view = engine_view.RepoView(repo)
        facts.snapshots = view.snapshots()
        facts.stored_bytes = engine_view.stored_bytes(repo)
        view.close()
        facts.up = True
    except VzError as e:
        facts.error = str(e).split("\n")[0]
    return facts


def history(node: Node) -> History | None:
    path = node.statedir / C.SCHEDULER_DB
    return History(path) if path.exists() else None


def job_runs(node: Node, since: float = 0.0) -> list[Run]:
    h = history(node)
    return h.since(since) if h else []


def ct_backup_results(runs: list[Run]) -> dict[int, tuple[float, bool]]:
    """CTID -> (end time, ok) of its newest scheduled backup."""
    out: dict[int, tuple[float, bool]] = {}
    for r in runs:
        if r.kind != "vzdump" or r.ended is None:
            continue
        for line in r.details:
            m = _CT_RESULT.match(line)
            if m:
                out[int(m.group(1))] = (r.ended, m.group(2) is None)
    return out


def migrations(node: Node, since: float = 0.0) -> list[dict[str, Any]]:
    """Migration records (see vzbackup.migrate.history) at or after *since*, oldest first."""
    out = []
    for rec in migrations_log.records(node):
        when = record_time(rec)
        if when is not None and when.timestamp() >= since:
            out.append(rec)
    return out


def record_time(rec: dict[str, Any]) -> datetime | None:
    try:
        t = datetime.fromisoformat(str(rec["time"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def parse_since(text: str) -> float:
    """'30d', '12h', '90m', '2w' or an ISO date -> a UNIX time."""
    m = re.fullmatch(r"\s*(\d+)\s*([mhdw])\s*", text)
    if m:
        return time.time() - int(m.group(1)) * {"m": 60, "h": 3600, "d": 86400,
                                                  "w": 604800}[m.group(2)]
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        from vzbackup.errors import UsageError

        raise UsageError(f"--since {text!r}: expected like 30d, 12h, 2w or 2026-11-01") from None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()
