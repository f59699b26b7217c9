"""vzbackup verify: re-read and re-hash every chunk of snapshots."""

from __future__ import annotations

import click

from vzbackup.cli.common import emit, json_option
from vzbackup.cli.repo_common import human, open_repo, repo_options
from vzbackup.engine.verify import verify as run_verify
from vzbackup.errors import DamagedError


@click.command()
@click.argument("snapshots", nargs=-1)
@repo_options
@json_option
@click.pass_context
def verify(ctx: click.Context, snapshots: tuple[str, ...], storage: str | None,
           keyfile: str | None, as_json: bool) -> None:
    """Verify SNAPSHOTs (default: all); exit 12 naming damaged files if any."""
    repo = open_repo(ctx, storage, keyfile)
    manifests = [repo.resolve(s) for s in snapshots] if snapshots else repo.manifests()
    rep = run_verify(repo, manifests)
    if as_json:
        emit(True, rep.to_dict())
    else:
        for d in rep.damaged:
            click.echo(f"DAMAGED chunk {d.chunk[:16]}: {d.error}", err=True)
            for w in d.where:
                click.echo(f"  needed by {w}", err=True)
        click.echo(f"verified {len(rep.snapshots)} snapshots, {rep.chunks} chunks, "
                   f"{human(rep.bytes)}: {'OK' if rep.ok else f'{len(rep.damaged)} damaged'}")
    if not rep.ok:
        raise click.exceptions.Exit(DamagedError.exit_code)


COMMANDS = [verify]
