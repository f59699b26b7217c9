"""vzbackup restore: from a CRIU checkpoint, a backup snapshot, or a vzdump archive.

    restore CTID                          CRIU images in DUMPDIR/Dump.CTID (vzctl restore)
    restore SNAPSHOT CTID                 a snapshot (101/2026-11-21T02:00:00Z, or 101 = latest)
    restore --storage NAME CTID           the latest snapshot of CTID from that storage
    restore ARCHIVE.tar.zst CTID          a classic vzdump archive
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vzbackup.backup import restore as R
from vzbackup.cli.common import container, emit, json_option, new_ips, node_of, require_root
from vzbackup.cli.repo_common import human, open_repo, repo_options
from vzbackup.ct import registry
from vzbackup.errors import UsageError


@click.command()
@click.argument("source")
@click.argument("ctid", required=False)
@repo_options
@click.option("--force", is_flag=True, help="Replace an existing (stopped) CT.")
@click.option("--start", is_flag=True, help="Start the CT after restoring it.")
@click.option("--ipadd", multiple=True, help="IP for the restored CT (repeatable; 'none').")
@click.option("--hostname", help="Hostname for the restored CT.")
@click.option("--with-state", is_flag=True, help="Restore the running state (checkpoint mode).")
@click.option("--dumpfile", help="CRIU restore: directory holding the images.")
@click.option("--keep-dump", is_flag=True, help="CRIU restore: keep the images afterwards.")
@json_option
@click.pass_context
def restore(ctx: click.Context, source: str, ctid: str | None, storage: str | None,
            keyfile: str | None, force: bool, start: bool, ipadd: tuple[str, ...],
            hostname: str | None, with_state: bool, dumpfile: str | None, keep_dump: bool,
            as_json: bool) -> None:
    """Restore a CT from a checkpoint, a backup snapshot or a vzdump archive."""
    from_backup = ctid is not None or storage is not None or keyfile is not None
    if not from_backup:
        _only_for("restoring a backup: 'restore CTID' alone resumes its CRIU checkpoint",
                  force=force, start=start, ipadd=ipadd, hostname=hostname,
                  with_state=with_state)
        from vzbackup.ct import ops  # (CRIU's driver: not imported by a backup's restore)

        ct = container(ctx, source)
        with ct.lock():
            pid = ops.restore(ct, dumpfile, keep_dump=keep_dump)
        emit(as_json, {"ctid": ct.ctid, "init_pid": pid}, f"CT {ct.ctid} restored (init pid {pid})")
        return
    _only_for("restoring a CRIU checkpoint", dumpfile=dumpfile, keep_dump=keep_dump)
    ips = new_ips(ipadd)
    require_root()
    node = node_of(ctx)
    target = registry.parse_ctid(ctid if ctid is not None else source.split("/")[0])
    lines: list[str] = []
    log = lines.append
    tty = sys.stderr.isatty() and not as_json
    if R.is_archive(source):
        _only_for("restoring a snapshot, not a vzdump archive", with_state=with_state,
                  storage=storage, keyfile=keyfile)
        ct = R.restore_archive(node, Path(source), target, force=force, start=start, ipadd=ips,
                               hostname=hostname, log=log)
        what = Path(source).name
        requests = 0
    else:
        repo = open_repo(ctx, storage, keyfile)
        repo.prefetch_index()
        m = repo.resolve(source, marked=False)  # (a restore ignores protection)
        done = {"n": 0}

        def progress(n: int) -> None:
            done["n"] += n
            click.echo(f"\r  restoring {m.id}: {human(done['n'])} ", nl=False, err=True)

        ct = R.restore_snapshot(node, repo, m, target, force=force, start=start, ipadd=ips,
                                hostname=hostname, with_state=with_state,
                                progress=progress if tty else None, log=log)
        if tty:
            click.echo("", err=True)
        what = m.id
        requests = repo.backend.requests
    for line in lines:
        if line.startswith("WARN"):
            click.echo(line, err=True)
    emit(
        as_json,
        {"ctid": ct.ctid, "source": what, "status": ct.status(), "log": lines,
         "storage_requests": requests},
        f"CT {ct.ctid} restored from {what} ({ct.status()})",
    )


def _only_for(what: str, **given: object) -> None:
    """Refuse the options of *given* that were set: they are only for *what*."""
    named = [f"--{name.replace('_', '-')}" for name, value in given.items() if value]
    if named:
        raise UsageError(f"{'/'.join(named)} {'is' if len(named) == 1 else 'are'} for {what}")


COMMANDS = [restore]
