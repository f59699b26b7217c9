"""The scheduler's persistent state in SQLite (SQLAlchemy): run history and run-now requests.

APScheduler keeps its jobs and next run times in the same database (table
``apscheduler_jobs``), so both survive restarts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

META = sa.MetaData()
RUNS = sa.Table(
    "vzbackup_runs",
    META,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job", sa.String(128), nullable=False, index=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("trigger", sa.String(32), nullable=False),  # schedule | missed | run-now
    sa.Column("started", sa.Float, nullable=False),
    sa.Column("ended", sa.Float),
    sa.Column("status", sa.String(16), nullable=False),  # running ok failed aborted
    sa.Column("bytes", sa.BigInteger, default=0),
    sa.Column("snapshots", sa.Text, default="[]"),
    sa.Column("error", sa.Text),
    sa.Column("details", sa.Text, default="[]"),
)
REQUESTS = sa.Table(
    "vzbackup_requests",
    META,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job", sa.String(128), nullable=False),
    sa.Column("requested", sa.Float, nullable=False),
    sa.Column("taken", sa.Float),
)
APS_JOBS = "apscheduler_jobs"


@dataclass
class Run:
    id: int
    job: str
    kind: str
    trigger: str
    started: float
    ended: float | None
    status: str
    bytes: int = 0
    snapshots: list[str] = field(default_factory=list)
    error: str | None = None
    details: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["started"] = _iso(self.started)
        d["ended"] = _iso(self.ended) if self.ended else None
        d["duration"] = round(self.ended - self.started, 3) if self.ended else None
        return d


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


class History:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.url = f"sqlite:///{path}"
        self.engine = sa.create_engine(self.url, connect_args={"timeout": 30})
        META.create_all(self.engine)

    def start(self, job: str, kind: str, trigger: str) -> int:
        with self.engine.begin() as c:
            res = c.execute(RUNS.insert().values(job=job, kind=kind, trigger=trigger,
                                                 started=time.time(), status="running"))
            return int(res.inserted_primary_key[0])

    def finish(self, run_id: int, status: str, *, bytes_: int = 0,
               snapshots: list[str] | None = None, error: str | None = None,
               details: list[str] | None = None) -> Run:
        with self.engine.begin() as c:
            c.execute(RUNS.update().where(RUNS.c.id == run_id).values(
                ended=time.time(), status=status, bytes=bytes_,
                snapshots=json.dumps(snapshots or []), error=error,
                details=json.dumps(details or [])))
        return self.get(run_id)

    def abandon_running(self) -> int:
        """Runs still 'running' from a daemon that died: mark them aborted."""
        with self.engine.begin() as c:
            return c.execute(RUNS.update().where(RUNS.c.status == "running").values(
                status="aborted", ended=time.time(), error="the scheduler stopped")).rowcount

    def get(self, run_id: int) -> Run:
        with self.engine.connect() as c:
            row = c.execute(RUNS.select().where(RUNS.c.id == run_id)).one()
        return _run(row)

    def runs(self, job: str | None = None, limit: int = 50) -> list[Run]:
        q = RUNS.select().order_by(RUNS.c.id.desc()).limit(limit)
        if job:
            q = q.where(RUNS.c.job == job)
        with self.engine.connect() as c:
            return [_run(r) for r in c.execute(q)]

    def since(self, started_after: float) -> list[Run]:
        """Finished and running runs started after *started_after*, oldest first."""
        q = RUNS.select().where(RUNS.c.started >= started_after).order_by(RUNS.c.id)
        with self.engine.connect() as c:
            return [_run(r) for r in c.execute(q)]

    def counts(self) -> dict[tuple[str, str, str], int]:
        """Number of runs by (job, kind, status), over the whole history."""
        q = sa.select(RUNS.c.job, RUNS.c.kind, RUNS.c.status, sa.func.count()).group_by(
            RUNS.c.job, RUNS.c.kind, RUNS.c.status)
        with self.engine.connect() as c:
            return {(r[0], r[1], r[2]): int(r[3]) for r in c.execute(q)}

    def latest_per_job(self) -> list[Run]:
        """The newest finished run of every job."""
        newest = sa.select(sa.func.max(RUNS.c.id)).where(RUNS.c.ended.is_not(None)).group_by(
            RUNS.c.job)
        q = RUNS.select().where(RUNS.c.id.in_(newest)).order_by(RUNS.c.job)
        with self.engine.connect() as c:
            return [_run(r) for r in c.execute(q)]

    def request(self, job: str) -> int:
        with self.engine.begin() as c:
            res = c.execute(REQUESTS.insert().values(job=job, requested=time.time()))
            return int(res.inserted_primary_key[0])

    def take_requests(self) -> list[tuple[int, str]]:
        with self.engine.begin() as c:
            rows = c.execute(REQUESTS.select().where(REQUESTS.c.taken.is_(None))).all()
            if rows:
                c.execute(REQUESTS.update().where(REQUESTS.c.id.in_([r.id for r in rows]))
                          .values(taken=time.time()))
        return [(r.id, r.job) for r in rows]

    def next_runs(self) -> dict[str, float | None]:
        """Next run time per job id as APScheduler stored it (None: paused)."""
        insp = sa.inspect(self.engine)
        if APS_JOBS not in insp.get_table_names():
            return {}
        t = sa.Table(APS_JOBS, sa.MetaData(), autoload_with=self.engine)
        with self.engine.connect() as c:
            return {r.id: r.next_run_time for r in c.execute(sa.select(t.c.id, t.c.next_run_time))}


def _run(r: Any) -> Run:
    return Run(r.id, r.job, r.kind, r.trigger, r.started, r.ended, r.status, r.bytes or 0,
               json.loads(r.snapshots or "[]"), r.error, json.loads(r.details or "[]"))
