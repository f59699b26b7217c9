"""vzbackup classic install|remove: the opt-in vzctl, vzlist, vzdump, vzrestore, vzmigrate."""

from __future__ import annotations

import os
from pathlib import Path

import click

from vzbackup.classic import wrappers as W
from vzbackup.cli.common import emit, json_option

BINDIR = click.option("--bindir", type=click.Path(file_okay=False), default=W.DEFAULT_BINDIR,
                      show_default=True, help="Where the wrappers go.")


@click.group()
def classic() -> None:
    """The classic OpenVZ command names, as wrappers around vzbackup (opt-in)."""


@classic.command()
@BINDIR
@click.argument("names", nargs=-1)
@json_option
@click.pass_context
def install(ctx: click.Context, bindir: str, names: tuple[str, ...], as_json: bool) -> None:
    """Write wrappers NAMES (default: all) into BINDIR, unless a real command has the name."""
    prefix = os.path.abspath(ctx.obj["prefix"])
    written = W.install(Path(bindir), names, prefix)
    note = "" if W.on_search_path(Path(bindir)) else f" (note: {bindir} is not on PATH)"
    emit(as_json, {"bindir": bindir, "installed": [p.name for p in written], "prefix": prefix},
         f"installed {', '.join(p.name for p in written)} in {bindir}{note}")


@classic.command()
@BINDIR
@click.argument("names", nargs=-1)
@json_option
def remove(bindir: str, names: tuple[str, ...], as_json: bool) -> None:
    """Delete the wrappers NAMES (default: all) from BINDIR; other files are never touched."""
    removed = W.remove(Path(bindir), names)
    emit(as_json, {"bindir": bindir, "removed": [p.name for p in removed]},
         f"removed {', '.join(p.name for p in removed) or 'nothing'} from {bindir}")


COMMANDS = [classic]
