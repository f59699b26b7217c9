"""Restore a snapshot (or a classic vzdump archive) as a container on this node.

The CT's files are built next to the final private area and swapped in only when complete;
an existing CT is replaced only with ``force`` and never while it runs. The config comes
from the backup, with this node's paths, and optionally new IPs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from vzbackup import errors as E
from vzbackup.config.ct import CTConfig
from vzbackup.config.net import validate_ip
from vzbackup.config.node import Node
from vzbackup.config.vzfile import VzFile
from vzbackup.ct import admission, fs, registry
from vzbackup.ct.container import Container
from vzbackup.engine.extract import load_tree, restore_tree
from vzbackup.engine.repo import Manifest, Repository

PATH_KEYS = ("VE_ROOT", "VE_PRIVATE")

logger = logging.getLogger(__name__)


def _ops() -> ModuleType:
    """``vzbackup.ct.ops``, imported when first used: it brings CRIU's driver (~15 ms of
    imports), which restoring a snapshot without ``--start`` or ``--with-state`` never needs."""
    from vzbackup.ct import ops

    return ops


def _target(node: Node, ctid: int, force: bool) -> Container:
    ct = Container(node, ctid)
    if ct.exists:
        if ct.running:
            raise E.StateError(
                f"CT {ctid} is running; restore never touches a running CT",
                hint="stop it first, or restore to another CTID",
            )
        if not force:
            raise E.ExistsError(
                f"CT {ctid} already exists", hint="pass --force to replace it, or pick a new CTID"
            )
    return ct


def _config(node: Node, ctid: int, conf_text: str, ipadd: list[str] | None,
            hostname: str | None, log: Callable[[str], None]) -> CTConfig:
    conf = CTConfig(ctid, VzFile(node.ct_conf_path(ctid), conf_text))
    for key in PATH_KEYS:  # this node's layout, not the source node's
        conf.set(key, node.value(key))
    if ipadd is not None:
        ips = [validate_ip(ip) for ip in ipadd]
        if ips:
            conf.set("IP_ADDRESS", " ".join(ips))
        else:
            conf.file.delete("IP_ADDRESS")
    if hostname:
        conf.set("HOSTNAME", hostname)
    for clash in admission.clashes(node, ctid, new=False, name=conf.name, ips=conf.ips):
        if clash.what == "name":  # the CT lands, nameless
            log(f"WARN: {clash.message}; the restored CT has no name")
            conf.file.delete("NAME")
        else:
            raise E.ExistsError(f"{clash.message} (the backup's address)",
                                hint="pass --ipadd NEW_IP (repeatable) or --ipadd none")
    conf.validate()
    return conf


def install(ct: Container, conf: CTConfig, build: Callable[[Path], None],
            what: str = "restore") -> None:
    """Build the private area with *build* under a hidden name next to it, then swap it (and
    the config, the name link) in; whatever fails, nothing half-made is left."""
    private = ct.ve_private(conf)
    private.parent.mkdir(parents=True, exist_ok=True)
    fresh = private.with_name(f".{private.name}.{what}-{os.getpid()}")
    try:
        build(fresh)
    except BaseException:
        fs.remove_tree(fresh, ignore_errors=True)
        raise
    old = private.with_name(f".{private.name}.old-{os.getpid()}")
    replacing, placed = ct.exists, False
    try:
        if replacing:
            if ct.mounted:
                ct.umount()
            prev = ct.ve_private()
            if prev.exists():
                os.rename(prev, old)
        if private.exists():
            raise E.ExistsError(f"private area {private} already exists")
        os.rename(fresh, private)
        placed = True
        conf.save()
        name = conf.get("NAME")
        if name:
            registry.set_name(ct.node, ct.ctid, name)
    except BaseException:
        if placed:
            fs.remove_tree(private, ignore_errors=True)
            if not replacing:
                ct.conf_path.unlink(missing_ok=True)
        if old.exists() and not private.exists():
            os.rename(old, private)
        fs.remove_tree(fresh, ignore_errors=True)
        raise
    fs.remove_tree(old, ignore_errors=True)
    try:  # the config's DISKSPACE/DISKINODES hold at once (start applies them again)
        ct.apply_quota(conf)
    except (E.VzError, OSError) as e:
        logger.warning("CT %s: disk quota not set up: %s", ct.ctid, e)


def restore_snapshot(node: Node, repo: Repository, m: Manifest, ctid: int, *,
                     force: bool = False, start: bool = False, ipadd: list[str] | None = None,
                     hostname: str | None = None, with_state: bool = False,
                     threads: int | None = None,
                     progress: Callable[[int], None] | None = None,
                     log: Callable[[str], None] = lambda s: None) -> Container:
    if with_state and not m.has_state:
        raise E.UsageError(
            f"snapshot {m.id} has no running state (mode {m.mode})",
            hint="only mode=checkpoint backups carry it; restore without --with-state",
        )
    node.ensure_dirs()
    ct = _target(node, ctid, force)
    with ct.lock():
        if ct.exists and ct.running:
            raise E.StateError(f"CT {ctid} is running; restore never touches a running CT")
        conf = _config(node, ctid, m.ct_config, ipadd, hostname, log)
        entries = load_tree(repo, repo.tree_of(m))
        log(f"INFO: restoring {m.id} ({len(entries)} entries) as CT {ctid}")

        def build(dest: Path) -> None:
            restore_tree(repo, entries, dest, threads=threads, progress=progress,
                         make_root=fs.make_private_area)

        images = None
        if with_state:
            images = _ops().dump_dir(ct, None)
            if images.exists() and any(images.iterdir()):
                raise E.ExistsError(f"dump directory {images} is not empty",
                                    hint="remove it first")
            with contextlib.suppress(OSError):
                images.rmdir()
            state = load_tree(repo, repo.state_tree_of(m) or [])
            restore_tree(repo, state, images, threads=threads)
        try:
            install(ct, conf, build)
        except BaseException:
            if images:
                shutil.rmtree(images, ignore_errors=True)
            raise
        if with_state:
            log("INFO: restoring the running state (CRIU; TCP connections are closed)")
            _ops().restore(ct, None, tcp_close=True)
        elif start:
            _ops().start(ct)
    return ct


def restore_archive(node: Node, archive: Path, ctid: int, *, force: bool = False,
                    start: bool = False, ipadd: list[str] | None = None,
                    hostname: str | None = None,
                    log: Callable[[str], None] = lambda s: None) -> Container:
    """Restore a classic ``vzdump-openvz-*.tar.{zst,xz,gz}`` archive."""
    from vzbackup.backup import vzdump_archive  # (tarfile and more: not for a snapshot)

    if not archive.is_file():
        raise E.NotFoundError(f"archive {archive} does not exist")
    node.ensure_dirs()
    ct = _target(node, ctid, force)
    with ct.lock():
        # the config is inside the archive: extract first into a scratch name, then configure
        scratch = node.path("VE_PRIVATE", ctid)
        scratch = scratch.with_name(f".{scratch.name}.import-{os.getpid()}")
        scratch.parent.mkdir(parents=True, exist_ok=True)
        try:
            conf_text = vzdump_archive.import_tar(archive, scratch)
            conf = _config(node, ctid, conf_text, ipadd, hostname, log)
            install(ct, conf, lambda dest: os.rename(scratch, dest))
        finally:
            fs.remove_tree(scratch, ignore_errors=True)
        log(f"INFO: restored {archive.name} as CT {ctid}")
        if start:
            _ops().start(ct)
    return ct


def is_archive(text: str) -> bool:
    return text.endswith((".tar", ".tar.zst", ".tar.gz", ".tgz", ".tar.xz", ".tar.lzo")) or (
        os.path.sep in text and os.path.isfile(text)
    )
