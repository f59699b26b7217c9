"""vzbackup list: vzlist-like table of CTs."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import click
from click.core import ParameterSource

from vzbackup.cli.common import emit, json_option, node_of, require_root
from vzbackup.ct import quota, registry
from vzbackup.ct.container import Container
from vzbackup.errors import NotFoundError, UsageError, VzError


class _Row:
    """One CT as list sees it: config and state are read once, columns derive from them."""

    def __init__(self, ct: Container) -> None:
        self.ct = ct
        self.conf = ct.conf
        self.state = ct.state()
        self.running = self.state is not None

    @cached_property
    def status(self) -> str:
        return self.ct.status(self.state)

    def key(self, key: str) -> str:
        return self.conf.get(key, "-")

    @cached_property
    def quota(self) -> quota.Usage | None:
        try:
            return quota.usage(self.ct.ve_private(self.conf), self.ct.ctid)
        except (OSError, VzError):
            return None

    @cached_property
    def disk_limits(self) -> quota.Limits:
        return self.ct.quota_limits(self.conf)

    def disk(self, what: str) -> dict[str, int | None]:
        """vzlist's usage/softlimit/hardlimit of diskspace (KiB) or diskinodes."""
        used = self.quota and (self.quota.space_kib if what == "space" else self.quota.inodes)
        return {"usage": used,
                "softlimit": getattr(self.disk_limits, f"{what}_soft"),
                "hardlimit": getattr(self.disk_limits, f"{what}_hard")}


class _Cell:
    """A column whose JSON value (an object) differs from its table text (one number)."""

    def __init__(self, text: object, data: object) -> None:
        self.text, self.data = text, data

    def __str__(self) -> str:
        return "-" if self.text is None else str(self.text)


def _disk(what: str, part: str = "") -> Callable[[_Row], object]:
    def get(r: _Row) -> object:
        d = r.disk(what)
        if part:
            return d[part]
        return _Cell(d["usage"], d)

    return get


