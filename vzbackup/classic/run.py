"""Run a classic command line: translate it, then run each vzbackup command line in turn."""

from __future__ import annotations

import sys

import click

from vzbackup.classic.syntax import PROGRAMS, translate, usage
from vzbackup.cli.common import run_guarded
from vzbackup.cli.group import cli
from vzbackup.config.node import Node
from vzbackup.errors import VzError


def main(argv: list[str] | None = None) -> None:
    """``argv`` is the classic program's name, then its arguments. Exits with the code of the
    first vzbackup command that fails (vzbackup's codes, see README), else 0."""
    argv = sys.argv[1:] if argv is None else argv
    prog, args = (argv[0], argv[1:]) if argv else ("vzctl", [])
    if args in (["--help"], ["-h"]) and prog in PROGRAMS:
        click.echo(usage(prog))
        sys.exit(0)
    try:
        node = Node.load()  # VZBACKUP_PREFIX or /
        steps, notes = translate(prog, args, node)
    except VzError as e:
        click.echo(f"{prog}: error: {e}", err=True)
        sys.exit(e.exit_code)
    for note in notes:
        click.echo(note, err=True)
    for step in steps:
        try:
            run_guarded(cli, step, prog)
        except SystemExit as e:  # a verb that ends with its own exit code (exec, enter)
            if e.code not in (0, None):
                raise
    sys.exit(0)
