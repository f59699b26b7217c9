"""Test harness: a fresh node prefix per test, the real busybox template, real CLI runs.

Every CT a test starts is stopped and every prefix removed afterwards, even on failure.
In CI (CI=true) a missing component fails the run instead of skipping. Helpers the tests
import live in nodebed.py; this file holds only fixtures.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodebed import (
    DEBIAN_TEMPLATE_BUILD_TIMEOUT,
    DEBIAN_TEMPLATE_NAME,
    DEMO_PREFIX,
    ROOT,
    TEMPLATE_NAME,
    NodeBed,
    link_or_copy,
    need,
)
from s3fixture import s3_bucket, s3_lock_bucket, s3_server  # noqa: F401 - fixtures
from sinks import smtp, web, web500  # noqa: F401 - fixtures
from twonode_fixture import shared_two_nodes, two_nodes  # noqa: F401 - fixtures

from vzbackup.ct import fs


@pytest.fixture(scope="session")
def template_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need(os.geteuid() == 0, "tests need root")
    cache = tmp_path_factory.mktemp("template-cache")
    out = cache / f"{TEMPLATE_NAME}.tar.zst"
    subprocess.run(
        ["bash", str(ROOT / "scripts/build-template.sh"), str(out)], check=True, capture_output=True
    )
    return cache


@pytest.fixture(scope="session")
def debian_template_cache() -> Iterator[Path]:
    """A directory holding debian-12-x86_64.tar.zst (+ its recipe), as scripts/setup.sh caches it.

    Built into DEMO_PREFIX's cache (under the template's lock) when missing: several minutes.
    """
    need(os.geteuid() == 0, "tests need root")
    cache = DEMO_PREFIX / "vz/template/cache"
    tarball = cache / f"{DEBIAN_TEMPLATE_NAME}.tar.zst"
    if not tarball.is_file():
        need(shutil.which("mmdebstrap") is not None, "mmdebstrap not installed (scripts/setup.sh)")
        subprocess.run(
            [sys.executable, "-m", "vzbackup.cli", "--prefix", str(DEMO_PREFIX),
             "template", "build", DEBIAN_TEMPLATE_NAME],
            check=True, capture_output=True, timeout=DEBIAN_TEMPLATE_BUILD_TIMEOUT,
        )
    held = Path(tempfile.mkdtemp(prefix="vzt-debian-template-", dir="/var/tmp"))
    try:  # our own links: a concurrent 'template remove' in the demo prefix can't pull it away
        for f in cache.glob(f"{DEBIAN_TEMPLATE_NAME}.tar.zst*"):
            link_or_copy(f, held)
        yield held
    finally:
        shutil.rmtree(held, ignore_errors=True)


def _bed(*caches: Path) -> Iterator[NodeBed]:
    prefix = Path(tempfile.mkdtemp(prefix="vzt-", dir="/var/tmp"))
    cache = prefix / "vz/template/cache"
    cache.mkdir(parents=True)
    for src in caches:
        for f in src.iterdir():
            link_or_copy(f, cache)
    bed = NodeBed(prefix)
    try:
        yield bed
    finally:
        bed.cleanup()


@pytest.fixture
def node(template_cache: Path) -> Iterator[NodeBed]:
    yield from _bed(template_cache)


@pytest.fixture(scope="module")
def module_node(template_cache: Path) -> Iterator[NodeBed]:
    """``node`` shared by one module's tests."""
    yield from _bed(template_cache)


@pytest.fixture
def debian_node(template_cache: Path, debian_template_cache: Path) -> Iterator[NodeBed]:
    """Like ``node``, with the Debian 12 template in the cache too (create --ostemplate it)."""
    yield from _bed(template_cache, debian_template_cache)


@pytest.fixture(scope="module")
def debian_module_node(template_cache: Path, debian_template_cache: Path) -> Iterator[NodeBed]:
    """``debian_node`` shared by one module's tests (they reuse one started Debian CT)."""
    yield from _bed(template_cache, debian_template_cache)


@pytest.fixture
def criu_ready() -> None:
    from vzbackup.criu.check import criu_binary, pycriu_module
    from vzbackup.errors import DependencyError

    try:
        criu_binary()
        pycriu_module()
    except DependencyError as e:
        need(False, str(e))


@pytest.fixture
def btrfs_node(node: NodeBed) -> Iterator[NodeBed]:
    """The bed with a 300 MB loopback btrfs mounted on vz/private; all undone afterwards."""
    img_dir = Path(tempfile.mkdtemp(prefix="vzt-btrfs-", dir="/var/tmp"))
    img = img_dir / "private.img"
    mnt = node.prefix / "vz/private"
    mnt.mkdir(parents=True, exist_ok=True)
    loop = ""
    try:
        subprocess.run(["truncate", "-s", "300M", str(img)], check=True)
        subprocess.run(["mkfs.btrfs", "-q", str(img)], check=True, capture_output=True)
        loop = subprocess.run(
            ["losetup", "--find", "--show", str(img)], check=True, capture_output=True, text=True
        ).stdout.strip()
        subprocess.run(["mount", "-t", "btrfs", loop, str(mnt)], check=True)
        assert fs.fs_type(mnt) == "btrfs"
        yield node
    finally:
        run = node.prefix / "vz/run"
        for state in run.glob("*.state") if run.is_dir() else []:
            node.vz("stop", "--fast", state.stem, check=False, timeout=90)
        with open("/proc/self/mountinfo") as f:
            below = [ln.split()[4] for ln in f if ln.split()[4].startswith(f"{node.prefix}/")]
        for m in sorted(below, key=len, reverse=True):  # CT roots bound from the btrfs first
            subprocess.run(["umount", m], capture_output=True, check=False)
        for _ in range(50):
            if not os.path.ismount(mnt):
                break
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        else:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            img.unlink()
            img_dir.rmdir()
