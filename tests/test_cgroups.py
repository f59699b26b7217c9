"""Tests for vzbackup.ct.cgroups against the real cgroups of this host (root required).

Every cgroup is named ``vzbackup-test/<pid>-<n>`` and is killed and destroyed in the fixture
teardown, also when a test fails; only processes started here are killed.  On a hybrid v1 host
the controller-independent tests also run against the empty cgroup2 mount at
/sys/fs/cgroup/unified, which exercises the v2 code path.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nodebed import skip_outside_ci

from vzbackup.ct.cgroups import (
    V1_DEVICE_RULES,
    CgroupSet,
    Limits,
    _format_cpulist,
    _parse_cpulist,
    _v1_mounts,
    detect_version,
    open_cgroups,
)
from vzbackup.ct.cgroups.devices import attached_count
from vzbackup.errors import RuntimeFailure

DEFAULT_ROOT = "/sys/fs/cgroup"
HYBRID_V2_ROOT = "/sys/fs/cgroup/unified"
MIB = 1024 * 1024

pytestmark = [
    skip_outside_ci(os.geteuid() != 0, reason="needs root to create cgroups"),
    skip_outside_ci(not os.path.isdir(DEFAULT_ROOT), reason="no /sys/fs/cgroup"),
]

HOST_VERSION = detect_version(DEFAULT_ROOT)
ROOTS = [DEFAULT_ROOT]
if HOST_VERSION == 1 and detect_version(HYBRID_V2_ROOT) == 2:
    ROOTS.append(HYBRID_V2_ROOT)

_counter = itertools.count()


class Env:
    """Creates cgroups and processes for one test and cleans all of them up."""

    def __init__(self) -> None:
        self.sets: list[CgroupSet] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def cgroup(self, root: str = DEFAULT_ROOT, *, create: bool = True) -> CgroupSet:
        cg = open_cgroups(f"vzbackup-test/{os.getpid()}-{next(_counter)}", root=root)
        self.sets.append(cg)
        if create:
            cg.create()
        return cg

    def spawn(self, cg: CgroupSet | None, argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        """Start argv already inside ``cg`` (attached in the child before exec)."""
        preexec: Callable[[], None] | None = None
        if cg is not None:
            target = cg

            def preexec() -> None:
                target.attach(os.getpid())

        proc = subprocess.Popen(argv, preexec_fn=preexec, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for cg in self.sets:
            with contextlib.suppress(Exception):
                cg.kill_all()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        errors = []
        for cg in self.sets:
            try:
                cg.destroy()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def env() -> Iterator[Env]:
    e = Env()
    try:
        yield e
    finally:
        e.cleanup()


@pytest.fixture(scope="module", autouse=True)
def _tidy_test_parent() -> Iterator[None]:
    """Remove the shared ``vzbackup-test`` parent at the end if it is empty.

    CgroupSet.destroy() only removes intermediates its own create() made, so a parent
    shared with a concurrent run may stay behind; rmdir of a non-empty one just fails.
    """
    yield
    for root in ROOTS:
        for path in set(open_cgroups("vzbackup-test", root=root).controller_paths().values()):
            with contextlib.suppress(OSError):
                os.rmdir(path)


def _parent_cpus(cg: CgroupSet) -> list[int]:
    leaf = cg.controller_paths()["unified" if cg.version == 2 else "cpuset"]
    parent = os.path.dirname(leaf)
    name = "cpuset.cpus.effective" if cg.version == 2 else "cpuset.effective_cpus"
    return _parse_cpulist(Path(parent, name).read_text())


def _wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


# --------------------------------------------------------------------------- pure helpers


def test_detect_version(tmp_path: Path) -> None:
    expected = 2 if os.path.exists(f"{DEFAULT_ROOT}/cgroup.controllers") else 1
    assert detect_version() == expected
    assert detect_version(str(tmp_path)) == 1
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    assert detect_version(str(tmp_path)) == 2


def test_v1_mounts_from_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "31 23 0:28 / /cg rw - tmpfs tmpfs rw\n"
        "32 31 0:29 / /cg/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "34 31 0:31 / /cg/my\\040mem rw shared:9 - cgroup cgroup rw,memory\n"
        "35 31 0:32 / /elsewhere/pids rw - cgroup cgroup rw,pids\n"
        "40 31 0:37 / /cg/systemd rw - cgroup cgroup rw,xattr,name=systemd\n"
        "41 31 0:38 / /cg/unified rw - cgroup2 cgroup2 rw\n"
        "42 31 0:29 / /cg/again rw - cgroup cgroup rw,cpu,cpuacct\n"
    )
    assert _v1_mounts("/cg", str(info)) == {
        "cpu": "/cg/cpu,cpuacct",
        "cpuacct": "/cg/cpu,cpuacct",
        "memory": "/cg/my mem",
        "name=systemd": "/cg/systemd",
        "unified": "/cg/unified",
    }


def test_cpulist_helpers() -> None:
    assert _parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert _format_cpulist([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert _format_cpulist([0]) == "0"
    assert _format_cpulist([]) == ""


@pytest.mark.parametrize("name", ["", "/abs", "a/../b", "a//b", "./a"])
def test_bad_names(name: str) -> None:
    with pytest.raises(ValueError):
        open_cgroups(name)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory_bytes": -1},
        {"swap_bytes": -5},
        {"pids_max": -1},
        {"cpus": -2},
        {"cpulimit_percent": -10},
        {"cpuunits": 7},
        {"cpuunits": 500_001},
        {"pids_max": True},
        {"memory_bytes": 1.5},
    ],
)
def test_invalid_limits_raise_value_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Limits(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- real cgroups


@pytest.mark.parametrize("root", ROOTS)
def test_create_is_idempotent(env: Env, root: str) -> None:
    cg = env.cgroup(root)
    cg.create()
    paths = cg.controller_paths()
    assert paths
    assert all(os.path.isdir(p) for p in paths.values())
    if cg.version == 2:
        assert set(paths) == {"unified"}
        return
    assert {"memory", "cpu", "cpuset", "pids", "freezer"} <= set(paths)
    assert "systemd" not in paths
    # every level of the v1 cpuset got cpus/mems, else nothing could be attached
    leaf = Path(paths["cpuset"])
    for level in (leaf, leaf.parent):
        assert (level / "cpuset.cpus").read_text().strip()
        assert (level / "cpuset.mems").read_text().strip()
    if "devices" in paths:
        rules = Path(paths["devices"], "devices.list").read_text().split("\n")
        assert {r for r in rules if r} == set(V1_DEVICE_RULES)


def test_limits_round_trip(env: Env) -> None:
    cg = env.cgroup()
    cg.apply(
        Limits(
            memory_bytes=64 * MIB,
            swap_bytes=32 * MIB,
            cpus=1,
            cpulimit_percent=50,
            cpuunits=500,
            pids_max=10,
        )
    )
    got = cg.read_limits()
    assert set(got) == {"memory", "swap", "cpus", "cpu_quota", "cpu_weight", "pids_max"}
    assert got["memory"] == str(64 * MIB)
    assert got["cpus"] == str(_parent_cpus(cg)[0])
    assert got["pids_max"] == "10"
    if cg.version == 1:
        if os.path.exists(cg.controller_paths()["memory"] + "/memory.memsw.limit_in_bytes"):
            assert got["swap"] == str(96 * MIB)  # memsw = memory + swap
        assert got["cpu_quota"] == "50000"
        assert Path(cg.controller_paths()["cpu"], "cpu.cfs_period_us").read_text() == "100000\n"
        assert got["cpu_weight"] == "512"
    else:
        if got["swap"]:
            assert got["swap"] == str(32 * MIB)
        assert got["cpu_quota"] == "50000 100000"
        assert got["cpu_weight"] == "50"

    # None leaves everything as it is
    cg.apply(Limits())
    cg.apply(Limits(pids_max=7))
    after = cg.read_limits()
    assert after == {**got, "pids_max": "7"}

    # too many CPUs are clamped to what the parent has
    cg.apply(Limits(cpus=100_000))
    assert cg.read_limits()["cpus"] == _format_cpulist(_parent_cpus(cg))

    # 0 = unlimited
    cg.apply(Limits(memory_bytes=0, cpulimit_percent=0, pids_max=0, cpus=0))
    got = cg.read_limits()
    assert got["pids_max"] == "max"
    if cg.version == 1:
        assert int(got["memory"]) >= 1 << 62
        if got["swap"]:
            assert int(got["swap"]) >= 1 << 62
        assert got["cpu_quota"] == "-1"
        assert got["cpus"] == _format_cpulist(_parent_cpus(cg))
    else:
        assert got["memory"] == "max"
        assert got["cpu_quota"] == "max 100000"


def test_v1_raising_memory_keeps_swap_allowance(env: Env) -> None:
    cg = env.cgroup()
    if cg.version != 1 or not os.path.exists(
        cg.controller_paths()["memory"] + "/memory.memsw.limit_in_bytes"
    ):
        pytest.skip("needs v1 memory.memsw.* (swap accounting)")
    cg.apply(Limits(memory_bytes=64 * MIB, swap_bytes=32 * MIB))
    # above the current memsw: memsw has to be raised first
    cg.apply(Limits(memory_bytes=256 * MIB))
    got = cg.read_limits()
    assert (got["memory"], got["swap"]) == (str(256 * MIB), str(288 * MIB))
    cg.apply(Limits(swap_bytes=0))
    assert cg.read_limits()["swap"] == str(256 * MIB)
    cg.apply(Limits(memory_bytes=16 * MIB))
    got = cg.read_limits()
    assert (got["memory"], got["swap"]) == (str(16 * MIB), str(16 * MIB))


@pytest.mark.parametrize("root", ROOTS)
def test_attach_and_pids(env: Env, root: str) -> None:
    cg = env.cgroup(root)
    assert cg.pids() == []
    first = env.spawn(cg, ["sleep", "30"])
    assert _wait_for(lambda: cg.pids() == [first.pid])
    lines = Path(f"/proc/{first.pid}/cgroup").read_text().splitlines()
    want = "/" + cg.name
    if cg.version == 2:
        assert f"0::{want}" in lines
    else:
        by_controller = {}
        for line in lines:
            _hid, ctls, path = line.split(":", 2)
            for ctl in ctls.split(","):
                by_controller[ctl] = path
        for ctl in cg.controller_paths():
            # /proc/PID/cgroup lists the hybrid unified hierarchy as "0::/path"
            assert by_controller["" if ctl == "unified" else ctl] == want, ctl

    # attaching a running process from outside
    second = env.spawn(None, ["sleep", "30"])
    cg.attach(second.pid)
    assert cg.pids() == sorted([first.pid, second.pid])
    assert os.getpid() not in cg.pids()


@pytest.mark.parametrize("root", ROOTS)
def test_attach_missing_pid_names_file_and_errno(env: Env, root: str) -> None:
    cg = env.cgroup(root)
    with pytest.raises(RuntimeFailure) as info:
        cg.attach(2**22 + 12345)  # above pid_max's ceiling: never a live pid
    msg = str(info.value)
    assert "cgroup.procs" in msg
    assert "errno" in msg


def test_pids_max_stops_fork_loop(env: Env) -> None:
    cg = env.cgroup()
    cg.apply(Limits(pids_max=5))
    script = "for i in 1 2 3 4 5 6 7 8; do sleep 5 & done; wait"
    proc = env.spawn(cg, ["sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # sampled while anything is in the set: dash exits at its first failed fork, and on a
    # busy machine that may come before the first sample; its sleeps live on (5 s)
    peak = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        n = len(cg.pids())
        peak = max(peak, n)
        if n == 0 and proc.poll() is not None:
            break
        time.sleep(0.005)
    stderr = proc.communicate(timeout=20)[1].decode()
    assert 1 <= peak <= 5
    # the shell could not start all 8 children
    assert proc.returncode != 0 or "fork" in stderr.lower(), stderr
    leaf = cg.controller_paths()["unified" if cg.version == 2 else "pids"]
    events = Path(leaf, "pids.events").read_text().split()
    assert int(events[events.index("max") + 1]) >= 1
    peak_file = Path(leaf, "pids.peak")
    if peak_file.exists():
        assert int(peak_file.read_text()) <= 5


def test_memory_limit_kills_hog(env: Env) -> None:
    cg = env.cgroup()
    cg.apply(Limits(memory_bytes=50 * MIB, swap_bytes=0))
    hog = env.spawn(
        cg,
        [sys.executable, "-c", "x = b'a' * (200 * 1024 * 1024); print(len(x))"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, _err = hog.communicate(timeout=60)
    assert hog.returncode != 0
    assert out.strip() != str(200 * MIB).encode()
    # a small process still fits
    ok = env.spawn(cg, [sys.executable, "-c", "x = b'a' * (5 * 1024 * 1024)"])
    assert ok.wait(timeout=60) == 0


def test_memory_limit_below_usage_fails(env: Env) -> None:
    cg = env.cgroup()
    if cg.version == 2:
        pytest.skip("v2 memory.max accepts any value and reclaims/OOM-kills instead")
    code = (
        "import sys, time\n"
        "x = b'a' * (100 * 1024 * 1024)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = env.spawn(cg, [sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    usage = cg.memory_usage()
    assert usage is not None and usage >= 100 * MIB
    before = cg.read_limits()["memory"]
    with pytest.raises(RuntimeFailure) as info:
        cg.apply(Limits(memory_bytes=10 * MIB, swap_bytes=0))
    msg = str(info.value)
    assert "memory." in msg and "limit_in_bytes" in msg
    assert "EBUSY" in msg
    assert proc.poll() is None  # nothing was killed
    # a limit above the usage works
    cg.apply(Limits(memory_bytes=512 * MIB))
    assert cg.read_limits()["memory"] == str(512 * MIB) != before


@pytest.mark.parametrize("root", ROOTS)
def test_freeze_and_thaw(env: Env, root: str, tmp_path: Path) -> None:
    cg = env.cgroup(root)
    ticks = tmp_path / "ticks"
    with ticks.open("wb") as out:
        busy = env.spawn(cg, ["sh", "-c", "while :; do echo x; sleep 0.01; done"], stdout=out)
    sleeper = env.spawn(cg, ["sleep", "30"])
    assert _wait_for(lambda: ticks.stat().st_size > 0)
    assert not cg.is_frozen()

    cg.freeze(timeout=10)
    assert cg.is_frozen()
    if cg.version == 1:
        state = Path(cg.controller_paths()["freezer"], "freezer.state").read_text().strip()
        assert state == "FROZEN"
    else:
        events = Path(cg.controller_paths()["unified"], "cgroup.events").read_text()
        assert "frozen 1" in events.splitlines()
    size = ticks.stat().st_size
    time.sleep(0.3)
    assert ticks.stat().st_size == size  # nothing ran
    assert busy.poll() is None and sleeper.poll() is None

    cg.thaw()
    assert not cg.is_frozen()
    if cg.version == 1:
        state = Path(cg.controller_paths()["freezer"], "freezer.state").read_text().strip()
        assert state == "THAWED"
    assert _wait_for(lambda: ticks.stat().st_size > size)
    # back to an ordinary interruptible sleep (it may be briefly R right after the thaw)
    status = Path(f"/proc/{sleeper.pid}/status")
    assert _wait_for(lambda: "State:\tS" in status.read_text()), status.read_text()


@pytest.mark.parametrize("root", ROOTS)
def test_kill_all(env: Env, root: str) -> None:
    cg = env.cgroup(root)
    procs = [env.spawn(cg, ["sleep", "30"]) for _ in range(3)]
    shell = env.spawn(cg, ["sh", "-c", "sleep 30 & sleep 30 & wait"])
    assert _wait_for(lambda: len(cg.pids()) == 6)
    cg.kill_all()
    assert cg.pids() == []
    for proc in [*procs, shell]:
        assert proc.wait(timeout=10) == -9
    cg.kill_all()  # empty set: no-op


@pytest.mark.parametrize("root", ROOTS)
def test_destroy(env: Env, root: str) -> None:
    cg = env.cgroup(root)
    paths = list(cg.controller_paths().values())
    # sub-cgroups the container made itself go too
    os.mkdir(os.path.join(paths[0], "nested"))
    # busy: a process is still inside
    proc = env.spawn(cg, ["sleep", "30"])
    assert _wait_for(lambda: cg.pids() == [proc.pid])
    started = time.monotonic()
    with pytest.raises(RuntimeFailure, match="EBUSY"):
        cg.destroy()
    assert time.monotonic() - started >= 0.2  # it retried first
    cg.kill_all()
    cg.destroy()
    assert not any(os.path.exists(p) for p in paths)
    cg.destroy()  # already gone: fine

    # intermediate directories that existed before are kept
    outer = env.cgroup(root)
    inner = open_cgroups(outer.name + "/inner", root=root)
    env.sets.insert(0, inner)
    inner.create()
    inner.destroy()
    assert all(os.path.isdir(p) for p in outer.controller_paths().values())
    assert not any(os.path.exists(p) for p in inner.controller_paths().values())


def test_attach_existing_only_skips_missing_hierarchies(env: Env) -> None:
    cg = env.cgroup()
    if len(cg.controller_paths()) < 2:
        pytest.skip("needs a v1 host with several hierarchies")
    missing = cg.controller_paths()["pids" if "pids" in cg.controller_paths() else "memory"]
    os.rmdir(missing)  # as for a CT started before that hierarchy was managed
    proc = env.spawn(None, ["sleep", "30"])
    with pytest.raises(RuntimeFailure):
        cg.attach(proc.pid)
    cg.attach(proc.pid, existing_only=True)
    present = [d for d in cg.controller_paths().values() if os.path.isdir(d)]
    assert present and all(
        str(proc.pid) in Path(d, "cgroup.procs").read_text().split() for d in present
    )


# Device nodes made in tmp_path: (name, S_IFCHR/S_IFBLK, major, minor, allowed?)
_PROBE_DEVICES = [
    ("null", stat.S_IFCHR, 1, 3, True),
    ("urandom", stat.S_IFCHR, 1, 9, True),
    ("loop0", stat.S_IFBLK, 7, 0, False),
    ("kmsg", stat.S_IFCHR, 1, 11, False),
]
_OPEN_PROBE = """
import json, os, sys
out = {}
for path in sys.argv[1:]:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        out[os.path.basename(path)] = "ok"
    except OSError as e:
        out[os.path.basename(path)] = e.errno
