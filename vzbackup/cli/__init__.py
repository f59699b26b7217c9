"""The ``vzbackup`` command: a click group whose commands are discovered in cli/commands/."""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys

import click

from vzbackup import __version__
from vzbackup.cli import commands as _commands
from vzbackup.cli.common import run_guarded


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vzbackup")
@click.option(
    "--prefix",
    envvar="VZBACKUP_PREFIX",
    default="/",
    show_default=True,
    help="Node prefix: vz.conf is PREFIX/etc/vz/vz.conf, CTs live under PREFIX/vz.",
)
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.pass_context
def cli(ctx: click.Context, prefix: str, verbose: int) -> None:
    """Containers, checkpoints, backups and migration for OpenVZ-style CTs."""
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    ctx.obj = {"prefix": prefix}


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(_commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{_commands.__name__}.{info.name}")
        for cmd in getattr(module, "COMMANDS", ()):
            cli.add_command(cmd)


_discover()


def main() -> None:
    run_guarded(cli)
