"""vzbackup upgrade-repo: the repository made the current format version."""

from __future__ import annotations

import click

from vzbackup.cli.common import emit, json_option
from vzbackup.cli.repo_common import open_repo, repo_options
from vzbackup.engine import maintenance
from vzbackup.engine.repo import VERSION


@click.command(name="upgrade-repo")
@click.option("--lockwait", type=click.FloatRange(0), default=1.0, help="Minutes to wait.")
@repo_options
@json_option
@click.pass_context
def upgrade_repo(ctx: click.Context, lockwait: float, storage: str | None, keyfile: str | None,
                 as_json: bool) -> None:
    """Make the repository format version 4: new snapshots store their lists of chunk ids
    as chunks (an unchanged backup then adds about 2 KB). Stored snapshots stay as they
    are; vzbackup releases that know only version 3 or older refuse the repository after."""
    repo = open_repo(ctx, storage, keyfile)
    old = maintenance.upgrade_format(repo, lockwait=lockwait * 60)
    emit(as_json, {"url": repo.backend.url, "from": old, "to": max(old, VERSION)},
         f"{repo.backend.url}: format version {old} -> {VERSION}" if old < VERSION
         else f"{repo.backend.url}: already format version {old}")


COMMANDS = [upgrade_repo]
