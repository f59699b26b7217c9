"""User-namespace id maps of containers and shifting a private area's ownership between them.

An unprivileged CT runs in a user namespace whose ids 0..SIZE-1 are the node's BASE..BASE+SIZE-1
(Proxmox's convention: 0..65535 -> 100000..165535); its private area is owned by those node
ids. A privileged CT runs in an identity-mapped user namespace (every id maps to itself): file
ownership is the node's, but its capabilities are relative to its own namespaces and the mounts
the node prepared for it are locked (see ``runtime``).

``shift_tree`` rewrites a tree's ownership from one map to another: owner and group of every
entry, POSIX ACL entries (system.posix_acl_access/default) and the root id of file
capabilities (security.capability v2 <-> v3), keeping setuid/setgid bits that chown clears.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from vzbackup.errors import ConfigError

log = logging.getLogger(__name__)

IDS_MAX = 1 << 32  # a uid/gid is 32 bits; (uid_t)-1 is never a valid id
IDENTITY_SIZE = IDS_MAX - 1  # "0 0 4294967295", the initial user namespace's map
OVERFLOW_ID = 65534  # what the kernel shows for an unmapped id (nobody/nogroup)

# CT config / vz.conf keys: mode and map of a CT (vz.conf gives the defaults for new CTs).
KEY_UNPRIVILEGED = "UNPRIVILEGED"
KEY_BASE = "IDMAP_BASE"
KEY_SIZE = "IDMAP_SIZE"
DEFAULT_BASE = 100000
DEFAULT_SIZE = 65536

# POSIX ACL xattr layout (linux/posix_acl_xattr.h): u32 version, then (u16 tag, u16 perm, u32 id).
ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")
ACL_VERSION = 2
ACL_HEADER = struct.Struct("<I")
ACL_ENTRY = struct.Struct("<HHI")
ACL_USER, ACL_GROUP = 0x02, 0x08
# File capabilities (linux/capability.h): v2 = magic + 2x(permitted, inheritable); v3 adds rootid.
CAP_XATTR = "security.capability"
VFS_CAP_REVISION_MASK = 0xFF000000
VFS_CAP_REVISION_2 = 0x02000000
VFS_CAP_REVISION_3 = 0x03000000
VFS_CAP_V2 = struct.Struct("<IIIII")
VFS_CAP_V3 = struct.Struct("<IIIIII")


@dataclass(frozen=True)
class IdMap:
    """One contiguous map, the same for uids and gids: CT ids 0..size-1 -> node base.."""

    base: int
    size: int

    def __post_init__(self) -> None:
        if self.size < 1 or self.base < 0 or self.base + self.size > IDS_MAX - 1:
            raise ConfigError(f"invalid id map: base {self.base}, size {self.size}")

    @property
    def identity(self) -> bool:
        return self.base == 0 and self.size == IDENTITY_SIZE

    @property
    def unprivileged(self) -> bool:
        return not self.identity

    @property
    def root(self) -> int:
        """The node id of the CT's root."""
        return self.base

    def proc_map(self) -> str:
        """The line written to /proc/PID/uid_map and gid_map."""
        return f"0 {self.base} {self.size}\n"

    def to_node(self, ct_id: int) -> int | None:
        return self.base + ct_id if 0 <= ct_id < self.size else None

    def to_ct(self, node_id: int) -> int | None:
        return node_id - self.base if self.base <= node_id < self.base + self.size else None

    def describe(self) -> str:
        if self.identity:
            return "privileged (identity map)"
        last = self.size - 1
        return f"unprivileged (CT 0..{last} -> node {self.base}..{self.base + last})"


IDENTITY = IdMap(0, IDENTITY_SIZE)


def _int_key(raw: str, key: str, default: int) -> int:
    if not raw:
        return default
    if not raw.isdigit():
        raise ConfigError(f"{key}={raw!r} is not a number")
    return int(raw)


def from_values(unprivileged: str, base: str, size: str) -> IdMap:
    """The map that UNPRIVILEGED/IDMAP_BASE/IDMAP_SIZE values describe ("" = default)."""
    if unprivileged not in ("yes", "no"):
        raise ConfigError(f"{KEY_UNPRIVILEGED}={unprivileged!r}: expected yes or no")
    if unprivileged == "no":
        return IDENTITY
    return IdMap(_int_key(base, KEY_BASE, DEFAULT_BASE), _int_key(size, KEY_SIZE, DEFAULT_SIZE))


def translate(node_id: int, src: IdMap, dst: IdMap) -> int:
    """A node id under *src* as the node id of the same CT id under *dst* (nobody if unmapped)."""
    ct_id = src.to_ct(node_id)
    if ct_id is None:
        ct_id = OVERFLOW_ID
    out = dst.to_node(ct_id)
    if out is None:
        out = dst.to_node(OVERFLOW_ID)
    return dst.base if out is None else out


