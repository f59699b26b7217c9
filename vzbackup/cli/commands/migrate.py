"""vzbackup migrate / migrate-agent / migrate-cleanup: move a CT to another node over SSH."""

from __future__ import annotations

import contextlib
import json
import logging
import sys

import click

from vzbackup import errors as E
from vzbackup.cli.common import container, emit, json_option, node_of, require_root
from vzbackup.ct import registry
from vzbackup.ct.container import Container
from vzbackup.syscalls import pid_alive

PHASE_ORDER = (
    "preflight", "first_sync", "stage", "stop", "dump", "final_sync", "image_transfer",
    "restore", "start", "commit", "lazy_pages", "cleanup",
)
PLAIN_WARNING = ("WARNING: --plain-tcp: the CT's memory crosses the network unencrypted and "
                 "unauthenticated; use it only on a trusted, private link")


def check_live_only(online: bool, lazy: bool | None, plain_tcp: bool) -> None:
    """Refuse the memory options without --online (no memory moves: they would be ignored)."""
    if not online and (lazy is not None or plain_tcp):
        raise E.UsageError("--lazy/--no-lazy and --plain-tcp choose how --online moves "
                           "memory; without --online none moves",
                           hint="add --online, or leave them out")


def _yes_no(_ctx: click.Context, _p: click.Parameter, value: str) -> bool:
    return value == "yes"


def _scope(report: dict, phase: str) -> str:
    """What the final sync visited: the directories changed since the first (migrate.changes)."""
    if phase != "final_sync":
        return ""
    n = report.get("final_sync_dirs")
    return "  (whole tree)" if n is None else f"  ({n} changed directories)"


def _print_times(report: dict) -> None:
    click.echo(f"Timings for CT {report['ctid']} -> {report['dest']} ({report['mode']}):")
    times = report["times"]
    for name in [*PHASE_ORDER, *sorted(set(times) - set(PHASE_ORDER))]:
        if name in times:
            click.echo(f"  {name:<15} {times[name]:8.3f} s" + _scope(report, name))
    if report["mode"] not in ("stopped", "dry-run"):
        label = "downtime" if report["mode"] == "restart" else "frozen"
        click.echo(f"  {label:<15} {report['frozen']:8.3f} s")
        for name, secs in report.get("frozen_steps", {}).items():
            click.echo(f"    {name:<17} {secs:8.3f} s")
        for name, secs in report.get("dest_steps", {}).items():
            click.echo(f"    DEST {name:<12} {secs:8.3f} s")
    click.echo(f"  {'total':<15} {report['total']:8.3f} s")


