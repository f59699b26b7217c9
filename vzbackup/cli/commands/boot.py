"""vzbackup boot / shutdown: the node's CTs at node start and stop (the systemd unit's verbs)."""

from __future__ import annotations

import os
from collections import Counter

import click

from vzbackup import constants as C
from vzbackup.cli.common import emit, json_option, node_of, require_root

_PARALLEL = click.option(
    "--parallel", type=click.IntRange(min=1),
    default=(os.cpu_count() or 1) * C.BOOT_PARALLEL_PER_CPU, show_default="4 per CPU",
    help="CTs of one BOOTORDER handled at once.")


def _node_run(ctx: click.Context, verb: str, parallel: int, as_json: bool,
              timeout: int | None = None):
    from vzbackup.ct.nodeboot import NodeRun

    require_root()
    say = (lambda _m: None) if as_json else (lambda m: click.echo(f"{verb}: {m}", err=True))
    return NodeRun(node_of(ctx), parallel=parallel, stop_timeout=timeout, say=say)


def _finish(ctx: click.Context, steps: list, as_json: bool) -> None:
    from vzbackup.ct.nodeboot import as_dict

    data = as_dict(steps)
    counts = Counter(s["action"] for s in data["cts"])
    emit(as_json, data, ", ".join(f"{n} {a}" for a, n in sorted(counts.items()))
         or "no CT to handle")
    if data["failed"]:
        ctx.exit(10)


@click.command()
@_PARALLEL
@json_option
@click.pass_context
def boot(ctx: click.Context, parallel: int, as_json: bool) -> None:
    """Start the ONBOOT CTs, highest BOOTORDER first (those of one order in parallel);
    a CT checkpointed at shutdown is restored. Exit 10 if any CT failed."""
    _finish(ctx, _node_run(ctx, "boot", parallel, as_json).boot(), as_json)


@click.command()
@_PARALLEL
@click.option("-t", "--timeout", type=click.IntRange(min=0),
              help="Seconds a clean halt may take (STOP_TIMEOUT).")
@json_option
@click.pass_context
def shutdown(ctx: click.Context, parallel: int, timeout: int | None, as_json: bool) -> None:
    """Stop every running CT, lowest BOOTORDER first; with VE_STOP_MODE=suspend an ONBOOT CT
    is checkpointed instead (boot restores it). Exit 10 if any CT failed."""
    _finish(ctx, _node_run(ctx, "shutdown", parallel, as_json, timeout).shutdown(), as_json)


COMMANDS = [boot, shutdown]
