"""A hostile CT: its root tries to reach the node; every attempt fails and the node is unchanged.

Runs for both modes, the unprivileged default and ``--privileged``, each against one CT per
module (restarted where an attempt ends it), and against a privileged CT that CRIU brought
back: "restored" (chkpnt + restore on the node) and "migrated" (an online migration with lazy
pages to a second node): CRIU recreates every mount, and the fences must be locked again
(``vzbackup.ct.refence``). Every attempt is one test id (``test_attempt[restored-set-clock]``).
What busybox can't do (kexec, module loading, open_by_handle_at, ptrace, clock calls) a small
static helper does, compiled here from tests/probes/vzprobe.c with ``gcc -static`` and copied
into the CT.

The node is only read, never changed: clock attempts write back the current value, sysctl
attempts the current value, module attempts name a module that doesn't exist.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nodebed import build_probe, next_ctid, wait_for

from vzbackup import syscalls as S
from vzbackup.config.node import Node
from vzbackup.constants import HOST_GATEWAY
from vzbackup.ct import syscall_filter
from vzbackup.ct.cgroups import open_cgroups

pytestmark = pytest.mark.slow

NUMPROC = 64
RAM = "96M"
MODES = ("unprivileged", "privileged")
# How a privileged CT came back through CRIU: the suite runs against these too.
REVIVED = ("restored", "migrated")
RO_BIND = "/mnt/node-ro"  # a read-only BINDMOUNT of a node directory in every hostile CT


@dataclass
class Hostile:
    bed: Any  # NodeBed, or the twonode bed's node B (vz, prefix)
    ctid: int
    ip: str
    mode: str
    ro_source: Path  # the node directory bound read-only at RO_BIND
    netns: str | None = None  # the node's network namespace (None: the root one)

    def run(self, script: str) -> subprocess.CompletedProcess[str]:
        return self.bed.vz("exec", str(self.ctid), script, check=False)

    def probe(self, *args: str) -> str:
        """Output of the helper: "ok", "errno N NAME" or "empty" (read found no data)."""
        res = self.run(f"/bin/vzprobe {' '.join(args)}")
        assert res.returncode in (0, 1), res
        return res.stdout.strip()

    def init_pid(self) -> int:
        return json.loads((self.bed.prefix / f"vz/run/{self.ctid}.state").read_text())["init_pid"]

    def restart(self) -> None:
        self.bed.vz("stop", "--fast", str(self.ctid), check=False)
        self.bed.vz("start", str(self.ctid))

    def cgroup_file(self, controller: str, name: str) -> Path:
        cg = open_cgroups(f"{Node.load(str(self.bed.prefix)).cgroup_parent}/{self.ctid}")
        return Path(cg.controller_paths()[controller], name)

    def node_socket(self, family: int = socket.AF_INET) -> socket.socket:
        """A UDP socket of the node's network namespace (where the CT's gateway is)."""
        if self.netns is None:
            return socket.socket(family, socket.SOCK_DGRAM)
        made: list[socket.socket] = []

        def in_netns() -> None:  # setns moves only this thread; the socket keeps the netns
            fd = os.open(f"/run/netns/{self.netns}", os.O_RDONLY)
            try:
                S.setns(fd, S.CLONE_NEWNET)
            finally:
                os.close(fd)
            made.append(socket.socket(family, socket.SOCK_DGRAM))

        t = threading.Thread(target=in_netns)
        t.start()
        t.join()
        return made[0]


@pytest.fixture(scope="module")
def probe_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_probe("vzprobe", tmp_path_factory.mktemp("probe"))


@pytest.fixture(scope="module")
def hostile(
    request: pytest.FixtureRequest,
    probe_binary: Path,
) -> Iterator[Hostile]:
    """One CT per variant (``indirect`` parameter): a mode, or a way back through CRIU."""
    variant = request.param
    mode = variant if variant in MODES else "privileged"
    migrated = variant == "migrated"
    if migrated:
        two = request.getfixturevalue("shared_two_nodes")
        bed, ctid, ip = two.a, next_ctid(), two.a.new_ip()
    else:
        bed = request.getfixturevalue("module_node")
        ctid, ip = bed.new_ctid(), bed.new_ip()
    ro_source = Path(tempfile.mkdtemp(prefix=f"vzt-ro-{variant}-", dir="/var/tmp"))
    ro_source.chmod(0o755)  # readable by an unmapped CT root too
    (ro_source / "f").write_text("node\n")
    bed.vz("create", str(ctid), "--ipadd", ip, "--hostname", f"ct{ctid}", f"--{mode}")
    try:
        bed.vz("set", str(ctid), "--numproc", str(NUMPROC), "--ram", RAM, "--swap", "0",
               "--bindmount", f"{ro_source}:{RO_BIND}:ro", "--save")
        target = bed.prefix / f"vz/private/{ctid}/bin/vzprobe"
        shutil.copy(probe_binary, target)
        owner = target.parent.stat()
        os.chown(target, owner.st_uid, owner.st_gid)  # the CT's (mapped) root
        bed.vz("start", str(ctid))
        if variant == "restored":
            bed.vz("chkpnt", str(ctid))
            bed.vz("restore", str(ctid))
        if migrated:
            res = bed.vz("migrate", str(ctid), two.dest(two.b), *two.ssh_args(), "--online",
                         "--json", timeout=240)
            assert json.loads(res.stdout)["mode"] == "online+lazy", res.stdout
            bed = two.b
        st = bed.vz("status", str(ctid)).stdout
        assert "running" in st, st
        yield Hostile(bed, ctid, ip, mode, ro_source, two.b.netns if migrated else None)
    finally:
        bed.vz("stop", "--fast", str(ctid), check=False)
        bed.vz("destroy", str(ctid), check=False)
        shutil.rmtree(ro_source, ignore_errors=True)


# ------------------------------------------------------------------------- node views
class _Timex(ctypes.Structure):
    _fields_ = [  # struct timex up to tick (x86_64 layout)
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("pad", ctypes.c_byte * 200),
    ]


def _node_clock() -> tuple[float, tuple[int, ...]]:
    """Wall clock minus monotonic clock (jumps when someone sets the time), adjtimex state."""
    tx = _Timex()
    ctypes.CDLL(None, use_errno=True).adjtimex(ctypes.byref(tx))
    offset = time.clock_gettime(time.CLOCK_REALTIME) - time.clock_gettime(time.CLOCK_MONOTONIC)
    return offset, (tx.freq, tx.status, tx.constant, tx.tick)


def _read(path: str) -> str | None:
    with contextlib.suppress(OSError):
        return Path(path).read_text()
    return None


def _node_disk() -> tuple[str, int, int]:
    """Name, major and minor of the block device holding the CTs' files."""
    dev = os.stat("/var/tmp").st_dev
    major, minor = os.major(dev), os.minor(dev)
    name = Path(f"/sys/dev/block/{major}:{minor}").resolve().name
    return name, major, minor


