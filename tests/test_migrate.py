"""vzbackup migrate between two real nodes (network namespaces with their own sshd).

Every test moves real busybox CTs with a counter process and a TCP connection from the root
netns (the "client" on the LAN), and checks where the CT runs afterwards, that its memory state
and connection survived, and that its files equal the source's.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from nodebed import (
    COUNTER,
    NOBODY_TASK,
    TENANT_NFT,
    build_probe,
    in_ct_netns,
    next_ctid,
    nobody_pids,
    wait_for,
)
from treecmp import diff, tree_manifest
from twonode_fixture import twonode
from vzbackup.migrate import ssh
from vzbackup.migrate.imagestream import ImagePipe, ImageStream
from vzbackup.migrate.priority import urge_session

from vzbackup import autogroup
from vzbackup import constants as C
from vzbackup import errors as E
from vzbackup.config.node import Node as VzNode
from vzbackup.criu.blockers import tree
from vzbackup.ct.container import Container
from vzbackup.ct.state import read_state, state_path

pytestmark = pytest.mark.slow
Bed = twonode.TwoNodes
Node = twonode.BedNode
ECHO_PORT = 7000
WINDOW_SETUP = "mkdir -p /data/tree/a/b && echo deep > /data/tree/a/b/f && echo bye > /data/gone"
WINDOW_CHANGES = (  # by the CT between the first sync and the freeze: all must arrive
    "cd /data && mv tree moved && rm gone && mkdir -p fresh/x && echo new > fresh/x/f && "
    "chmod 700 moved/a && mv fresh/x/f moved/a/b/g && echo more >> moved/a/b/f && "
    "ln -s moved/a/b/g x"
)


WITNESS_MIB = 32  # runs of pages with holes, plus 1 MiB of PROT_NONE pages


@pytest.fixture(scope="module")
def memwitness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A static process that checks its memory byte for byte after a move (probes/)."""
    return build_probe("memwitness", tmp_path_factory.mktemp("witness"))


def _start_witness(node: Node, ctid: int, binary: Path, mib: int = WITNESS_MIB,
                   churn: str = "") -> None:
    """Start the witness in CT *ctid*; *churn*: how it changes its mappings meanwhile
    ("free", "unmap", "remap" or "fork"; probes/memwitness.c)."""
    shutil.copy(binary, _private(node, ctid) / "bin/memwitness")
    node.sh(ctid, f"setsid /bin/memwitness {mib} {churn} </dev/null >/dev/null 2>&1 &")
    wait_for(lambda: node.sh(ctid, "cat /tmp/memwitness.ready 2>/dev/null").strip(),
             timeout=60, what="memory witness")


def _witness_says(node: Node, ctid: int) -> str:
    """The witness's verdict on its memory here: "ok" or where it differs."""
    node.sh(ctid, "rm -f /tmp/memwitness.result; touch /tmp/memwitness.check")
    return wait_for(lambda: node.sh(ctid, "cat /tmp/memwitness.result 2>/dev/null").strip(),
                    what="memory witness verdict")


class Client:
    """A TCP connection from the root netns to the CT's echo server."""

    def __init__(self, ip: str) -> None:
        self.sock = wait_for(
            lambda: socket.create_connection((ip, ECHO_PORT), timeout=3), what=f"{ip} echo"
        )
        self.sock.settimeout(30)

    def roundtrip(self, msg: bytes) -> bytes:
        self.sock.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = self.sock.recv(len(msg) - len(got))
            if not chunk:
                break
            got += chunk
        return got

    def close(self) -> None:
        self.sock.close()


def _make_ct(node: Node, *, start: bool = True, privileged: bool = False) -> tuple[int, str]:
    """A busybox CT; unprivileged ones run a non-root task too (a privileged CT's can't be
    dumped here: root lacks CAP_SYS_RESOURCE), privileged ones can move with lazy pages."""
    ctid, ip = next_ctid(), node.new_ip()
    node.vz("create", str(ctid), "--ipadd", ip, "--hostname", f"m{ctid}",
            "--privileged" if privileged else "--unprivileged")
    if start:
        node.vz("start", str(ctid))
        node.sh(ctid, COUNTER)
        if not privileged:
            node.sh(ctid, NOBODY_TASK)
        node.sh(ctid, f"setsid nc -ll -p {ECHO_PORT} -e /bin/cat </dev/null >/dev/null 2>&1 &")
        node.sh(ctid, "mkdir -p /data && echo payload > /data/f && ln /data/f /data/hard")
    return ctid, ip


def _counter(node: Node, ctid: int) -> int:
    return int(wait_for(lambda: node.sh(ctid, "cat /tmp/counter").strip(), what="counter"))


def _private(node: Node, ctid: int) -> Path:
    return node.prefix / "vz/private" / str(ctid)


def _files(root: Path) -> dict[str, tuple]:
    """The tree minus what a running CT changes by itself (counter, heartbeat log)."""
    return tree_manifest(root, skip=("tmp", "var/log", "var/run"))


def _migrate(bed: Bed, src: Node, dst: Node, ctid: int, *extra: str, check: bool = True):
    res = src.vz("migrate", str(ctid), bed.dest(dst), *bed.ssh_args(), "--json", *extra,
                 check=check, timeout=240)
    try:
        report = json.loads(res.stdout) if res.stdout.strip() else {}
    except ValueError:
        report = {}
    return res, report


