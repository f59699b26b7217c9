"""vzbackup create: a new CT from an OS template."""

from __future__ import annotations

import click

from vzbackup.cli.common import emit, json_option, node_of, require_root
from vzbackup.ct import ops, registry


@click.command()
@click.argument("ctid")
@click.option("--ostemplate", help="OS template name in TEMPLATE/cache (default DEF_OSTEMPLATE).")
@click.option("--config", "sample", help="Sample config ve-NAME.conf-sample (default CONFIGFILE).")
@click.option("--ipadd", multiple=True, help="IP address (repeatable).")
@click.option("--hostname")
@click.option("--name", help="A name that can be used instead of the CTID.")
@click.option(
    "--privileged/--unprivileged",
    default=None,
    help="Run with the node's ids (default: vz.conf UNPRIVILEGED, normally unprivileged).",
)
@json_option
@click.pass_context
def create(
    ctx: click.Context,
    ctid: str,
    ostemplate: str | None,
    sample: str | None,
    ipadd: tuple[str, ...],
    hostname: str | None,
    name: str | None,
    privileged: bool | None,
    as_json: bool,
) -> None:
    """Create container CTID."""
    require_root()
    node = node_of(ctx)
    ct = ops.create(
        node,
        registry.parse_ctid(ctid),
        ostemplate=ostemplate,
        sample=sample,
        ipadd=list(ipadd),
        hostname=hostname,
        name=name,
        privileged=privileged,
    )
    ids = ct.conf.idmap
    emit(
        as_json,
        {
            "ctid": ct.ctid,
            "private": str(ct.ve_private()),
            "config": str(ct.conf_path),
            "unprivileged": ids.unprivileged,
            "idmap": {"base": ids.base, "size": ids.size},
        },
        f"CT {ct.ctid} created ({ids.describe()}): private area {ct.ve_private()}",
    )


COMMANDS = [create]
