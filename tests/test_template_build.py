"""OS templates: 'vzbackup template build|list|remove', Debian CTs, templates that can't boot.

The Debian template is the one scripts/setup.sh caches (debian_template_cache); only the failing
builds run mmdebstrap here. CTs are real: the Debian one boots systemd and its stock services.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import zstandard
from nodebed import DEBIAN_TEMPLATE_NAME, TEMPLATE_NAME, NodeBed, need, wait_for

from vzbackup.constants import TEMPLATE_BASE_PACKAGES, TEMPLATE_DEFAULT_PACKAGES
from vzbackup.errors import UsageError
from vzbackup.template import debian

USAGE, NOTFOUND, EXISTS, RUNTIME = 2, 4, 5, 10
DEAD_MIRROR = "http://127.0.0.1:9/debian"  # discard port: connection refused at once


def _cache(node: NodeBed) -> Path:
    return node.prefix / "vz/template/cache"


def _hidden(node: NodeBed) -> list[str]:
    """What a build may leave in the cache besides templates: only its lock file."""
    return sorted(p.name for p in _cache(node).iterdir() if not p.name.endswith(".lock")
                  and p.name.startswith("."))


# ------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize(
    ("name", "suite"),
    [("debian-12-x86_64", "bookworm"), ("debian-13-x86_64", "trixie"),
     ("debian-12-x86_64-web", "bookworm")],
)
def test_recipe_from_openvz_style_name(name: str, suite: str) -> None:
    r = debian.recipe_for(name, None, None)
    assert (r.suite, r.arch, r.mirror) == (suite, "amd64", "http://deb.debian.org/debian")
    assert list(r.packages) == [*TEMPLATE_BASE_PACKAGES, *TEMPLATE_DEFAULT_PACKAGES]
    assert debian.recipe_for(name, ["redis-server"], None).packages == (
        *TEMPLATE_BASE_PACKAGES, "redis-server",
    )
    assert r.inputs() != debian.recipe_for(name, [], None).inputs()


@pytest.mark.parametrize(
    ("name", "packages", "mirror", "says"),
    [
        ("debian-11-x86_64", None, None, "not a release we build"),
        ("centos-7-x86_64", None, None, "don't know how to build"),
        ("debian-12-aarch64", None, None, "don't know how to build"),
        ("../debian-12-x86_64", None, None, "invalid OS template name"),
        ("debian-12-x86_64", ["redis;rm"], None, "invalid package name"),
        ("debian-12-x86_64", ["--foo"], None, "invalid package name"),
        ("debian-12-x86_64", None, "ftp://x", "invalid mirror URL"),
    ],
)
def test_recipe_bad_input(name: str, packages: list[str] | None, mirror: str | None,
                          says: str) -> None:
    with pytest.raises(UsageError, match=says):
        debian.recipe_for(name, debian.split_packages(packages or []) if packages else None, mirror)


def test_split_packages() -> None:
    assert debian.split_packages(["a,b", "c  d", ""]) == ["a", "b", "c", "d"]


# ---------------------------------------------------------------------------------- the cache


def test_list_and_remove(debian_node: NodeBed) -> None:
    rows = json.loads(debian_node.vz("template", "list", "--json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {TEMPLATE_NAME, DEBIAN_TEMPLATE_NAME}
    deb = by_name[DEBIAN_TEMPLATE_NAME]
    assert deb["recipe"]["suite"] == "bookworm" and "redis-server" in deb["recipe"]["packages"]
    assert deb["size"] > 10**7 and by_name[TEMPLATE_NAME]["recipe"] == {}
    assert DEBIAN_TEMPLATE_NAME in debian_node.vz("template", "list").stdout

    res = debian_node.vz("template", "remove", DEBIAN_TEMPLATE_NAME)
    assert "debian-12-x86_64.tar.zst" in res.stdout
    assert not list(_cache(debian_node).glob(f"{DEBIAN_TEMPLATE_NAME}*"))
    res = debian_node.vz("template", "remove", DEBIAN_TEMPLATE_NAME, check=False)
    assert res.returncode == NOTFOUND and TEMPLATE_NAME in res.stderr  # lists what exists
    assert debian_node.vz("template", "remove", "../x", check=False).returncode == USAGE


def test_build_same_recipe_is_instant_other_recipe_refused(debian_node: NodeBed) -> None:
    res = debian_node.vz("template", "build", DEBIAN_TEMPLATE_NAME, "--json")
    assert json.loads(res.stdout)["up_to_date"] is True
    before = (_cache(debian_node) / f"{DEBIAN_TEMPLATE_NAME}.tar.zst").stat().st_mtime_ns
    res = debian_node.vz("template", "build", DEBIAN_TEMPLATE_NAME, "--packages", "cron",
                         check=False)
    assert res.returncode == EXISTS and "--force" in res.stderr
    res = debian_node.vz("template", "build", TEMPLATE_NAME, check=False)
    assert res.returncode == USAGE and "don't know how to build" in res.stderr
    assert (_cache(debian_node) / f"{DEBIAN_TEMPLATE_NAME}.tar.zst").stat().st_mtime_ns == before


def test_failed_build_leaves_nothing(node: NodeBed) -> None:
    need(shutil.which("mmdebstrap") is not None, "mmdebstrap not installed (scripts/setup.sh)")
    before = sorted(p.name for p in _cache(node).iterdir())
    res = node.vz("template", "build", "debian-12-x86_64", "--mirror", DEAD_MIRROR,
                  "--packages", "", check=False, timeout=600)
    assert res.returncode == RUNTIME, res.stderr
    assert "mmdebstrap failed to build debian-12-x86_64 from " + DEAD_MIRROR in res.stderr
    assert "127.0.0.1" in res.stderr.split("last lines:")[1]  # apt's own words on the mirror
    assert _hidden(node) == []
    assert sorted(p.name for p in _cache(node).iterdir() if not p.name.endswith(".lock")) == before


# -------------------------------------------------------------------------------- Debian CTs


def test_debian_ct_boots_systemd_and_stock_services(debian_node: NodeBed) -> None:
    ctid, _ip = debian_node.create_running("--ostemplate", DEBIAN_TEMPLATE_NAME)  # unprivileged
    wait_for(lambda: debian_node.sh(ctid, "redis-cli ping", check=False).strip() == "PONG",
             timeout=60, what="redis-server in the Debian CT")
    state = debian_node.sh(ctid, "systemctl is-system-running --wait", check=False).strip()
    assert state in ("running", "degraded"), state
    for unit in ("redis-server", "postgresql@15-main", "ssh", "cron", "systemd-journald"):
        wait_for(lambda u=unit: debian_node.sh(ctid, f"systemctl is-active {u}", check=False)
                 .strip() == "active", timeout=60, what=unit)
    # Per-CT identity: own SSH host keys and machine-id, hostname from the config.
    keys = debian_node.sh(ctid, "ls /etc/ssh/ssh_host_ed25519_key && cat /etc/machine-id")
    assert len(keys.split()[1]) == 32
    assert debian_node.sh(ctid, "hostname").strip() == f"ct{ctid}"


def test_foreign_template_name_accepted(node: NodeBed) -> None:
    """A Proxmox/OpenVZ-style tarball name works as --ostemplate as is (any .tar.{zst,gz,xz})."""
    src = _cache(node) / f"{TEMPLATE_NAME}.tar.zst"
    name = "debian-12-standard_12.7-1_amd64"
    with src.open("rb") as f, gzip.open(_cache(node) / f"{name}.tar.gz", "wb") as gz:
        zstandard.ZstdDecompressor().copy_stream(f, gz)
    assert name in node.vz("template", "list").stdout
    ctid, _ip = node.create_running("--ostemplate", name)
    assert node.sh(ctid, "echo hi").strip() == "hi"


def _tarball(path: Path, members: dict[str, bytes], mode: int = 0o644) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            tf.addfile(info, io.BytesIO(data))


def test_template_that_is_not_a_root_filesystem(node: NodeBed) -> None:
    _tarball(_cache(node) / "photos.tar.gz", {"./holiday.jpg": b"\xff\xd8"})
    _tarball(_cache(node) / "noexec.tar.gz", {"./sbin/init": b"data"})
    ctid = node.new_ctid()
    for name, says in (("photos", "/sbin/init is missing"),
                       ("noexec", "/sbin/init is not an executable file")):
        res = node.vz("create", str(ctid), "--ostemplate", name, check=False)
        assert res.returncode == USAGE, res.stderr
        assert f"OS template {name!r} is not a root filesystem: {says}" in res.stderr
        assert not (node.prefix / f"vz/private/{ctid}").exists()
        assert not (node.prefix / f"etc/vz/conf/{ctid}.conf").exists()
        assert not [p for p in (node.prefix / "vz/private").iterdir()]


def test_ct_whose_init_is_missing_refuses_to_start(node: NodeBed) -> None:
    ctid = node.new_ctid()
    node.vz("create", str(ctid))
    private = node.prefix / f"vz/private/{ctid}"
    (private / "sbin/init").unlink()
    res = node.vz("start", str(ctid), check=False)
    assert res.returncode == NOTFOUND, res.stderr
    assert f"CT {ctid} cannot start: /sbin/init is missing" in res.stderr
    assert node.vz("status", str(ctid)).stdout.count("running") == 0
    # Nothing half-made: no mount, no supervisor state, no cgroup, the private area intact.
    assert not os.path.ismount(node.prefix / f"vz/root/{ctid}")
    assert not list((node.prefix / "vz/run").glob(f"{ctid}.*"))
    assert str(node.prefix) not in Path("/proc/self/mountinfo").read_text()
    assert (private / "bin/busybox").is_file()
    (private / "sbin/init").symlink_to("/sbin/init")  # a loop, chroot-style
    res = node.vz("start", str(ctid), check=False)
    assert res.returncode == NOTFOUND and "symlink loop" in res.stderr
    (private / "sbin/init").unlink()
    (private / "sbin/init").symlink_to("../bin/busybox")
    node.vz("start", str(ctid))
    assert node.sh(ctid, "echo up").strip() == "up"
