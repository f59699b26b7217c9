"""vzbackup chkpnt / restore / suspend / resume: CRIU state snapshots and freezing."""

from __future__ import annotations

import click

from vzbackup.cli.common import container, emit, json_option
from vzbackup.ct import ops


@click.command()
@click.argument("ctid")
@click.option("--dumpfile", help="Directory for the CRIU images (default DUMPDIR/Dump.CTID).")
@json_option
@click.pass_context
def chkpnt(ctx: click.Context, ctid: str, dumpfile: str | None, as_json: bool) -> None:
    """Checkpoint running CTID to disk; the CT stops."""
    ct = container(ctx, ctid)
    path, took = ops.chkpnt(ct, dumpfile)
    emit(
        as_json,
        {"ctid": ct.ctid, "dumpdir": str(path), "seconds": round(took, 3)},
        f"CT {ct.ctid} checkpointed to {path} ({took:.2f}s)",
    )


@click.command()
@click.argument("ctid")
@click.option("--dumpfile", help="Directory holding the CRIU images.")
@click.option("--keep-dump", is_flag=True, help="Keep the images after a successful restore.")
@json_option
@click.pass_context
def restore(
    ctx: click.Context, ctid: str, dumpfile: str | None, keep_dump: bool, as_json: bool
) -> None:
    """Restore CTID from a checkpoint."""
    ct = container(ctx, ctid)
    pid = ops.restore(ct, dumpfile, keep_dump=keep_dump)
    emit(as_json, {"ctid": ct.ctid, "init_pid": pid}, f"CT {ct.ctid} restored (init pid {pid})")


@click.command()
@click.argument("ctid")
@click.pass_context
def suspend(ctx: click.Context, ctid: str) -> None:
    """Freeze all processes of CTID in place."""
    ct = container(ctx, ctid)
    ops.suspend(ct)
    click.echo(f"CT {ct.ctid} suspended")


@click.command()
@click.argument("ctid")
@click.pass_context
def resume(ctx: click.Context, ctid: str) -> None:
    """Thaw a suspended CTID."""
    ct = container(ctx, ctid)
    ops.resume(ct)
    click.echo(f"CT {ct.ctid} resumed")


COMMANDS = [chkpnt, restore, suspend, resume]