def _migrate_with_window_changes(bed: Bed, ctid: int, *extra: str) -> dict:
    """Migrate A -> B; the CT changes files (WINDOW_CHANGES) after the first sync, while
    the migration is held still at DEST's staging (before anything is frozen)."""
    proc = _spawn_migrate(bed, ctid, "--json", *extra, verbose=True)
    assert proc.stderr is not None
    log = []
    for line in proc.stderr:
        log.append(line)
        if "phase stage" in line:
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                bed.a.sh(ctid, WINDOW_CHANGES)
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            break
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, "".join(log) + err
    return json.loads(out)


def _spawn_migrate(bed: Bed, ctid: int, *extra: str, env: dict[str, str] | None = None,
                   verbose: bool = False) -> subprocess.Popen[str]:
    """A migration A -> B in the background (to disturb it while it runs); *verbose*: its
    log (-v) names each phase as it starts."""
    return subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{bed.a.netns}", sys.executable, "-m", "vzbackup.cli",
         *(["-v"] if verbose else []), "migrate", str(ctid), bed.dest(bed.b),
         *bed.ssh_args(), *extra],
        env=bed.a.env() | (env or {}), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )


def _status(node: Node, ctid: int) -> str:
    return node.vz("status", str(ctid), check=False).stdout


def _assert_moved(src: Node, dst: Node, ctid: int, running: bool = True) -> None:
    assert "deleted" in _status(src, ctid)
    assert not _private(src, ctid).exists()
    st = _status(dst, ctid)
    assert "exist" in st and ("running" in st) == running, st
    assert (src.prefix / f"etc/vz/conf/{ctid}.conf.migrated").exists()
    assert not list((src.prefix / "vz/lock").glob("*.migrate.json"))
    assert not list((dst.prefix / "vz/lock").glob("*.migrate.json"))


# --------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize(
    ("mode", "flags"),
    [("online+lazy", ["--online"]), ("online", ["--online", "--no-lazy"])],
)
def test_online_keeps_counter_connection_and_files(
    two_nodes: Bed, memwitness: Path, mode: str, flags
) -> None:
    bed = two_nodes
    ctid, ip = _make_ct(bed.a)  # unprivileged, with a task of another uid
    _start_witness(bed.a, ctid, memwitness)
    client = Client(ip)
    try:
        assert client.roundtrip(b"before") == b"before"
        in_ct_netns(bed.a.prefix, ctid, "nft", TENANT_NFT)  # the tenant's own firewall
        bed.a.sh(ctid, WINDOW_SETUP)
        # a tmpfs image CRIU writes near the end, big enough to cross by the OpenSSH client
        shm = bed.a.sh(ctid, "head -c 3000000 /dev/urandom > /dev/shm/blob; md5sum /dev/shm/blob")
        # an empty tmpfs whose root lost its mount's mode (CRIU's tmpfsplain must tar it)
        bed.a.sh(ctid, "chmod 0750 /run/lock")
        before = _counter(bed.a, ctid)
        report = _migrate_with_window_changes(bed, ctid, *flags, "--remove-area", "no")
        assert report["mode"] == mode and report["ok"] and report["runs_on"] == "dest"
        # the final sync visited only what changed since the first (migrate.changes)...
        assert report["final_sync_dirs"], report
        assert report["bytes_sent"]["images_ssh"] >= 3000000, report
        for phase in ("preflight", "first_sync", "dump", "final_sync", "image_transfer",
                      "restore", "commit"):
            assert phase in report["times"], report
        assert 0 < report["frozen"] < report["total"]
        for step in ("restore.criu_namespaces", "restore.refence", "restore.criu_resume"):
            assert step in report["dest_steps"], report  # DEST's restore, step by step (-t)
        st = _status(bed.b, ctid)
        assert "running" in st
        assert _session_nices(bed.b, ctid) == {0}  # the restore's raised priority ended
        assert _counter(bed.b, ctid) >= before  # memory state moved: no restart from 1
        time.sleep(0.3)
        assert _counter(bed.b, ctid) > before
        assert client.roundtrip(b"after the move") == b"after the move"
        assert "tcp dport 2222 drop" in in_ct_netns(bed.b.prefix, ctid, "nft", "list",
                                                    "ruleset")
        # --remove-area no: the source keeps its (stopped) files, equal to DEST's (...and
        # every change the CT made before the freeze arrived)
        assert "deleted" in _status(bed.a, ctid)
        assert not diff(_files(_private(bed.a, ctid)), _files(_private(bed.b, ctid)))
        assert bed.b.sh(ctid, "cat /data/hard") == "payload\n"
        assert bed.b.sh(ctid, "cat /data/moved/a/b/f /data/x; ls /data") == \
            "deep\nmore\nnew\nf\nfresh\nhard\nmoved\nx\n"
        assert len(nobody_pids(bed.b, ctid)) == 1
        assert bed.b.sh(ctid, "md5sum /dev/shm/blob") == shm
        assert bed.b.sh(ctid, "stat -c %a /run/lock") == "750\n"
        assert _witness_says(bed.b, ctid) == "ok"  # every page, lazy or not, and none extra
    finally:
        client.close()
    # and back: B -> A, the same way
    client = Client(ip)
    try:
        res, report = _migrate(bed, bed.b, bed.a, ctid, "--online", check=False)
        # A still has the kept private area of the first move: preflight refuses it
        assert res.returncode != 0 and "private area" in res.stderr
        assert "running" in _status(bed.b, ctid)
        (bed.a.prefix / f"etc/vz/conf/{ctid}.conf.migrated").unlink()
        twonode._run(["rm", "-rf", str(_private(bed.a, ctid))])
        res, report = _migrate(bed, bed.b, bed.a, ctid, *flags)
        assert report["mode"] == mode
        assert "running" in _status(bed.a, ctid) and "deleted" in _status(bed.b, ctid)
        assert client.roundtrip(b"home again") == b"home again"
        assert _witness_says(bed.a, ctid) == "ok"
    finally:
        client.close()