def _failed(res: subprocess.CompletedProcess[str]) -> bool:
    return res.returncode != 0


# ------------------------------------------------------------------------- the attempts
def set_clock(ct: Hostile) -> None:
    before = _node_clock()
    for op in ("clock_settime", "settimeofday", "adjtimex"):
        assert ct.probe(op) != "ok", op
    busybox_date = ct.run("date -s '2001-02-03 04:05:06'")  # exits 0 even when refused
    assert "can't set date" in busybox_date.stderr
    assert _failed(ct.run("hwclock --hctosys"))
    after = _node_clock()
    assert abs(after[0] - before[0]) < 0.5  # no step of the node's clock
    assert after[1] == before[1]  # frequency, status, time constant, tick


def write_node_sysctl(ct: Hostile) -> None:
    for key in ("vm/swappiness", "kernel/panic", "vm/drop_caches"):
        node_value = _read(f"/proc/sys/{key}")
        value = (node_value or "1").strip()  # drop_caches reads as nothing: write 1 (harmless)
        assert _failed(ct.run(f"echo {value} > /proc/sys/{key}")), key
        assert _read(f"/proc/sys/{key}") == node_value, key


def mount_cgroupfs(ct: Hostile) -> None:
    """No mount, or one of the CT's own subtree (cgroup namespace): no release_agent there,
    none of the node's cgroups; the node's release_agent files stay as they were."""
    node_agents = {p: p.read_text() for p in Path("/sys/fs/cgroup").glob("*/release_agent")}
    assert not any("evil" in v for v in node_agents.values()), node_agents  # an earlier run's
    mounted = not _failed(ct.run("mkdir -p /tmp/cg && mount -t cgroup -o memory cgroup /tmp/cg"))
    try:
        if mounted:
            assert _failed(ct.run("test -e /tmp/cg/release_agent"))
            assert _failed(ct.run("echo /tmp/evil > /tmp/cg/release_agent"))
            parent = Node.load(str(ct.bed.prefix)).cgroup_parent.split("/")[0]
            assert parent not in ct.run("ls /tmp/cg").stdout
    finally:
        ct.run("umount /tmp/cg")
    assert _failed(ct.run("echo /tmp/evil > /sys/fs/cgroup/memory/release_agent"))
    assert {p: p.read_text() for p in node_agents} == node_agents


