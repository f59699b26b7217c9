"""Clone a CT: OpenVZ's "Clone a VE" recipe (copy the private area, copy and edit the config,
add the name link) as one command that leaves nothing behind when it fails.

The files come from the backup modes (``modes.consistent_source``): a stopped CT is copied
as it is while its lock is held; a running one through a read-only btrfs snapshot taken while
it is frozen (private area on a btrfs subvolume) or else suspend mode's two rsync passes, the
second while it is frozen, straight into the clone's private area. The copy itself is a
writable btrfs snapshot where source and clone share a btrfs, else ``cp`` with reflinks where
the filesystem has them, keeping hard links, ACLs, xattrs, file capabilities, devices and
holes either way.

What the clone does not inherit: the source's name and addresses (``--name``, ``--ipadd``
give it its own; without them it has none), MAC addresses and host interface names of its
bridged interfaces (new ones), its machine-id and, when the template's first-boot unit makes
them, its SSH host keys. It keeps the source's id map: every CT of a node gets vz.conf's map
(Proxmox's convention), so a clone needs no ownership shift and its files stay shared with
the source's on btrfs and reflink filesystems.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from vzbackup import constants as C
from vzbackup import errors as E
from vzbackup.backup import modes
from vzbackup.backup.restore import install
from vzbackup.config.ct import CTConfig, validate_name
from vzbackup.config.net import Netif, format_netif, validate_ip
from vzbackup.config.node import Node
from vzbackup.config.vzfile import VzFile
from vzbackup.ct import admission, fs, ops, registry
from vzbackup.ct.container import Container

# cp keeping what a private area holds: owners, modes, times, hard links, xattrs (ACLs, file
# capabilities); named rather than -a, whose "all" hides a failure to copy an xattr.
CP_ARGV = ("cp", "-dR", "--preserve=mode,ownership,timestamps,links,xattr",
           "--reflink=auto", "--sparse=auto", "-T")
PATH_KEYS = ("VE_ROOT", "VE_PRIVATE")  # the clone's own paths: the node's defaults
DROPPED_KEYS = ("NAME", "IP_ADDRESS")  # the source's; --name/--ipadd give the clone its own
SSH_KEYS_UNIT = "etc/systemd/system/vzbackup-ssh-hostkeys.service"  # template's first-boot unit
FICLONE = 0x40049409  # ioctl: share a whole file's extents (linux/fs.h)
PROGRESS_EVERY = 1.0  # seconds between progress reports (each walks the trees)


@dataclasses.dataclass
class CloneResult:
    ctid: int
    source: int
    mode: str  # how the source was held: stop (it was stopped), snapshot or suspend
    method: str  # how the files were copied: btrfs-snapshot, reflink, copy or rsync
    frozen_seconds: float
    seconds: float
    private: str
    hostname: str
    ips: list[str]
    name: str
    macs: list[str]
    reset: list[str]  # identity files reset in the clone
    idmap: str
    started: bool = False


def new_mac() -> str:
    """A random MAC in vzctl's OUI (00:18:51), as vzctl makes for veth interfaces."""
    return ":".join([C.CLONE_MAC_OUI, *(f"{b:02X}" for b in secrets.token_bytes(3))])


def _netifs(nifs: list[Netif]) -> list[Netif]:
    """Bridged interfaces for the clone: new MACs where the source had fixed ones, host
    interface names from the clone's CTID (vethNEWID.N), no addresses of the source."""
    return [dataclasses.replace(
        nif,
        mac=new_mac() if nif.mac else None,
        host_mac=new_mac() if nif.host_mac else None,
        host_ifname=None,
        ip=(),
    ) for nif in nifs]


