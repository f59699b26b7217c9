"""vzbackup drain / node-capacity: move every CT of this node to other nodes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import click

from vzbackup.cli.commands.migrate import PLAIN_WARNING, check_live_only
from vzbackup.cli.common import emit, json_option, node_of, require_root
from vzbackup.ct import registry


def _dest_list(_ctx: click.Context, _p: click.Parameter, value: str) -> list[str]:
    dests = [d.strip() for d in value.split(",") if d.strip()]
    if not dests or len(set(dests)) != len(dests):
        raise click.BadParameter("give one or more distinct [user@]host, comma-separated")
    return dests


def _summary(data: dict) -> str:
    lines = [f"{'CT':>8}  {'dest':<24} {'result':<7} {'mode':<12} {'frozen':>7} {'time':>7}"]
    for r in data["results"]:
        result = "ok" if r["ok"] else "FAILED"
        lines.append(f"{r['ctid']:>8}  {r['dest'] or '-':<24} {result:<7} {r['mode'] or '-':<12} "
                     f"{r['frozen']:7.2f} {r['seconds']:7.1f}"
                     + (f"  {r['error'].splitlines()[0]}" if r["error"] else ""))
    verb = "checked" if data["dry_run"] else "moved"
    lines.append(f"{len(data['results']) - data['failed']} {verb}, {data['failed']} failed "
                 f"in {data['seconds']:.1f}s")
    return "\n".join(lines)


@click.command()
@click.argument("dests", metavar="DEST[,DEST...]", callback=_dest_list)
@click.option("--online", is_flag=True, help="Move running CTs live (CRIU); stopped CTs move "
              "stopped. Without it running CTs are restarted at DEST.")
@click.option("--lazy/--no-lazy", default=None,
              help="Post-copy memory for --online (default: when DEST supports it).")
@click.option("--parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="CTs moved at the same time.")
@click.option("--exclude", multiple=True, metavar="CTID", help="Leave this CT here.")
@click.option("--remove-area", type=click.Choice(["yes", "no"]), default="yes",
              show_default=True, help="Remove each moved CT's private area here.")
@click.option("--plain-tcp", is_flag=True, help="Memory pages unencrypted (trusted links only).")
@click.option("--ssh-port", type=click.IntRange(1, 65535), help="SSH port (default: 22).")
@click.option("--ssh-key", help="Private key file for SSH.")
@click.option("--ssh-opt", multiple=True, metavar="KEY=VALUE", help="SSH option (see migrate).")
@click.option("--accept-new-hostkey", is_flag=True, help="Trust and record unknown host keys.")
@click.option("--dry-run", is_flag=True, help="Place the CTs and run each one's preflight only.")
@json_option
@click.pass_context
def drain(ctx: click.Context, dests: list[str], online: bool, lazy: bool | None, parallel: int,
          exclude: tuple[str, ...], remove_area: str, plain_tcp: bool, ssh_port: int | None,
          ssh_key: str | None, ssh_opt: tuple[str, ...], accept_new_hostkey: bool,
          dry_run: bool, as_json: bool) -> None:
    """Move every CT of this node to the DESTs ([user@]host, comma-separated).

    Each DEST reports its free memory and disk; the largest CTs are placed first, each onto
    the DEST with the most memory left. A CT that fails to move stays here, running as before;
    the others go on. Exit code 15 when any CT was not moved.
    """
    from vzbackup.migrate.drain import Drain
    from vzbackup.migrate.phases import MigrateOptions
    from vzbackup.migrate.ssh import Session, SSHTarget
    from vzbackup.migrate.sync import push_tree

    check_live_only(online, lazy, plain_tcp)
    if plain_tcp:
        click.echo(PLAIN_WARNING, err=True)
    require_root()
    node = node_of(ctx)
    skip = frozenset(registry.resolve(node, x) for x in exclude)
    targets = {d: SSHTarget.parse(d, port=ssh_port, key=ssh_key, opts=list(ssh_opt))
               for d in dests}  # bad syntax is refused before anything starts
    for t in targets.values():
        t.accept_new = t.accept_new or accept_new_hostkey

    @contextlib.contextmanager
    def connect(dest: str) -> Iterator[Session]:
        with Session(targets[dest]) as session:
            session.connect()
            yield session

    opts = MigrateOptions(online=online, lazy=lazy, remove_area=remove_area == "yes",
                          dry_run=dry_run, plain_pages=plain_tcp)
    say = (lambda _m: None) if as_json else (lambda m: click.echo(f"drain: {m}", err=True))
    report = Drain(node, list(targets), opts, connect=connect, push_tree=push_tree,
                   parallel=parallel, exclude=skip, say=say).run()
    data = report.as_dict()
    emit(as_json, data, _summary(data))
    if report.failed:
        ctx.exit(15)


@click.command(name="node-capacity", hidden=True)
@json_option
@click.pass_context
def node_capacity(ctx: click.Context, as_json: bool) -> None:
    """Free memory and disk of this node (what 'drain' asks each DEST)."""
    from vzbackup.migrate.drain import local_capacity

    data = local_capacity(node_of(ctx))
    emit(as_json, data, f"memory available {data['mem_available'] >> 20} MiB, disk free "
         f"{data['disk_free'] >> 20} MiB under {data['private_parent']}")


COMMANDS = [drain, node_capacity]