def remount_sys_rw(ct: Hostile) -> None:
    helper = _read("/sys/kernel/uevent_helper")
    assert _failed(ct.run("mount -o remount,rw /sys"))
    assert _failed(ct.run("echo /tmp/evil > /sys/kernel/uevent_helper"))
    assert " ro," in ct.run("grep ' /sys ' /proc/mounts").stdout.replace(" ro ", " ro,")
    assert _read("/sys/kernel/uevent_helper") == helper


def mount_devtmpfs_open_disk(ct: Hostile) -> None:
    disk, _, _ = _node_disk()
    ct.run("mkdir -p /tmp/devtmpfs")
    mounted = not _failed(ct.run("mount -t devtmpfs none /tmp/devtmpfs"))
    try:
        assert ct.probe("read", f"/tmp/devtmpfs/{disk}") != "ok"
    finally:
        if mounted:
            ct.run("umount /tmp/devtmpfs")
    assert not mounted, "devtmpfs mounted (the disk still did not open)"


def mknod_disk(ct: Hostile) -> None:
    _, major, minor = _node_disk()
    res = ct.run(f"mknod /tmp/disk b {major} {minor}")
    opened = ct.probe("read", "/tmp/disk")
    ct.run("rm -f /tmp/disk")
    assert opened != "ok"
    assert _failed(res), "mknod of the node's disk worked (opening it did not)"


def load_module(ct: Hostile) -> None:
    modules = _read("/proc/modules")
    for op in ("finit_module", "delete_module"):
        assert ct.probe(op) != "ok", op
    assert _failed(ct.run("modprobe -q dummy"))
    assert _read("/proc/modules") == modules


def kexec(ct: Hostile) -> None:
    loaded = _read("/sys/kernel/kexec_loaded")
    assert ct.probe("kexec") != "ok"
    assert _read("/sys/kernel/kexec_loaded") == loaded


def open_by_handle(ct: Hostile) -> None:
    assert ct.probe("open_by_handle") != "ok"


def ptrace_or_signal_node_process(ct: Hostile) -> None:
    victim = subprocess.Popen(["sleep", "300"])
    try:
        assert ct.probe("ptrace", str(victim.pid)) != "ok"
        assert ct.probe("kill", str(victim.pid)) != "ok"
        assert _failed(ct.run(f"kill -9 {victim.pid}"))
        assert victim.poll() is None
        status = Path(f"/proc/{victim.pid}/status").read_text()
        assert "TracerPid:\t0\n" in status
    finally:
        victim.kill()
        victim.wait()


def change_node_hostname(ct: Hostile) -> None:
    before = socket.gethostname()
    ct.run("hostname evil-node; echo evil-node > /proc/sys/kernel/hostname")
    assert socket.gethostname() == before


def unmount_masks(ct: Hostile) -> None:
    """The node's mounts are locked: no umount of a mask or a read-only path."""
    for path in ("/proc/kmsg", "/proc/sys/net", "/proc/sys", "/proc/acpi", "/sys/firmware"):
        assert _failed(ct.run(f"umount {path}")), path
    assert ct.probe("read", "/proc/kmsg") == "empty"  # still the node's /dev/null
    assert ct.run("ls /sys/firmware").stdout == ""


def remount_proc_sys_rw(ct: Hostile) -> None:
    node_value = _read("/proc/sys/vm/swappiness")
    for how in ("remount,rw", "remount,bind,rw"):
        assert _failed(ct.run(f"mount -o {how} /proc/sys")), how
    assert " ro," in ct.run("grep ' /proc/sys ' /proc/mounts").stdout
    assert _failed(ct.run(f"echo {node_value.strip()} > /proc/sys/vm/swappiness"))
    assert _read("/proc/sys/vm/swappiness") == node_value


