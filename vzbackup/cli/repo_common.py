"""CLI plumbing shared by the commands that read or change a backup repository."""

from __future__ import annotations

from collections.abc import Callable

import click

from vzbackup import constants as C
from vzbackup.backup import defaults as D
from vzbackup.backup import session
from vzbackup.cli.common import node_of, require_root
from vzbackup.engine.repo import Repository


def repo_options(f: Callable) -> Callable:
    f = click.option("--keyfile", type=click.Path(dir_okay=False),
                     help="Key file of an encrypted repository.")(f)
    return click.option("--storage", help="Named storage (storage.cfg); default 'local'.")(f)


def open_repo(ctx: click.Context, storage: str | None, keyfile: str | None) -> Repository:
    require_root()
    node = node_of(ctx)
    defaults = D.load_defaults(node.vzbackup_confdir / C.VZDUMP_CONF)
    return session.open_repository(
        node, storage or defaults.storage, keyfile or defaults.encryption_key or None
    )


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
