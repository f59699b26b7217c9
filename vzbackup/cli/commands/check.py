"""vzbackup check: is this node able to run and checkpoint containers?"""

from __future__ import annotations

from pathlib import Path

import click

from vzbackup.cli.common import emit, json_option, require_root
from vzbackup.criu.check import criu_binary, criu_check, criu_version, pycriu_module
from vzbackup.ct.cgroups import detect_version
from vzbackup.errors import DependencyError


@click.command()
@json_option
def check(as_json: bool) -> None:
    """Check CRIU (>= 4.2, 'criu check'), pycriu and the cgroup layout."""
    require_root()
    binary = criu_binary()
    pycriu_module()
    failed = criu_check()
    if failed is not None:
        raise DependencyError(f"'{binary} check' failed:\n{failed}")
    pipe_max = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    data = {
        "criu": binary,
        "criu_version": criu_version(),
        "criu_check": "ok",
        "cgroup_version": detect_version(),
        "pipe_max_size": pipe_max,
    }
    emit(as_json, data, "\n".join(f"{k}: {v}" for k, v in data.items()))


COMMANDS = [check]