def test_restart_migration_b_to_a(two_nodes: Bed) -> None:
    bed = two_nodes
    ctid, ip = _make_ct(bed.b)
    files = _files(_private(bed.b, ctid))
    _, report = _migrate(bed, bed.b, bed.a, ctid, "-t")
    assert report["mode"] == "restart" and report["ok"]
    assert {"first_sync", "stop", "final_sync", "start"} <= set(report["times"])
    assert report["final_sync_dirs"] is not None  # only what changed since the first sync
    _assert_moved(bed.b, bed.a, ctid)
    assert not diff(files, _files(_private(bed.a, ctid)))
    bed.a.sh(ctid, f"setsid nc -ll -p {ECHO_PORT} -e /bin/cat </dev/null >/dev/null 2>&1 &")
    client = Client(ip)
    assert client.roundtrip(b"x") == b"x"
    client.close()


def test_stopped_migration_with_new_id_and_times(two_nodes: Bed) -> None:
    bed = two_nodes
    ctid, _ = _make_ct(bed.a, start=False)
    files = _files(_private(bed.a, ctid))
    new = next_ctid()
    res = bed.a.vz("migrate", str(ctid), bed.dest(bed.b), *bed.ssh_args(), "-t",
                   "--new-id", str(new), timeout=240)
    assert "Timings for CT" in res.stdout and "first_sync" in res.stdout
    assert "deleted" in _status(bed.a, ctid)
    assert "exist" in _status(bed.b, new) and "stopped" in _status(bed.b, new)
    assert not diff(files, _files(_private(bed.b, new)))
    (rec,) = json.loads(bed.a.vz("migrate", "history", "--json").stdout)
    assert set(rec) == {"time", "ctid", "new_ctid", "mode", "dest", "result", "error",
                        "bytes", "phases"}
    assert (rec["ctid"], rec["new_ctid"], rec["mode"], rec["result"]) == (
        ctid, new, "stopped", "ok")
    assert rec["error"] is None and rec["time"].endswith("Z")
    assert rec["bytes"]["tree"] > 0 and set(rec["bytes"]) == {"tree", "images", "pages"}
    assert {"first_sync", "frozen", "total"} <= set(rec["phases"])
    assert str(ctid) in bed.a.vz("migrate", "history").stdout
    bed.b.vz("start", str(new))
    assert "running" in _status(bed.b, new)


# --------------------------------------------------------------------------- preflight


def test_dry_run_and_preflight_refusals_change_nothing(two_nodes: Bed) -> None:
    bed = two_nodes
    ctid, ip = _make_ct(bed.a)
    res, report = _migrate(bed, bed.a, bed.b, ctid, "--online", "--dry-run")
    assert report["mode"] == "dry-run" and report["preflight"]["dest_criu"]
    assert report["preflight"]["lazy"] is True  # an unprivileged CT moves with lazy pages
    assert "running" in _status(bed.a, ctid) and "deleted" in _status(bed.b, ctid)
    # the CTID exists at DEST, and the IP is used by another CT there
    bed.b.vz("create", str(ctid))
    other = next_ctid()
    bed.b.vz("create", str(other), "--ipadd", ip)
    res, _ = _migrate(bed, bed.a, bed.b, ctid, "--online", check=False)
    assert res.returncode == 15, res.stderr
    assert "already exists" in res.stderr and ip in res.stderr
    assert "nothing was changed" in res.stderr
    assert "running" in _status(bed.a, ctid)
    # --online for a stopped CT, and an unknown CT
    stopped, _ = _make_ct(bed.a, start=False)
    res, _ = _migrate(bed, bed.a, bed.b, stopped, "--online", check=False)
    assert res.returncode == 15 and "--online needs a running CT" in res.stderr
    res, _ = _migrate(bed, bed.a, bed.b, next_ctid(), check=False)
    assert res.returncode == 4


def test_memory_options_without_online_are_refused(two_nodes: Bed) -> None:
    """--lazy/--no-lazy/--plain-tcp only say how --online moves memory: without it they were
    ignored (a running CT was restarted at DEST, a stopped one copied)."""
    bed = two_nodes
    running, _ = _make_ct(bed.a)
    stopped, _ = _make_ct(bed.a, start=False)
    for ctid, flag in ((running, "--lazy"), (stopped, "--no-lazy"), (running, "--plain-tcp")):
        res, _ = _migrate(bed, bed.a, bed.b, ctid, flag, check=False)
        assert res.returncode == 2 and "--online" in res.stderr, (flag, res.stderr)
    res = bed.a.vz("drain", bed.dest(bed.b), *bed.ssh_args(), "--dry-run", "--lazy",
                   check=False)
    assert res.returncode == 2 and "--online" in res.stderr, res.stdout + res.stderr
    assert "running" in _status(bed.a, running) and "stopped" in _status(bed.a, stopped)
    assert "deleted" in _status(bed.b, running) and "deleted" in _status(bed.b, stopped)
    assert not bed.a.vz("migrate", "history", "--json").stdout.strip("[]\n ")


