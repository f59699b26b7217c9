"""Acceptance: a Debian 12 CT from the built template, with systemd and the stock units
(redis-server, postgresql, ssh, cron), keeps its state through chkpnt + restore (a client's
TCP connection from the node stays open), a checkpoint backup restored from S3 onto another,
empty node prefix, and live migration (lazy and not) while a client writes through one
connection: every acknowledged write is at DEST, the freeze is reported, and a node shutdown
(VE_STOP_MODE=suspend) and boot; after each step systemd is ``running``, the stock services
are active and journald logs.

Redis is the witness: the client INCRements one key through one TCP connection; the value
the CT returns after each step proves its memory and the connection moved with it.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import threading

import pytest
from nodebed import DEBIAN_TEMPLATE_NAME, NodeBed, link_or_copy, next_ctid, wait_for
from s3fixture import Bucket
from test_debian import STOCK_UNITS, journal_logs, stock_units, system_state
from test_s3 import configure
from twonode_fixture import twonode

pytestmark = pytest.mark.slow
_beds = itertools.count()
REDIS_PORT = 6379
# Redis listens on the CT's address for the client on the node (stock: localhost only).
REDIS_ON_LAN = (
    "sed -i 's/^bind .*/bind 0.0.0.0/; s/^protected-mode yes/protected-mode no/' "
    "/etc/redis/redis.conf && systemctl restart redis-server"
)


TCP_BACKOFF = 150.0  # s: covers retransmission backoff after a freeze, not a speed limit


class Redis:
    """One TCP connection to the CT's redis-server, speaking its inline protocol."""

    def __init__(self, ip: str) -> None:
        self.sock = wait_for(
            lambda: socket.create_connection((ip, REDIS_PORT), timeout=3), what=f"redis on {ip}"
        )
        self.sock.settimeout(TCP_BACKOFF)
        self.buf = b""

    def call(self, command: str) -> bytes:
        self.sock.sendall(command.encode() + b"\r\n")
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def incr(self) -> int:
        return int(self.call("INCR hits").lstrip(b":"))

    def close(self) -> None:
        self.sock.close()


def serve_redis(run_sh, ctid: int) -> None:
    run_sh(ctid, REDIS_ON_LAN)


def assert_machine_ok(bed, ctid: int, tag: str) -> None:
    """systemd is ``running``, the stock services are up, journald takes and returns a line."""
    assert system_state(bed, ctid) == "running"
    assert stock_units(bed, ctid) == dict.fromkeys(STOCK_UNITS, "active")
    assert journal_logs(bed, ctid, tag)


@pytest.fixture(scope="module")
def deb(debian_module_node: NodeBed) -> tuple[NodeBed, int, str]:
    bed = debian_module_node
    ctid, ip = bed.create_running("--ostemplate", DEBIAN_TEMPLATE_NAME)
    assert system_state(bed, ctid) == "running"
    serve_redis(bed.sh, ctid)
    return bed, ctid, ip


def test_chkpnt_and_restore_keep_a_client_connection(deb, criu_ready) -> None:
    bed, ctid, ip = deb
    client = Redis(ip)
    try:
        before = client.incr()
        bed.vz("chkpnt", str(ctid))
        bed.vz("restore", str(ctid))
        assert client.incr() == before + 1  # same connection, same memory
    finally:
        client.close()
    assert_machine_ok(bed, ctid, "after-restore")
    assert bed.sh(ctid, "systemctl is-active console-getty").strip() == "active"


def test_node_shutdown_suspends_and_boot_restores(deb, criu_ready) -> None:
    """VE_STOP_MODE=suspend: the node's shutdown checkpoints the CT, its boot restores it
    (the same redis process and client connection), and systemd is running again."""
    bed, ctid, ip = deb
    bed.vz("set", str(ctid), "--onboot", "yes", "--stop-mode", "suspend", "--save")
    client = Redis(ip)
    try:
        before = client.incr()
        down = json.loads(bed.vz("shutdown", "--json", timeout=300).stdout)
        assert [(s["ctid"], s["action"]) for s in down["cts"]] == [(ctid, "checkpointed")], down
        assert "stopped" in bed.vz("status", str(ctid)).stdout
        up = json.loads(bed.vz("boot", "--json", timeout=300).stdout)
        assert [(s["ctid"], s["action"]) for s in up["cts"]] == [(ctid, "restored")], up
        assert client.incr() == before + 1  # same connection, same memory
    finally:
        client.close()
    assert_machine_ok(bed, ctid, "after-node-boot")


