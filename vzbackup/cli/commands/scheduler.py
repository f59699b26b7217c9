"""vzbackup scheduler run / vzbackup jobs ...: scheduled backup, prune and verify jobs."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import click

from vzbackup import constants as C
from vzbackup.cli.common import emit, json_option, node_of, require_root
from vzbackup.config.node import Node
from vzbackup.errors import NotFoundError, UsageError

KINDS = ("vzdump", "prune", "verify", "restore-test")


def _jobs_path(node: Node, jobs: str | None) -> Path:
    return Path(jobs) if jobs else node.vzbackup_confdir / C.JOBS_CFG


@click.group(name="scheduler")
def scheduler_group() -> None:
    """The scheduler daemon (run it under systemd: conf/vzbackup-scheduler.service)."""


@scheduler_group.command(name="run")
@click.option("--jobs", "jobs_file", type=click.Path(dir_okay=False),
              help="Jobs file (default PREFIX/etc/vzbackup/jobs.cfg).")
@click.pass_context
def run(ctx: click.Context, jobs_file: str | None) -> None:
    """Run the scheduler in the foreground; logs go to stderr (the journal)."""
    from vzbackup.scheduler.daemon import Daemon, daemon_pid

    require_root()
    node = node_of(ctx)
    other = daemon_pid(node)
    if other and other != os.getpid():
        raise UsageError(f"a scheduler for {node.prefix} already runs (pid {other})")
    logging.getLogger("vzbackup").setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("vzbackup").addHandler(handler)
    logging.getLogger("vzbackup").propagate = False
    sys.exit(Daemon(node, _jobs_path(node, jobs_file)).serve())


@click.group(name="jobs")
def jobs_group() -> None:
    """Scheduled jobs: list, show, add, remove, enable, disable, run-now, next, history."""


def _load(ctx: click.Context, jobs_file: str | None):
    from vzbackup.scheduler.config import load_jobs

    node = node_of(ctx)
    path = _jobs_path(node, jobs_file)
    return node, path, *load_jobs(path, node)


def _reload(node: Node) -> str:
    from vzbackup.scheduler.daemon import daemon_pid

    pid = daemon_pid(node)
    if pid:
        os.kill(pid, signal.SIGHUP)
        return f" (scheduler pid {pid} reloaded)"
    return " (no scheduler running: takes effect when it starts)"


jobs_file_option = click.option("--jobs", "jobs_file", type=click.Path(dir_okay=False),
                                help="Jobs file (default PREFIX/etc/vzbackup/jobs.cfg).")


def _job_dict(j, next_runs: dict) -> dict:
    from vzbackup.scheduler.daemon import next_run

    return {"id": j.id, "kind": j.kind, "schedule": j.schedule_text, "enabled": j.enabled,
            "ctids": j.ctids, "all": j.all, "exclude": j.exclude, "storage": j.storage,
            "options": j.options, "prune": j.prune.to_string() if j.prune else None,
            "repeat_missed": j.repeat_missed, "jitter": j.jitter, "comment": j.comment,
            "next_run": next_run(next_runs.get(j.id)) if j.enabled else None}


def _history(node: Node):
    from vzbackup.scheduler.history import History

    return History(node.statedir / C.SCHEDULER_DB)


@jobs_group.command(name="list")
@jobs_file_option
@json_option
@click.pass_context
def list_jobs(ctx: click.Context, jobs_file: str | None, as_json: bool) -> None:
    """List the jobs with their next run."""
    node, _, _, jobs = _load(ctx, jobs_file)
    nxt = _history(node).next_runs()
    rows = [_job_dict(j, nxt) for j in jobs.values()]
    if as_json:
        emit(True, rows)
        return
    click.echo(f"{'ID':<16} {'KIND':<12} {'ON':<3} {'SCHEDULE':<18} {'NEXT RUN':<26} SELECTION")
    for r in rows:
        sel = "all" if r["all"] else ",".join(map(str, r["ctids"])) or "-"
        click.echo(f"{r['id']:<16} {r['kind']:<12} {'yes' if r['enabled'] else 'no':<3} "
                   f"{r['schedule']:<18} {r['next_run'] or '-':<26} {sel}")


@jobs_group.command(name="show")
@click.argument("job_id")
@jobs_file_option
@json_option
@click.pass_context
def show(ctx: click.Context, job_id: str, jobs_file: str | None, as_json: bool) -> None:
    """Show one job and its last runs."""
    node, _, _, jobs = _load(ctx, jobs_file)
    if job_id not in jobs:
        raise NotFoundError(f"no job {job_id!r}")
    h = _history(node)
    d = _job_dict(jobs[job_id], h.next_runs())
    d["runs"] = [r.to_dict() for r in h.runs(job_id, limit=10)]
    if as_json:
        emit(True, d)
        return
    for k, v in d.items():
        if k != "runs":
            click.echo(f"{k:<14} {v}")
    for r in d["runs"]:
        click.echo(f"  run {r['id']}: {r['started']} {r['status']} {r['error'] or ''}")


@jobs_group.command(name="add")
@click.argument("job_id")
@click.option("--kind", type=click.Choice(KINDS), default="vzdump", show_default=True)
@click.option("--schedule", required=True, help='"02:00", "mon..fri 22:30", or a cron line.')
@click.option("--all", "all_", is_flag=True, help="Every CT (vzdump).")
@click.option("--vmid", help="CTIDs, comma-separated.")
@click.option("--exclude", help="With --all: CTIDs to skip, comma-separated.")
@click.option("--storage")
@click.option("--mode", type=click.Choice(("stop", "suspend", "snapshot", "checkpoint")))
@click.option("--prune-backups", help="e.g. keep-daily=7,keep-weekly=4")
@click.option("--repeat-missed", is_flag=True, help="Make up a run missed while down.")
@click.option("--jitter", type=click.IntRange(0), help="Random delay up to N seconds.")
@click.option("--scratch-ctid", type=int, help="restore-test: CTID to restore into.")
@click.option("--disabled", is_flag=True)
@jobs_file_option
@click.pass_context
def add(ctx: click.Context, job_id: str, kind: str, schedule: str, all_: bool,
        vmid: str | None, exclude: str | None, storage: str | None, mode: str | None,
        prune_backups: str | None, repeat_missed: bool, jitter: int | None,
        scratch_ctid: int | None, disabled: bool, jobs_file: str | None) -> None:
    """Add a job, e.g.: vzbackup jobs add nightly --all --schedule 02:00"""
    from vzbackup.scheduler.config import add_job

    require_root()
    node = node_of(ctx)
    settings = {"schedule": schedule}
    for key, value in (("vmid", vmid), ("exclude", exclude), ("storage", storage),
                       ("mode", mode), ("prune-backups", prune_backups),
                       ("scratch-ctid", scratch_ctid), ("jitter", jitter)):
        if value is not None:
            settings[key] = str(value)
    if all_:
        settings["all"] = "1"
    if repeat_missed:
        settings["repeat-missed"] = "1"
    if disabled:
        settings["enabled"] = "0"
    path = _jobs_path(node, jobs_file)
    add_job(path, kind, job_id, settings, node)
    click.echo(f"job {job_id} added to {path}{_reload(node)}")


@jobs_group.command(name="remove")
@click.argument("job_id")
@jobs_file_option
@click.pass_context
def remove(ctx: click.Context, job_id: str, jobs_file: str | None) -> None:
    """Remove a job."""
    from vzbackup.scheduler.config import remove_job

    require_root()
    node = node_of(ctx)
    remove_job(_jobs_path(node, jobs_file), job_id)
    click.echo(f"job {job_id} removed{_reload(node)}")


def _toggle(on: bool):
    @click.command(name="enable" if on else "disable")
    @click.argument("job_id")
    @jobs_file_option
    @click.pass_context
    def toggle(ctx: click.Context, job_id: str, jobs_file: str | None) -> None:
        from vzbackup.scheduler.config import set_enabled

        require_root()
        node = node_of(ctx)
        set_enabled(_jobs_path(node, jobs_file), job_id, on)
        click.echo(f"job {job_id} {'enabled' if on else 'disabled'}{_reload(node)}")

    toggle.help = f"{'Enable' if on else 'Disable'} a job."
    return toggle


jobs_group.add_command(_toggle(True))
jobs_group.add_command(_toggle(False))


@jobs_group.command(name="run-now")
@click.argument("job_id")
@click.option("--wait/--no-wait", default=True, help="Wait for the run and report it.")
@jobs_file_option
@json_option
@click.pass_context
def run_now(ctx: click.Context, job_id: str, wait: bool, jobs_file: str | None,
            as_json: bool) -> None:
    """Run a job now: through the daemon if one runs, else in the foreground."""
    from vzbackup.scheduler.daemon import Daemon, daemon_pid

    require_root()
    node, path, _, jobs = _load(ctx, jobs_file)
    if job_id not in jobs:
        raise NotFoundError(f"no job {job_id!r} in {path}")
    h = _history(node)
    if daemon_pid(node):
        before = {r.id for r in h.runs(job_id)}
        h.request(job_id)
        if not wait:
            click.echo(f"job {job_id} queued")
            return
        while True:
            new = [r for r in h.runs(job_id) if r.id not in before and r.status != "running"]
            if new:
                run_ = new[0]
                break
            time.sleep(0.5)
    else:
        d = Daemon(node, path)
        d.run_job(job_id, "run-now")
        run_ = h.runs(job_id, limit=1)[0]
    emit(as_json, run_.to_dict(),
         f"job {job_id}: {run_.status}" + (f": {run_.error}" if run_.error else ""))
    if run_.status != "ok":
        raise click.exceptions.Exit(10)


@jobs_group.command(name="next")
@jobs_file_option
@json_option
@click.pass_context
def next_(ctx: click.Context, jobs_file: str | None, as_json: bool) -> None:
    """When each enabled job runs next."""
    from vzbackup.scheduler.daemon import next_run

    node, _, _, jobs = _load(ctx, jobs_file)
    nxt = _history(node).next_runs()
    rows = {j.id: next_run(nxt.get(j.id)) for j in jobs.values() if j.enabled}
    emit(as_json, rows, "\n".join(f"{k:<16} {v}" for k, v in sorted(rows.items(),
                                                                     key=lambda kv: kv[1])))


@jobs_group.command(name="history")
@click.argument("job_id", required=False)
@click.option("-n", "--limit", type=click.IntRange(1), default=20)
@json_option
@click.pass_context
def history(ctx: click.Context, job_id: str | None, limit: int, as_json: bool) -> None:
    """Past runs (newest first)."""
    node = node_of(ctx)
    runs = [r.to_dict() for r in _history(node).runs(job_id, limit)]
    if as_json:
        emit(True, runs)
        return
    for r in runs:
        click.echo(f"{r['id']:>5} {r['job']:<16} {r['started']} {r['status']:<8} "
                   f"{r['duration'] or '-':>8}s {', '.join(r['snapshots'])} {r['error'] or ''}")


COMMANDS = [scheduler_group, jobs_group]
