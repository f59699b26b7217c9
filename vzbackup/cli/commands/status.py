"""vzbackup status: vzctl-like one-line state of a CT."""

from __future__ import annotations

import click

from vzbackup.cli.common import emit, json_option, node_of, require_root
from vzbackup.ct import registry
from vzbackup.ct.container import Container


@click.command()
@click.argument("ctid")
@json_option
@click.pass_context
def status(ctx: click.Context, ctid: str, as_json: bool) -> None:
    """Show whether CTID exists, is mounted and runs."""
    require_root()
    node = node_of(ctx)
    ct = Container(node, registry.resolve(node, ctid))
    exists = ct.exists
    st = ct.state() if exists else None
    data = {
        "ctid": ct.ctid,
        "exist": exists,
        "mounted": exists and ct.mounted,
        "status": ct.status() if exists else "deleted",
        "init_pid": st.init_pid if st else None,
        "disk_quota_unenforced": ct.quota_problems() if exists else [],
    }
    words = [
        "exist" if exists else "deleted",
        "mounted" if data["mounted"] else "unmounted",
        data["status"] if exists else "down",
    ]
    emit(as_json, data, f"CTID {ct.ctid} {' '.join(words)}")
    if not as_json:  # stdout stays vzctl's one line
        for problem in data["disk_quota_unenforced"]:
            click.echo(f"WARNING: CT {ct.ctid}: {problem}", err=True)


COMMANDS = [status]