def test_checkpoint_backup_restores_with_state_from_s3_onto_another_empty_node(
    deb, s3_bucket: Bucket, criu_ready
) -> None:
    bed, ctid, ip = deb
    client = Redis(ip)
    try:
        saved = client.incr()
    finally:
        client.close()
    configure(bed, s3_bucket.storage_cfg())
    res = bed.vz("dump", str(ctid), "--storage", "s3", "--mode", "checkpoint", "--json",
                 timeout=600)
    assert json.loads(res.stdout)["results"][0]["ok"]
    assert_machine_ok(bed, ctid, "after-checkpoint-backup")  # leave-running: still up
    # The node is lost: another node, at a prefix of its own with nothing in it but the S3
    # storage's config, brings the CT back running from the bucket alone.
    bed.vz("stop", str(ctid), "--fast")  # (its address must be free on this machine)
    other = NodeBed(bed.prefix.with_name(bed.prefix.name + "-other"))
    other.prefix.mkdir()
    try:
        configure(other, s3_bucket.storage_cfg())
        other.vz("restore", "--storage", "s3", str(ctid), "--with-state", timeout=600)
        client = Redis(ip)
        try:
            assert client.incr() == saved + 1  # the memory of the checkpoint
        finally:
            client.close()
        assert_machine_ok(other, ctid, "after-s3-restore")
    finally:
        other.cleanup()


@pytest.fixture(scope="module")
def debian_two_nodes(template_cache, debian_template_cache):
    bed = twonode.up(f"deb{os.getpid()}-{next(_beds)}", template_cache)
    try:
        for node in (bed.a, bed.b):
            for f in debian_template_cache.iterdir():
                link_or_copy(f, node.prefix / "vz/template/cache")
        yield bed
    finally:
        bed.cleanup()


MIGRATE_TIMEOUT = 240.0  # s: under the test's 300 s, so that a hang is explained


def migrate(bed, ctid: int, *extra: str) -> dict:
    """``vzbackup -v migrate`` A -> B; its JSON report. A migration that hangs fails the test
    with the CRIU logs of both ends and what their processes wait in, taken before the kill
    (DEST's agent removes its images and logs once the source is gone)."""
    argv = [sys.executable, "-m", "vzbackup.cli", "-v", "migrate", str(ctid), bed.dest(bed.b),
            *bed.ssh_args(), *extra, "--json"]
    proc = subprocess.Popen(twonode._in_ns(bed.a.netns, argv), env=bed.a.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=MIGRATE_TIMEOUT)
    except subprocess.TimeoutExpired:
        hang = hang_report(bed, ctid)
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"migrate hung for {MIGRATE_TIMEOUT:.0f} s\n{hang}\n"
                             f"its stderr:\n{err}") from None
    assert proc.returncode == 0, f"migrate -> {proc.returncode}\nstdout: {out}\nstderr: {err}"
    return json.loads(out)


def hang_report(bed, ctid: int, lines: int = 40) -> str:
    """The tails of the migration's CRIU logs at both nodes, and where CRIU and vzbackup's
    processes wait."""
    parts = []
    for node in (bed.a, bed.b):
        for log in sorted(node.prefix.glob(f"vz/dump/Dump.{ctid}.migrate*/*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {node.name}: {log.name}\n" + "\n".join(tail))
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,ppid,stat,wchan:32,etimes,args"],
                        capture_output=True, text=True).stdout.splitlines()
    parts.append("--- processes\n" + "\n".join(
        ps[:1] + [ln[:240] for ln in ps if "criu" in ln or "vzbackup" in ln]))
    return "\n".join(parts)


class Writer(threading.Thread):
    """INCRs through one connection until stopped; keeps the last acknowledged value."""

    def __init__(self, client: Redis) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.acked = 0
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                self.acked = self.client.incr()
        except BaseException as e:  # reported by the test
            self.error = e


@pytest.mark.parametrize("lazy", ["--lazy", "--no-lazy"])
def test_live_migration_keeps_every_acknowledged_write(debian_two_nodes, lazy: str) -> None:
    bed = debian_two_nodes
    a, b = bed.a, bed.b
    ctid, ip = next_ctid(), a.new_ip()
    a.vz("create", str(ctid), "--ostemplate", DEBIAN_TEMPLATE_NAME, "--ipadd", ip)
    a.vz("start", str(ctid))
    assert system_state(a, ctid) == "running"
    serve_redis(a.sh, ctid)
    client = Redis(ip)
    writer = Writer(client)
    writer.start()
    try:
        wait_for(lambda: writer.acked > 10, what="writes before the move")
        # Memory over CRIU's TLS: without lazy pages PostgreSQL's SysV shared memory goes
        # through the page server too (scripts/criu-patches/tlsns.patch).
        report = migrate(bed, ctid, "--online", lazy)
        assert report["ok"] and report["runs_on"] == "dest"
        assert 0 < report["frozen"] < report["total"]
        moved_at = writer.acked
        # A write sent while the CT was frozen is retransmitted on TCP's backoff (its next
        # try can come tens of seconds after a long freeze on a busy node): wait that out.
        wait_for(lambda: writer.error or writer.acked > moved_at + 10, timeout=TCP_BACKOFF,
                 what=f"writes after the move (frozen {report['frozen']:.2f} s)")
    finally:
        writer.halt.set()
        writer.join(30)
        client.close()
    assert writer.error is None, writer.error
    assert "running" in b.vz("status", str(ctid)).stdout
    # Every acknowledged write is at DEST (the counter never went back).
    assert int(b.sh(ctid, "redis-cli GET hits").strip()) >= writer.acked
    assert_machine_ok(b, ctid, "after-migration")
