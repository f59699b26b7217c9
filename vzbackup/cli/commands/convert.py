"""vzbackup convert: switch a stopped CT between privileged and unprivileged."""

from __future__ import annotations

import click

from vzbackup.cli.common import container, emit, json_option, node_of
from vzbackup.ct import idmap, ops
from vzbackup.errors import UsageError


@click.command()
@click.argument("ctid")
@click.option(
    "--unprivileged/--privileged",
    "unprivileged",
    required=True,
    help="Target mode: the CT's ids mapped onto the node's (IDMAP_BASE..) or the node's own.",
)
@click.option("--base", type=int, help="Node id of the CT's root (default: vz.conf IDMAP_BASE).")
@click.option("--size", type=click.IntRange(min=1),
              help="How many ids the CT gets (default: vz.conf IDMAP_SIZE).")
@click.option("--dry-run", is_flag=True, help="Only count what would change.")
@json_option
@click.pass_context
def convert(
    ctx: click.Context,
    ctid: str,
    unprivileged: bool,
    base: int | None,
    size: int | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Convert stopped CTID to an unprivileged or privileged CT (shifts file ownership)."""
    if not unprivileged and (base is not None or size is not None):
        raise UsageError("--base/--size are for --unprivileged: a privileged CT uses the "
                         "node's own ids")
    ct = container(ctx, ctid)
    node = node_of(ctx)
    target = idmap.IDENTITY
    if unprivileged:
        default = node.new_ct_idmap(privileged=False)
        target = idmap.IdMap(default.base if base is None else base,
                             default.size if size is None else size)
    r = ops.convert(ct, target, dry_run=dry_run)
    verb = "would shift" if dry_run else "shifted"
    emit(
        as_json,
        {**r, "dry_run": dry_run},
        f"CT {r['ctid']}: {r['from']} -> {r['to']}: {verb} {r['entries']} entries "
        f"({r['acls']} ACLs, {r['fcaps']} file capabilities)",
    )


COMMANDS = [convert]
