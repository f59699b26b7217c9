"""OS templates: scripts/build-template.sh and vzbackup.template, on real files (no mocks)."""

from __future__ import annotations

import gzip
import io
import lzma
import os
import shutil
import socket
import stat
import subprocess
import tarfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from nodebed import skip_outside_ci

from vzbackup.errors import ExistsError, NotFoundError, RuntimeFailure, UsageError
from vzbackup.template.cache import TEMPLATE_SUFFIXES, available_templates, find_template
from vzbackup.template.extract import extract_template

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "build-template.sh"
NAME = "busybox-1.0-x86_64"
BUSYBOX = Path("/bin/busybox")

needs_root = skip_outside_ci(os.geteuid() != 0, reason="needs root (chroot, chown, mknod)")
pytestmark = skip_outside_ci(not BUSYBOX.is_file(), reason="busybox-static not installed")


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Template built once via the default path under VZBACKUP_PREFIX, with --all-formats."""
    base = tmp_path_factory.mktemp("template")
    scratch = base / "scratch"
    scratch.mkdir()
    env = {"VZBACKUP_PREFIX": str(base / "prefix"), "TMPDIR": str(scratch)}
    t0 = time.monotonic()
    res = run_script("--all-formats", env=env)
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    cache = base / "prefix" / "vz" / "template" / "cache"
    return {"cache": cache, "env": env, "scratch": scratch, "stderr": res.stderr, "secs": elapsed}


def archive(built: dict[str, object], suffix: str = ".tar.zst") -> Path:
    return Path(str(built["cache"])) / (NAME + suffix)


# ------------------------------------------------------------------------------ build script


def test_build_writes_all_formats_and_cleans_up(built: dict[str, object]) -> None:
    cache = Path(str(built["cache"]))
    names = sorted(p.name for p in cache.iterdir())
    assert names == sorted([NAME + s for s in TEMPLATE_SUFFIXES] + [NAME + ".tar.zst.sha256"])
    assert list(Path(str(built["scratch"])).iterdir()) == []  # temp rootfs removed
    for suffix in TEMPLATE_SUFFIXES:
        assert archive(built, suffix).stat().st_size > 500_000
    # Numeric root ownership for every member, and a sticky world-writable /tmp.
    with tarfile.open(archive(built, ".tar.xz")) as tf:
        members = tf.getmembers()
    assert {(m.uid, m.gid) for m in members} == {(0, 0)}
    tmp = next(m for m in members if m.name == "./tmp")
    assert stat.S_IMODE(tmp.mode) == 0o1777


def test_second_run_is_a_noop(built: dict[str, object]) -> None:
    files = list(Path(str(built["cache"])).iterdir())
    before = {p: p.stat().st_mtime_ns for p in files}
    out = archive(built)
    res = run_script("--all-formats", str(out), env=dict(built["env"]))  # type: ignore[arg-type]
    assert res.returncode == 0, res.stderr
    assert "up to date" in res.stderr
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_missing_copy_is_derived_and_rebuild_on_new_inputs(
    built: dict[str, object], tmp_path: Path
) -> None:
    out = tmp_path / "cache" / f"{NAME}.tar.zst"
    out.parent.mkdir()
    for suffix in (".tar.zst", ".tar.zst.sha256"):
        shutil.copy2(archive(built, suffix), out.parent / (NAME + suffix))
    res = run_script("--all-formats", str(out), env={"TMPDIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    gz = out.parent / f"{NAME}.tar.gz"
    # Reproducible archive: the copy derived from the .zst equals the one built from scratch.
    assert gz.read_bytes() == archive(built, ".tar.gz").read_bytes()

    # A different busybox binary (same program, one extra trailing byte) changes the input hash.
    bb = tmp_path / "busybox"
    bb.write_bytes(BUSYBOX.read_bytes() + b"\0")
    bb.chmod(0o755)
    old_hash = (out.parent / f"{NAME}.tar.zst.sha256").read_text()
    res = run_script(str(out), env={"TMPDIR": str(tmp_path), "BUSYBOX": str(bb)})
    assert res.returncode == 0, res.stderr
    assert "up to date" not in res.stderr
    assert (out.parent / f"{NAME}.tar.zst.sha256").read_text() != old_hash
    assert gz.read_bytes() != archive(built, ".tar.gz").read_bytes()  # refreshed, not stale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busybox", "cache"]


def test_script_rejects_bad_arguments(tmp_path: Path) -> None:
    assert run_script(str(tmp_path / "x.tar.gz")).returncode != 0
    assert run_script("--bogus").returncode != 0
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ lookup


def test_available_and_find(built: dict[str, object], tmp_path: Path) -> None:
    cache = Path(str(built["cache"]))
    assert available_templates(cache) == [NAME]
    assert find_template(cache, NAME) == archive(built, ".tar.zst")
    assert available_templates(tmp_path / "missing") == []

    (tmp_path / "other-2.0.tar.gz").write_bytes(b"")
    (tmp_path / ".hidden.tar.gz").write_bytes(b"")
    (tmp_path / "notes.txt").write_bytes(b"")
    (tmp_path / "dir.tar.xz").mkdir()
    assert available_templates(tmp_path) == ["other-2.0"]
    assert find_template(tmp_path, "other-2.0") == tmp_path / "other-2.0.tar.gz"


def test_find_errors(built: dict[str, object], tmp_path: Path) -> None:
    cache = Path(str(built["cache"]))
    with pytest.raises(NotFoundError) as exc:
        find_template(cache, "centos-7-x86_64")
    assert "centos-7-x86_64" in str(exc.value)
    assert NAME in str(exc.value)
    with pytest.raises(NotFoundError, match="none"):
        find_template(tmp_path, NAME)
    for bad in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(UsageError):
            find_template(cache, bad)


# ------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize("suffix", TEMPLATE_SUFFIXES)
def test_extract_each_format(built: dict[str, object], tmp_path: Path, suffix: str) -> None:
    dest = tmp_path / "private" / "101"
    extract_template(archive(built, suffix), dest)
    assert sorted(p.name for p in (tmp_path / "private").iterdir()) == ["101"]

    busybox = dest / "bin" / "busybox"
    assert busybox.is_file() and not busybox.is_symlink()
    assert stat.S_IMODE(busybox.stat().st_mode) == 0o755
    assert busybox.read_bytes() == BUSYBOX.read_bytes()
    init = dest / "sbin" / "init"
    assert init.is_symlink() and init.resolve() == busybox.resolve()
    assert (dest / "usr" / "sbin" / "httpd").resolve() == busybox.resolve()
    assert stat.S_IMODE((dest / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((dest / "root").stat().st_mode) == 0o700

    inittab = (dest / "etc" / "inittab").read_text()
    assert "getty" not in inittab and "askfirst" not in inittab and "tty" not in inittab
    assert "::sysinit:/etc/init.d/rcS" in inittab
    assert "::respawn:/usr/sbin/httpd -f -p 80 -h /www" in inittab
    assert "::respawn:/bin/sh /usr/local/bin/heartbeat" in inittab
    assert "::shutdown:/etc/init.d/rcK" in inittab
    assert "vzbackup busybox template" in (dest / "www" / "index.html").read_text()
    assert os.access(dest / "www" / "cgi-bin" / "status", os.X_OK)
    assert (dest / "etc" / "passwd").read_text().startswith("root:x:0:0:root:/root:/bin/sh\n")
    assert stat.S_IMODE((dest / "etc" / "shadow").stat().st_mode) == 0o600
    for d in ("proc", "sys", "dev", "run", "var/log", "var/run", "home", "usr/bin"):
        assert (dest / d).is_dir(), d
    if os.geteuid() == 0:
        assert {(p.lstat().st_uid, p.lstat().st_gid) for p in dest.rglob("*")} == {(0, 0)}


def _compress(raw: bytes, fmt: str) -> bytes:
    if fmt == "zst":
        return zstandard.ZstdCompressor(write_checksum=True).compress(raw)
    if fmt == "xz":
        return lzma.compress(raw)
    return gzip.compress(raw)


def _make_archive(
    path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], fmt: str = "gz"
) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    path.write_bytes(_compress(buf.getvalue(), fmt))
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 1_600_000_000
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def _file(name: str, data: bytes, **attrs: object) -> tuple[tarfile.TarInfo, bytes]:
    return _info(name, size=len(data), **attrs), data


@pytest.mark.parametrize("fmt", ["zst", "xz", "gz"])
def test_extract_preserves_links_modes_owners(tmp_path: Path, fmt: str) -> None:
    root = os.geteuid() == 0
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [
        (_info(".", tarfile.DIRTYPE, mode=0o755), None),
        (_info("./srv", tarfile.DIRTYPE, mode=0o2750, uid=1234, gid=5678), None),
        _file("./srv/tool", b"#!/bin/sh\n", mode=0o4755, uid=0, gid=0, mtime=1_234_567_890),
        _file("./srv/data", b"payload", mode=0o640, uid=1234, gid=5678),
        (_info("./srv/rel", tarfile.SYMTYPE, linkname="data"), None),
        (_info("./srv/abs", tarfile.SYMTYPE, linkname="/etc/passwd"), None),
        (_info("./srv/hard", tarfile.LNKTYPE, linkname="./srv/data"), None),
        (_info("./tmp", tarfile.DIRTYPE, mode=0o1777), None),
        (_info("./run", tarfile.DIRTYPE), None),
        (_info("./run/fifo", tarfile.FIFOTYPE, mode=0o600), None),
    ]
    if root:
        members.append((_info("./dev", tarfile.DIRTYPE), None))
        members.append(
            (_info("./dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3), None)
        )
    tar = _make_archive(tmp_path / f"t.tar.{fmt}", members, fmt)
    dest = tmp_path / "ct"
    extract_template(tar, dest)

    srv = dest / "srv"
    assert stat.S_IMODE(srv.stat().st_mode) == 0o2750
    assert stat.S_IMODE((srv / "tool").stat().st_mode) == 0o4755
    assert (srv / "tool").stat().st_mtime == 1_234_567_890
    assert srv.stat().st_mtime == 1_600_000_000
    assert os.readlink(srv / "rel") == "data" and (srv / "rel").read_bytes() == b"payload"
    assert os.readlink(srv / "abs") == "/etc/passwd"  # kept verbatim: absolute inside the CT
    assert (srv / "hard").stat().st_ino == (srv / "data").stat().st_ino
    assert (srv / "data").stat().st_nlink == 2
    assert stat.S_IMODE((dest / "tmp").stat().st_mode) == 0o1777
    assert stat.S_ISFIFO((dest / "run" / "fifo").lstat().st_mode)
    if root:
        assert (srv.stat().st_uid, srv.stat().st_gid) == (1234, 5678)
        assert ((srv / "data").stat().st_uid, (srv / "data").stat().st_gid) == (1234, 5678)
        null = (dest / "dev" / "null").lstat()
        assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1
        assert os.minor(null.st_rdev) == 3


def test_extract_into_existing_empty_dir(built: dict[str, object], tmp_path: Path) -> None:
    dest = tmp_path / "ct"
    dest.mkdir(mode=0o700)
    ino = dest.stat().st_ino
    extract_template(archive(built), dest)
    assert dest.stat().st_ino == ino  # filled in place (works for mountpoints and subvolumes)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755  # the archive's root entry
    assert (dest / "bin" / "busybox").is_file()
    assert not [p for p in dest.iterdir() if p.name.startswith(".partial")]

    with pytest.raises(ExistsError, match="not empty"):
        extract_template(archive(built), dest)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExistsError):
        extract_template(archive(built), tmp_path / "file")
    with pytest.raises(NotFoundError):
        extract_template(tmp_path / "nope.tar.zst", tmp_path / "ct2")


# ------------------------------------------------------------------------------ hostile archives

Builder = Callable[[Path], list[tuple[tarfile.TarInfo, bytes | None]]]


def _dotdot(outside: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [_file("./ok", b"fine"), _file("../evil", b"pwned")]


def _absolute(outside: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [_file("./ok", b"fine"), _file(str(outside / "abs"), b"pwned")]


def _symlink_to_root(outside: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [
        (_info("./escape", tarfile.SYMTYPE, linkname="/"), None),
        _file("./escape" + str(outside / "through"), b"pwned"),
    ]


def _symlink_relative_up(outside: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [
        (_info("./up", tarfile.SYMTYPE, linkname=".."), None),
        _file("./up/through", b"pwned"),
    ]


def _symlink_then_file(outside: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [
        (_info("./victim", tarfile.SYMTYPE, linkname=str(outside / "victim")), None),
        _file("./victim", b"pwned"),
    ]


def _hardlink_passwd(outside: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [(_info("./pw", tarfile.LNKTYPE, linkname="/etc/passwd"), None)]


def _hardlink_via_symlink(outside: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [
        (_info("./s", tarfile.SYMTYPE, linkname=str(outside / "victim")), None),
        (_info("./h", tarfile.LNKTYPE, linkname="./s"), None),
    ]


def _dir_swapped_for_symlink(outside: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    # 'l/d' is created through a harmless link; the link is then re-pointed outside, so the
    # deferred chmod of directory 'l/d' would hit outside/d.
    return [
        (_info("./sub", tarfile.DIRTYPE), None),
        (_info("./l", tarfile.SYMTYPE, linkname="sub"), None),
        (_info("./l/d", tarfile.DIRTYPE, mode=0o777), None),
        (_info("./l", tarfile.SYMTYPE, linkname=str(outside)), None),
    ]


@pytest.mark.parametrize(
    "builder",
    [
        _dotdot,
        _absolute,
        _symlink_to_root,
        _symlink_relative_up,
        _symlink_then_file,
        _hardlink_passwd,
        _hardlink_via_symlink,
        _dir_swapped_for_symlink,
    ],
)
def test_hostile_archive_is_refused(tmp_path: Path, builder: Builder) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("original")
    (outside / "d").mkdir(mode=0o755)
    outside.chmod(0o755)
    parent = tmp_path / "private"
    parent.mkdir()
    passwd = os.stat("/etc/passwd")
    tar = _make_archive(tmp_path / "hostile.tar.gz", builder(outside))

    with pytest.raises(RuntimeFailure, match="unsafe member"):
        extract_template(tar, parent / "ct")

    assert list(parent.iterdir()) == []  # neither dest nor a .partial dir remains
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.tar.gz", "outside", "private"]
    assert sorted(p.name for p in outside.iterdir()) == ["d", "victim"]
    assert (outside / "victim").read_text() == "original"
    assert stat.S_IMODE((outside / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE(outside.stat().st_mode) == 0o755
    now = os.stat("/etc/passwd")
    assert (now.st_nlink, now.st_mtime_ns, now.st_mode) == (
        passwd.st_nlink,
        passwd.st_mtime_ns,
        passwd.st_mode,
    )


@pytest.mark.parametrize("suffix", TEMPLATE_SUFFIXES)
@pytest.mark.parametrize("cut", ["half", "trailer", "last-byte", "header"])
def test_truncated_archive_is_refused(
    built: dict[str, object], tmp_path: Path, suffix: str, cut: str
) -> None:
    data = archive(built, suffix).read_bytes()
    size = {"half": len(data) // 2, "trailer": len(data) - 8, "last-byte": len(data) - 1}
    bad = tmp_path / (NAME + suffix)
    bad.write_bytes(data[: size.get(cut, 10)])
    parent = tmp_path / "private"
    parent.mkdir()
    with pytest.raises(RuntimeFailure, match="is corrupt"):
        extract_template(bad, parent / "ct")
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("suffix", TEMPLATE_SUFFIXES)
def test_corrupt_archive_is_refused(built: dict[str, object], tmp_path: Path, suffix: str) -> None:
    data = bytearray(archive(built, suffix).read_bytes())
    mid = len(data) // 2
    data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    bad = tmp_path / (NAME + suffix)
    bad.write_bytes(bytes(data))
    with pytest.raises(RuntimeFailure, match="is corrupt"):
        extract_template(bad, tmp_path / "ct")
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.name]


def test_garbage_and_trailing_data_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"this is not an archive" * 100)
    with pytest.raises(RuntimeFailure, match="is corrupt"):
        extract_template(junk, tmp_path / "ct")
    # A damaged header in the middle makes tarfile stop quietly; the leftover data gives it away.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name in ("a", "b", "c"):
            info, data = _file(name, name.encode() * 600)
            tf.addfile(info, io.BytesIO(data))
    raw = bytearray(buf.getvalue())
    raw[1536:1544] = b"GARBAGE!"  # header of member 'b' (a: 512 header + 1024 data)
    damaged = tmp_path / "damaged.tar.zst"
    damaged.write_bytes(_compress(bytes(raw), "zst"))
    with pytest.raises(RuntimeFailure, match="is corrupt"):
        extract_template(damaged, tmp_path / "ct")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.tar.zst", "junk.tar.gz"]


# ------------------------------------------------------------------------------ smoke: it runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, deadline: float) -> str:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@needs_root
def test_rootfs_runs_in_chroot(built: dict[str, object], tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    extract_template(archive(built), rootfs)

    res = subprocess.run(
        ["chroot", str(rootfs), "/bin/sh", "-c", "echo ok; ls /www"],
        capture_output=True, text=True, timeout=10, check=True,
    )
    assert res.stdout.split() == ["ok", "cgi-bin", "index.html"]
    for script in ("/etc/init.d/rcS", "/etc/init.d/rcK", "/usr/local/bin/heartbeat",
                   "/www/cgi-bin/status", "/etc/profile"):
        subprocess.run(["chroot", str(rootfs), "/bin/sh", "-n", script], check=True, timeout=10)

    port = _free_port()
    proc = subprocess.Popen(
        ["chroot", str(rootfs), "/usr/sbin/httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/www"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        assert "vzbackup busybox template" in _get(f"http://127.0.0.1:{port}/", deadline)
        assert "hostname: " in _get(f"http://127.0.0.1:{port}/cgi-bin/status", deadline)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()


@needs_root
def test_heartbeat_counts_and_rotates(built: dict[str, object], tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    extract_template(archive(built), rootfs)
    log = rootfs / "var" / "log" / "heartbeat"
    log.write_text("".join(f"{n} 2024-01-01T00:00:00Z\n" for n in range(1, 999)))  # 998 lines
    proc = subprocess.Popen(["chroot", str(rootfs), "/bin/sh", "/usr/local/bin/heartbeat"])
    try:
        deadline = time.monotonic() + 15
        while True:
            lines = log.read_text().splitlines()
            if len(lines) < 900 and int(lines[-1].split()[0]) >= 1001:
                break
            assert time.monotonic() < deadline, f"{len(lines)} lines, last {lines[-1]!r}"
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    counters = [int(line.split()[0]) for line in lines]
    assert counters == list(range(counters[0], counters[0] + len(counters)))  # contiguous
    assert 500 <= len(counters) < 1000
    assert lines[-1].split()[1].endswith("Z")
