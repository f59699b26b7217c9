"""vzbackup console: attach to a running CT's console (like vzctl console)."""

from __future__ import annotations

import sys

import click

from vzbackup.cli.common import container
from vzbackup.ct import console as ct_console
from vzbackup.errors import NotFoundError


@click.command()
@click.argument("ctid")
@click.option("--log", "show_log", is_flag=True, help="Print what the CT wrote to its console.")
@click.pass_context
def console(ctx: click.Context, ctid: str, show_log: bool) -> None:
    """Attach to the console of CTID; detach with Esc then '.'."""
    ct = container(ctx, ctid)
    rundir = ct.node.rundir
    if show_log:
        for path in (
            ct_console.log_path(rundir, ct.ctid).with_suffix(".log.1"),
            ct_console.log_path(rundir, ct.ctid),
        ):
            if path.exists():
                sys.stdout.buffer.write(path.read_bytes())
        return
    ct.require_running()
    sock = ct_console.socket_path(rundir, ct.ctid)
    if not sock.exists():
        raise NotFoundError(f"CT {ct.ctid} has no console (it was restored without one)")
    ct_console.attach(sock, banner=f"Attached to CT {ct.ctid} (ESC . to detach)\r\n")
    click.echo(f"\r\nDetached from CT {ct.ctid}", err=True)


COMMANDS = [console]
