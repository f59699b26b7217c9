"""vzbackup verify: re-read and re-hash every chunk of snapshots."""

from __future__ import annotations

import click

from vzbackup.cli.common import emit, json_option, node_of
from vzbackup.cli.repo_common import human, open_repo, repo_options
from vzbackup.ct import registry
from vzbackup.engine.repo import Manifest, Repository
from vzbackup.engine.verify import verify as run_verify
from vzbackup.errors import DamagedError, UsageError


@click.command()
@click.argument("snapshots", nargs=-1)
@click.option("--ct", "cts", multiple=True, help="Every snapshot of this CT (repeatable).")
@click.option("--exclude", multiple=True,
              help="Without SNAPSHOTS or --ct: every snapshot but this CT's (repeatable).")
@repo_options
@json_option
@click.pass_context
def verify(ctx: click.Context, snapshots: tuple[str, ...], cts: tuple[str, ...],
           exclude: tuple[str, ...], storage: str | None, keyfile: str | None,
           as_json: bool) -> None:
    """Verify SNAPSHOTs (a CTID alone: its newest), the snapshots of CTs (--ct), or all;
    exit 12 naming damaged files if any."""
    if exclude and (snapshots or cts):
        raise UsageError("--exclude is for verifying every CT (no SNAPSHOTS or --ct given)")
    node = node_of(ctx)
    repo = open_repo(ctx, storage, keyfile)
    rep = run_verify(repo, _selected(repo, snapshots, [registry.resolve(node, c) for c in cts],
                                     {registry.resolve(node, c) for c in exclude}))
    if as_json:
        emit(True, rep.to_dict())
    else:
        for d in rep.damaged:
            what = f"chunk {d.chunk[:16]}" if d.chunk else "snapshot"  # "": its id lists
            click.echo(f"DAMAGED {what}: {d.error}", err=True)
            for w in d.where:
                click.echo(f"  needed by {w}", err=True)
        click.echo(f"verified {len(rep.snapshots)} snapshots, {rep.chunks} chunks, "
                   f"{human(rep.bytes)}: {'OK' if rep.ok else f'{len(rep.damaged)} damaged'}")
    if not rep.ok:
        raise click.exceptions.Exit(DamagedError.exit_code)


def _selected(repo: Repository, snapshots: tuple[str, ...], cts: list[int],
              exclude: set[int]) -> list[Manifest]:
    """The snapshots named, then every snapshot of *cts*; with neither, every snapshot of
    the CTs not in *exclude*. Each once."""
    if not snapshots and not cts:
        return [m for m in repo.manifests() if m.ctid not in exclude]
    chosen = {m.id: m for m in map(repo.resolve, snapshots)}
    for ctid in cts:
        chosen.update((m.id, m) for m in repo.manifests(ctid))
    return list(chosen.values())


COMMANDS = [verify]
