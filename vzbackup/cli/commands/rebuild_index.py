"""vzbackup rebuild-index: the index, read again from the packs' headers."""

from __future__ import annotations

import click

from vzbackup.cli.common import emit, json_option
from vzbackup.cli.repo_common import open_repo, repo_options
from vzbackup.engine import maintenance
from vzbackup.errors import DamagedError


@click.command(name="rebuild-index")
@click.option("--dry-run", is_flag=True, help="Only read the packs and report.")
@click.option("--lockwait", type=click.FloatRange(0), default=1.0, help="Minutes to wait.")
@repo_options
@json_option
@click.pass_context
def rebuild_index(ctx: click.Context, dry_run: bool, lockwait: float, storage: str | None,
                  keyfile: str | None, as_json: bool) -> None:
    """Rebuild the repository's index from the headers of its packs (after the index was
    lost, deleted or damaged; safe while backups run). Exit 12 if a pack is unreadable."""
    repo = open_repo(ctx, storage, keyfile)
    log = (lambda m: None) if as_json else (lambda m: click.echo(m, err=True))
    rep = maintenance.rebuild_index(repo, dry_run=dry_run, lockwait=lockwait * 60, log=log)
    emit(as_json, rep.to_dict(),
         f"{'would index' if dry_run else 'indexed'} {rep.chunks} chunks of {rep.packs} packs"
         + ("" if dry_run else f" ({rep.index_files_written} index files written, "
            f"{rep.index_files_replaced} replaced)"))
    if rep.unreadable:
        raise DamagedError(f"{len(rep.unreadable)} packs have no readable header: "
                           + ", ".join(sorted(rep.unreadable)),
                           hint="their chunks are lost; 'vzbackup verify' names the snapshots "
                                "that need them")


COMMANDS = [rebuild_index]
