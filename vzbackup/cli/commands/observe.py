"""vzbackup browse / metrics / report: look at the backups and migrations of this node.

Heavy libraries (the FUSE binding, prometheus_client, matplotlib) load inside the commands,
so they cost nothing to the rest of the CLI.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from vzbackup.cli.common import emit, json_option, node_of, require_root
from vzbackup.cli.repo_common import open_repo, repo_options
from vzbackup.errors import DependencyError, NotFoundError, UsageError


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
@click.option("--state", is_flag=True,
              help="With SNAPSHOT: its CRIU images (checkpoint mode) instead of its files.")
@click.option("--allow-other", is_flag=True, help="Let other users than root read the mount.")
@click.option("--debug", is_flag=True, help="libfuse's request trace on stderr.")
@click.pass_context
def browse(ctx: click.Context, mountpoint: str, snapshot: str | None, storage: str | None,
           keyfile: str | None, cache_size: str, state: bool, allow_other: bool,
           debug: bool) -> None:
    """Mount the repository read-only on MOUNTPOINT (/CTID/TIME/..., /CTID/TIME.criu/ for
    CRIU images, /CTID/latest), or only SNAPSHOT (CTID/TIME, or CTID for its newest), until
    'umount MOUNTPOINT' or Ctrl-C."""
    require_root()
    mnt = Path(mountpoint)
    if not mnt.is_dir():
        raise UsageError(f"mount point {mountpoint} is not a directory")
    if not os.path.exists("/dev/fuse"):
        raise DependencyError("/dev/fuse is missing (modprobe fuse)")
    from vzbackup.observe.engine_view import RepoView

    view = RepoView(open_repo(ctx, storage, keyfile), _parse_size(cache_size))
    only = view.resolve(snapshot) if snapshot else None
    if state and (only is None or not only.has_state):
        raise (UsageError("--state needs a SNAPSHOT") if only is None else
               NotFoundError(f"snapshot {only.id} has no running state",
                             hint="only --mode checkpoint backups have one"))
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
        browsefs.mount(view, str(mnt.resolve()), only, state=state, allow_other=allow_other,
                       debug=debug, on_ready=ready)
    except RuntimeError as e:
        if e.args != (browsefs.STOPPED_BY_SIGNAL,):
            raise UsageError(f"could not mount on {mountpoint} (libfuse error {e})") from None
    click.echo(f"unmounted {mountpoint}", err=True)
    sys.stdout.flush()


@click.command()
@click.option("--textfile", "textfile_dir", type=click.Path(file_okay=False),
              help="Write DIR/vzbackup.prom for node_exporter's textfile collector "
                   "(atomically) instead of printing the metrics.")
@click.pass_context
def metrics(ctx: click.Context, textfile_dir: str | None) -> None:
    """Prometheus metrics of this node's backups, jobs and migrations, without a daemon."""
    require_root()
    from vzbackup.observe import metrics as M

    node = node_of(ctx)
    if textfile_dir:
        path = M.write_textfile(node, Path(textfile_dir))
        click.echo(f"wrote {path}", err=True)
        return
    from prometheus_client import generate_latest

    click.echo(generate_latest(M.registry(node)).decode(), nl=False)


@click.command()
@click.option("--html", "html_file", required=True, type=click.Path(dir_okay=False),
              help="Where the page goes (one self-contained file).")
@click.option("--storage", help="Only this storage (default: every storage the jobs use).")
@click.option("--since", default="30d", show_default=True,
              help="Period: 30d, 12h, 2w, or a date like 2026-11-01.")
@json_option
@click.pass_context
def report(ctx: click.Context, html_file: str, storage: str | None, since: str,
           as_json: bool) -> None:
    """An HTML report with plots: snapshot history per CT, job durations and failures,
    repository growth, migrations with their phase times."""
    require_root()
    from vzbackup.observe import facts as F
    from vzbackup.observe import report as R

    node = node_of(ctx)
    start = F.parse_since(since)
    if storage:
        from vzbackup.backup.session import open_backend

        open_backend(node, storage)  # an unknown name is an error here, not a page
    out = R.write(node, storage, start, Path(html_file))
    emit(as_json, out, f"wrote {html_file}: {out['snapshots']} snapshots, {out['runs']} job "
                       f"runs, {out['migrations']} migrations")


COMMANDS = [browse, metrics, report]