def _shift_acl(raw: bytes, src: IdMap, dst: IdMap) -> bytes:
    (version,) = ACL_HEADER.unpack_from(raw)
    if version != ACL_VERSION or (len(raw) - ACL_HEADER.size) % ACL_ENTRY.size:
        return raw
    out = bytearray(raw[: ACL_HEADER.size])
    for off in range(ACL_HEADER.size, len(raw), ACL_ENTRY.size):
        tag, perm, ident = ACL_ENTRY.unpack_from(raw, off)
        if tag in (ACL_USER, ACL_GROUP):
            ident = translate(ident, src, dst)
        out += ACL_ENTRY.pack(tag, perm, ident)
    return bytes(out)


def _shift_fcaps(raw: bytes, dst: IdMap) -> bytes:
    """v2 for the identity map, v3 with the CT's root as rootid otherwise."""
    if len(raw) < VFS_CAP_V2.size:
        return raw
    magic, *caps = VFS_CAP_V2.unpack_from(raw)
    flags = magic & ~VFS_CAP_REVISION_MASK
    if magic & VFS_CAP_REVISION_MASK not in (VFS_CAP_REVISION_2, VFS_CAP_REVISION_3):
        return raw
    if dst.identity:
        return VFS_CAP_V2.pack(VFS_CAP_REVISION_2 | flags, *caps)
    return VFS_CAP_V3.pack(VFS_CAP_REVISION_3 | flags, *caps, dst.root)


def _xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise


@dataclass
class ShiftStats:
    """What shifting a tree's owners changed."""

    entries: int = 0
    acls: int = 0
    fcaps: int = 0


def _shift_one(
    path: str, st: os.stat_result, src: IdMap, dst: IdMap, stats: ShiftStats, dry_run: bool
) -> None:
    is_link = stat.S_ISLNK(st.st_mode)
    fcaps = None if is_link else _xattr(path, CAP_XATTR)
    uid, gid = translate(st.st_uid, src, dst), translate(st.st_gid, src, dst)
    if dry_run:
        acls = 0 if is_link else sum(bool(_xattr(path, n)) for n in ACL_XATTRS)
        stats.acls += acls
        stats.fcaps += bool(fcaps)
        return
    if (uid, gid) != (st.st_uid, st.st_gid):
        os.chown(path, uid, gid, follow_symlinks=False)
        if not is_link and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
            os.chmod(path, stat.S_IMODE(st.st_mode))  # chown cleared them
    if is_link:
        return
    for name in ACL_XATTRS:
        raw = _xattr(path, name)
        if raw:
            os.setxattr(path, name, _shift_acl(raw, src, dst), follow_symlinks=False)
            stats.acls += 1
    if fcaps:  # chown dropped it: write it back, with the new root id
        os.setxattr(path, CAP_XATTR, _shift_fcaps(fcaps, dst), follow_symlinks=False)
        stats.fcaps += 1


def shift_tree(top: str | Path, src: IdMap, dst: IdMap, *, dry_run: bool = False) -> ShiftStats:
    """Rewrite the ownership of everything under *top* (on one filesystem) from *src* to *dst*
    (*dry_run*: only count what would change)."""
    stats = ShiftStats()
    if src == dst:
        return stats
    top = str(top)
    dev = os.lstat(top).st_dev
    seen: set[int] = set()  # hard-linked inodes are shifted once
    stack = [top]
    while stack:
        path = stack.pop()
        st = os.lstat(path)
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
        _shift_one(path, st, src, dst, stats, dry_run)
        stats.entries += 1
        if stat.S_ISDIR(st.st_mode) and st.st_dev == dev:
            with os.scandir(path) as it:
                stack.extend(e.path for e in it)
    if not dry_run:
        log.info("shifted %d entries of %s: %s -> %s", stats.entries, top, src, dst)
    return stats


def give_images(images: str | Path, m: IdMap) -> None:
    """Hand CRIU images to the CT's root: CRIU's restored tasks open some of them (tty-info,
    ...) after taking the CT's credentials, and the node's root-only 0600 files (in a 0700
    directory) are out of reach of an unmapped id. The images are the CT's own memory; their
    directory stays the node's, searchable but not listable by others."""
    if m.identity:
        return
    mode = stat.S_IMODE(os.stat(images).st_mode)
    if not mode & stat.S_IXOTH:
        os.chmod(images, mode | stat.S_IXOTH)
    for entry in os.scandir(images):
        if (
            entry.is_file(follow_symlinks=False)
            and entry.stat(follow_symlinks=False).st_uid != m.root
        ):
            os.chown(entry.path, m.root, m.root, follow_symlinks=False)
