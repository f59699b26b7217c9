"""vzdump archives (vzbackup.backup.vzdump_archive): real trees, GNU tar both ways, no mocks."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import stat
import subprocess
import tarfile
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import zstandard
from nodebed import skip_outside_ci

from vzbackup.backup.defaults import STD_EXCLUDES, ExcludeMatcher
from vzbackup.backup.vzdump_archive import (
    CONF_MEMBER,
    ExportEntry,
    archive_name,
    entries_from_dir,
    export_tar,
    import_tar,
    parse_archive_name,
    preorder,
)
from vzbackup.errors import (
    ConfigError,
    ExistsError,
    NotFoundError,
    RuntimeFailure,
    UsageError,
)

needs_root = skip_outside_ci(os.geteuid() != 0, reason="needs root (chown, mknod, xattrs)")
needs_tools = skip_outside_ci(
    not all(shutil.which(t) for t in ("setfacl", "getfacl", "zstd", "tar", "xz", "gzip")),
    reason="needs setfacl/getfacl (Debian package acl), zstd, xz, gzip and GNU tar",
)
pytestmark = [needs_root, needs_tools]

CONF = 'HOSTNAME="ct101"\nIP_ADDRESS="10.199.0.101"\n# Zürich office\nONBOOT="yes"\n'
SPARSE_SIZE = 8 << 20


# ---------------------------------------------------------------------------------- helpers


def sh(cmd: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        **kwargs,  # type: ignore[arg-type]
    )


def manifest(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[object, ...]]:
    """Everything a restore must reproduce, per relative path; hardlinks by first name."""
    paths = [str(root)]
    for dirpath, dirnames, filenames in os.walk(root):
        paths += [os.path.join(dirpath, n) for n in dirnames + filenames]
    first_name: dict[int, str] = {}
    result: dict[str, tuple[object, ...]] = {}
    for path in sorted(paths):
        rel = os.path.relpath(path, root)
        if rel in skip:
            continue
        st = os.lstat(path)
        fmt = stat.S_IFMT(st.st_mode)
        is_dir = fmt == stat.S_IFDIR
        xattrs = {
            n: os.getxattr(path, n, follow_symlinks=False)
            for n in sorted(os.listxattr(path, follow_symlinks=False))
        }
        result[rel] = (
            fmt,
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
            st.st_mtime_ns,
            None if is_dir else st.st_nlink,
            None if is_dir else first_name.setdefault(st.st_ino, rel),
            st.st_size if fmt == stat.S_IFREG else None,
            hashlib.sha256(Path(path).read_bytes()).hexdigest() if fmt == stat.S_IFREG else None,
            os.readlink(path) if fmt == stat.S_IFLNK else None,
            st.st_rdev if fmt in (stat.S_IFCHR, stat.S_IFBLK) else None,
            xattrs,
        )
    return result


WEIRD = os.fsdecode(b"weird-\xff-name")
LONG = "/".join(["d" * 60, "e" * 60, "f" * 70])


def build_tree(src: Path) -> None:
    """A private area with every kind of entry and attribute an export must carry."""
    src.mkdir(mode=0o755)
    (src / "etc").mkdir()
    (src / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    srv = src / "srv"
    srv.mkdir()
    os.chown(srv, 1234, 5678)
    srv.chmod(0o2750)
    data = srv / "data"
    data.write_bytes(b"payload " * 5000)
    os.chown(data, 1234, 5678)
    data.chmod(0o640)
    os.link(data, srv / "hard")
    os.symlink("data", srv / "rel")
    os.symlink("/etc/passwd", srv / "abs")
    os.setxattr(data, "user.test", b"hello")
    os.setxattr(data, "user.binary", b"\xff\x00\xfe\n")
    sh(f"setfacl -m u:4321:r--,g:8765:rw- {data} && setfacl -d -m u:4321:rwx,g::r-x {srv}")
    (src / "bin").mkdir()
    tool = src / "bin" / "tool"
    tool.write_bytes(b"#!/bin/sh\necho hi\n")
    tool.chmod(0o4755)
    (src / "tmp").mkdir()
    (src / "tmp").chmod(0o1777)
    (src / "run").mkdir()
    os.mkfifo(src / "run" / "fifo", 0o600)
    (src / "dev").mkdir()
    os.mknod(src / "dev" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (src / "dev" / "null").chmod(0o666)
    os.mknod(src / "dev" / "loop0", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    (src / "dev" / "loop0").chmod(0o660)
    (src / "var" / "lib").mkdir(parents=True)
    with open(src / "var" / "lib" / "disk.img", "wb") as f:  # sparse: a hole, data, a hole
        f.truncate(SPARSE_SIZE)
        f.seek(SPARSE_SIZE // 2)
        f.write(b"middle of nowhere")
    (src / WEIRD).write_text("non-UTF-8 name\n")
    (src / LONG).parent.mkdir(parents=True)
    (src / LONG).write_text("a path longer than ustar's 100 characters\n")
    (src / "empty").touch()
    # Distinct mtimes with nanoseconds, children before parents (symlinks themselves too).
    paths = sorted((p for p in src.rglob("*")), key=lambda p: len(p.parts), reverse=True)
    for n, path in enumerate([*paths, src]):
        t = 1_700_000_000_123_456_789 + n * 1_000_000_007
        os.utime(path, ns=(t, t), follow_symlinks=False)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("tree") / "src"
    build_tree(src)
    return src


@pytest.fixture(scope="module")
def exported(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dump") / archive_name(101, datetime(2026, 1, 2, 3, 4, 5))
    size = export_tar(out, entries_from_dir(tree), CONF, level=3, threads=2)
    assert size == out.stat().st_size > 0
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no .partial left
    return out


# ---------------------------------------------------------------------------------- names


def test_archive_names() -> None:
    when = datetime(2026, 11, 20, 7, 8, 9)
    name = archive_name(101, when)
    assert name == "vzdump-openvz-101-2026_11_20-07_08_09.tar.zst"
    ctid, parsed = parse_archive_name(name)  # type: ignore[misc]
    assert ctid == 101 and parsed.replace(tzinfo=None) == when and parsed.tzinfo is not None
    aware = datetime(2026, 11, 20, 7, 8, 9, tzinfo=UTC)
    assert (
        archive_name(5, aware) == f"vzdump-openvz-5-{aware.astimezone():%Y_%m_%d-%H_%M_%S}.tar.zst"
    )
    for suffix in ("tar", "tgz", "tar.gz", "tar.lzo", "tar.zst", "tar.xz"):
        assert parse_archive_name(f"/vz/dump/vzdump-openvz-7-2009_10_09-11_04_43.{suffix}") == (
            7,
            datetime(2009, 10, 9, 11, 4, 43).astimezone(),
        )
    for bad in (
        "vzdump-qemu-101-2026_11_20-07_08_09.vma.zst",
        "vzdump-openvz-101-2026_13_20-07_08_09.tar",  # month 13
        "vzdump-openvz-101-2026_11_20-07_08_09.tar.bz2",
        "vzdump-openvz-x-2026_11_20-07_08_09.tar",
        "vzdump-openvz-101-2026_11_20-07_08_09.tar.zst.partial",
        "vzdump-openvz-99999999999-2026_11_20-07_08_09.tar",
    ):
        assert parse_archive_name(bad) is None, bad
    for ctid in (-1, 2**31, True):
        with pytest.raises(UsageError):
            archive_name(ctid, when)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ round trip


def test_round_trip_every_kind(tree: Path, exported: Path, tmp_path: Path) -> None:
    src = manifest(tree)
    data = src["srv/data"]
    assert data[2:4] == (1234, 5678) and data[5] == 2  # owner; two names
    assert src["srv/hard"][6] == "srv/data"
    assert set(data[-1]) == {"system.posix_acl_access", "user.binary", "user.test"}  # type: ignore[arg-type]
    assert "system.posix_acl_default" in src["srv"][-1]  # type: ignore[operator]
    assert stat.S_IMODE(os.lstat(tree / "bin" / "tool").st_mode) == 0o4755
    assert os.lstat(tree / "var/lib/disk.img").st_blocks * 512 < SPARSE_SIZE // 4  # sparse

    dest = tmp_path / "private" / "101"
    assert import_tar(exported, dest) == CONF
    assert manifest(dest) == src
    assert os.listdir(tmp_path / "private") == ["101"]  # no .partial left
    assert not (dest / "etc" / "vzdump").exists()


def test_gnu_tar_reads_the_export(tree: Path, exported: Path, tmp_path: Path) -> None:
    sh(f"zstd -q -t {exported}")  # frame and checksum are sound
    listing = sh(f"zstd -dc {exported} | tar -tvf -").stdout.splitlines()
    assert listing[0].split()[-1] == CONF_MEMBER  # the config comes first
    assert listing[1].split()[-1] == "./"
    by_name = {line.split(" ./", 1)[1] if " ./" in line else line: line for line in listing[2:]}
    assert "srv/hard link to ./srv/data" in by_name
    assert "srv/rel -> data" in by_name and "srv/abs -> /etc/passwd" in by_name
    print("\n".join(listing))
    assert by_name["dev/null"].startswith("crw-rw-rw-") and " 1,3 " in by_name["dev/null"]
    assert by_name["dev/loop0"].startswith("brw-rw----") and " 7,0 " in by_name["dev/loop0"]
    assert by_name["run/fifo"].startswith("prw-------")
    assert by_name["bin/tool"].startswith("-rwsr-xr-x")
    assert by_name["tmp/"].startswith("drwxrwxrwt")

    gnu = tmp_path / "gnu"
    gnu.mkdir()
    sh(
        f"zstd -dc {exported} | tar -xpf - -C {gnu} --numeric-owner --acls --xattrs "
        "--xattrs-include='*' --exclude=./etc/vzdump"
    )
    assert manifest(gnu) == manifest(tree)
    assert "user:4321:r--" in sh(f"getfacl -n {gnu}/srv/data").stdout


@pytest.mark.parametrize("compress", ["", "| gzip", "| xz -T1", "| zstd -q"])
def test_import_of_gnu_tar_archive_made_like_vzdump(tmp_path: Path, compress: str) -> None:
    src = tmp_path / "src"
    build_tree(src)
    (src / "etc" / "vzdump").mkdir()
    (src / "etc" / "vzdump" / "vps.conf").write_text(CONF)
    for p in (src / "etc" / "vzdump" / "vps.conf", src / "etc" / "vzdump", src / "etc"):
        os.utime(p, ns=(1_600_000_000_000_000_001,) * 2)
    suffix = {"": "tar", "| gzip": "tgz", "| xz -T1": "tar.xz", "| zstd -q": "tar.zst"}[compress]
    archive = tmp_path / f"vzdump-openvz-101-2026_01_02-03_04_05.{suffix}"
    # vzdump's OpenVZ archive command (GNU format, GNU sparse members), plus ACLs/xattrs.
    sh(
        f"cd {src} && find . -print0 | tar cpf - --totals --sparse --numeric-owner --acls "
        f"--xattrs --xattrs-include='*' --no-recursion --one-file-system --null -T - "
        f"{compress} > {archive}"
    )
    dest = tmp_path / "ct"
    assert import_tar(archive, dest) == CONF
    assert manifest(dest) == manifest(src, skip=("etc/vzdump", "etc/vzdump/vps.conf"))
    assert os.lstat(dest / "var/lib/disk.img").st_blocks * 512 < SPARSE_SIZE // 4  # holes kept


def test_acls_from_text_records_only(tmp_path: Path) -> None:
    # tar --acls without --xattrs stores only SCHILY.acl.* text; it must still be restored.
    ref = tmp_path / "ref"
    ref.mkdir()
    sh(f"setfacl -d -m u:99:rwx {ref}")
    (ref / "f").write_text("x")
    (ref / "f").chmod(0o644)
    sh(f"setfacl -b {ref}/f && setfacl -m u:4321:r-x,g:8765:rw-,m::rwx {ref}/f")
    default = "user::rwx\nuser:99:rwx\ngroup::r-x\nmask::rwx\nother::r-x\n"
    access = "user::rw-,u:4321:r-x,group::r--,g:8765:rw-,m::rwx,other::r--"  # short forms too
    members = [
        conf_member(),
        (tarinfo("./d", tarfile.DIRTYPE, pax={"SCHILY.acl.default": default}), None),
        (tarinfo("./d/f", size=1, mode=0o674, pax={"SCHILY.acl.access": access}), b"x"),
    ]
    dest = tmp_path / "ct"
    import_tar(make_archive(tmp_path / "acl.tar", members, ""), dest)
    for path, name in (("d/f", "access"), ("d", "default")):
        want = os.getxattr(ref / path.removeprefix("d").lstrip("/"), f"system.posix_acl_{name}")
        assert os.getxattr(dest / path, f"system.posix_acl_{name}") == want
    assert sh(f"getfacl -n {dest}/d/f").stdout == sh(f"getfacl -n {ref}/f").stdout.replace(
        str(ref).lstrip("/") + "/f", str(dest).lstrip("/") + "/d/f"
    )


# ---------------------------------------------------------------------------- export rules


def test_export_leaves_out_the_cts_own_etc_vzdump_and_sockets(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "etc" / "vzdump").mkdir(parents=True)
    (src / "etc" / "vzdump" / "vps.conf").write_text("stale copy\n")
    (src / "etc" / "vzdump" / "other").write_text("x")
    os.link(src / "etc" / "vzdump" / "other", src / "etc" / "a-link")  # comes first
    os.link(src / "etc" / "vzdump" / "other", src / "etc" / "z-link")  # comes after
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(src / "sock"))
    out = tmp_path / "a.tar.zst"
    export_tar(out, entries_from_dir(src), CONF)
    names = sh(f"zstd -dc {out} | tar -tf -").stdout.splitlines()
    assert names == ["./etc/vzdump/vps.conf", "./", "./etc/", "./etc/a-link", "./etc/z-link"]
    ct = tmp_path / "ct"
    assert import_tar(out, ct) == CONF
    assert sorted(os.listdir(ct)) == ["etc"]
    assert sorted(os.listdir(ct / "etc")) == ["a-link", "z-link"]
    assert (ct / "etc/z-link").stat().st_ino == (ct / "etc/a-link").stat().st_ino

    # A hardlink whose only other name is left out goes with it.
    entries = [
        ExportEntry(".", "dir", 0o755),
        ExportEntry("etc", "dir", 0o755),
        ExportEntry("etc/vzdump", "dir", 0o755),
        ExportEntry("etc/vzdump/f", "file", size=1, read=lambda: iter([b"x"])),
        ExportEntry("etc/zz", "hardlink", link_target="etc/vzdump/f"),
    ]
    out2 = tmp_path / "b.tar.zst"
    export_tar(out2, entries, CONF)
    assert sh(f"zstd -dc {out2} | tar -tf -").stdout.split() == [CONF_MEMBER, "./", "./etc/"]


def test_entries_from_dir_excludes_and_stays_on_one_filesystem(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for d in ("tmp/sub", "var/run", "mnt/other", "keep"):
        (src / d).mkdir(parents=True)
    for f in ("tmp/a", "tmp/sub/b", "var/run/crond.pid", "var/run/utmp", "keep/x"):
        (src / f).write_text(f)
    subprocess.run(["mount", "-t", "tmpfs", "vzt", str(src / "mnt/other")], check=True)
    try:
        (src / "mnt/other/hidden").write_text("on another filesystem")
        paths = [e.path for e in entries_from_dir(src, exclude=ExcludeMatcher(STD_EXCLUDES))]
        everything = [e.path for e in entries_from_dir(src, one_file_system=False)]
    finally:
        subprocess.run(["umount", str(src / "mnt/other")], check=True)
    assert paths == [".", "keep", "keep/x", "mnt", "mnt/other", "tmp", "var", "var/run",
                     "var/run/utmp"]
    assert "mnt/other/hidden" in everything and "tmp/sub/b" in everything


def test_walk_order_is_refused_and_preorder_fixes_it(tmp_path: Path) -> None:
    # The repository's walk lists a directory's children, then descends: not depth-first.
    t = 1_650_000_000_000_000_000
    body = [b"shared data"]

    def d(path: str, n: int) -> ExportEntry:
        return ExportEntry(path, "dir", 0o750, 0, 0, t + n)

    walk_order = [
        d(".", 0),
        d("a", 1),
        d("b", 2),
        ExportEntry("file1", "file", 0o600, 7, 8, t + 3, 11, read=lambda: iter(body)),
        ExportEntry("a/x", "file", 0o644, 0, 0, t + 4, 0),
        ExportEntry("b/link", "hardlink", 0o600, 7, 8, t + 3, link_target="file1"),
        ExportEntry("b/link2", "hardlink", 0o600, 7, 8, t + 3, link_target="file1"),
    ]
    with pytest.raises(UsageError, match="out of order") as exc:
        export_tar(tmp_path / "x.tar.zst", walk_order, CONF)
    assert exc.value.hint and "preorder()" in exc.value.hint
    assert list(tmp_path.iterdir()) == []

    fixed = preorder(walk_order)
    assert [(e.path, e.kind, e.link_target) for e in fixed] == [
        (".", "dir", None),
        ("a", "dir", None),
        ("a/x", "file", None),
        ("b", "dir", None),
        ("b/link", "file", None),  # now first: it carries the data
        ("b/link2", "hardlink", "b/link"),
        ("file1", "hardlink", "b/link"),
    ]
    assert walk_order[3].kind == "file" and walk_order[5].kind == "hardlink"  # not modified
    out = tmp_path / "x.tar.zst"
    export_tar(out, fixed, CONF)
    for how in ("ours", "gnu"):
        dest = tmp_path / how
        if how == "ours":
            import_tar(out, dest)
        else:
            dest.mkdir()
            sh(f"zstd -dc {out} | tar -xpf - -C {dest} --numeric-owner --exclude=./etc/vzdump")
        assert [os.lstat(dest / p).st_mtime_ns - t for p in (".", "a", "b")] == [0, 1, 2], how
        assert (dest / "file1").read_bytes() == b"shared data", how
        assert os.lstat(dest / "file1").st_nlink == 3, how
    with pytest.raises(UsageError, match="not in the tree"):
        preorder([ExportEntry("h", "hardlink", link_target="nowhere")])


def test_export_refuses_a_file_that_changes_size(tmp_path: Path) -> None:
    def entries(size: int, chunks: list[bytes]) -> Iterator[ExportEntry]:
        yield ExportEntry(".", "dir", 0o755)
        yield ExportEntry("f", "file", size=size, read=lambda: iter(chunks))

    for size, chunks, message in (
        (10, [b"12345"], "got 5 bytes of 10"),
        (4, [b"12345"], "more than its 4 bytes"),
        (4, [b"1234", b"", b"5"], "more than its 4 bytes"),
    ):
        out = tmp_path / "x.tar.zst"
        with pytest.raises(RuntimeFailure, match=message):
            export_tar(out, entries(size, chunks), CONF)
        assert list(tmp_path.iterdir()) == []


def test_export_read_error_and_bad_entries(tmp_path: Path) -> None:
    def failing() -> Iterator[bytes]:
        yield b"ab"
        raise OSError(5, "Input/output error")

    cases: list[tuple[list[ExportEntry], type[Exception], str]] = [
        ([ExportEntry("f", "file", size=4, read=failing)], RuntimeFailure, "Input/output error"),
        ([ExportEntry("../x", "file")], UsageError, "invalid path"),
        ([ExportEntry("/abs", "file")], UsageError, "invalid path"),
        ([ExportEntry("a//b", "file")], UsageError, "invalid path"),
        ([ExportEntry("x", "socket")], UsageError, "unknown entry kind"),
        ([ExportEntry(".", "file")], UsageError, "root entry must be a directory"),
        ([ExportEntry("s", "symlink")], UsageError, "symlink without a valid target"),
        ([ExportEntry("f", "file", size=3)], UsageError, "needs a read function"),
        ([ExportEntry("h", "hardlink", link_target="f")], UsageError, "exported before it"),
        (
            [ExportEntry("d", "dir"), ExportEntry("h", "hardlink", link_target="d")],
            UsageError,
            "not a non-directory",
        ),
        ([ExportEntry("a/b", "file")], UsageError, "out of order"),
        ([ExportEntry("h", "hardlink", link_target="../f")], UsageError, "hardlink target"),
        ([ExportEntry("d", "dir"), ExportEntry("d", "dir")], UsageError, "given twice"),
    ]
    for entries, error, message in cases:
        with pytest.raises(error, match=message):
            export_tar(tmp_path / "x.tar.zst", entries, CONF)
        assert list(tmp_path.iterdir()) == [], message
    for kwargs in ({"level": 0}, {"level": 20}, {"threads": -1}):
        with pytest.raises(UsageError):
            export_tar(tmp_path / "x.tar.zst", [], CONF, **kwargs)  # type: ignore[arg-type]


def test_export_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "x.tar.zst"
    out.write_text("earlier backup")
    with pytest.raises(ExistsError, match="already exists"):
        export_tar(out, [], CONF)
    assert out.read_text() == "earlier backup"
    out2 = tmp_path / "y.tar.zst"
    (tmp_path / "y.tar.zst.partial").write_text("running")
    with pytest.raises(ExistsError, match="another export is running"):
        export_tar(out2, [], CONF)
    assert (tmp_path / "y.tar.zst.partial").read_text() == "running"  # not ours to remove
    assert not out2.exists()


# --------------------------------------------------------------------------- hostile imports

Member = tuple[tarfile.TarInfo, bytes | None]


def tarinfo(
    name: str, kind: bytes = tarfile.REGTYPE, pax: dict[str, str] | None = None, **attrs: object
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 1_600_000_000
    info.pax_headers = pax or {}
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def conf_member(text: str = CONF) -> Member:
    data = text.encode()
    return tarinfo(CONF_MEMBER, size=len(data)), data


def file_member(name: str, data: bytes) -> Member:
    return tarinfo(name, size=len(data)), data


def make_archive(path: Path, members: list[Member], fmt: str = "zst") -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    path.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(raw) if fmt else raw)
    return path


PROBE = f"vzbackup-test-probe-{uuid.uuid4().hex}"

Builder = Callable[[Path], list[Member]]
HOSTILE: dict[str, Builder] = {
    "dotdot": lambda canary: [file_member("./ok", b"fine"), file_member("../evil", b"pwned")],
    "absolute": lambda canary: [file_member(str(canary / "abs"), b"pwned")],
    "dotdot-inside": lambda canary: [file_member("./a/../../evil", b"pwned")],
    "symlink-to-etc-then-write": lambda canary: [
        (tarinfo("./x", tarfile.SYMTYPE, linkname="/etc"), None),
        file_member(f"./x/{PROBE}", b"pwned"),
    ],
    "symlink-to-canary-then-write": lambda canary: [
        (tarinfo("./x", tarfile.SYMTYPE, linkname=str(canary)), None),
        file_member("./x/victim", b"pwned"),
    ],
    "symlink-up-then-write": lambda canary: [
        (tarinfo("./up", tarfile.SYMTYPE, linkname=".."), None),
        file_member("./up/evil", b"pwned"),
    ],
    "symlink-replaced-by-file": lambda canary: [
        (tarinfo("./victim", tarfile.SYMTYPE, linkname=str(canary / "victim")), None),
        file_member("./victim", b"pwned"),
    ],
    "hardlink-to-etc-passwd": lambda canary: [
        (tarinfo("./pw", tarfile.LNKTYPE, linkname="/etc/passwd"), None)
    ],
    "hardlink-outside-relative": lambda canary: [
        (tarinfo("./pw", tarfile.LNKTYPE, linkname="../outside/victim"), None)
    ],
    "hardlink-via-symlink": lambda canary: [
        (tarinfo("./s", tarfile.SYMTYPE, linkname=str(canary / "victim")), None),
        (tarinfo("./h", tarfile.LNKTYPE, linkname="./s"), None),
    ],
    "dir-swapped-for-symlink": lambda canary: [
        (tarinfo("./sub", tarfile.DIRTYPE), None),
        (tarinfo("./l", tarfile.SYMTYPE, linkname="sub"), None),
        (tarinfo("./l/d", tarfile.DIRTYPE, mode=0o777), None),
        (tarinfo("./l", tarfile.SYMTYPE, linkname=str(canary)), None),
    ],
}


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[Path]:
    """A directory next to the destination whose contents must never change."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("original")
    (outside / "d").mkdir(mode=0o755)
    outside.chmod(0o755)
    passwd = os.stat("/etc/passwd")
    yield outside
    assert sorted(p.name for p in outside.iterdir()) == ["d", "victim"]
    assert (outside / "victim").read_text() == "original"
    assert stat.S_IMODE((outside / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE(outside.stat().st_mode) == 0o755
    assert not (tmp_path / "evil").exists()
    probe = Path("/etc") / PROBE
    if probe.exists():
        probe.unlink()
        pytest.fail("the archive wrote into /etc")
    now = os.stat("/etc/passwd")
    assert (now.st_nlink, now.st_mtime_ns, now.st_mode) == (
        passwd.st_nlink,
        passwd.st_mtime_ns,
        passwd.st_mode,
    )


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused(tmp_path: Path, canary: Path, case: str) -> None:
    archive = make_archive(tmp_path / "hostile.tar.zst", [conf_member(), *HOSTILE[case](canary)])
    parent = tmp_path / "private"
    with pytest.raises(RuntimeFailure, match="unsafe member"):
        import_tar(archive, parent / "101")
    assert list(parent.iterdir()) == []  # neither dest nor dest.partial


def test_device_nodes_only_when_allowed(tmp_path: Path, canary: Path) -> None:
    members = [
        conf_member(),
        (tarinfo("./dev", tarfile.DIRTYPE), None),
        (tarinfo("./dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660), None),
    ]
    archive = make_archive(tmp_path / "dev.tar.zst", members)
    with pytest.raises(RuntimeFailure, match="device nodes are not allowed"):
        import_tar(archive, tmp_path / "private" / "a", allow_devices=False)
    assert list((tmp_path / "private").iterdir()) == []
    import_tar(archive, tmp_path / "private" / "b")
    st = os.lstat(tmp_path / "private" / "b" / "dev" / "sda")
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(8, 0)


@pytest.mark.parametrize("cut", ["half", "checksum", "last-byte", "header"])
def test_truncated_archive_is_refused(exported: Path, tmp_path: Path, cut: str) -> None:
    data = exported.read_bytes()
    size = {"half": len(data) // 2, "checksum": len(data) - 4, "last-byte": len(data) - 1}
    bad = tmp_path / "cut.tar.zst"
    bad.write_bytes(data[: size.get(cut, 10)])
    parent = tmp_path / "private"
    with pytest.raises(RuntimeFailure, match="is corrupt"):
        import_tar(bad, parent / "101")
    assert list(parent.iterdir()) == []


def test_plain_tar_cut_at_a_member_boundary_is_refused(tmp_path: Path) -> None:
    raw = make_archive(tmp_path / "full.tar", [conf_member(), file_member("./a", b"a" * 512)], "")
    data = raw.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: data.index(b"a" * 512) + 512])  # no end-of-archive blocks
    with pytest.raises(RuntimeFailure, match="is corrupt"):
        import_tar(cut, tmp_path / "ct")
    assert not (tmp_path / "ct").exists() and not (tmp_path / "ct.partial").exists()


def test_archive_without_vps_conf(tmp_path: Path, canary: Path) -> None:
    plain = make_archive(tmp_path / "plain.tar.zst", [file_member("./etc/hostname", b"ct\n")])
    with pytest.raises(NotFoundError, match=r"has no \./etc/vzdump/vps\.conf") as exc:
        import_tar(plain, tmp_path / "private" / "1")
    assert exc.value.exit_code == 4
    pct = [file_member("./etc/vzdump/pct.conf", b"arch: amd64\n"), file_member("./f", b"x")]
    lxc = make_archive(tmp_path / "lxc.tar.zst", pct)
    with pytest.raises(NotFoundError) as exc:
        import_tar(lxc, tmp_path / "private" / "2")
    assert exc.value.hint and "LXC" in exc.value.hint
    assert list((tmp_path / "private").iterdir()) == []


def test_vps_conf_must_be_a_small_text_file(tmp_path: Path) -> None:
    link = tarinfo(CONF_MEMBER, tarfile.SYMTYPE, linkname="/etc/shadow")
    cases = {
        "symlink": ([(link, None)], "not a regular file"),
        "binary": ([file_member(CONF_MEMBER, b"\xff\xfe")], "not UTF-8"),
        "huge": ([file_member(CONF_MEMBER, b"#" * ((1 << 20) + 1))], "too large"),
    }
    for name, (members, message) in cases.items():
        archive = make_archive(tmp_path / f"{name}.tar.zst", members)
        with pytest.raises(ConfigError, match=message):
            import_tar(archive, tmp_path / "private" / name)
    assert list((tmp_path / "private").iterdir()) == []


def test_unsupported_and_damaged_inputs(tmp_path: Path) -> None:
    lzo = tmp_path / "vzdump-openvz-101-2010_01_01-00_00_00.tar.lzo"
    lzo.write_bytes(b"\x89LZO\x00\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(UsageError, match=r"\.tar\.lzo archives are not supported") as exc:
        import_tar(lzo, tmp_path / "a")
    assert exc.value.hint and "lzop -dc" in exc.value.hint
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive at all" * 50)
    with pytest.raises(RuntimeFailure, match="is corrupt"):
        import_tar(junk, tmp_path / "b")
    with pytest.raises(NotFoundError):
        import_tar(tmp_path / "missing.tar.zst", tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == [junk.name, lzo.name]


def test_import_never_overwrites(exported: Path, tmp_path: Path) -> None:
    dest = tmp_path / "ct"
    dest.mkdir()
    with pytest.raises(ExistsError, match="already exists"):
        import_tar(exported, dest)
    other = tmp_path / "other"
    (tmp_path / "other.partial").mkdir()
    (tmp_path / "other.partial" / "busy").write_text("someone else's")
    with pytest.raises(ExistsError, match="another import is running"):
        import_tar(exported, other)
    assert (tmp_path / "other.partial" / "busy").read_text() == "someone else's"
    assert not other.exists()
