"""vzbackup browse / metrics / report: look at the backups and migrations of this node.

Heavy libraries (the FUSE binding, prometheus_client, matplotlib) load inside the commands,
so they cost nothing to the rest of the CLI.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from vzbackup.cli.common import require_root
from vzbackup.cli.repo_common import open_repo, repo_options
from vzbackup.errors import DependencyError, UsageError


def _parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        return int(float(num) * units[unit])
    except ValueError:
        raise UsageError(f"{text!r} is not a size", hint="e.g. 512M or 2G") from None


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.argument("snapshot", required=False)
@repo_options
@click.option("--cache-size", default="256M", show_default=True,
              help="Memory for decoded chunks (the kernel page cache comes on top).")
@click.option("--allow-other", is_flag=True, help="Let other users than root read the mount.")
@click.option("--debug", is_flag=True, help="libfuse's request trace on stderr.")
@click.pass_context
def browse(ctx: click.Context, mountpoint: str, snapshot: str | None, storage: str | None,
           keyfile: str | None, cache_size: str, allow_other: bool, debug: bool) -> None:
    """Mount the repository read-only on MOUNTPOINT (/CTID/TIME/..., /CTID/latest), or only
    SNAPSHOT (CTID/TIME, or CTID for its newest), until 'umount MOUNTPOINT' or Ctrl-C."""
    require_root()
    mnt = Path(mountpoint)
    if not mnt.is_dir():
        raise UsageError(f"mount point {mountpoint} is not a directory")
    if not os.path.exists("/dev/fuse"):
        raise DependencyError("/dev/fuse is missing (modprobe fuse)")
    from vzbackup.observe.engine_view import RepoView

    view = RepoView(open_repo(ctx, storage, keyfile), _parse_size(cache_size))
    only = view.resolve(snapshot) if snapshot else None
    try:
        from vzbackup.observe import browsefs
    except (OSError, ImportError) as e:
        raise DependencyError(f"FUSE is not usable: {e}", hint="apt-get install fuse3") from None
    what = only.id if only else "every snapshot"
    source = f"{what} of {view.url}"

    def ready() -> None:
        click.echo(f"mounted {source} on {mountpoint}; 'umount {mountpoint}' or Ctrl-C "
                   "unmounts", err=True)

    try:
        browsefs.mount(view, str(mnt.resolve()), only, allow_other=allow_other, debug=debug,
                       on_ready=ready)
    except RuntimeError as e:
        if e.args != (browsefs.STOPPED_BY_SIGNAL,):
            raise UsageError(f"could not mount on {mountpoint} (libfuse error {e})") from None
    click.echo(f"unmounted {mountpoint}", err=True)
    sys.stdout.flush()


COMMANDS = [browse]
