"""Compare directory trees by everything a backup must reproduce (test helper)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path


def tree_manifest(root: Path, *, mtimes: bool = True, xattrs: bool = True,
                  skip: tuple[str, ...] = ()) -> dict[str, tuple]:
    """By relative path: type, permission bits, uid, gid, then size + sha256 + allocated-less
    flag (regular files), target (symlinks) or rdev (devices), hardlink group, xattrs and
    mtime (not for directories: their times differ between copies). Directories named in
    *skip* (relative paths) are not entered: a running CT changes them under the walk."""
    root = Path(root)
    out: dict[str, tuple] = {}
    inodes: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        dirnames[:] = sorted(d for d in dirnames
                             if (d if rel_dir == "." else f"{rel_dir}/{d}") not in skip)
        for name in sorted([*dirnames, *filenames]):
            p = Path(dirpath, name)
            rel = p.relative_to(root).as_posix()
            st = os.lstat(p)
            entry: tuple = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                            st.st_gid)
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 20), b""):
                        h.update(block)
                sparse = st.st_blocks * 512 < st.st_size // 2
                entry += (st.st_size, h.hexdigest(), sparse)
                if st.st_nlink > 1:
                    entry += ("link:" + inodes.setdefault((st.st_dev, st.st_ino), rel),)
            elif stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(p),)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry += (st.st_rdev,)
            if xattrs and not stat.S_ISLNK(st.st_mode):
                entry += (tuple(sorted((n, os.getxattr(p, n)) for n in os.listxattr(p))),)
            if mtimes and not stat.S_ISDIR(st.st_mode):
                entry += (st.st_mtime_ns,)
            out[rel] = entry
    return out


def diff(a: dict[str, tuple], b: dict[str, tuple]) -> list[str]:
    """Human-readable differences (empty when equal)."""
    out = [f"only in first: {k}" for k in sorted(a.keys() - b.keys())]
    out += [f"only in second: {k}" for k in sorted(b.keys() - a.keys())]
    out += [f"differs: {k}: {a[k]} != {b[k]}" for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]
    return out


def make_rich_tree(root: Path) -> None:
    """A tree with every kind of entry and metadata a CT private area can hold."""
    root.mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    for i in range(300):  # many small files, some identical
        (root / "etc" / f"conf{i}").write_text(f"setting_{i % 50} = {i % 7}\n" * (1 + i % 13))
    (root / "bin").mkdir()
    data = os.urandom(3 << 20)
    (root / "bin/big").write_bytes(data + data[: 1 << 20])  # large file, repeats inside
    (root / "bin/sh").write_bytes(b"\x7fELF" + os.urandom(100_000))
    os.link(root / "bin/sh", root / "bin/ash")  # hardlink pair
    os.symlink("sh", root / "bin/busybox")
    os.symlink("/etc/passwd", root / "bin/abs-link")  # absolute target: stays as is
    (root / "empty").write_bytes(b"")
    with open(root / "sparse", "wb") as f:  # 64 MiB with two data islands
        f.seek(10 << 20)
        f.write(b"island one" * 1000)
        f.seek(60 << 20)
        f.write(b"island two")
        f.truncate(64 << 20)
    (root / "dev").mkdir()
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "dev/loop9", 0o660 | stat.S_IFBLK, os.makedev(7, 9))
    os.mkfifo(root / "dev/fifo")
    (root / "home").mkdir()
    (root / "home/user").mkdir(mode=0o700)
    (root / "home/user/file").write_text("owned by 1234\n")
    os.chown(root / "home/user", 1234, 5678)
    os.chown(root / "home/user/file", 1234, 5678)
    os.chown(root / "bin/busybox", 42, 43, follow_symlinks=False)
    (root / "bin/suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "bin/suid", 0o4755)
    (root / "tmp").mkdir(mode=0o1777)
    os.chmod(root / "tmp", 0o1777)
    os.setxattr(root / "etc/passwd", "user.test", b"hello")
    os.setxattr(root / "etc/passwd", "trusted.secret", b"\x00\x01")
    os.system(f"setfacl -m u:1234:r {root}/etc/conf1 && setfacl -d -m g:5678:rx {root}/home")
    os.utime(root / "etc/conf2", ns=(1_000_000_123, 1_234_567_891_234_567_891))
