"""vzbackup migrate-recv-tree: the DEST end of a streamed private-area transfer (internal)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vzbackup import constants as C


@click.command(name=C.RECV_COMMAND, hidden=True)
@click.option("--keep", is_flag=True, help="Keep files DST has and the stream lacks.")
@click.argument("dst", type=click.Path(path_type=Path))
def migrate_recv_tree(keep: bool, dst: Path) -> None:
    """Extract a zstd-compressed tar from stdin into DST, swapping it in atomically."""
    from vzbackup.migrate.sync import receive_tree  # paramiko: not for --help

    receive_tree(sys.stdin.buffer, dst, delete=not keep)


COMMANDS = [migrate_recv_tree]
