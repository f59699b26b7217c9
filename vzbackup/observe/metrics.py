"""Prometheus metrics of a node (prometheus_client): backups per CT, verify and restore-test
results, repositories, scheduled jobs and migrations.

A collector builds every family at scrape time from :mod:`facts`; repository listings are
kept for ``REPO_TTL`` seconds (the daemon drops them when a job ends), the scheduler history
and migration log are read on every scrape.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vzbackup.config.node import Node
from vzbackup.observe import facts as F

PREFIX = "vzbackup_"
REPO_TTL = 300.0  # seconds a repository listing is reused between scrapes
TEXTFILE_NAME = "vzbackup.prom"


def _g(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, labels=labels)


class RepoCache:
    """Repository facts per storage, reused for *ttl* seconds; ``clear`` after a job."""

    def __init__(self, ttl: float = REPO_TTL) -> None:
        self.ttl = ttl
        self.lock = threading.Lock()
        self.items: dict[str, tuple[float, F.RepoFacts]] = {}

    def get(self, node: Node, storage: str, keyfile: Path | None) -> F.RepoFacts:
        with self.lock:
            hit = self.items.get(storage)
            if hit and time.monotonic() - hit[0] < self.ttl:
                return hit[1]
        got = F.repo_facts(node, storage, keyfile)
        with self.lock:
            self.items[storage] = (time.monotonic(), got)
        return got

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


class NodeCollector(Collector):
    def __init__(self, node: Node, cache: RepoCache | None = None) -> None:
        self.node = node
        self.cache = cache or RepoCache(ttl=0)

    def collect(self) -> Iterator[Metric]:
        repos = [self.cache.get(self.node, name, key)
                 for name, key in F.watched_storages(self.node).items()]
        yield from _repository_metrics(repos)
        yield from _backup_metrics(repos)
        h = F.history(self.node)
        runs = h.latest_per_job() if h else []
        yield from _job_metrics(h.counts() if h else {}, runs)
        yield from _ct_result_metrics(F.job_runs(self.node) if h else [], repos)
        yield from _migration_metrics(F.migrations(self.node))


def _repository_metrics(repos: list[F.RepoFacts]) -> Iterator[Metric]:
    up = _g("repository_up", "1 if the storage's repository could be read", ["storage"])
    stored = _g("repository_stored_bytes", "Bytes the repository takes on its storage",
                ["storage"])
    logical = _g("repository_logical_bytes", "Logical bytes of all snapshots", ["storage"])
    ratio = _g("repository_dedup_ratio",
               "Logical over stored bytes (deduplication and compression)", ["storage"])
    count = _g("repository_snapshots", "Snapshots in the repository", ["storage"])
    for r in repos:
        up.add_metric([r.storage], int(r.up))
        if not r.up:
            continue
        stored.add_metric([r.storage], r.stored_bytes)
        logical.add_metric([r.storage], r.logical_bytes)
        count.add_metric([r.storage], len(r.snapshots))
        if r.dedup_ratio is not None:
            ratio.add_metric([r.storage], r.dedup_ratio)
    yield from (up, stored, logical, ratio, count)


def _backup_metrics(repos: list[F.RepoFacts]) -> Iterator[Metric]:
    labels = ["storage", "ctid"]
    when = _g("backup_last_timestamp_seconds", "Time of the CT's newest snapshot", labels)
    size = _g("backup_last_size_bytes", "Logical size of the CT's newest snapshot", labels)
    new = _g("backup_last_new_bytes", "Bytes the newest snapshot added to the repository",
             labels)
    took = _g("backup_last_duration_seconds", "How long the newest backup took", labels)
    frozen = _g("backup_last_frozen_seconds", "How long the newest backup froze the CT",
                labels)
    count = _g("backup_snapshots", "Snapshots of the CT", labels)
    for r in repos:
        per_ct: dict[int, int] = {}
        for s in r.snapshots:
            per_ct[s.ctid] = per_ct.get(s.ctid, 0) + 1
        for ctid, s in sorted(r.latest_per_ct().items()):
            key = [r.storage, str(ctid)]
            when.add_metric(key, s.time.timestamp())
            size.add_metric(key, s.size)
            new.add_metric(key, float(s.stats.get("stored_new", 0)))
            took.add_metric(key, float(s.stats.get("duration", 0)))
            frozen.add_metric(key, float(s.stats.get("frozen_seconds", 0)))
            count.add_metric(key, per_ct[ctid])
    yield from (when, size, new, took, frozen, count)


def _ct_result_metrics(runs: list, repos: list[F.RepoFacts]) -> Iterator[Metric]:
    """Whether each CT's latest backup attempt worked: a failed scheduled backup after its
    newest snapshot counts as a failure."""
    ok = _g("backup_last_success", "1 if the CT's latest backup attempt made a snapshot",
            ["ctid"])
    newest: dict[int, float] = {}
    for r in repos:
        for ctid, s in r.latest_per_ct().items():
            newest[ctid] = max(newest.get(ctid, 0.0), s.time.timestamp())
    attempts = F.ct_backup_results(runs)
    for ctid in sorted(newest.keys() | attempts.keys()):
        ended, good = attempts.get(ctid, (0.0, True))
        ok.add_metric([str(ctid)], 1 if good or newest.get(ctid, 0.0) > ended else 0)
    yield ok


def _job_metrics(counts: dict[tuple[str, str, str], int], latest: list) -> Iterator[Metric]:
    runs = CounterMetricFamily(PREFIX + "job_runs", "Finished runs of a scheduled job",
                               labels=["job", "kind", "status"])
    for (job, kind, status), n in sorted(counts.items()):
        if status != "running":
            runs.add_metric([job, kind, status], n)
    fails = CounterMetricFamily(PREFIX + "job_failures", "Failed or aborted runs of a job",
                                labels=["job", "kind"])
    per_job: dict[tuple[str, str], int] = {}
    for (job, kind, status), n in counts.items():
        per_job.setdefault((job, kind), 0)
        if status in ("failed", "aborted"):
            per_job[(job, kind)] += n
    for (job, kind), n in sorted(per_job.items()):
        fails.add_metric([job, kind], n)
    labels = ["job", "kind"]
    success = _g("job_last_success", "1 if the job's latest run succeeded", labels)
    ended = _g("job_last_run_timestamp_seconds", "When the job's latest run ended", labels)
    took = _g("job_last_duration_seconds", "How long the job's latest run took", labels)
    verify = _g("verify_last_success", "1 if the latest verify run found no damage", ["job"])
    verify_t = _g("verify_last_timestamp_seconds", "When the latest verify run ended", ["job"])
    rtest = _g("restore_test_last_success",
               "1 if the latest restore test brought the CT up", ["job", "ctid"])
    rtest_t = _g("restore_test_last_timestamp_seconds", "When the latest restore test ended",
                 ["job", "ctid"])
    for r in latest:
        good = int(r.status == "ok")
        success.add_metric([r.job, r.kind], good)
        ended.add_metric([r.job, r.kind], r.ended)
        took.add_metric([r.job, r.kind], r.ended - r.started)
        if r.kind == "verify":
            verify.add_metric([r.job], good)
            verify_t.add_metric([r.job], r.ended)
        elif r.kind == "restore-test":
            ctid = r.snapshots[0].split("/")[0] if r.snapshots else ""
            rtest.add_metric([r.job, ctid], good)
            rtest_t.add_metric([r.job, ctid], r.ended)
    yield from (runs, fails, success, ended, took, verify, verify_t, rtest, rtest_t)


def _migration_metrics(records: list[dict]) -> Iterator[Metric]:
    total = CounterMetricFamily(PREFIX + "migrations", "Migrations run from this node",
                                labels=["mode", "result"])
    labels = ["ctid", "mode", "dest"]
    frozen = _g("migration_last_frozen_seconds",
                "How long the CT's latest migration kept it frozen", labels)
    took = _g("migration_last_total_seconds", "How long the CT's latest migration took",
              labels)
    ok = _g("migration_last_success", "1 if the CT's latest migration succeeded", labels)
    when = _g("migration_last_timestamp_seconds", "When the CT's latest migration ran", labels)
    counts: dict[tuple[str, str], int] = {}
    latest: dict[str, dict] = {}
    for rec in records:
        key = (str(rec.get("mode", "")), str(rec.get("result", "")))
        counts[key] = counts.get(key, 0) + 1
        latest[str(rec.get("ctid", ""))] = rec
    for key, n in sorted(counts.items()):
        total.add_metric(list(key), n)
    for ctid, rec in sorted(latest.items()):
        key = [ctid, str(rec.get("mode", "")), str(rec.get("dest", ""))]
        phases = rec.get("phases") or {}
        frozen.add_metric(key, float(phases.get("frozen", 0)))
        took.add_metric(key, float(phases.get("total", 0)))
        ok.add_metric(key, int(rec.get("result") == "ok"))
        t = F.record_time(rec)
        if t:
            when.add_metric(key, t.timestamp())
    yield from (total, frozen, took, ok, when)


def registry(node: Node, cache: RepoCache | None = None) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(NodeCollector(node, cache))
    return reg


def write_textfile(node: Node, directory: Path) -> Path:
    """node_exporter's textfile collector format, written atomically into *directory*."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / TEXTFILE_NAME
    write_to_textfile(str(path), registry(node))
    return path