def test_sync_rsync_without_rsync_is_refused_by_preflight(two_nodes: Bed) -> None:
    """--sync rsync where rsync is missing fails the preflight (and --dry-run), before DEST
    is touched; it passed, and the migration failed later, at the first sync."""
    bed = two_nodes
    ctid, _ = _make_ct(bed.a, start=False)
    env = bed.a.env() | {"PATH": "/nonexistent"}  # no rsync here
    argv = ["/usr/bin/nsenter", f"--net=/run/netns/{bed.a.netns}", sys.executable, "-m",
            "vzbackup.cli", "migrate", str(ctid), bed.dest(bed.b), *bed.ssh_args()]
    for extra in (["--dry-run"], []):
        res = subprocess.run([*argv, "--sync", "rsync", *extra], env=env, capture_output=True,
                             text=True, timeout=120, check=False)
        assert res.returncode == 15, res.stdout + res.stderr
        assert "rsync is missing" in res.stderr and "nothing was changed" in res.stderr
    assert "exist" in _status(bed.a, ctid) and "deleted" in _status(bed.b, ctid)
    res = subprocess.run([*argv, "--dry-run"], env=env, capture_output=True, text=True,
                         timeout=120, check=True)  # auto: the stream
    assert "preflight OK" in res.stdout


def test_unknown_host_key_refused_before_anything(two_nodes: Bed, tmp_path: Path) -> None:
    bed = two_nodes
    ctid, _ = _make_ct(bed.a, start=False)
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    res = bed.a.vz("migrate", str(ctid), bed.dest(bed.b), "--ssh-key", str(bed.ssh_key),
                   "--ssh-opt", f"UserKnownHostsFile={empty}", check=False)
    assert res.returncode == 14 and "host key" in res.stderr.lower()
    assert "exist" in _status(bed.a, ctid) and "deleted" in _status(bed.b, ctid)


def test_ssh_settings_given_twice_must_agree(two_nodes: Bed) -> None:
    """root@DEST with --ssh-opt User=..., --ssh-port with Port=..., --ssh-key with
    IdentityFile=...: refused unless they agree (--ssh-opt used to win in silence, and
    against root@ only: a non-root user@ won)."""
    bed = two_nodes
    ctid, _ = _make_ct(bed.a, start=False)
    for extra in (["--ssh-opt", "User=nobody"], ["--ssh-port", "22", "--ssh-opt", "Port=2222"],
                  ["--ssh-opt", "IdentityFile=/nonexistent"]):
        res, _ = _migrate(bed, bed.a, bed.b, ctid, "--dry-run", *extra, check=False)
        assert res.returncode == 2 and "disagree" in res.stderr, (extra, res.stderr)
    host = bed.dest(bed.b).partition("@")[2]
    res = bed.a.vz("migrate", str(ctid), host, *bed.ssh_args(), "--dry-run", "--ssh-opt",
                   "User=root", "--ssh-opt", "Port=22", "--ssh-opt",
                   f"IdentityFile={bed.ssh_key}", "--ssh-key", str(bed.ssh_key))
    assert "preflight OK" in res.stdout
    assert "exist" in _status(bed.a, ctid) and "deleted" in _status(bed.b, ctid)


# --------------------------------------------------------------------------- failures


def _assert_still_home(src: Node, dst: Node, ctid: int, before: int,
                       client: Client | None) -> None:
    assert "running" in _status(src, ctid)
    assert "deleted" in _status(dst, ctid)
    assert not _private(dst, ctid).exists()
    # DEST's restore supervisor, prepared ahead (root mounted), undid it when called off
    wait_for(lambda: f" {dst.prefix}/vz/root/{ctid} " not in Path("/proc/self/mountinfo")
             .read_text(), what="DEST's CT root unmounted")
    assert not list((dst.prefix / "vz/lock").glob("*.migrate.json"))
    assert not list((src.prefix / "vz/lock").glob("*.migrate.json"))
    assert _counter(src, ctid) >= before
    assert _session_nices(src, ctid) <= {0}  # the CT's sessions were never raised
    if client is not None:
        assert client.roundtrip(b"still here") == b"still here"
    ip = src.vz("exec", str(ctid), "ip -4 -o addr show eth0").stdout.split()[3].split("/")[0]
    fresh = Client(ip)  # and new connections reach it here
    assert fresh.roundtrip(b"new") == b"new"
    fresh.close()


@pytest.mark.parametrize(
    ("flag", "fails", "keeps_tcp"),
    [
        ("--no-lazy", "swrk", True),  # restore fails inside post-dump
        ("--lazy", "lazy-pages", True),  # DEST's page daemon fails before the pages flow
        ("--lazy", "swrk", False),  # restore fails while CRIU serves pages: post-copy's
        # point of no return for the TCP repair state; the CT itself resumes here
    ],
)
def test_dest_restore_failure_resumes_at_source(
    two_nodes: Bed, flag: str, fails: str, keeps_tcp: bool
) -> None:
    bed = two_nodes
    ctid, ip = _make_ct(bed.a, privileged=flag == "--lazy")
    client = Client(ip)
    try:
        before = _counter(bed.a, ctid)
        _dest_criu_doing(bed, fails, "exit 3")  # after the dump froze the CT here
        res, _ = _migrate(bed, bed.a, bed.b, ctid, "--online", flag, check=False)
        assert res.returncode == 15, res.stderr
        assert "keeps running here" in res.stderr, res.stderr
        _assert_still_home(bed.a, bed.b, ctid, before, client if keeps_tcp else None)
        rec = json.loads(bed.a.vz("migrate", "history", "--json").stdout)[-1]
        assert rec["result"] == "failed" and "keeps running here" in rec["error"]
    finally:
        client.close()


