"""vzbackup clone: a new CT from a stopped or running one (its files, its config, new identity)."""

from __future__ import annotations

import dataclasses
import sys

import click

from vzbackup.backup import clone as K
from vzbackup.cli.common import container, emit, json_option, new_ips, node_of
from vzbackup.cli.repo_common import human
from vzbackup.ct import registry


@click.command()
@click.argument("ctid")
@click.argument("newid")
@click.option("--name", help="Name of the clone (the source's is never copied).")
@click.option("--hostname", help="Hostname of the clone (default: the source's).")
@click.option("--ipadd", multiple=True,
              help="IP of the clone (repeatable); 'none' or no --ipadd: no address.")
@click.option("--start", is_flag=True, help="Start the clone.")
@json_option
@click.pass_context
def clone(ctx: click.Context, ctid: str, newid: str, name: str | None, hostname: str | None,
          ipadd: tuple[str, ...], start: bool, as_json: bool) -> None:
    """Clone CT CTID (stopped or running) as the new CT NEWID."""
    ips = new_ips(ipadd) or []
    src = container(ctx, ctid)
    target = registry.parse_ctid(newid)
    tty = sys.stderr.isatty() and not as_json
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if tty:
            click.echo(f"\r\033[K  {line}", err=True)

    def progress(copied: int, total: int) -> None:
        click.echo(f"\r\033[K  cloning CT {src.ctid} -> {target}: {human(copied)} of "
                   f"{human(total)}", nl=False, err=True)

    try:
        res = K.clone(node_of(ctx), src, target, name=name, hostname=hostname,
                      ipadd=ips, start=start,
                      progress=progress if tty else None, log=log)
    finally:
        if tty:
            click.echo("\r\033[K", nl=False, err=True)
    held = "" if res.mode == "stop" else f", frozen {res.frozen_seconds:.2f}s"
    emit(as_json, {**dataclasses.asdict(res), "log": lines},
         f"CT {res.ctid} cloned from CT {res.source} ({res.method}, source {res.mode}{held}) "
         f"in {res.seconds:.1f}s: {'running' if res.started else 'stopped'}, "
         f"{res.idmap}, IP {' '.join(res.ips) or 'none'}")


COMMANDS = [clone]
