"""The ``vzbackup`` click group: its commands are discovered in cli/commands/."""

from __future__ import annotations

import gc
import importlib
import importlib.util
import logging
import sys

import click

from vzbackup import __version__
from vzbackup.cli import commands as _commands


class LazyGroup(click.Group):
    """Imports a command's module only when it runs: ``vzbackup dump`` loads neither the
    migration's SSH stack nor the report's, so a quick command starts quickly. A command
    is looked for in ``commands/NAME.py`` first (``-`` read as ``_``), then in every module
    (``--help``)."""

    def _discover(self) -> None:
        import pkgutil  # only --help and unknown names list every command

        for info in sorted(pkgutil.iter_modules(_commands.__path__), key=lambda m: m.name):
            self._load(info.name)

    def _load(self, module_name: str) -> None:
        module = importlib.import_module(f"{_commands.__name__}.{module_name}")
        for cmd in getattr(module, "COMMANDS", ()):
            if cmd.name not in self.commands:
                self.add_command(cmd)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = cmd_name.replace("-", "_")  # rebuild-index: commands/rebuild_index.py
        if cmd_name not in self.commands and module.isidentifier() and \
                importlib.util.find_spec(f"{_commands.__name__}.{module}") is not None:
            self._load(module)
        if cmd_name not in self.commands:
            self._discover()
        return self.commands.get(cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._discover()
        return sorted(self.commands)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
    # the command's module is imported by now (click resolves it before this runs): what
    # starting up made lives until exit, so the collector need never look at it again
    gc.freeze()
    gc.enable()
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    ctx.obj = {"prefix": prefix}