@pytest.mark.parametrize("flag", ["--no-lazy", "--lazy"])
def test_dest_restore_that_hangs_resumes_at_source(two_nodes: Bed, flag: str) -> None:
    """DEST's restore never answers (its CRIU hangs): the source waits the freeze's bound
    (C.FREEZE_REPLY_ENV here), resumes the CT and stops asking DEST anything; DEST's agent
    removes its copy once its restore returns and finds the link closed."""
    bed = two_nodes
    ctid, ip = _make_ct(bed.a, privileged=flag == "--lazy")
    client = Client(ip)
    hung = bed.dir / "hung-swrk.pid"
    mig = None
    try:
        before = _counter(bed.a, ctid)
        _dest_criu_doing(bed, "swrk", f"echo $$ > {hung}; exec sleep 600")
        mig = _spawn_migrate(bed, ctid, "--online", flag, env={C.FREEZE_REPLY_ENV: "3"})
        out, err = mig.communicate(timeout=240)
        # it ended while DEST's restore still hung
        assert hung.exists() and Path(f"/proc/{hung.read_text().strip()}").exists()
        assert mig.returncode == 15, out + err
        assert "did not answer 'restore' within 3 s" in err and "keeps running here" in err, err
        os.kill(int(hung.read_text()), signal.SIGKILL)  # DEST's restore fails now
        wait_for(lambda: "deleted" in _status(bed.b, ctid) and not _private(bed.b, ctid).exists()
                 and not list((bed.b.prefix / "vz/lock").glob("*.migrate.json")),
                 timeout=60, what="DEST removed its copy")
        _assert_still_home(bed.a, bed.b, ctid, before, client if flag == "--no-lazy" else None)
    finally:
        client.close()
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(hung.read_text()), signal.SIGKILL)
        if mig is not None and mig.poll() is None:
            mig.kill()
            mig.wait()


def test_keep_dst_holds_when_dest_is_not_told(two_nodes: Bed) -> None:
    """--keep-dst keeps DEST's synced private area also when the source can't ask DEST to
    roll back (here: DEST's restore answers too late, the source stops talking to it); DEST
    used to remove it then. A second migration reuses it."""
    bed = two_nodes
    ctid, _ = _make_ct(bed.a)
    hung = bed.dir / "hung-swrk.pid"
    try:
        _dest_criu_doing(bed, "swrk", f"echo $$ > {hung}; exec sleep 600")
        mig = _spawn_migrate(bed, ctid, "--online", "--no-lazy", "--keep-dst",
                             env={C.FREEZE_REPLY_ENV: "3"})
        out, err = mig.communicate(timeout=240)
        assert mig.returncode == 15 and "did not answer 'restore'" in err, out + err
        os.kill(int(hung.read_text()), signal.SIGKILL)  # DEST's restore fails now
        journal = bed.b.prefix / f"vz/lock/{ctid}.migrate.json"
        wait_for(lambda: "deleted" in _status(bed.b, ctid) and journal.exists()
                 and json.loads(journal.read_text())["state"] == "kept", timeout=60,
                 what="DEST rolled back but for the private area")
        assert (_private(bed.b, ctid) / "data/f").read_text() == "payload\n"
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(hung.read_text()), signal.SIGKILL)
    assert "running" in _status(bed.a, ctid)
    _set_remote_env(bed, bed.b, "VZBACKUP_CRIU", "/usr/local/sbin/criu")
    _, report = _migrate(bed, bed.a, bed.b, ctid, "--online", "--no-lazy")
    assert report["ok"] and report["mode"] == "online"
    assert "running" in _status(bed.b, ctid) and not journal.exists()


STALL_MS = 3000  # DEST's lazy-pages daemon gives up after this long without progress


@pytest.mark.parametrize("transport", [[], ["--plain-tcp"]], ids=["tls", "plain"])
def test_stalled_lazy_transfer_resumes_at_source(two_nodes: Bed, memwitness: Path,
                                                transport: list[str]) -> None:
    """Lazy pages that stop flowing (here: the source's page server is stopped once DEST
    runs the CT) end at DEST's stall limit: its daemon gives up without closing the session,
    and the source's CRIU takes that for a failed transfer and resumes the CT here with all
    of its memory. Stock CRIU took a plain TCP session's end, closed or not, for "every page
    taken" and killed the CT here, while DEST's ran without the pages still missing."""
    bed = two_nodes
    ctid, _ = _make_ct(bed.a, privileged=True)
    # a transfer long enough to stop (~1 s here), in a CT allowed the memory
    bed.a.vz("set", str(ctid), "--ram", "1G", "--save")
    _start_witness(bed.a, ctid, memwitness, mib=640)
    _set_remote_env(bed, bed.b, "CRIU_VZBACKUP_LAZY_STALL_MS", str(STALL_MS))
    before = _counter(bed.a, ctid)
    restored_at_dest = state_path(VzNode.load(str(bed.b.prefix)), ctid)
    mig = _spawn_migrate(bed, ctid, "--online", "--lazy", *transport)
    stopped: list[int] = []
    try:
        wait_for(lambda: mig.poll() is not None or json.loads(
            restored_at_dest.read_text())["status"] == "running", timeout=120, interval=0.002,
            what="the restore at DEST")
        stopped = _descendants(mig.pid, "criu")
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        assert mig.poll() is None and stopped, "the migration ended before its pages stopped"
        time.sleep(STALL_MS / 1000 + 2)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        out, err = mig.communicate(timeout=120)
    assert mig.returncode == 15, out + err
    assert "keeps running here" in err and "stalled" in err, err
    _assert_still_home(bed.a, bed.b, ctid, before, None)
    assert _witness_says(bed.a, ctid) == "ok"


CHURN_STALL_MS = 10000  # a stall fails the test in seconds, not at DEST's 60 s default


