"""vzbackup set: change a CT's parameters at run time and/or in CTID.conf (--save)."""

from __future__ import annotations

import click

from vzbackup.cli.common import container
from vzbackup.ct import ops


@click.command(name="set")
@click.argument("ctid")
@click.option("--save", is_flag=True, help="Store the settings in CTID.conf (needed on a "
              "running CT too for --onboot, --bootorder, --stop-mode, --bindmount, --name).")
@click.option("--ipadd", multiple=True)
@click.option("--ipdel", multiple=True, help="An IP, or 'all'.")
@click.option("--hostname")
@click.option("--name")
@click.option("--nameserver", multiple=True)
@click.option("--searchdomain", multiple=True)
@click.option("--onboot", type=click.Choice(["yes", "no"]))
@click.option("--bootorder", type=click.IntRange(0), help="Higher boots first (vzbackup boot).")
@click.option("--stop-mode", type=click.Choice(["stop", "suspend"]),
              help="At node shutdown: stop, or checkpoint for boot to restore (VE_STOP_MODE).")
@click.option("--cpus", type=click.IntRange(0))
@click.option("--cpulimit", type=click.IntRange(0), help="Percent, 100 = one CPU.")
@click.option("--cpuunits", type=click.IntRange(8, 500000))
@click.option("--ram", "--memory", "ram", help="Memory limit, e.g. 256M (PHYSPAGES).")
@click.option("--swap", help="Swap limit, e.g. 128M (SWAPPAGES).")
@click.option(
    "--bindmount",
    multiple=True,
    help="/host/dir:/ct/dir[:ro] (repeatable; takes effect at the next start).",
)
@click.option("--numproc", type=click.IntRange(1))
@click.option("--diskspace", help="Disk space soft[:hard], KiB or with K/M/G/T (DISKSPACE).")
@click.option("--diskinodes", help="Inodes soft[:hard] (DISKINODES).")
@click.option("--diskquota", type=click.Choice(["yes", "no"]),
              help="Enforce the disk limits (DISK_QUOTA; vz.conf's by default).")
@click.pass_context
def set_(ctx: click.Context, ctid: str, save: bool, **params: object) -> None:
    """Set parameters of CTID."""
    ct = container(ctx, ctid)
    given = {k: v for k, v in params.items() if v not in (None, ())}
    if not given:
        raise click.UsageError("nothing to set")
    if "numproc" in given:
        given["numproc"] = f"{given['numproc']}:{given['numproc']}"
    changed = ops.set_params(ct, given, save=save)
    where = "saved" if save else "applied"
    click.echo(f"CT {ct.ctid}: {', '.join(changed)} {where}")


COMMANDS = [set_]