print(json.dumps(out))
"""


@pytest.mark.parametrize("root", ROOTS)
def test_device_access(env: Env, root: str, tmp_path: Path) -> None:
    """Only DEVICE_RULES open; on v2 (and a hybrid host's cgroup2 mount) the BPF program
    alone decides, since the unified root's tasks have no v1 devices whitelist there."""
    cg = env.cgroup(root)
    cg.create()  # again: still one program attached
    program_dir = cg.controller_paths().get("unified")
    if program_dir:
        assert attached_count(program_dir) == 1
    for name, kind, major, minor, _ in _PROBE_DEVICES:
        os.mknod(tmp_path / name, kind | 0o600, os.makedev(major, minor))
    probe = env.spawn(
        cg,
        [sys.executable, "-c", _OPEN_PROBE, *(str(tmp_path / d[0]) for d in _PROBE_DEVICES)],
        stdout=subprocess.PIPE,
    )
    got = json.loads(probe.communicate(timeout=30)[0])
    want = {name: "ok" if ok else errno.EPERM for name, *_, ok in _PROBE_DEVICES}
    assert got == want
    mknod = env.spawn(cg, ["mknod", str(tmp_path / "sda"), "b", "8", "0"], stderr=subprocess.PIPE)
    assert mknod.wait(timeout=30) != 0
    assert not (tmp_path / "sda").exists()