STUCK_SAMPLES = 15  # samples in a row of a witness asleep on one fault: stuck (~0.1 s; a
# fault that waits for its page takes 1 or 2; one never woken, all until the transfer ends)


def _witness_pid(node: Node, ctid: int) -> int | None:
    """The host PID of the witness in CT *ctid* at *node* (not a child it forked: the
    process tree lists parents first), once the CT runs there."""
    state = read_state(VzNode.load(str(node.prefix)), ctid)
    found = _descendants(state.init_pid, "memwitness") if state and state.init_pid else []
    return found[0] if found else None


def _lazy_migration_watching_witness(bed: Bed, ctid: int) -> tuple[int, dict, str, list[str]]:
    """Migrate *ctid* A -> B online with lazy pages, sampling where the witness at DEST
    sleeps (/proc/PID/wchan) from the restore there ("phase commit") to the end of the lazy
    transfer ("phase cleanup"): exit code, report, log and the samples."""
    proc = _spawn_migrate(bed, ctid, "--json", "--online", "--lazy", verbose=True)
    log: list[str] = []
    restored, transferred = threading.Event(), threading.Event()

    def read_log() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            if "phase commit" in line:
                restored.set()
            if "phase cleanup" in line:
                transferred.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    pid, samples = None, []
    while proc.poll() is None and not transferred.is_set():
        if restored.is_set():
            pid = pid or _witness_pid(bed.b, ctid)
            with contextlib.suppress(OSError):  # (not found yet, or gone)
                samples.append(Path(f"/proc/{pid}/wchan").read_text())
        time.sleep(0.005)
    out, _ = proc.communicate(timeout=240)
    reader.join()
    return proc.returncode, json.loads(out) if out.strip() else {}, "".join(log), samples


@pytest.mark.parametrize("churn", ["free", "unmap", "remap", "fork"])
def test_lazy_migration_of_a_ct_changing_its_mappings_meanwhile(two_nodes: Bed,
                                                                memwitness: Path,
                                                                churn: str) -> None:
    """A CT's allocators free, unmap and move pages all the time, and its programs fork. A
    page freed (madvise(MADV_DONTNEED)), unmapped or moved (mremap) inside a range DEST's
    lazy-pages daemon has requested splits the request; stock CRIU completed only the part
    its reply started at and waited for the others forever (a Debian CT's lazy migration
    stalled in CI; the freeing witness here, 4 of 4 times: xferwhole.patch). A freed page
    touched again before the daemon had unregistered it left the process asleep on that
    fault until the whole transfer ended (zerowake.patch). The witness, changing a page
    every 0.5 ms across 256 MiB, runs on at DEST while its pages come, and moves intact."""
    bed = two_nodes
    ctid, _ = _make_ct(bed.a, privileged=True)
    bed.a.vz("set", str(ctid), "--ram", "1G", "--save")
    _start_witness(bed.a, ctid, memwitness, mib=256, churn=churn)
    assert _witness_says(bed.a, ctid) == "ok"
    _set_remote_env(bed, bed.b, "CRIU_VZBACKUP_LAZY_STALL_MS", str(CHURN_STALL_MS))
    # debug logging: the daemon logs an event before handling it, so a fault comes in
    # between more often
    _set_remote_env(bed, bed.b, C.CRIU_LOG_LEVEL_ENV, "4")
    rc, report, log, samples = _lazy_migration_watching_witness(bed, ctid)
    assert rc == 0 and report["mode"] == "online+lazy", log
    assert samples, "the witness was never seen at DEST while its pages came"
    asleep = max((len(list(run)) for where, run in itertools.groupby(samples)
                  if where == "handle_userfault"), default=0)
    assert asleep < STUCK_SAMPLES, f"the witness slept on a fault through {asleep} samples"
    _assert_moved(bed.a, bed.b, ctid)
    assert _witness_says(bed.b, ctid) == "ok"


def _descendants(pid: int, comm: str) -> list[int]:
    """The processes named *comm* below process *pid*."""
    found = []
    for child in tree(pid)[1:]:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{child}/comm").read_text().strip() == comm:
                found.append(child)
    return found


def _session_nices(node: Node, ctid: int) -> set[int]:
    """The scheduler autogroup nice of the sessions of CT *ctid* at *node* and of its
    supervisor (empty without autogroups)."""
    ct = Container(VzNode.load(str(node.prefix)), ctid)
    state = read_state(ct.node, ctid)
    pids = [*ct.cgroup().pids(), *([state.supervisor_pid] if state else [])]
    return {found[1] for pid in pids if (found := autogroup.group(pid))}


def _dest_criu_doing(bed: Bed, part: str, action: str) -> None:
    """DEST's CRIU passes every check, but its *part* (its first argument) runs the shell
    *action* instead (through DEST's sshd, for the agent)."""
    wrapper = bed.dir / "destcriu"
    wrapper.write_text("#!/bin/sh\ncase \"$1\" in --version) echo 'Version: 4.2.1';;"
                       f" check|cpuinfo) exit 0;; {part}) {action};;"
                       " *) exec /usr/local/sbin/criu \"$@\";; esac\n")
    wrapper.chmod(0o755)
    _set_remote_env(bed, bed.b, "VZBACKUP_CRIU", str(wrapper))


def _set_remote_env(bed: Bed, node: Node, key: str, value: str) -> None:
    """Add an environment variable to the sessions of *node*'s sshd (SetEnv) and reload it."""
    conf = next(bed.dir.glob(f"{node.name}/sshd_config"))
    text = conf.read_text()
    conf.write_text(text.replace("SetEnv ", f"SetEnv {key}={value} ", 1))
    for pid in bed.sshd_pids:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if str(conf).encode() in cmdline:
            os.kill(pid, signal.SIGHUP)
    time.sleep(0.5)


