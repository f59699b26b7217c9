"""vzbackup list: vzlist-like table of CTs."""

from __future__ import annotations

from collections.abc import Callable

import click

from vzbackup.cli.common import emit, json_option, node_of, require_root
from vzbackup.ct import registry
from vzbackup.ct.container import Container

# field -> (header, getter)
FIELDS: dict[str, tuple[str, Callable[[Container], object]]] = {
    "ctid": ("CTID", lambda ct: ct.ctid),
    "nproc": ("NPROC", lambda ct: ct.nproc() if ct.running else "-"),
    "status": ("STATUS", lambda ct: ct.status()),
    "ip": ("IP_ADDR", lambda ct: " ".join(ct.conf.ips) or "-"),
    "hostname": ("HOSTNAME", lambda ct: ct.conf.hostname or "-"),
    "name": ("NAME", lambda ct: ct.conf.name or "-"),
    "onboot": ("ONBOOT", lambda ct: ct.conf.get("ONBOOT", "no")),
    "ostemplate": ("OSTEMPLATE", lambda ct: ct.conf.ostemplate or "-"),
    "cpus": ("CPUS", lambda ct: ct.conf.get("CPUS", "-")),
    "cpulimit": ("CPULIM", lambda ct: ct.conf.get("CPULIMIT", "-")),
    "cpuunits": ("CPUUNI", lambda ct: ct.conf.get("CPUUNITS", "-")),
    "physpages": ("PHYSPAGES", lambda ct: ct.conf.get("PHYSPAGES", "-")),
    "swappages": ("SWAPPAGES", lambda ct: ct.conf.get("SWAPPAGES", "-")),
    "diskspace": ("DISKSPACE", lambda ct: ct.conf.get("DISKSPACE", "-")),
    "private": ("PRIVATE", lambda ct: str(ct.ve_private())),
    "root": ("ROOT", lambda ct: str(ct.ve_root())),
    "pid": ("PID", lambda ct: ct.state().init_pid if ct.state() else "-"),
}
DEFAULT = "ctid,nproc,status,ip,hostname"


@click.command(name="list")
@click.option("-a", "--all", "show_all", is_flag=True, help="Stopped CTs too.")
@click.option("-S", "--stopped", is_flag=True, help="Only stopped CTs.")
@click.option(
    "-o",
    "--output",
    default=DEFAULT,
    show_default=True,
    help=f"Comma-separated fields: {', '.join(FIELDS)}.",
)
@click.option("-H", "--no-header", is_flag=True)
@json_option
@click.pass_context
def list_(
    ctx: click.Context, show_all: bool, stopped: bool, output: str, no_header: bool, as_json: bool
) -> None:
    """List containers (running ones unless -a)."""
    require_root()
    fields = [f.strip() for f in output.split(",") if f.strip()]
    unknown = [f for f in fields if f not in FIELDS]
    if unknown:
        raise click.BadParameter(f"unknown field(s) {', '.join(unknown)}", param_hint="-o")
    node = node_of(ctx)
    rows = []
    for ctid in registry.list_ctids(node):
        ct = Container(node, ctid)
        running = ct.running
        if (stopped and running) or (not show_all and not stopped and not running):
            continue
        rows.append({f: FIELDS[f][1](ct) for f in fields})
    if as_json:
        emit(True, rows)
        return
    table = [[str(r[f]) for f in fields] for r in rows]
    if not no_header:
        table.insert(0, [FIELDS[f][0] for f in fields])
    widths = [max((len(row[i]) for row in table), default=0) for i in range(len(fields))]
    for row in table:
        click.echo(
            "  ".join(
                c.rjust(w) if i == 0 else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
        )


COMMANDS = [list_]
