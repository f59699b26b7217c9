"""vzbackup dump: back containers up into a deduplicated repository (vzdump's job)."""

from __future__ import annotations

import sys

import click

from vzbackup import constants as C
from vzbackup.backup import defaults as D
from vzbackup.backup import job
from vzbackup.backup.modes import MODES
from vzbackup.cli.common import emit, json_option, node_of, require_root
from vzbackup.cli.repo_common import human
from vzbackup.ct import registry
from vzbackup.ct.container import Container
from vzbackup.errors import UsageError, VzError


@click.command()
@click.argument("ctids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every CT on this node.")
@click.option("--exclude", multiple=True, help="With --all: skip this CTID (repeatable).")
@click.option("--mode", type=click.Choice(MODES), help="Consistency mode (default: stop).")
@click.option("--storage", help="Named storage (storage.cfg); default 'local'.")
@click.option("--keyfile", "encryption_key", type=click.Path(dir_okay=False),
              help="Encrypt with this key file (vzdump.conf: encryption-key).")
@click.option("--zstd-level", type=click.IntRange(1, 19), help="zstd level per chunk.")
@click.option("--zstd", type=click.IntRange(0, 256),
              help="Worker threads for hashing/compression (0 = one per CPU).")
@click.option("--exclude-path", multiple=True, help="Pattern to leave out (repeatable).")
@click.option("--stdexcludes/--no-stdexcludes", default=None,
              help="vzdump's standard excludes (not in checkpoint mode).")
@click.option("--bwlimit", type=click.IntRange(0), help="Write limit in KiB/s.")
@click.option("--tmpdir", type=click.Path(file_okay=False), help="For suspend/checkpoint copies.")
@click.option("--lockwait", type=click.IntRange(0), help="Minutes to wait for locks.")
@click.option("--stopwait", type=click.IntRange(0), help="Minutes to wait for a clean stop.")
@click.option("--script", type=click.Path(dir_okay=False), help="Hook script (vzdump phases).")
@click.option("--notes-template", help="Snapshot notes ({{vmid}}, {{guestname}}, {{node}}).")
@click.option("--prune-backups", help="Prune after the backup, e.g. keep-last=3,keep-daily=7.")
@json_option
@click.pass_context
def dump(ctx: click.Context, ctids: tuple[str, ...], all_: bool, exclude: tuple[str, ...],
         as_json: bool, **cli_opts: object) -> None:
    """Back up CTIDs (or --all) as snapshots in the repository of a storage."""
    require_root()
    node = node_of(ctx)
    if all_ == bool(ctids):
        raise UsageError("give CTIDs or --all (not both)")
    if exclude and not all_:
        raise UsageError("--exclude only goes with --all")
    if all_:
        skip = {registry.resolve(node, x) for x in exclude}
        ids = [c for c in registry.list_ctids(node) if c not in skip]
    else:
        ids = [registry.resolve(node, x) for x in ctids]
    cts = [Container(node, c) for c in ids]
    for ct in cts:
        ct.conf  # noqa: B018 - a wrong CTID fails before any work
    opts = D.merge(
        D.load_defaults(node.vzbackup_confdir / C.VZDUMP_CONF),
        {k: v for k, v in cli_opts.items() if v not in (None, ())},
    )
    tty = sys.stderr.isatty() and not as_json
    echo = (lambda line: click.echo(line, err=True)) if (ctx.find_root().params.get("verbose")
                                                         or (not as_json and not tty)) else None

    def progress_factory(ct: Container):
        if not tty:
            return None
        state = {"bytes": 0}

        def progress(files: int, nbytes: int) -> None:
            state["bytes"] += nbytes
            click.echo(f"\r  CT {ct.ctid}: {files} files, {human(state['bytes'])} ",
                       nl=False, err=True)

        return progress

    results = job.run(cts, opts, echo=echo, progress_factory=progress_factory)
    if tty:
        click.echo("", err=True)
    for r in results:
        if as_json:
            continue
        if r.ok:
            s = r.stats
            click.echo(
                f"CT {r.ctid}: snapshot {r.snapshot}: {s['files']} files, "
                f"{human(s['bytes_total'])}; read {human(s['bytes_read'])}, new "
                f"{human(s['bytes_new'])} stored as {human(s['stored_new'])}, "
                f"{s['duration']:.2f} s"
            )
        else:
            click.echo(f"CT {r.ctid}: FAILED: {r.error}", err=True)
    emit(as_json, {"results": [r.to_dict() for r in results]})
    failed = [r for r in results if not r.ok]
    if failed:
        raise click.exceptions.Exit(failed[0].exit_code or VzError.exit_code)


COMMANDS = [dump]