def test_ssh_drop_during_transfer_leaves_ct_at_source(two_nodes: Bed) -> None:
    bed = two_nodes
    ctid, ip = _make_ct(bed.a)
    bed.a.sh(ctid, "dd if=/dev/urandom of=/data/big bs=1M count=40 2>/dev/null")
    client = Client(ip)
    try:
        before = _counter(bed.a, ctid)
        mig = _spawn_migrate(bed, ctid, "--online", "--bwlimit", "4000")
        # cut the LAN link of node B while the private area is being copied
        wait_for(lambda: _private(bed.b, ctid).exists(), what="first sync started")
        time.sleep(1.0)
        down = bed.b.run(["ip", "link", "set", "lan0", "down"])
        assert down.returncode == 0, down.stderr
        out, _ = mig.communicate(timeout=240)
        assert mig.returncode != 0, out
        bed.b.run(["ip", "link", "set", "lan0", "up"])
        bed.b.run(["ip", "route", "replace", "default", "dev", "lan0"])
        # DEST's agent notices the dead link (keepalive) and removes its partial copy
        wait_for(lambda: not _private(bed.b, ctid).exists(), timeout=120,
                 what="DEST rolled back")
        _assert_still_home(bed.a, bed.b, ctid, before, client)
    finally:
        client.close()


def test_disk_full_at_dest_leaves_ct_at_source(two_nodes: Bed) -> None:
    bed = two_nodes
    ctid, ip = _make_ct(bed.a)
    bed.a.sh(ctid, "dd if=/dev/urandom of=/data/big bs=1M count=30 2>/dev/null")
    private_parent = bed.b.prefix / "vz/private"
    private_parent.mkdir(parents=True, exist_ok=True)
    # 40 MiB of space, which preflight accepts for the ~33 MiB private area... almost
    twonode._run(["mount", "-t", "tmpfs", "-o", "size=36m", "tmpfs", str(private_parent)])
    client = Client(ip)
    try:
        before = _counter(bed.a, ctid)
        bed.b.run(["dd", "if=/dev/zero", f"of={private_parent}/filler", "bs=1M", "count=4"])
        res, _ = _migrate(bed, bed.a, bed.b, ctid, "--online", check=False)
        assert res.returncode != 0
        assert "space" in res.stderr.lower()
        (private_parent / "filler").unlink()
        _assert_still_home(bed.a, bed.b, ctid, before, client)
    finally:
        client.close()
        twonode._run(["umount", "-l", str(private_parent)], check=False)


def test_locks_refuse_second_migration_and_cleanup_command(two_nodes: Bed) -> None:
    bed = two_nodes
    ctid, _ = _make_ct(bed.a, start=False)
    lockfile = bed.a.prefix / f"vz/lock/{ctid}.backup.lock"
    lockfile.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lockfile, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a backup of this CT is running
    try:
        res, _ = _migrate(bed, bed.a, bed.b, ctid, check=False)
        assert res.returncode == 7 and "locked" in res.stderr
    finally:
        os.close(fd)
    # a crashed DEST attempt: journal + partial private area; migrate-cleanup removes them
    journal = bed.b.prefix / f"vz/lock/{ctid}.migrate.json"
    journal.parent.mkdir(parents=True, exist_ok=True)
    partial = _private(bed.b, ctid)
    partial.mkdir(parents=True)
    (partial / "junk").write_text("x")
    journal.write_text(json.dumps({"ctid": ctid, "role": "dest", "state": "preparing",
                                   "pid": 999999, "private": str(partial)}))
    out = bed.b.vz("migrate-cleanup", str(ctid)).stdout
    assert "removed DEST copy" in out
    assert not partial.exists() and not journal.exists()
    res, report = _migrate(bed, bed.a, bed.b, ctid)
    assert report["mode"] == "stopped"
    _assert_moved(bed.a, bed.b, ctid, running=False)


@pytest.mark.parametrize("holds", ["page-server", "swrk"])
def test_source_killed_while_frozen_resumes_ct_and_dest_rolls_back(two_nodes: Bed,
                                                                   holds: str) -> None:
    bed = two_nodes
    ctid, ip = _make_ct(bed.a)
    # 40 MB of shared memory: pages that DEST's page server takes while the CT is frozen
    bed.a.sh(ctid, "dd if=/dev/urandom of=/dev/shm/blob bs=1M count=40 2>/dev/null")
    # DEST's page-server lingers after the pages arrived: the source, frozen until DEST has
    # them all, is killed meanwhile (before anything is restored at DEST)
    slow = bed.dir / "slowcriu"
    # (page-server), or DEST's restore starts late (swrk): restored there after the source
    # died, the copy is rolled back without closing the connections the source's copy holds
    slow.write_text(f"#!/bin/sh\n[ \"$1\" = {holds} ] || exec /usr/local/sbin/criu \"$@\"\n"
                    + ("/usr/local/sbin/criu \"$@\"; rc=$?; sleep 8; exit $rc\n"
                       if holds == "page-server"
                       else "sleep 8; exec /usr/local/sbin/criu \"$@\"\n"))
    slow.chmod(0o755)
    _set_remote_env(bed, bed.b, "VZBACKUP_CRIU", str(slow))
    client = Client(ip)
    try:
        before = _counter(bed.a, ctid)
        # CRIU's debug log names the step it runs ("Running post-dump scripts")
        mig = _spawn_migrate(bed, ctid, "--online", "--no-lazy",
                             env={C.CRIU_LOG_LEVEL_ENV: "4"})
        log = bed.a.prefix / f"vz/dump/Dump.{ctid}.migrate-out/dump.log"
        # CRIU reached post-dump: the CT is frozen here, DEST waits for its page-server
        wait_for(lambda: "post-dump" in log.read_text(), timeout=120, interval=0.02,
                 what="post-dump")
        time.sleep(1)
        mig.kill()
        mig.communicate(timeout=60)
        # its OpenSSH master's socket directory outlives it, until the next session sweeps it
        left = f"{tempfile.gettempdir()}/{ssh.CONTROL_DIR_PREFIX}{mig.pid}-*"
        assert len(glob.glob(left)) == 1
        ssh._remove_control_dir(ssh._new_control_dir())
        assert glob.glob(left) == []
        # CRIU lost its caller: it resumes the tasks; DEST's agent lost its link: it rolls back
        wait_for(lambda: not _private(bed.b, ctid).exists(), timeout=120, what="DEST rollback")
        wait_for(lambda: _counter(bed.a, ctid) > before, what="counter runs on at the source")
        # the killed migration's journal on the source: the documented cleanup clears it
        out = bed.a.vz("migrate-cleanup", str(ctid)).stdout
        assert "nothing to undo" in out
        _assert_still_home(bed.a, bed.b, ctid, before, client)
    finally:
        client.close()


