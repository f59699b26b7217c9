"""vzbackup.safetar: the ownership-shift hook of extraction, for templates and vzdump imports.

Real files, real chown/xattrs (root only); the shift is a plain offset map like a CT's
user-namespace id map (0..65535 -> 100000..165535).
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nodebed import skip_outside_ci

from vzbackup.backup.vzdump_archive import entries_from_dir, export_tar, import_tar
from vzbackup.safetar import CorruptArchive, UnsafeMember, extract, open_stream
from vzbackup.template.extract import extract_template

pytestmark = skip_outside_ci(os.geteuid() != 0, reason="needs root (chown to other ids)")
BASE = 100000


@dataclass
class OffsetShift:
    """CT ids 0..65535 -> node BASE.. ; xattrs get a marker so the test sees they went through."""

    seen: list[str] = field(default_factory=list)

    def shift_id(self, node_id: int) -> int:
        return BASE + node_id if node_id < 65536 else BASE + 65534

    def shift_xattr(self, name: str, value: bytes) -> bytes:
        self.seen.append(name)
        return value + b"-shifted" if name.startswith("user.") else value


def _member(name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0, data: bytes = b"",
            link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.size = kind, mode, uid, gid, len(data)
    info.linkname, info.mtime = link, 1700000000
    return info, data


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data else None)
    return path


def test_template_extraction_shifts_owners_and_keeps_special_modes(tmp_path: Path) -> None:
    tar = _tar(tmp_path / "t.tar.gz", [
        _member(".", tarfile.DIRTYPE, 0o755),
        _member("./sbin", tarfile.DIRTYPE, 0o755),
        _member("./sbin/init", tarfile.REGTYPE, 0o4755, data=b"#!/bin/sh\n"),
        _member("./tmp", tarfile.DIRTYPE, 0o1777),
        _member("./srv", tarfile.DIRTYPE, 0o2775, uid=33, gid=33),
        _member("./srv/f", tarfile.REGTYPE, 0o644, uid=1000, gid=100, data=b"x"),
        _member("./srv/g", tarfile.LNKTYPE, 0o644, uid=1000, gid=100, link="./srv/f"),
        _member("./big", tarfile.REGTYPE, 0o600, uid=70000, gid=70000, data=b"y"),
        _member("./l", tarfile.SYMTYPE, 0o777, uid=5, gid=5, link="sbin/init"),
    ])
    dest = tmp_path / "ct"
    extract_template(tar, dest, shift=OffsetShift())
    owners = {p: (os.lstat(dest / p).st_uid, os.lstat(dest / p).st_gid)
              for p in (".", "sbin/init", "tmp", "srv", "srv/f", "srv/g", "big", "l")}
    assert owners == {
        ".": (BASE, BASE), "sbin/init": (BASE, BASE), "tmp": (BASE, BASE),
        "srv": (BASE + 33, BASE + 33), "srv/f": (BASE + 1000, BASE + 100),
        "srv/g": (BASE + 1000, BASE + 100), "big": (BASE + 65534, BASE + 65534),
        "l": (BASE + 5, BASE + 5),
    }
    assert stat.S_IMODE(os.stat(dest / "sbin/init").st_mode) == 0o4755  # chown didn't eat it
    assert stat.S_IMODE(os.stat(dest / "tmp").st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(dest / "srv").st_mode) == 0o2775
    # Without a shift, numeric owners go in as they are.
    plain = tmp_path / "plain"
    extract_template(tar, plain)
    assert (os.stat(plain / "srv/f").st_uid, os.stat(plain / "big").st_gid) == (1000, 70000)


def test_vzdump_import_shifts_owners_and_passes_xattrs_through_the_hook(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc/app.conf").write_text("k=v\n")
    os.chown(src / "etc/app.conf", 1000, 1000)
    os.setxattr(src / "etc/app.conf", "user.tag", b"v1")
    archive = tmp_path / "vzdump-openvz-101-2026_01_01-00_00_00.tar.zst"
    export_tar(archive, entries_from_dir(src), 'HOSTNAME="ct"\n')
    shift = OffsetShift()
    import_tar(archive, tmp_path / "ct", shift=shift)
    st = os.stat(tmp_path / "ct/etc/app.conf")
    assert (st.st_uid, st.st_gid) == (BASE + 1000, BASE + 1000)
    assert os.getxattr(tmp_path / "ct/etc/app.conf", "user.tag") == b"v1-shifted"
    assert "user.tag" in shift.seen
    assert os.stat(tmp_path / "ct").st_uid == BASE


def test_extract_refuses_escapes_and_trailing_garbage(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    bad = _tar(tmp_path / "bad.tar.gz", [_member("../evil", tarfile.REGTYPE, 0o644, data=b"x")])
    with open_stream(bad) as stream, pytest.raises(UnsafeMember, match=r"'\.\.' component"):
        extract(stream, str(root))
    assert not (tmp_path / "evil").exists()
    plain = tmp_path / "p.tar"
    with tarfile.open(plain, "w") as tf:
        info, _ = _member("f", tarfile.REGTYPE, 0o644)
        tf.addfile(info)
    with plain.open("ab") as f:
        f.write(b"garbage" * 2000)
    with open_stream(plain) as stream, pytest.raises(CorruptArchive, match="after the end"):
        extract(stream, str(root))
