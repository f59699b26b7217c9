"""vzbackup mount / umount: the CT's root (VE_PRIVATE bound on VE_ROOT)."""

from __future__ import annotations

import click

from vzbackup.cli.common import container


@click.command()
@click.argument("ctid")
@click.pass_context
def mount(ctx: click.Context, ctid: str) -> None:
    """Mount the CT's private area on VE_ROOT."""
    ct = container(ctx, ctid)
    with ct.lock():
        ct.mount()
    click.echo(f"CT {ct.ctid} mounted at {ct.ve_root()}")


@click.command()
@click.argument("ctid")
@click.pass_context
def umount(ctx: click.Context, ctid: str) -> None:
    """Unmount a stopped CT's VE_ROOT."""
    ct = container(ctx, ctid)
    with ct.lock():
        ct.require_stopped("unmounting it")
        ct.umount()
    click.echo(f"CT {ct.ctid} unmounted")


COMMANDS = [mount, umount]