def mount_fresh_proc_or_sysfs(ct: Hostile) -> None:
    """A new procfs or sysfs would show what the masks hide: refused while they are locked,
    also after detaching the whole /proc or /sys (tried in a mount namespace of its own, so
    the CT keeps its /proc: the detach works on a restored CT, hiding the masks with it)."""
    ct.run("mkdir -p /tmp/fresh")
    for fs, where in (("proc", "/proc"), ("sysfs", "/sys")):
        for prep in ("", f"umount -l {where};"):
            try_it = f"unshare -m sh -c '{prep} mount -t {fs} {fs} /tmp/fresh'"
            assert _failed(ct.run(try_it)), try_it


def remount_readonly_bindmount(ct: Hostile) -> None:
    before = sorted(p.name for p in ct.ro_source.iterdir())
    for how in ("remount,rw", "remount,bind,rw"):
        assert _failed(ct.run(f"mount -o {how} {RO_BIND}")), how
    assert _failed(ct.run(f"echo evil > {RO_BIND}/evil"))
    assert ct.run(f"cat {RO_BIND}/f").stdout == "node\n"
    assert sorted(p.name for p in ct.ro_source.iterdir()) == before


def read_kcore(ct: Hostile) -> None:
    for path in ("/proc/kcore", "/proc/kmsg"):
        assert ct.probe("read", path) != "ok", path
    assert ct.probe("write", "/proc/sysrq-trigger", "h") != "ok"


def fork_bomb(ct: Hostile) -> None:
    events = ct.cgroup_file("pids", "pids.events")
    # the shell returns at once, the bomb goes on in the background: wait for it to hit
    # NUMPROC (it did within the few ms the command took to exit, until the CLI exited faster)
    ct.run("timeout -s KILL 5 sh -c 'b() { b | b & }; b' >/dev/null 2>&1")
    try:
        deadline = time.monotonic() + 30
        while int(events.read_text().split()[1]) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert int(events.read_text().split()[1]) > 0  # the CT hit NUMPROC
        assert len(open_cgroups_pids(ct)) <= NUMPROC
        assert subprocess.run(["true"], check=False).returncode == 0  # the node forks
    finally:
        ct.restart()
    assert ct.run("true").returncode == 0


def open_cgroups_pids(ct: Hostile) -> list[int]:
    return open_cgroups(f"{Node.load(str(ct.bed.prefix)).cgroup_parent}/{ct.ctid}").pids()


def spoof_address(ct: Hostile) -> None:
    """The CT's root adds foreign addresses and sends from them; only its own gets out."""
    sock = ct.node_socket()
    sock.bind((HOST_GATEWAY, 0))
    sock.settimeout(0.5)
    port = str(sock.getsockname()[1])
    foreign = ("192.0.2.7", "10.199.250.250")
    try:
        for src in foreign:
            ct.run(f"ip addr add {src}/32 dev eth0")
        for src in (ct.ip, *foreign):
            for _ in range(3):
                ct.probe("udp", src, HOST_GATEWAY, port)
        got = set()
        with contextlib.suppress(TimeoutError):
            while True:
                got.add(sock.recvfrom(100)[1][0])
    finally:
        sock.close()
        for src in foreign:
            ct.run(f"ip addr del {src}/32 dev eth0")
    assert got == {ct.ip}


def spoof_ipv6_address(ct: Hostile) -> None:
    """A routed CT has no IPv6: whatever address its root takes, the node hears nothing."""
    sock = ct.node_socket(socket.AF_INET6)
    sock.bind(("::", 0))
    sock.settimeout(0.5)
    port = str(sock.getsockname()[1])
    foreign = "fd99:199:ff::7"  # setup.sh's unreachable test range
    try:
        ct.run("echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad")  # usable at once
        ct.run(f"ip -6 addr add {foreign}/64 dev eth0")
        for _ in range(3):
            ct.probe("udp", foreign, "ff02::1%eth0", port)
        with contextlib.suppress(TimeoutError):
            got = sock.recvfrom(100)[1][0]
            pytest.fail(f"the node received IPv6 from the CT (source {got})")
    finally:
        sock.close()
        ct.run(f"ip -6 addr del {foreign}/64 dev eth0")


def exceed_physpages(ct: Hostile) -> None:
    init = ct.init_pid()
    res = ct.run("dd if=/dev/zero of=/dev/null bs=400M count=1")
    assert _failed(res)  # killed by the CT's OOM killer, or its malloc failed
    assert Path(f"/proc/{init}").exists()  # the CT itself lives on
    assert ct.run("true").returncode == 0


