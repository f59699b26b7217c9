"""vzbackup prune / gc / protect / unlock: retention and repository housekeeping."""

from __future__ import annotations

import click

from vzbackup.cli.common import emit, json_option, node_of
from vzbackup.cli.repo_common import human, open_repo, repo_options
from vzbackup.ct import registry
from vzbackup.engine import gc as G
from vzbackup.engine import locks as L
from vzbackup.engine import maintenance
from vzbackup.engine.keeppolicy import KeepPolicy
from vzbackup.errors import UsageError

KEEPS = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


def _keep_options(f):
    for k in reversed(KEEPS):
        f = click.option(f"--keep-{k}", type=click.IntRange(0), default=0,
                         help=f"Keep the newest backup of the last N {k} periods."
                         if k != "last" else "Keep the N newest backups.")(f)
    return f


@click.command()
@click.argument("ctids", nargs=-1)
@_keep_options
@click.option("--prune-backups", help="Proxmox form, e.g. keep-last=3,keep-daily=7.")
@click.option("--exclude", multiple=True,
              help="Without CTIDS: leave this CT's snapshots alone (repeatable).")
@click.option("--dry-run", is_flag=True, help="Only show what would be removed.")
@click.option("--lockwait", type=click.FloatRange(0), default=1.0, help="Minutes to wait.")
@repo_options
@json_option
@click.pass_context
def prune(ctx: click.Context, ctids: tuple[str, ...], prune_backups: str | None,
          exclude: tuple[str, ...], dry_run: bool, lockwait: float, storage: str | None,
          keyfile: str | None, as_json: bool, **keeps: int) -> None:
    """Remove snapshots the retention rules don't keep (per CT, every CT if no CTIDS are
    given; protected ones stay)."""
    if ctids and exclude:
        raise UsageError("--exclude is for pruning every CT (no CTIDS given)")
    if prune_backups:
        if any(keeps.values()):
            raise UsageError("give --prune-backups or --keep-* options, not both")
        policy = KeepPolicy.parse(prune_backups)
    else:
        policy = KeepPolicy(**{k.removeprefix("keep_"): v for k, v in keeps.items()})
    if policy.keep_all:
        raise UsageError("no --keep-* rule given: nothing would be pruned")
    repo = open_repo(ctx, storage, keyfile)
    node = node_of(ctx)
    ids = [registry.resolve(node, c) for c in ctids]
    res = maintenance.prune(repo, policy, ctids=ids or None,
                            exclude={registry.resolve(node, c) for c in exclude},
                            dry_run=dry_run, lockwait=lockwait * 60)
    rows = [
        {"ctid": ctid, "snapshot": d.item.id, "keep": d.keep, "reasons": d.reasons,
         "protected": d.item.protected}
        for ctid, decisions in res.items() for d in decisions
    ]
    if as_json:
        emit(True, {"dry_run": dry_run, "policy": policy.to_string(), "snapshots": rows})
        return
    for r in rows:
        verdict = "keep  " if r["keep"] else ("would remove" if dry_run else "remove")
        click.echo(f"{verdict:<12} {r['snapshot']:<28} {', '.join(r['reasons'])}")
    gone = sum(not r["keep"] for r in rows)
    click.echo(f"{gone} of {len(rows)} snapshots {'would be ' if dry_run else ''}removed"
               + ("" if dry_run or not gone else "; run 'vzbackup gc' to free their space"))


@click.command()
@click.option("--dry-run", is_flag=True)
@click.option("--grace", type=click.FloatRange(0), default=G.DEFAULT_GRACE, show_default=True,
              help="Seconds: packs and uploads younger than this stay.")
@click.option("--lockwait", type=click.FloatRange(0), default=1.0, help="Minutes to wait.")
@repo_options
@json_option
@click.pass_context
def gc(ctx: click.Context, dry_run: bool, grace: float, lockwait: float, storage: str | None,
       keyfile: str | None, as_json: bool) -> None:
    """Drop or repack packs by how much of them snapshots still reference, and remove
    what killed backups left behind (safe while backups run)."""
    repo = open_repo(ctx, storage, keyfile)
    rep = maintenance.collect_garbage(repo, grace=grace, dry_run=dry_run, lockwait=lockwait * 60)
    emit(
        as_json,
        rep.to_dict(),
        f"{'would free' if dry_run else 'freed'} {human(rep.bytes_deleted)} "
        f"({rep.chunks_deleted} unreferenced chunks): {rep.packs_deleted} of "
        f"{rep.packs_total} packs deleted, {rep.packs_repacked} repacked, "
        f"{rep.packs_kept_young} recent ones kept; {len(rep.incomplete_removed)} incomplete "
        f"uploads and {len(rep.trash_deleted)} pruned snapshots dropped",
    )


@click.command()
@click.argument("snapshot")
@click.option("--off", is_flag=True, help="Remove the protection.")
@repo_options
@click.pass_context
def protect(ctx: click.Context, snapshot: str, off: bool, storage: str | None,
            keyfile: str | None) -> None:
    """Protect SNAPSHOT from prune (or --off)."""
    repo = open_repo(ctx, storage, keyfile)
    m = repo.resolve(snapshot)
    repo.set_protected(m.id, not off)
    click.echo(f"snapshot {m.id} {'un' if off else ''}protected")


@click.command(name="break-lock")
@repo_options
@json_option
@click.pass_context
def break_lock(ctx: click.Context, storage: str | None, keyfile: str | None, as_json: bool) -> None:
    """Remove repository locks left by crashed processes (live holders are kept)."""
    repo = open_repo(ctx, storage, keyfile)
    gone = L.break_stale(repo)
    emit(as_json, [g._asdict() for g in gone],
         "\n".join(f"removed stale {g.describe()}" for g in gone) or "no stale locks")


COMMANDS = [prune, gc, protect, break_lock]