def clone_config(node: Node, src: CTConfig, newid: int, *, name: str | None,
                 hostname: str | None, ips: list[str]) -> CTConfig:
    """The clone's CTID.conf: the source's, with this CT's paths, name, hostname, addresses
    and interfaces (everything else, the id map included, as the source has it)."""
    conf = CTConfig(newid, VzFile(node.ct_conf_path(newid), src.file.text()))
    for key in PATH_KEYS:
        conf.set(key, node.value(key))
    for key in DROPPED_KEYS:
        conf.file.delete(key)
    if name:
        conf.set("NAME", name)
    if hostname:
        conf.set("HOSTNAME", hostname)
    if ips:
        conf.set("IP_ADDRESS", " ".join(ips))
    if conf.get("NETIF"):
        conf.set("NETIF", format_netif(_netifs(conf.netifs)))
    conf.validate()
    return conf


# --- the copy --------------------------------------------------------------------------------


def _same_fs(a: Path, b: Path) -> bool:
    return fs.mount_of(a) == fs.mount_of(b)


def _reflinks(src: Path, dest: Path) -> bool:
    """Whether cp's --reflink=auto shares extents from *src* to the empty directory *dest*:
    one filesystem, and a FICLONE between two probe files in *dest* works."""
    if not _same_fs(src, dest.parent):
        return False
    probe = dest / ".vzbackup-reflink-probe"
    try:
        with open(probe, "wb+") as a, open(f"{probe}2", "wb") as b:
            a.write(b"x")
            a.flush()
            fcntl.ioctl(b.fileno(), FICLONE, a.fileno())
        return True
    except OSError:
        return False
    finally:
        for p in (probe, Path(f"{probe}2")):
            p.unlink(missing_ok=True)


def copy_tree(src: Path, dest: Path) -> str:
    """Copy the private area *src* as *dest* (absent or an empty directory); returns how."""
    if fs.is_btrfs_subvolume(src) and _same_fs(src, dest.parent):
        if dest.exists():
            fs.remove_tree(dest)
        fs.snapshot(src, dest, readonly=False)
        return "btrfs-snapshot"
    if not dest.exists():
        fs.make_private_area(dest)
    method = "reflink" if _reflinks(src, dest) else "copy"
    try:
        res = subprocess.run([*CP_ARGV, str(src), str(dest)], capture_output=True, text=True,
                             check=False)
    except FileNotFoundError:
        raise E.DependencyError("cp is missing", hint="apt-get install coreutils") from None
    if res.returncode != 0:
        lines = res.stderr.strip().splitlines()
        full = any("No space left" in line for line in lines)
        raise E.RuntimeFailure(
            f"copying {src} to {dest.parent} failed: "
            + ("no space left on the device" if full else " / ".join(lines[-3:])),
            hint="free space where the private areas live (VE_PRIVATE)" if full else None,
        )
    return method