ATTEMPTS: list[Callable[[Hostile], None]] = [
    set_clock,
    write_node_sysctl,
    mount_cgroupfs,
    remount_sys_rw,
    mount_devtmpfs_open_disk,
    mknod_disk,
    load_module,
    kexec,
    open_by_handle,
    ptrace_or_signal_node_process,
    change_node_hostname,
    unmount_masks,
    remount_proc_sys_rw,
    mount_fresh_proc_or_sysfs,
    remount_readonly_bindmount,
    read_kcore,
    exceed_physpages,
    spoof_address,
    spoof_ipv6_address,
    fork_bomb,  # last: the CT is restarted afterwards (a restored CT is then a fresh one)
]


@pytest.mark.parametrize("attempt", ATTEMPTS, ids=lambda f: f.__name__.replace("_", "-"))
@pytest.mark.parametrize("hostile", MODES + REVIVED, indirect=True, scope="module")
def test_attempt(hostile: Hostile, attempt: Callable[[Hostile], None]) -> None:
    attempt(hostile)


@pytest.mark.parametrize("how", ["poweroff -f", "halt -f", "reboot -f"])
@pytest.mark.parametrize("hostile", MODES, indirect=True, scope="module")
def test_reboot_or_power_off_ends_only_the_ct(hostile: Hostile, how: str) -> None:
    """In a pid namespace reboot(2) ends the CT's init (seccomp leaves it alone on purpose):
    a reboot starts the CT again (as vzctl does), halt and power off stop it; the node keeps
    running either way (same boot id, same clock)."""
    boot_id = _read("/proc/sys/kernel/random/boot_id")
    clock = _node_clock()
    init = hostile.init_pid()
    hostile.run(how)
    wait_for(lambda: not Path(f"/proc/{init}").exists(), what="the CT's init to end")
    if how.startswith("reboot"):
        wait_for(lambda: hostile.init_pid() != init, what="the CT to start again")
        wait_for(lambda: hostile.run("true").returncode == 0, what="the rebooted CT to answer")
        assert "running" in hostile.bed.vz("status", str(hostile.ctid)).stdout
        assert hostile.run("cat /proc/1/comm").stdout == "init\n"  # busybox init, booted anew
    else:
        wait_for(
            lambda: "running" not in hostile.bed.vz("status", str(hostile.ctid)).stdout,
            what="the supervisor to record the stop",
        )
        hostile.bed.vz("start", str(hostile.ctid))
    assert _read("/proc/sys/kernel/random/boot_id") == boot_id
    assert abs(_node_clock()[0] - clock[0]) < 0.5


# ------------------------------------------------------------------------- seccomp
def _seccomp_status(pid: int | str) -> tuple[str, int]:
    fields = dict(
        line.split(":\t", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":\t" in line
    )
    return fields["Seccomp"], int(fields["Seccomp_filters"])


def _assert_filtered(ct: Hostile) -> None:
    assert _seccomp_status(ct.init_pid()) == ("2", 1)  # init: filter mode, our one filter
    assert ct.run("grep -E '^Seccomp(_filters)?:' /proc/self/status").stdout.split() == [
        "Seccomp:",
        "2",
        "Seccomp_filters:",
        "1",  # exec loads its own before nsenter joins the CT
    ]
    # keyctl answers ENOSYS from the filter; without it the call succeeds.
    assert ct.probe("keyctl") == "errno 38 ENOSYS"
    for name in ("kexec", "finit_module", "delete_module", "swapon", "bpf"):
        assert ct.probe(name) == "errno 1 EPERM", name


@pytest.mark.usefixtures("criu_ready")
@pytest.mark.parametrize("hostile", MODES, indirect=True, scope="module")
def test_seccomp_filter_kept_across_checkpoint(hostile: Hostile) -> None:
    _assert_filtered(hostile)
    hostile.bed.vz("chkpnt", str(hostile.ctid))
    hostile.bed.vz("restore", str(hostile.ctid))
    _assert_filtered(hostile)


def test_seccomp_table_is_complete() -> None:
    denied = syscall_filter.denied()
    for name in ("kexec_load", "kexec_file_load", "init_module", "finit_module"):
        assert name in denied
    assert "reboot" not in denied and "mount" not in denied  # see the module docstring
    assert syscall_filter.build() is not None
