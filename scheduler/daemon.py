"""``vzbackup scheduler run``: the foreground daemon that runs backup, prune and verify jobs.

APScheduler (3.x) with its SQLAlchemy job store in ``STATEDIR/scheduler.db`` keeps next run
times across restarts; a missed run is made up once at start when the job has
``repeat-missed 1`` (misfire grace unlimited, coalesced), and skipped otherwise. At most
``max-workers`` jobs run at once; two jobs never back up the same CT at once (the per-CT
backup lock, waited for up to the job's lockwait). SIGHUP reloads jobs.cfg (a bad file is
reported and the running schedule kept); SIGTERM stops scheduling, waits up to
``shutdown-timeout`` for running jobs, then aborts them (their commands get SIGTERM).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import socket
import threading
import time
from datetime import datetime
from pathlib import Path

from apscheduler.events import EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from vzbackup.scheduler.config import JobDef, load_jobs
from vzbackup.scheduler.history import History
from vzbackup.scheduler.notify import Notifier, NotifySettings
from vzbackup.scheduler.runner import Outcome, Runner

from vzbackup import constants as C
from vzbackup.config.node import Node
from vzbackup.errors import ConfigError
from vzbackup.syscalls import pid_alive

log = logging.getLogger("vzbackup.scheduler")
POLL = 0.5  # seconds between looks for run-now requests
MISSED_GRACE = 1  # seconds: a run later than this after its time is "missed"

_DAEMON: Daemon | None = None  # APScheduler pickles job references: functions, not methods


def fire(job_id: str, trigger: str = "schedule", schedule: str = "") -> None:
    """What APScheduler calls; runs the job through the live daemon (*schedule* is stored
    with the job only to notice when jobs.cfg changes it)."""
    if _DAEMON is not None:
        _DAEMON.run_job(job_id, trigger)


class Daemon:
    def __init__(self, node: Node, jobs_path: Path | None = None) -> None:
        self.node = node
        self.jobs_path = jobs_path or node.vzbackup_confdir / C.JOBS_CFG
        self.options, self.jobs = load_jobs(self.jobs_path, node)  # refuses a bad file
        self.history = History(node.statedir / C.SCHEDULER_DB)
        self.runner = Runner(node, log.info)
        self.stopping = threading.Event()
        self.reload_requested = threading.Event()
        self.running: set[str] = set()
        self._lock = threading.Lock()
        self.scheduler = BackgroundScheduler(
            jobstores={"default": SQLAlchemyJobStore(url=self.history.url),
                       "volatile": MemoryJobStore()},
            executors={"default": ThreadPoolExecutor(self.options.max_workers)},
            job_defaults={"coalesce": True, "max_instances": 1},
        )
        self.scheduler.add_listener(self._missed, EVENT_JOB_MISSED)
        self.endpoint = None  # the HTTP endpoint (metrics, report) while serving

    # --- schedule -----------------------------------------------------------------------------
    def _sync(self, jobs: dict[str, JobDef]) -> None:
        """Make the scheduled jobs match *jobs*, keeping stored next-run times if unchanged."""
        wanted = {j.id: j for j in jobs.values() if j.enabled}
        for aps in self.scheduler.get_jobs(jobstore="default"):
            j = wanted.get(aps.id)
            if j is None:
                aps.remove()
                log.info("job %s: removed from the schedule", aps.id)
        for j in wanted.values():
            grace = None if j.repeat_missed else MISSED_GRACE
            aps = self.scheduler.get_job(j.id, jobstore="default")
            if aps is not None and aps.kwargs.get("schedule") == j.schedule_text and \
                    aps.misfire_grace_time == grace and aps.trigger.jitter == (j.jitter or None):
                continue  # unchanged: keep its stored next run time (missed runs stay visible)
            self.scheduler.add_job(
                fire, _trigger(j), args=[j.id], kwargs={"schedule": j.schedule_text}, id=j.id,
                name=j.id, jobstore="default", replace_existing=True, misfire_grace_time=grace,
            )
            stored = self.scheduler.get_job(j.id, jobstore="default")
            log.info("job %s: scheduled '%s', next run %s", j.id, j.schedule_text,
                     stored.next_run_time)

    def _missed(self, event: JobExecutionEvent) -> None:
        log.warning("job %s: missed the run due at %s (repeat-missed is off)", event.job_id,
                    event.scheduled_run_time)

    def reload(self) -> bool:
        try:
            options, jobs = load_jobs(self.jobs_path, self.node)
        except ConfigError as e:
            log.error("reload refused, keeping the running schedule: %s", e)
            return False
        if options.max_workers != self.options.max_workers:
            log.warning("max-workers changes take effect at the next start")
        if options.metrics_listen != self.options.metrics_listen:
            log.warning("metrics-listen changes take effect at the next start")
        self.options.notify, self.options.mailto = options.notify, options.mailto
        self.options.webhook, self.options.smtp_server = options.webhook, options.smtp_server
        self.options.mail_from, self.options.shutdown_timeout = (options.mail_from,
                                                                  options.shutdown_timeout)
        self.jobs = jobs
        self._sync(jobs)
        log.info("reloaded %s: %d jobs", self.jobs_path, len(jobs))
        return True

    # --- running ------------------------------------------------------------------------------
    def run_job(self, job_id: str, trigger: str) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            log.error("job %s: not in %s any more", job_id, self.jobs_path)
            return
        if self.stopping.is_set():
            return
        with self._lock:
            self.running.add(job_id)
        run_id = self.history.start(job.id, job.kind, trigger)
        log.info("job %s (%s): started (%s)", job.id, job.kind, trigger)
        t0 = time.monotonic()
        try:
            out = self.runner.run(job)
        except Exception as e:
            out = Outcome()
            out.fail(f"internal error: {e}")
        finally:
            with self._lock:
                self.running.discard(job_id)
        run = self.history.finish(run_id, out.status, bytes_=out.bytes, snapshots=out.snapshots,
                                  error=out.error, details=out.details)
        if self.endpoint is not None:
            self.endpoint.cache.clear()  # the repository changed: list it again
        log.info("job %s: %s in %.1f s%s", job.id, out.status, time.monotonic() - t0,
                 f": {out.error}" if out.error else "")
        event = {**run.to_dict(), "host": socket.gethostname()}
        try:
            failed = self._notifier().notify(event)
        except ConfigError as e:
            log.error("job %s: notification settings: %s", job.id, e)
            return
        for channel in failed:
            log.warning("job %s: notification by %s failed", job.id, channel)

    def _notifier(self) -> Notifier:
        o = self.options
        extra = {"mail_from": o.mail_from} if o.mail_from else {}
        return Notifier(
            NotifySettings(policy=o.notify, mailto=list(o.mailto), smtp_server=o.smtp_server,
                           webhook=o.webhook, **extra),
            log=log.warning,
        )

    def _take_requests(self) -> None:
        for req_id, job_id in self.history.take_requests():
            if job_id not in self.jobs:
                log.error("run-now request %d: no job %s", req_id, job_id)
                continue
            self.scheduler.add_job(fire, "date", args=[job_id, "run-now"],
                                   id=f"run-now-{req_id}", jobstore="volatile",
                                   misfire_grace_time=None)

    # --- life cycle ---------------------------------------------------------------------------
    def serve(self) -> int:
        global _DAEMON
        _DAEMON = self
        pidfile = self.node.rundir / C.SCHEDULER_PID
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(f"{os.getpid()}\n")
        aborted = self.history.abandon_running()
        if aborted:
            log.warning("%d runs of a previous daemon were left running: marked aborted", aborted)
        signal.signal(signal.SIGHUP, lambda *_: self.reload_requested.set())
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        self.scheduler.start(paused=True)
        self._sync(self.jobs)
        self.scheduler.resume()
        self._serve_http()
        _sd_notify("READY=1")
        log.info("scheduler running: %d jobs from %s, %d worker(s), state in %s",
                 len(self.jobs), self.jobs_path, self.options.max_workers, self.history.url)
        try:
            while not self.stopping.wait(POLL):
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    self.reload()
                self._take_requests()
        finally:
            self._shutdown()
            pidfile.unlink(missing_ok=True)
            _DAEMON = None
        return 0

    def _serve_http(self) -> None:
        """Metrics and the report over HTTP; a busy address is logged, not fatal."""
        address = self.options.metrics_address
        if address is None:
            return
        from vzbackup.observe.server import Endpoint

        try:
            self.endpoint = Endpoint(self.node, *address, log=log.error)
        except OSError as e:
            log.error("metrics and report not served: %s:%d: %s", *address, e.strerror)
            return
        self.endpoint.start()
        log.info("metrics on %smetrics, report on %s", self.endpoint.url, self.endpoint.url)

    def _shutdown(self) -> None:
        _sd_notify("STOPPING=1")
        if self.endpoint is not None:
            self.endpoint.close()
        self.scheduler.pause()
        deadline = time.monotonic() + self.options.shutdown_timeout
        while self.running and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.running:
            log.warning("shutdown timeout: aborting %s", ", ".join(sorted(self.running)))
            self.runner.abort()
        self.scheduler.shutdown(wait=True)
        log.info("scheduler stopped")


def _trigger(job: JobDef) -> BaseTrigger:
    """The job's trigger with its jitter (add_job's jitter= reaches only the triggers
    APScheduler builds from a name, not a trigger object)."""
    trigger = copy.copy(job.trigger)
    trigger.jitter = job.jitter or None
    return trigger


def _sd_notify(state: str) -> None:
    """systemd Type=notify readiness, if started by systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
        s.sendto(state.encode(), addr)


def daemon_pid(node: Node) -> int | None:
    """PID of a running scheduler of this node, or None."""
    try:
        pid = int((node.rundir / C.SCHEDULER_PID).read_text())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def next_run(value: float | None) -> str:
    if not value:
        return "-"
    return datetime.fromtimestamp(value).astimezone().isoformat(timespec="seconds")