# field -> (header, getter)
FIELDS: dict[str, tuple[str, Callable[[_Row], object]]] = {
    "ctid": ("CTID", lambda r: r.ct.ctid),
    "nproc": ("NPROC", lambda r: r.ct.nproc() if r.running else "-"),
    "status": ("STATUS", lambda r: r.status),
    "ip": ("IP_ADDR", lambda r: " ".join(r.conf.ips) or "-"),
    "hostname": ("HOSTNAME", lambda r: r.conf.hostname or "-"),
    "name": ("NAME", lambda r: r.conf.name or "-"),
    "onboot": ("ONBOOT", lambda r: r.conf.get("ONBOOT", "no")),
    "bootorder": ("BOOTORDER", lambda r: r.key("BOOTORDER")),
    "stopmode": ("STOPMODE", lambda r: r.conf.get("VE_STOP_MODE")
                 or r.ct.node.value("VE_STOP_MODE")),
    "ostemplate": ("OSTEMPLATE", lambda r: r.conf.ostemplate or "-"),
    "cpus": ("CPUS", lambda r: r.key("CPUS")),
    "cpulimit": ("CPULIM", lambda r: r.key("CPULIMIT")),
    "cpuunits": ("CPUUNI", lambda r: r.key("CPUUNITS")),
    "physpages": ("PHYSPAGES", lambda r: r.key("PHYSPAGES")),
    "swappages": ("SWAPPAGES", lambda r: r.key("SWAPPAGES")),
    "diskspace": ("DQBLOCKS", _disk("space")),
    "diskspace.s": ("DQBLOCKS.S", _disk("space", "softlimit")),
    "diskspace.h": ("DQBLOCKS.H", _disk("space", "hardlimit")),
    "diskinodes": ("DQINODES", _disk("inodes")),
    "diskinodes.s": ("DQINODES.S", _disk("inodes", "softlimit")),
    "diskinodes.h": ("DQINODES.H", _disk("inodes", "hardlimit")),
    "quota": ("QUOTA", lambda r: quota.detect(r.ct.ve_private(r.conf)).backend),
    "private": ("PRIVATE", lambda r: str(r.ct.ve_private(r.conf))),
    "root": ("ROOT", lambda r: str(r.ct.ve_root(r.conf))),
    "pid": ("PID", lambda r: r.state.init_pid if r.state else "-"),
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
@click.option("-b", "--backups", is_flag=True, help="List backup snapshots instead of CTs.")
@click.option("--storage", help="List the snapshots on this storage (implies -b).")
@click.option("--keyfile", type=click.Path(dir_okay=False), help="Key of an encrypted repository.")
@click.argument("ctids", nargs=-1)
@json_option
@click.pass_context
def list_(
    ctx: click.Context, show_all: bool, stopped: bool, output: str, no_header: bool,
    backups: bool, storage: str | None, keyfile: str | None, ctids: tuple[str, ...],
    as_json: bool,
) -> None:
    """List containers (running ones unless -a; CTIDs: those), or backup snapshots with
    -b/--storage."""
    require_root()
    if backups or storage or keyfile:
        ct_only = [name for name, given in (
            ("-a", show_all), ("-S", stopped),
            ("-o", ctx.get_parameter_source("output") != ParameterSource.DEFAULT)) if given]
        if ct_only:
            raise UsageError(f"{'/'.join(ct_only)}: for listing CTs, not backup snapshots")
        _list_snapshots(ctx, storage, keyfile, ctids, no_header, as_json)
        return
    fields = [f.strip() for f in output.split(",") if f.strip()]
    unknown = [f for f in fields if f not in FIELDS]
    if unknown:
        raise click.BadParameter(f"unknown field(s) {', '.join(unknown)}", param_hint="-o")
    node = node_of(ctx)
    chosen = [registry.resolve(node, c) for c in ctids]  # vzlist CTID: that CT, in any state
    missing = [c for c in chosen if not Container(node, c).exists]
    if missing:
        raise NotFoundError(f"CT(s) {', '.join(map(str, missing))} not found")
    rows = []
    for ctid in chosen or registry.list_ctids(node):
        row = _Row(Container(node, ctid))
        if not chosen and ((stopped and row.running) or
                           (not show_all and not stopped and not row.running)):
            continue
        rows.append({f: FIELDS[f][1](row) for f in fields})
    if as_json:
        emit(True, [{f: v.data if isinstance(v, _Cell) else v for f, v in r.items()}
                    for r in rows])
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


def _list_snapshots(ctx: click.Context, storage: str | None, keyfile: str | None,
                    ctids: tuple[str, ...], no_header: bool, as_json: bool) -> None:
    from vzbackup.cli.repo_common import human, open_repo

    repo = open_repo(ctx, storage, keyfile)
    wanted = {registry.parse_ctid(c) for c in ctids}
    ms = [m for m in repo.manifests() if not wanted or m.ctid in wanted]
    stored = repo.stored_bytes()
    logical = sum(m.size for m in ms)
    if as_json:
        emit(True, {
            "storage": repo.backend.url,
            "encrypted": repo.encrypted,
            "stored_bytes": stored,
            "dedup_ratio": round(logical / stored, 2) if stored else None,
            "snapshots": [
                {"id": m.id, "ctid": m.ctid, "time": m.time, "mode": m.mode,
                 "hostname": m.hostname, "size": m.size, "new_bytes": m.stats.get("stored_new"),
                 "files": m.stats.get("files"), "protected": m.protected,
                 "with_state": m.has_state, "notes": m.notes}
                for m in ms
            ],
        })
        return
    if not no_header:
        click.echo(f"{'SNAPSHOT':<28} {'MODE':<10} {'SIZE':>10} {'NEW':>10}  P  NOTES")
    for m in ms:
        click.echo(
            f"{m.id:<28} {m.mode + ('+state' if m.has_state else ''):<10} "
            f"{human(m.size):>10} {human(m.stats.get('stored_new', 0)):>10}  "
            f"{'*' if m.protected else ' '}  {m.notes}"
        )
    if not no_header:
        ratio = f"{logical / stored:.1f}x" if stored else "-"
        click.echo(f"{len(ms)} snapshots, {human(logical)} of data in {human(stored)} "
                   f"stored ({repo.backend.url}); dedup+compression {ratio}")


COMMANDS = [list_]
