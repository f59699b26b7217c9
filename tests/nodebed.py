"""Helpers for the tests: a node prefix driving the real CLI, waits, probes, CT workloads.

Imported by test modules (``from nodebed import NodeBed, wait_for``); the fixtures that build
on them live in conftest.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import pty
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from vzbackup.constants import HOST_GATEWAY

ROOT = Path(__file__).resolve().parent.parent


TEMPLATE_NAME = "busybox-1.0-x86_64"
# The Debian 12 template scripts/setup.sh builds (systemd, redis, postgresql, sshd, cron), and
# the cache it lives in; the debian_template_cache fixture builds it there if it is missing.
DEBIAN_TEMPLATE_NAME = "debian-12-x86_64"
DEMO_PREFIX = Path(os.environ.get("VZBACKUP_DEMO_PREFIX", "/var/lib/vzbackup/demo"))
DEBIAN_TEMPLATE_BUILD_TIMEOUT = 1800


_ctids = itertools.count(int(os.environ.get("VZBACKUP_TEST_CTID_BASE", "3100")))


_ips = itertools.count(10)


def next_ctid() -> int:
    """A CTID no other test of this run uses."""
    return next(_ctids)


def link_or_copy(src: Path, dest_dir: Path) -> None:
    """Hardlink *src* into *dest_dir* (copy across filesystems)."""
    dest = dest_dir / src.name
    if src.stat().st_dev == dest_dir.stat().st_dev:
        os.link(src, dest)
    else:
        shutil.copy(src, dest)


def need(condition: bool, why: str) -> None:
    """Skip when a component is missing, but fail in CI where set-up installs everything."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"required component missing in CI: {why}")
    pytest.skip(why)


def build_probe(name: str, out_dir: Path) -> Path:
    """Compile ``tests/probes/NAME.c`` into a static binary in *out_dir*."""
    need(shutil.which("gcc") is not None, f"gcc (build-essential) builds the {name} probe")
    out = out_dir / name
    source = ROOT / f"tests/probes/{name}.c"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(source)], check=True)
    return out


def skip_outside_ci(condition: bool, reason: str) -> pytest.MarkDecorator:
    """skipif for a missing component, except in CI, where the test runs and fails instead."""
    return pytest.mark.skipif(condition and not os.environ.get("CI"), reason=reason)


@dataclass
class NodeBed:
    """A node prefix with helpers to run the real CLI against it."""

    prefix: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "VZBACKUP_PREFIX": str(self.prefix)}

    def vz(
        self, *args: str, check: bool = True, timeout: float = 120, input_: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [sys.executable, "-m", "vzbackup.cli", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input_,
            check=False,
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"vzbackup {' '.join(args)} -> {res.returncode}\n"
                f"stdout: {res.stdout}\nstderr: {res.stderr}"
            )
        return res

    def sh(self, ctid: int, script: str, check: bool = True) -> str:
        return self.vz("exec", str(ctid), script, check=check).stdout

    def new_ctid(self) -> int:
        return next_ctid()

    def new_ip(self) -> str:
        return f"10.199.{os.getpid() % 200}.{next(_ips)}"

    def create_running(self, *extra: str) -> tuple[int, str]:
        ctid, ip = self.new_ctid(), self.new_ip()
        self.vz("create", str(ctid), "--ipadd", ip, "--hostname", f"ct{ctid}", *extra)
        self.vz("start", str(ctid))
        return ctid, ip

    def cleanup(self) -> None:
        run = self.prefix / "vz/run"
        for state in run.glob("*.state") if run.is_dir() else []:
            with contextlib.suppress(Exception):
                subprocess.run(
                    [sys.executable, "-m", "vzbackup.cli", "stop", "--fast", state.stem],
                    env=self.env(),
                    capture_output=True,
                    timeout=60,
                )
        # Last resort: kill supervisors this prefix recorded, by PID.
        for state in run.glob("*.state") if run.is_dir() else []:
            with contextlib.suppress(Exception):
                st = json.loads(state.read_text())
                for pid in (st.get("init_pid"), st.get("supervisor_pid")):
                    if pid:
                        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        with open("/proc/self/mountinfo") as f:
            mounts = [ln.split()[4] for ln in f if str(self.prefix) in ln.split()[4]]
        for m in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True, check=False)
        shutil.rmtree(self.prefix, ignore_errors=True)