def test_image_stream_sends_closed_images_and_again_what_changed(tmp_path: Path) -> None:
    """What crosses while CRIU writes: each image once closed, a rewritten one again, the
    log never; rest() names what is left once the dump is over."""
    got: list[tuple[str, bytes]] = []

    def send(names: list[str]) -> int:
        blobs = [(n, (tmp_path / n).read_bytes()) for n in names]
        got.extend(blobs)
        return sum(len(b) for _, b in blobs)

    stream = ImageStream(tmp_path, send)
    stream.start()
    try:
        (tmp_path / "core-1.img").write_bytes(b"one")
        log = (tmp_path / "dump.log").open("w")  # CRIU keeps its log open
        log.write("x")
        log.flush()
        wait_for(lambda: ("core-1.img", b"one") in got, what="the first image streamed")
        (tmp_path / "core-1.img").write_bytes(b"ONE")  # written again after it was sent
        (tmp_path / "inventory.img").write_bytes(b"inv")
        rest = stream.rest()
    finally:
        stream.close()
        log.close()
    sent = {n for n, _ in got} | set(rest)
    assert sent == {"core-1.img", "inventory.img"}  # never the log, nor the wake-up file
    assert sorted(f.name for f in tmp_path.iterdir()) == ["core-1.img", "dump.log",
                                                         "inventory.img"]
    assert "core-1.img" in rest or ("core-1.img", b"ONE") in got
    assert stream.bytes == sum(len(b) for _, b in got)


def test_image_pipe_acknowledges_batches_and_reports_a_failed_receiver(tmp_path: Path) -> None:
    """The image stream into DEST's real receiver (``sh -c`` standing in for ssh): finish()
    returns with every batch written, a name sent again replaces its earlier copy, and a
    receiver that fails to start makes wait_ready() raise with its message."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    receiver = [sys.executable, "-m", "vzbackup.cli", C.RECV_IMAGES_COMMAND]
    (src / "core-1.img").write_bytes(b"one")
    (src / "pages-1.img").write_bytes(os.urandom(3 << 20))
    pipe = ImagePipe(["sh", "-c"], [*receiver, str(dst)], src)
    try:
        pipe.wait_ready()  # the receiver runs: nothing was sent yet
        assert list(dst.iterdir()) == []
        assert pipe.send(["core-1.img", "pages-1.img"]) == 3 + (3 << 20)
        (src / "core-1.img").write_bytes(b"ONE!")
        pipe.send(["core-1.img"])
        pipe.send([])  # an empty batch is acknowledged too
        pipe.finish()
        for name in ("core-1.img", "pages-1.img"):
            assert (dst / name).read_bytes() == (src / name).read_bytes()
            assert (dst / name).stat().st_mode & 0o777 == 0o644
        assert pipe.bytes == 7 + (3 << 20)
    finally:
        pipe.close()
    bad = ImagePipe(["sh", "-c"], [*receiver, str(tmp_path / "missing")], src)
    try:  # the receiver refuses at start: known before anything is frozen
        with pytest.raises(E.RuntimeFailure, match=r"(?s)DEST failed .*missing. does not exist"):
            bad.wait_ready()
    finally:
        bad.close()


def test_urge_session_raises_a_whole_session_never_lowers_one() -> None:
    """DEST's daemons and SSH sessions get the freeze's priority as whole sessions
    (scheduler autogroups): a process's own nice ranks it only within its session, and the
    sessions share the CPUs evenly."""
    if autogroup.group() is None:
        pytest.skip("this kernel has no scheduler autogroups")
    lead = subprocess.Popen(["sleep", "60"], start_new_session=True)
    higher = subprocess.Popen(["sleep", "60"], start_new_session=True)
    ours = autogroup.group()
    try:
        assert autogroup.set_nice(higher.pid, C.FREEZE_NICE - 3)
        urge_session(lead.pid)
        urge_session(higher.pid)
        assert autogroup.group(lead.pid)[1] == C.FREEZE_NICE
        assert autogroup.group(higher.pid)[1] == C.FREEZE_NICE - 3
        assert autogroup.group() == ours  # another session's raise leaves ours alone
    finally:
        for p in (lead, higher):
            p.kill()
            p.wait()
