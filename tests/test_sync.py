"""Private-area transfer (migrate/sync.py) between the bed's nodes: rsync over the paramiko
session, the tar+zstd stream, fallback, failures at DEST."""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from treecmp import diff, make_rich_tree, tree_manifest
from twonode_fixture import ssh_target, twonode
from vzbackup.migrate import changes, sync
from vzbackup.migrate.rsh_bridge import main as bridge_main
from vzbackup.migrate.ssh import Session

from vzbackup.errors import DependencyError, RuntimeFailure

pytestmark = pytest.mark.slow
METHODS = ["rsync", "stream"]


@pytest.fixture(scope="module")
def rich(shared_two_nodes: twonode.TwoNodes) -> Path:
    """The rich tree on node A's side (shared, never modified)."""
    src = shared_two_nodes.dir / "rich"
    make_rich_tree(src)
    return src


@pytest.fixture
def session(shared_two_nodes: twonode.TwoNodes) -> Iterator[Session]:
    with Session(ssh_target(shared_two_nodes)) as s:
        yield s


@pytest.fixture
def work(shared_two_nodes: twonode.TwoNodes, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh directory per test (src copies and DST trees go below it)."""
    d = shared_two_nodes.dir / f"w-{request.node.name.replace('[', '-').strip(']')}"
    d.mkdir()
    try:
        yield d
    finally:
        with open("/proc/self/mountinfo") as f:
            mounts = [ln.split()[4] for ln in f if ln.split()[4].startswith(f"{d}/")]
        for m in sorted(mounts, key=len, reverse=True):  # a remote rsync may still exit
            if subprocess.run(["umount", m], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", m], check=False)
        shutil.rmtree(d, ignore_errors=True)


def same(a: Path, b: Path) -> list[str]:
    return diff(tree_manifest(a), tree_manifest(b))


def accepted_logins(bed: twonode.TwoNodes) -> int:
    return (bed.dir / "b/sshd.log").read_text().count("Accepted publickey")


@pytest.mark.parametrize("method", METHODS)
def test_push_then_incremental(
    method: str, rich: Path, session: Session, work: Path, shared_two_nodes: twonode.TwoNodes
) -> None:
    src, dst = work / "src", work / "dst"
    subprocess.run(["cp", "-a", str(rich), str(src)], check=True)
    seen: list[int] = []
    logins = accepted_logins(shared_two_nodes)
    first = sync.push_tree(session, src, str(dst), method=method, progress=seen.append)
    # the stream uses the session; rsync the OpenSSH client, once logged in for both pushes
    new_logins = 1 if method == "rsync" else 0
    assert accepted_logins(shared_two_nodes) == logins + new_logins
    assert first.method == method
    assert same(src, dst) == []
    assert seen and seen == sorted(seen) and seen[-1] == first.bytes_sent
    if method == "rsync":
        assert first.files == sum(1 for p in src.rglob("*") if p.is_file()
                                  and not p.is_symlink()) - 1  # ash is a hardlink of sh

    (src / "etc/conf7").write_text("changed\n")
    (src / "etc/conf8").unlink()
    shutil.rmtree(src / "home/user")
    (src / "new").write_bytes(os.urandom(1000))
    os.setxattr(src / "etc/conf9", "user.added", b"x")
    second = sync.push_tree(session, src, str(dst), method=method)
    assert accepted_logins(shared_two_nodes) == logins + new_logins  # the master was reused
    assert same(src, dst) == []
    assert not (dst / "etc/conf8").exists() and not (dst / "home/user").exists()
    assert not Path(f"{dst}.partial").exists()
    if method == "rsync":
        assert second.bytes_sent * 20 < first.bytes_sent
        assert second.files == 2


def test_final_sync_of_the_changed_dirs_only(rich: Path, session: Session, work: Path) -> None:
    """What a CT does between the first sync and the freeze arrives, by visiting only the
    directories a change watch recorded: writes (one through a shared mapping, no event),
    renames of files and of a whole tree, deletions, new trees, attributes, odd names."""
    src, dst = work / "src", work / "dst"
    subprocess.run(["cp", "-a", str(rich), str(src)], check=True)
    for d in ("keep/deep", "moving/sub/subsub", "moving/sub/other", "gone/inner", "mapped"):
        (src / d).mkdir(parents=True)
    for f in ("keep/deep/k", "moving/sub/subsub/m", "moving/sub/other/o", "gone/inner/g",
              "mapped/shm"):
        (src / f).write_bytes(b"0123456789" * 100)
    with open(src / "mapped/shm", "r+b") as f:
        shared = mmap.mmap(f.fileno(), 1000)  # writes through it raise no fanotify event
    watch = changes.start(src, [os.getpid()])
    assert watch is not None, "no fanotify filesystem mark on the bed's filesystem"
    try:
        sync.push_tree(session, src, str(dst), method="rsync")
        (src / "etc/conf7").write_text("setting_7 = 1\n")  # same size as before
        (src / "etc/conf8").rename(src / "home/conf8")
        (src / "etc/conf9").unlink()
        (src / "moving").rename(src / "home/moved")  # a whole tree, deep entries unchanged
        (src / "home/moved/sub/subsub/m2").write_text("new in a moved dir\n")
        shutil.rmtree(src / "gone")
        (src / "fresh/a\nb").mkdir(parents=True)  # newline: rsync's list is NUL-separated
        (src / "fresh/a\nb/f").write_text("new tree\n")
        os.chmod(src / "tmp", 0o700)
        os.symlink("conf1", src / "etc/link")
        shared[:5] = b"XXXXX"
        only = watch.changed([os.getpid()])
        assert only is not None, watch.why
        assert "keep/deep/." not in only and "bin/." not in only
        assert {"etc/.", "home/.", "home/moved/sub/subsub/.", "fresh/a\nb/.", "tmp/.",
                "mapped/.", "."} <= set(only)
        stats = sync.push_tree(session, src, str(dst), method="rsync", only_dirs=only)
        assert stats.files is not None and stats.files < 10
        assert same(src, dst) == []
        assert sync.push_tree(session, src, str(dst), only_dirs=[]).bytes_sent == 0
        os.link(src / "etc/conf10", src / "etc/conf10.link")  # rsync -H must see both names
        assert watch.changed() is None and "hard links" in watch.why
    finally:
        shared.close()
        watch.close()


@pytest.mark.parametrize("method", METHODS)
def test_no_delete_keeps_extra_files(method: str, session: Session, work: Path) -> None:
    src, dst = work / "src", work / "dst"
    (src / "d").mkdir(parents=True)
    (src / "d/f").write_text("new\n")
    (dst / "d").mkdir(parents=True)
    (dst / "d/f").write_text("old\n")
    (dst / "extra").write_text("keep me\n")
    sync.push_tree(session, src, str(dst), method=method, delete=False)
    assert (dst / "d/f").read_text() == "new\n"
    assert (dst / "extra").read_text() == "keep me\n"


def test_auto_falls_back_without_remote_rsync(
    rich: Path, session: Session, work: Path
) -> None:
    assert sync.remote_has_rsync(session)
    missing = "/nonexistent/rsync"
    assert not sync.remote_has_rsync(session, missing)
    dst = work / "dst"
    stats = sync.push_tree(session, rich, str(dst), remote_rsync=missing)
    assert stats.method == "stream" and stats.files is None
    assert same(rich, dst) == []
    with pytest.raises(DependencyError, match="rsync is missing"):
        sync.push_tree(session, rich, str(dst), method="rsync", remote_rsync=missing)
    assert sync.push_tree(session, rich, str(work / "dst2")).method == "rsync"


@pytest.mark.parametrize("method", METHODS)
def test_disk_full_at_dest(method: str, rich: Path, session: Session, work: Path) -> None:
    mnt = work / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    dst = mnt / "private"
    dst.mkdir()
    (dst / "old").write_text("previous contents\n")
    before = tree_manifest(dst)
    with pytest.raises(RuntimeFailure, match="No space left on device") as e:
        sync.push_tree(session, rich, str(dst), method=method)
    assert str(dst) in str(e.value)
    if method == "stream":  # the swap never happened and the partial tree is gone
        assert diff(before, tree_manifest(dst)) == []
        assert sorted(p.name for p in mnt.iterdir()) == ["private"]


def test_stream_into_unwritable_dest(rich: Path, session: Session, work: Path) -> None:
    (work / "file").write_text("not a directory\n")
    with pytest.raises(RuntimeFailure, match="not a directory"):
        sync.push_tree(session, rich, str(work / "file/private"), method="stream")


def test_stream_bwlimit_paces_sending(
    session: Session, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = work / "src"
    src.mkdir()
    (src / "random").write_bytes(os.urandom(3 << 20))
    now = [0.0]
    slept: list[float] = []
    monkeypatch.setattr(sync.time, "monotonic", lambda: now[0])

    def fake_sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    monkeypatch.setattr(sync.time, "sleep", fake_sleep)
    stats = sync.push_tree(session, src, str(work / "dst"), method="stream", bwlimit_kbps=512)
    assert sum(slept) == pytest.approx(stats.bytes_sent / (512 * 1024))
    assert same(src, work / "dst") == []


def test_rsync_over_the_session_without_openssh(rich: Path, session: Session, work: Path,
                                                shared_two_nodes: twonode.TwoNodes) -> None:
    logins = accepted_logins(shared_two_nodes)
    stats = sync.push_tree(session, rich, str(work / "dst"), method="rsync", via="session")
    assert accepted_logins(shared_two_nodes) == logins  # over the session: no new login
    assert stats.bytes_sent > 0 and same(rich, work / "dst") == []


def test_openssh_checks_the_same_host_key(shared_two_nodes: twonode.TwoNodes, work: Path,
                                          tmp_path: Path) -> None:
    """The OpenSSH client refuses a host whose key is not in the session's known_hosts."""
    src = work / "src"
    src.mkdir()
    (src / "f").write_text("x\n")
    with Session(ssh_target(shared_two_nodes)) as s:
        argv = s.openssh_command()
        assert argv is not None
        stranger = tmp_path / "known_hosts"
        stranger.write_text(f"{shared_two_nodes.b.lan_ip} ssh-ed25519 "
                            "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n")
        s.target.known_hosts = str(stranger)
        s._close_openssh()  # a fresh master for the changed target
        with pytest.raises(RuntimeFailure, match="rsync"):
            sync.push_tree(s, src, str(work / "dst"), method="rsync", via="openssh")
    assert not (work / "dst").exists()


def test_relay_runs_only_the_remote_rsync(session: Session) -> None:
    relay = sync._Relay(session, "rsync ", None)
    try:
        res = subprocess.run(
            [sys.executable, "-m", "vzbackup.migrate.rsh_bridge", relay.path, "-l", "root", "host",
             "touch", "/tmp/x"], capture_output=True, text=True,
        )
        assert res.returncode == 255 and "refusing" in res.stderr
        ok = subprocess.run(
            [sys.executable, "-m", "vzbackup.migrate.rsh_bridge", relay.path, "host", "rsync",
             "--version"], capture_output=True, text=True,
        )
        assert ok.returncode == 0 and "rsync" in ok.stdout
        bad = subprocess.run(
            [sys.executable, "-m", "vzbackup.migrate.rsh_bridge", relay.path, "host", "rsync",
             "--no-such-option"], capture_output=True, text=True,
        )
        assert bad.returncode == relay.remote_status != 0  # the remote status propagates
    finally:
        relay.close()
    assert bridge_main(["only-socket"]) == 255