class PtyDriver:
    """Runs the real CLI on a pty of its own, as a person at a terminal would."""

    def __init__(self, bed: NodeBed, *args: str, rows: int = 30, cols: int = 100) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # pragma: no cover - the child execs
            os.execve(sys.executable, [sys.executable, "-m", "vzbackup.cli", *args], bed.env())
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.out = b""

    def expect(self, needle: bytes, timeout: float = 20.0) -> bytes:
        """Read until *needle* appeared (everything read so far is kept in ``out``)."""
        deadline = time.monotonic() + timeout
        while needle not in self.out:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(f"{needle!r} not seen; got {self.out[-2000:]!r}")
        return self.out

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:
            return False
        self.out += data
        return bool(data)

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait(self, timeout: float = 30.0) -> int:
        """Exit code of the CLI (output keeps being collected meanwhile)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            self._read(0.1)
        raise AssertionError(f"the CLI did not exit; got {self.out[-2000:]!r}")

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            os.close(self.fd)


def wait_for(pred, timeout: float = 20.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            last = pred()
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def http_get(ip: str, port: int = 80, path: str = "/", timeout: float = 3.0) -> str:
    with socket.create_connection((ip, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


# A task as 'nobody' in its own session inside the CT: CRIU must read its rlimits, which root
# here (no CAP_SYS_RESOURCE) can only do inside the CT's user namespace.
NOBODY_TASK = "setsid su nobody -s /bin/sh -c 'exec sleep 1000' </dev/null >/dev/null 2>&1 &"


def nobody_pids(bed, ctid: int) -> list[str]:
    """PIDs (inside the CT) of the NOBODY_TASK processes."""
    out = bed.sh(ctid, "ps -o pid,user,args")
    return [
        r[0]
        for r in (ln.split() for ln in out.splitlines())
        if r[1:] == ["nobody", "sleep", "1000"]
    ]


COUNTER = (  # an in-memory counter in a CT: a cold start would begin again at 1
    # (written to a new file and renamed, so a reader never sees it empty)
    "setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; "
    "mv /tmp/counter.new /tmp/counter; usleep 100000; done' </dev/null >/dev/null 2>&1 &"
)


class EchoPeer:
    """A host-side TCP server; the CT connects to it and echoes what it gets."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(1)
        self.sock.settimeout(20)
        self.port = self.sock.getsockname()[1]
        self.conn: socket.socket | None = None

    def accept(self) -> None:
        self.conn, _ = self.sock.accept()
        self.conn.settimeout(30)

    def roundtrip(self, msg: bytes) -> bytes:
        assert self.conn is not None
        self.conn.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = self.conn.recv(len(msg) - len(got))
            if not chunk:
                break
            got += chunk
        return got

    def close(self) -> None:
        if self.conn:
            self.conn.close()
        self.sock.close()

    def connect_from(self, bed: NodeBed, ctid: int) -> None:
        """Let CT *ctid* connect here with busybox nc echoing through cat."""
        nc = f"nc {HOST_GATEWAY} {self.port} -e /bin/cat"
        bed.sh(ctid, f"setsid {nc} </dev/null >/dev/null 2>&1 &")
        self.accept()


# A tenant's own firewall inside a CT: nftables, and a legacy iptables rule
TENANT_NFT = ("add table inet tenant; add chain inet tenant input { type filter hook input "
              "priority 0; policy accept; }; add rule inet tenant input tcp dport 2222 drop")
TENANT_LEGACY = ["iptables-legacy", "-A", "INPUT", "-p", "tcp", "--dport", "2223", "-j", "DROP"]


def in_ct_netns(prefix: Path, ctid: int, *argv: str) -> str:
    """Run *argv* (a node tool) in the network namespace of the running CT *ctid*."""
    pid = json.loads((prefix / f"vz/run/{ctid}.state").read_text())["init_pid"]
    return subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", *argv], check=True,
                          capture_output=True, text=True).stdout
