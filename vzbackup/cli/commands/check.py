"""vzbackup check [CTID]: can this node checkpoint containers, and can it checkpoint this CT?"""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from vzbackup.cli.common import container, emit, json_option, node_of, require_root
from vzbackup.config.node import Node
from vzbackup.criu.blockers import blockers
from vzbackup.criu.check import criu_binary, criu_check, criu_version, pycriu_module
from vzbackup.ct import quota, registry
from vzbackup.ct.cgroups import detect_version
from vzbackup.ct.container import Container
from vzbackup.errors import CheckpointError, DependencyError, VzError


@click.command()
@click.argument("ctid", required=False)
@json_option
@click.pass_context
def check(ctx: click.Context, ctid: str | None, as_json: bool) -> None:
    """Check CRIU (>= 4.2, 'criu check'), pycriu and the cgroup layout; with CTID, list per
    process what in that running CT would make a CRIU dump fail (exit 11 if anything)."""
    require_root()
    if ctid is not None:
        _check_ct(ctx, ctid, as_json)
        return
    binary = criu_binary()
    pycriu_module()
    failed = criu_check()
    if failed is not None:
        raise DependencyError(f"'{binary} check' failed:\n{failed}")
    pipe_max = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    node = node_of(ctx)
    data = {
        "criu": binary,
        "criu_version": criu_version(),
        "criu_check": "ok",
        "cgroup_version": detect_version(),
        "pipe_max_size": pipe_max,
        "disk_quota": quota.detect(node.path("VE_PRIVATE", 0), new=True).describe(),
    }
    warnings = _quota_warnings(node)
    text = "\n".join([*(f"{k}: {v}" for k, v in data.items()),
                      *(f"WARNING: {w}" for w in warnings)])
    emit(as_json, {**data, "disk_quota_warnings": warnings}, text)


def _quota_warnings(node: Node) -> list[str]:
    """Per CT with disk limits: what its private area's filesystem leaves unenforced."""
    out = []
    for ctid in registry.list_ctids(node):
        with contextlib.suppress(VzError, OSError):
            out += [f"CT {ctid}: {p}" for p in Container(node, ctid).quota_problems()]
    return out


def _check_ct(ctx: click.Context, ident: str, as_json: bool) -> None:
    ct = container(ctx, ident)
    found = blockers(ct)
    verdict = "checkpointable" if not found else f"{len(found)} blocker(s) for a CRIU dump"
    text = "\n".join([f"CT {ct.ctid}: {verdict}", *(f"  {b}" for b in found)])
    emit(as_json, {"ctid": ct.ctid, "checkpointable": not found,
                   "blockers": [b.as_dict() for b in found]}, text)
    if found:
        raise click.exceptions.Exit(CheckpointError.exit_code)


COMMANDS = [check]