class _MigrateGroup(click.Group):
    """``migrate CTID DEST [OPTIONS]`` moves a CT; ``migrate history`` (a subcommand) and
    any future one are recognized by their first word, everything else moves a CT."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or args[0] not in self.commands:
            args = [MOVE, *args]
        return super().parse_args(ctx, args)

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.commands[MOVE].format_help(ctx, formatter)
        formatter.write_paragraph()
        formatter.write_text("Also: 'vzbackup migrate history [--json]' lists past migrations.")


MOVE = "move"


class _MoveCommand(click.Command):
    """The default subcommand, shown as plain ``migrate`` in usage lines."""

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        path = ctx.parent.command_path if ctx.parent else ctx.command_path
        formatter.write_usage(path, " ".join(self.collect_usage_pieces(ctx)))


@click.group(cls=_MigrateGroup, name="migrate", invoke_without_command=False)
def migrate_group() -> None:
    """Move a CT to another node over SSH (see 'migrate CTID DEST --help')."""


@migrate_group.command(name=MOVE, cls=_MoveCommand, hidden=True)
@click.argument("ctid")
@click.argument("dest")
@click.option("--online", is_flag=True, help="Live migration: checkpoint, move, restore (CRIU).")
@click.option("--lazy/--no-lazy", default=None,
              help="Post-copy memory (default: when DEST supports userfaultfd).")
@click.option("--keep-dst", is_flag=True, help="On failure keep the synced private area at DEST.")
@click.option("--remove-area", type=click.Choice(["yes", "no"]), default="yes",
              callback=_yes_no, show_default=True,
              help="Remove the private area here after success (no: keep it, config renamed "
                   "to CTID.conf.migrated).")
@click.option("--new-id", type=int, help="CTID at DEST (stopped and restart migrations).")
@click.option("--bwlimit", type=click.IntRange(min=1), help="Private-area bandwidth, KB/s.")
@click.option("--sync", "sync_method", type=click.Choice(["auto", "rsync", "stream"]),
              default="auto", show_default=True, help="Private-area transfer.")
@click.option("--plain-tcp", is_flag=True,
              help="Send memory pages over plain TCP, unencrypted (trusted links only; "
                   "default: CRIU's TLS with one-time certificates).")
@click.option("--ssh-port", type=click.IntRange(1, 65535), help="SSH port (default: 22).")
@click.option("--ssh-key", help="Private key file for SSH.")
@click.option("--ssh-opt", multiple=True, metavar="KEY=VALUE",
              help="SSH option (UserKnownHostsFile, ConnectTimeout, ServerAliveInterval, "
                   "StrictHostKeyChecking=accept-new).")
@click.option("--accept-new-hostkey", is_flag=True,
              help="Trust and record an unknown host key (a changed key is always refused).")
@click.option("--dry-run", is_flag=True, help="Run the preflight checks only.")
@click.option("-t", "--times", "show_times", is_flag=True, help="Print phase timings.")
@json_option
@click.pass_context
def migrate(ctx: click.Context, ctid: str, dest: str, online: bool, lazy: bool | None,
            keep_dst: bool, remove_area: bool, new_id: int | None, bwlimit: int | None,
            sync_method: str, plain_tcp: bool, ssh_port: int | None, ssh_key: str | None,
            ssh_opt: tuple[str, ...],
            accept_new_hostkey: bool, dry_run: bool, show_times: bool, as_json: bool) -> None:
    """Move CTID to the node DEST ([user@]host) over SSH.

    A stopped CT is copied and registered there. A running CT is restarted there, or with
    --online moved while running (frozen only for the final step). Until DEST confirms, any
    failure leaves the CT running here.
    """
    from vzbackup.migrate.phases import MigrateOptions, Migration
    from vzbackup.migrate.ssh import Session, SSHTarget
    from vzbackup.migrate.sync import push_tree

    check_live_only(online, lazy, plain_tcp)
    ct = container(ctx, ctid)
    if new_id is not None:
        registry.parse_ctid(new_id)
    if not as_json:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("migrate: %(message)s"))
        mlog = logging.getLogger("vzbackup.migrate")
        mlog.addHandler(handler)
        mlog.setLevel(logging.INFO)
        mlog.propagate = False
    target = SSHTarget.parse(dest, port=ssh_port, key=ssh_key, opts=list(ssh_opt))
    if accept_new_hostkey:
        target.accept_new = True
    opts = MigrateOptions(
        online=online, lazy=lazy, keep_dst=keep_dst, remove_area=remove_area, new_id=new_id,
        bwlimit_kbps=bwlimit, dry_run=dry_run, sync_method=sync_method, plain_pages=plain_tcp,
    )
    if plain_tcp and online:
        click.echo(PLAIN_WARNING, err=True)
    with Session(target) as session:
        session.connect()
        mig = Migration(ct, session, opts, push_tree=push_tree)
        try:
            report = mig.run()
        except E.VzError:
            if as_json:
                click.echo(json.dumps(mig.report.as_dict(), indent=2, sort_keys=True))
            raise
    data = report.as_dict()
    if as_json:
        emit(True, data)
        return
    if show_times:
        _print_times(data)
    if dry_run:
        click.echo(f"preflight OK: CT {ct.ctid} can migrate to {dest}")
    else:
        click.echo(f"CT {ct.ctid} migrated to {dest} ({data['mode']}, "
                   f"frozen {data['frozen']:.3f}s, total {data['total']:.2f}s)")


@click.command(name="migrate-agent", hidden=True)
@click.argument("ctid")
@click.option("--source", default="", help="Name of the source node (for logs).")
@click.pass_context
def migrate_agent(ctx: click.Context, ctid: str, source: str) -> None:
    """DEST side of 'vzbackup migrate' (JSON lines on stdin/stdout)."""
    from vzbackup.migrate.agent import run_agent

    require_root()
    node = node_of(ctx)
    sys.exit(run_agent(node, registry.parse_ctid(ctid), source))


@click.command(name="migrate-cleanup")
@click.argument("ctid")
@json_option
@click.pass_context
def migrate_cleanup(ctx: click.Context, ctid: str, as_json: bool) -> None:
    """Finish or undo a crashed migration of CTID on this node, from its journal.

    On DEST an uncommitted copy is removed; on the source of a committed migration the
    source copy is retired (as after a successful migration).
    """
    from vzbackup.migrate.agent import undo_created
    from vzbackup.migrate.journal import Journal
    from vzbackup.migrate.phases import finish_source

    ct: Container = container(ctx, ctid, must_exist=False)
    journal = Journal.load(ct.node, ct.ctid)
    if journal is None:
        emit(as_json, {"ctid": ct.ctid, "action": "none"}, f"CT {ct.ctid}: no migration journal")
        return
    if journal.pid and pid_alive(journal.pid):
        raise E.LockedError(f"CT {ct.ctid}: migration process {journal.pid} is still running")
    with ct.lock():
        if journal.role == "dest":
            action = "kept" if journal.state == "committed" else "removed DEST copy"
            if journal.state != "committed":
                undo_created(ct.node, journal)
            else:
                journal.remove(ct.node)
        elif journal.state == "committed":
            finish_source(ct, remove_area=journal.remove_area)
            journal.remove(ct.node)
            action = "retired source copy"
        else:
            with contextlib.suppress(OSError):
                journal.remove(ct.node)
            action = "nothing to undo here"
    emit(as_json, {"ctid": ct.ctid, "role": journal.role, "action": action},
         f"CT {ct.ctid}: {action} ({journal.role}, state {journal.state})")


@migrate_group.command(name="history")
@json_option
@click.pass_context
def migrate_history(ctx: click.Context, as_json: bool) -> None:
    """Migrations run from this node, oldest first (STATEDIR/migrations.jsonl)."""
    from vzbackup.migrate.history import records

    recs = list(records(node_of(ctx)))
    if as_json:
        emit(True, recs)
        return
    if not recs:
        click.echo("no migrations recorded on this node")
        return
    click.echo(f"{'time':<21} {'CT':>6} {'new':>6} {'mode':<12} {'result':<7} "
               f"{'frozen':>8} {'total':>8}  dest")
    for r in recs:
        ph = r.get("phases", {})
        click.echo(f"{r.get('time', ''):<21} {r.get('ctid', ''):>6} {r.get('new_ctid', ''):>6} "
                   f"{r.get('mode', ''):<12} {r.get('result', ''):<7} "
                   f"{ph.get('frozen', 0):8.3f} {ph.get('total', 0):8.2f}  {r.get('dest', '')}"
                   + (f"  ({r['error']})" if r.get("error") else ""))


COMMANDS = [migrate_group, migrate_agent, migrate_cleanup]
