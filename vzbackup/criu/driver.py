"""Dump and restore a container's process tree with pycriu (criu swrk RPC).

One fresh ``pycriu.criu()`` per request; images go to a directory, CRIU's log beside them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from vzbackup.criu.check import criu_binary, pycriu_module
from vzbackup.errors import CheckpointError

DUMP_LOG = "dump.log"
RESTORE_LOG = "restore.log"


@dataclass
class DumpOptions:
    leave_running: bool = False
    tcp_established: bool = True
    file_locks: bool = True
    external: list[str] = field(default_factory=list)  # e.g. "mnt[/mnt/vol]:vol"


@dataclass
class RestoreOptions:
    root: str = ""
    tcp_established: bool = True  # tcp_close instead for a restore from a backup
    file_locks: bool = True
    veths: list[tuple[str, str]] = field(default_factory=list)  # (if_in, if_out[@bridge])
    external: list[str] = field(default_factory=list)


def _log_tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errs = [ln for ln in text if "Error" in ln or "error" in ln]
    return "\n".join((errs or text)[-lines:])


def _new(images_dir: Path, log_name: str):
    pycriu = pycriu_module()
    c = pycriu.criu()
    c.use_binary(criu_binary())
    fd = os.open(images_dir, os.O_DIRECTORY)
    c.opts.images_dir_fd = fd
    c.opts.log_file = log_name
    c.opts.log_level = 4
    return c, fd


def dump(pid: int, images_dir: Path, opts: DumpOptions) -> float:
    """Checkpoint the tree rooted at host *pid* into *images_dir*; returns seconds taken."""
    images_dir.mkdir(parents=True, exist_ok=True)
    c, fd = _new(images_dir, DUMP_LOG)
    try:
        c.opts.pid = pid
        c.opts.leave_running = opts.leave_running
        c.opts.tcp_established = opts.tcp_established
        c.opts.file_locks = opts.file_locks
        c.opts.manage_cgroups = True
        c.opts.external.extend(opts.external)
        t0 = time.monotonic()
        try:
            c.dump()
        except Exception as e:
            raise CheckpointError(
                f"CRIU dump of pid {pid} failed: {e}\n{_log_tail(images_dir / DUMP_LOG)}",
                hint=f"full log: {images_dir / DUMP_LOG}",
            ) from None
        return time.monotonic() - t0
    finally:
        os.close(fd)


def restore(images_dir: Path, opts: RestoreOptions) -> int:
    """Restore the tree from *images_dir* as a child of the caller; returns its host pid."""
    c, fd = _new(images_dir, RESTORE_LOG)
    try:
        c.opts.root = opts.root
        c.opts.rst_sibling = True
        c.opts.tcp_established = opts.tcp_established
        c.opts.tcp_close = not opts.tcp_established
        c.opts.file_locks = opts.file_locks
        c.opts.manage_cgroups = True
        c.opts.external.extend(f"veth[{if_in}]:{if_out}" for if_in, if_out in opts.veths)
        c.opts.external.extend(opts.external)
        try:
            resp = c.restore()
        except Exception as e:
            raise CheckpointError(
                f"CRIU restore from {images_dir} failed: {e}\n"
                f"{_log_tail(images_dir / RESTORE_LOG)}",
                hint=f"the images are kept; full log: {images_dir / RESTORE_LOG}",
            ) from None
        return int(resp.pid)
    finally:
        os.close(fd)