@contextlib.contextmanager
def _copy_progress(src: Path, dest: Path,
                   progress: Callable[[int, int], None] | None) -> Iterator[None]:
    """Call *progress(copied, total)* every PROGRESS_EVERY seconds while the block copies the
    tree *src* to *dest* (a thread walks both: only for a terminal to watch)."""
    if progress is None:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        total = fs.tree_bytes(src)
        while not done.wait(PROGRESS_EVERY):
            progress(min(fs.tree_bytes(dest), total), total)

    t = threading.Thread(target=watch, name="clone-progress", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()


# --- the clone's own identity ----------------------------------------------------------------


def _real_dir(root: Path, rel: str) -> Path | None:
    """root/rel if every component is a real directory (never a symlink the CT planted)."""
    path = root
    for part in Path(rel).parts:
        path = path / part
        if path.is_symlink() or not path.is_dir():
            return None
    return path


def reset_identity(root: Path) -> list[str]:
    """Make the copied tree *root* a new machine: empty machine-id (systemd makes one at
    boot), no SSH host keys where the template's first-boot unit makes new ones."""
    reset = []
    etc = _real_dir(root, "etc")
    mid = etc / "machine-id" if etc else None
    if mid and mid.is_file() and not mid.is_symlink() and mid.stat().st_size:
        fd = os.open(mid, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
        os.close(fd)
        reset.append("/etc/machine-id")
    ssh = _real_dir(root, "etc/ssh")
    unit = root / SSH_KEYS_UNIT
    if ssh and _real_dir(root, "etc/systemd/system") and unit.is_file():
        for key in sorted(ssh.glob("ssh_host_*")):
            if key.is_file() and not key.is_symlink():
                key.unlink()
                reset.append(f"/etc/ssh/{key.name}")
    return reset


# --- the verb ---------------------------------------------------------------------------------


def _source_mode(ct: Container) -> str:
    """How a running source is held still: a btrfs snapshot where its private area is a
    subvolume, else suspend mode (rsync, freeze, rsync)."""
    private = ct.ve_private()
    if fs.is_btrfs_subvolume(private) and not fs.is_mount_point(private):
        return "snapshot"
    return "suspend"


def _discard(ct: Container, conf: CTConfig) -> None:
    """Undo an installed clone (its private area, config and name link)."""
    fs.remove_tree(ct.ve_private(conf), ignore_errors=True)
    ct.conf_path.unlink(missing_ok=True)
    if conf.name and registry.name_owner(ct.node, conf.name) == ct.ctid:
        registry.remove_name(ct.node, conf.name)


def clone(node: Node, src: Container, newid: int, *, name: str | None = None,
          hostname: str | None = None, ipadd: list[str] | None = None, start: bool = False,
          progress: Callable[[int, int], None] | None = None,
          log: Callable[[str], None] = lambda m: None) -> CloneResult:
    """Clone CT *src* as the new, stopped CT *newid* (started with *start*)."""
    t0 = time.monotonic()
    if newid == src.ctid:
        raise E.UsageError(f"CT {newid} can't be its own clone: pick a new CTID")
    ips = [validate_ip(ip) for ip in ipadd or []]
    if name:
        validate_name(name)
    new = Container(node, newid)
    node.ensure_dirs()
    with new.lock(), src.backup_lock():
        conf = clone_config(node, src.conf, newid, name=name, hostname=hostname, ips=ips)
        for clash in admission.clashes(node, newid, name=name or "", ips=ips, host=True,
                                       private=new.ve_private(conf)):
            raise clash.error()
        mode = _source_mode(src)  # for a stopped source: its private area as it is, locked
        held: dict[str, object] = {}

        def build(dest: Path) -> None:
            if mode == "suspend":
                fs.make_private_area(dest)
            with _copy_progress(src.ve_private(), dest, progress), modes.consistent_source(
                    src, mode, tmpdir=dest.parent, log=log,
                    copy_into=dest if mode == "suspend" else None) as source:
                held["mode"], held["frozen"] = source.mode, source.frozen_seconds
                held["method"] = "rsync" if source.root == dest else copy_tree(source.root, dest)
            held["reset"] = reset_identity(dest)

        install(new, conf, build, what="clone")
        try:
            new.write_dist_files(conf)
        except BaseException:
            _discard(new, conf)
            raise
        if start:
            try:
                ops.start(new)
            except E.VzError as e:
                raise type(e)(f"CT {newid} was cloned from CT {src.ctid} but did not start: "
                              f"{e}", hint=f"vzbackup start {newid}") from e
    ids = conf.idmap
    return CloneResult(
        ctid=newid, source=src.ctid, mode=str(held["mode"]), method=str(held["method"]),
        frozen_seconds=round(float(held["frozen"]), 3),  # type: ignore[arg-type]
        seconds=round(time.monotonic() - t0, 3), private=str(new.ve_private(conf)),
        hostname=conf.hostname, ips=conf.ips, name=conf.name,
        macs=[m for n in conf.netifs for m in (n.mac, n.host_mac) if m],
        reset=list(held["reset"]), idmap=ids.describe(), started=start,  # type: ignore[call-overload]
    )
