"""vzbackup exec / enter: run a command or a shell inside a running CT."""

from __future__ import annotations

import sys

import click

from vzbackup.cli.common import container


@click.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("ctid")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_(ctx: click.Context, ctid: str, command: tuple[str, ...]) -> None:
    """Run COMMAND in CTID; exits with its exit code (one word is run by /bin/sh -c)."""
    ct = container(ctx, ctid)
    argv = ["/bin/sh", "-c", command[0]] if len(command) == 1 else list(command)
    rc = ct.exec(argv).returncode
    sys.exit(rc if rc >= 0 else 128 - rc)


@click.command()
@click.argument("ctid")
@click.pass_context
def enter(ctx: click.Context, ctid: str) -> None:
    """Open an interactive shell in CTID (like vzctl enter)."""
    ct = container(ctx, ctid)
    click.echo(f"entered into CT {ct.ctid}", err=True)
    rc = ct.enter(["/bin/sh", "-l"])
    click.echo(f"exited from CT {ct.ctid}", err=True)
    sys.exit(rc if rc >= 0 else 128 - rc)


COMMANDS = [exec_, enter]
