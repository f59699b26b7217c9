"""vzbackup key create FILE: a new key for an encrypted repository."""

from __future__ import annotations

from pathlib import Path

import click

from vzbackup.engine.crypto import KeyFile


@click.group()
def key() -> None:
    """Encryption keys (AES-256-GCM; keep a copy of the key file off the node!)."""


@key.command()
@click.argument("path", type=click.Path(dir_okay=False))
def create(path: str) -> None:
    """Create a random key in PATH (mode 0600)."""
    k = KeyFile.create(Path(path))
    click.echo(f"created key {path} (fingerprint {k.fingerprint[:16]}); store a copy somewhere "
               "safe: without it the backups can't be read")


COMMANDS = [key]
