"""vzbackup migrate-recv-images: the DEST end of an online migration's image stream
(internal)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vzbackup import constants as C


@click.command(name=C.RECV_IMAGES_COMMAND, hidden=True)
@click.argument("where", type=click.Path(exists=True, file_okay=False, path_type=Path))
def migrate_recv_images(where: Path) -> None:
    """Write the images of the stream on stdin into WHERE, acknowledging each batch."""
    from vzbackup.migrate.imagestream import receive_images

    receive_images(sys.stdin.buffer, sys.stdout.buffer, where)


COMMANDS = [migrate_recv_images]
