"""vzbackup start / stop / restart."""

from __future__ import annotations

import click

from vzbackup.cli.common import container
from vzbackup.ct import ops


@click.command()
@click.argument("ctid")
@click.pass_context
def start(ctx: click.Context, ctid: str) -> None:
    """Start container CTID."""
    ct = container(ctx, ctid)
    with ct.lock():
        pid = ops.start(ct)
    click.echo(f"CT {ct.ctid} started (init pid {pid})")


@click.command()
@click.argument("ctid")
@click.option("-t", "--timeout", type=click.IntRange(min=0),
              help="Seconds to wait for a clean halt (STOP_TIMEOUT).")
@click.option("--fast", is_flag=True, help="Kill at once, no clean halt.")
@click.pass_context
def stop(ctx: click.Context, ctid: str, timeout: int | None, fast: bool) -> None:
    """Stop container CTID: halt inside, then kill after the timeout."""
    if fast and timeout is not None:
        raise click.UsageError("--fast kills at once: there is no clean halt to time (-t)")
    ct = container(ctx, ctid)
    with ct.lock():
        ops.stop(ct, timeout=timeout, fast=fast)
    click.echo(f"CT {ct.ctid} stopped")


@click.command()
@click.argument("ctid")
@click.option("-t", "--timeout", type=click.IntRange(min=0),
              help="Seconds to wait for a clean halt.")
@click.pass_context
def restart(ctx: click.Context, ctid: str, timeout: int | None) -> None:
    """Stop (if running) and start container CTID."""
    ct = container(ctx, ctid)
    with ct.lock():  # one lock for both: nobody starts or migrates it in between
        if ct.running:
            ops.stop(ct, timeout=timeout)
            click.echo(f"CT {ct.ctid} stopped")
        pid = ops.start(ct)
    click.echo(f"CT {ct.ctid} started (init pid {pid})")


COMMANDS = [start, stop, restart]
