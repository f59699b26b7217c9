"""vzbackup chkpnt / suspend / resume: CRIU state snapshots and freezing."""

from __future__ import annotations

import click

from vzbackup.cli.common import container, ct_verb, emit, json_option
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


suspend = ct_verb("suspend", ops.suspend, "suspended", "Freeze all processes of CTID in place.")
resume = ct_verb("resume", ops.resume, "resumed", "Thaw a suspended CTID.")


COMMANDS = [chkpnt, suspend, resume]
