"""vzbackup destroy: remove a stopped CT."""

from __future__ import annotations

import click

from vzbackup.cli.common import container
from vzbackup.ct import ops


@click.command()
@click.argument("ctid")
@click.pass_context
def destroy(ctx: click.Context, ctid: str) -> None:
    """Destroy stopped container CTID (private area and config)."""
    ct = container(ctx, ctid)
    ops.destroy(ct)
    click.echo(f"CT {ct.ctid} destroyed")


COMMANDS = [destroy]
