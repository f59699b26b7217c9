"""The classic command names: ``vzbackup classic install`` writes the wrappers (never over a
real command), and the classic OpenVZ command lines run through them on real CTs: vzctl
create/set/start/exec/enter, vzlist, vzdump, vzrestore, and vzmigrate on the two-node bed."""

from __future__ import annotations

import fcntl
import os
import pty
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodebed import TEMPLATE_NAME, NodeBed, PtyDriver, next_ctid
from twonode_fixture import twonode

from vzbackup.classic import syntax
from vzbackup.config.node import Node

NAMES = ["vzctl", "vzlist", "vzdump", "vzrestore", "vzmigrate"]


@pytest.fixture
def bindir() -> Iterator[Path]:
    """The wrappers, installed into a directory of their own (removed afterwards)."""
    d = Path(tempfile.mkdtemp(prefix="vzt-classic-", dir="/var/tmp"))
    try:
        res = vzbackup("classic", "install", "--bindir", str(d))
        assert res.returncode == 0, res.stderr
        assert sorted(p.name for p in d.iterdir()) == sorted(NAMES)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def vzbackup(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vzbackup.cli", *args], capture_output=True,
                          text=True, env=env, check=False, timeout=60)


def classic(bindir: Path, env: dict[str, str], *argv: str,
            netns: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a classic command line through its installed wrapper (from /, as a user might)."""
    cmd = [str(bindir / argv[0]), *argv[1:]]
    if netns:
        cmd = ["nsenter", f"--net=/run/netns/{netns}", *cmd]
    return subprocess.run(cmd, env=env, cwd="/", capture_output=True, text=True, check=False,
                          timeout=240)


def ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, f"{res.args} -> {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


class WrapperPty(PtyDriver):
    """A classic command on a pty of its own (vzctl enter)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # pragma: no cover - the child execs
            os.execve(argv[0], argv, env)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        self.out = b""


def test_install_never_shadows_a_real_command_and_remove_keeps_foreign_files(tmp_path: Path):
    real, target = tmp_path / "real", tmp_path / "bin"
    real.mkdir()
    (real / "vzlist").write_text("#!/bin/sh\necho the real vzlist\n")
    (real / "vzlist").chmod(0o755)
    env = {**os.environ, "PATH": f"{real}:{os.environ['PATH']}"}
    res = vzbackup("classic", "install", "--bindir", str(target), env=env)
    assert res.returncode == 5 and f"vzlist ({real}/vzlist)" in res.stderr
    assert not target.exists()  # nothing written
    res = vzbackup("classic", "install", "--bindir", str(target), "vzctl", "vzdump", env=env)
    assert res.returncode == 0 and sorted(p.name for p in target.iterdir()) == ["vzctl", "vzdump"]
    # a foreign file in the bin directory is a real command too; ours may be written again
    (target / "vzrestore").write_text("#!/bin/sh\n")
    res = vzbackup("classic", "install", "--bindir", str(target), "vzrestore", "vzctl", env=env)
    assert res.returncode == 5 and "vzrestore" in res.stderr
    assert vzbackup("classic", "install", "--bindir", str(target), "vzctl", env=env).returncode == 0
    res = vzbackup("classic", "remove", "--bindir", str(target), "--json", env=env)
    assert sorted(p.name for p in target.iterdir()) == ["vzrestore"]
    assert (real / "vzlist").exists()
    assert vzbackup("classic", "install", "--bindir", str(target), "vzfoo").returncode == 2


@pytest.mark.parametrize(("argv", "steps"), [
    (["vzctl", "--verbose", "set", "101", "--ipadd", "10.0.0.5", "--save"],
     [["-v", "set", "101", "--ipadd", "10.0.0.5", "--save"]]),
    (["vzctl", "exec", "101", "ls", "-l", "/"], [["exec", "101", "ls -l /"]]),
    (["vzctl", "start", "101", "--wait"], [["start", "101"]]),
    (["vzlist", "-a", "-o", "veid,ip_addr", "-H"], [["list", "-a", "-o", "ctid,ip", "-H"]]),
    (["vzdump", "--suspend", "--dumpdir=/d", "--storage", "s3", "101"],
     [["dump", "--mode", "suspend", "--storage", "s3", "101"],
      ["export", "101", "--dumpdir", "/d", "--storage", "s3"]]),
    (["vzdump", "--maxfiles", "3", "101"], [["dump", "--prune-backups", "keep-last=3", "101"],
                                            ["export", "101", "--dumpdir", "DUMPDIR"]]),
    (["vzrestore", "/d/a.tar.zst", "102", "--force"], [["restore", "/d/a.tar.zst", "102",
                                                        "--force"]]),
    (["vzmigrate", "-r", "no", "--live", "--ssh=-i /k -p 2222 -oA=b", "root@h", "101"],
     [["migrate", "101", "root@h", "--remove-area", "no", "--online", "--ssh-key", "/k",
       "--ssh-port", "2222", "--ssh-opt", "A=b"]]),
])
def test_translation_table(argv: list[str], steps: list[list[str]], tmp_path: Path) -> None:
    node = Node.load(str(tmp_path))
    got, _ = syntax.translate(argv[0], argv[1:], node)
    dumpdir = str(node.dumpdir)
    assert got == [[dumpdir if t == "DUMPDIR" else t for t in s] for s in steps]


def test_classic_command_lines_on_a_node(node: NodeBed, bindir: Path) -> None:
    env = node.env()
    ctid, new, ip = next_ctid(), next_ctid(), node.new_ip()
    c = str(ctid)
    out = ok(classic(bindir, env, "vzctl", "create", c, "--ostemplate", TEMPLATE_NAME,
                     "--config", "basic"))
    assert f"CT {ctid} created" in out
    ok(classic(bindir, env, "vzctl", "set", c, "--ipadd", ip, "--hostname", "classic",
               "--save"))
    ok(classic(bindir, env, "vzctl", "start", c))
    assert ok(classic(bindir, env, "vzctl", "exec", c, "echo", "$(hostname)", ">", "/root/m",
                      "&&", "cat", "/root/m")) == "classic\n"
    assert classic(bindir, env, "vzctl", "exec", c, "exit 3").returncode == 3
    shell = WrapperPty([str(bindir / "vzctl"), "enter", c], env)
    try:
        shell.expect(b"#")
        shell.send(b"echo in-$(hostname)-$((6*7)); exit\n")
        shell.expect(b"in-classic-42")
        assert shell.wait() == 0
    finally:
        shell.kill()
    rows = ok(classic(bindir, env, "vzlist", "-a")).splitlines()
    assert rows[0].split() == ["CTID", "NPROC", "STATUS", "IP_ADDR", "HOSTNAME"]
    assert [c, "running", ip, "classic"] == [rows[1].split()[i] for i in (0, 2, 3, 4)]
    assert ok(classic(bindir, env, "vzlist", "-1")).split() == [c]
    res = ok(classic(bindir, env, "vzdump", "--suspend", c))
    (archive,) = (node.prefix / "vz/dump").glob(f"vzdump-openvz-{ctid}-*.tar.zst")
    assert str(archive) in res
    ok(classic(bindir, env, "vzctl", "stop", c))
    assert ok(classic(bindir, env, "vzlist", "-H", "-o", "veid,status", c)).split() == [
        c, "stopped"]  # a CTID named: that CT, stopped or not
    ok(classic(bindir, env, "vzctl", "destroy", c))
    ok(classic(bindir, env, "vzrestore", str(archive), str(new)))
    ok(classic(bindir, env, "vzctl", "start", str(new)))
    assert ok(classic(bindir, env, "vzctl", "exec", str(new), "cat /root/m")) == "classic\n"
    res = classic(bindir, env, "vzctl", "frobnicate", c)
    assert res.returncode == 2 and res.stderr.startswith("vzctl: error: unknown command")
    assert "exec2" in ok(classic(bindir, env, "vzctl", "--help"))


def test_vzmigrate_online_on_the_two_node_bed(two_nodes: twonode.TwoNodes, bindir: Path,
                                              criu_ready: None) -> None:
    bed = two_nodes
    ctid = next_ctid()
    bed.a.vz("create", str(ctid), "--ipadd", bed.a.new_ip(), "--hostname", "mover")
    bed.a.vz("start", str(ctid))
    bed.a.sh(ctid, "echo moved > /root/m")
    ssh = f"-i {bed.ssh_key} -o UserKnownHostsFile={bed.known_hosts}"
    ok(classic(bindir, bed.a.env(), "vzmigrate", "--online", f"--ssh={ssh}", bed.dest(bed.b),
               str(ctid), netns=bed.a.netns))
    assert "running" in bed.b.vz("status", str(ctid)).stdout
    assert bed.b.sh(ctid, "cat /root/m; hostname").split() == ["moved", "mover"]
    assert "deleted" in bed.a.vz("status", str(ctid), check=False).stdout


def test_vzdump_all_exports_every_ct_but_the_excluded(tmp_path: Path) -> None:
    node = Node.load(str(tmp_path))
    node.confdir.mkdir(parents=True)
    for ctid in (101, 102, 103):
        (node.confdir / f"{ctid}.conf").write_text("")
    steps, notes = syntax.translate("vzdump", ["--all", "--exclude", "102", "--compress",
                                               "--dumpdir", "/d"], node)
    assert steps == [["dump", "--all", "--exclude", "102"],
                     ["export", "101", "--dumpdir", "/d"], ["export", "103", "--dumpdir", "/d"]]
    assert notes == ["vzdump: --compress ignored: chunks are always zstd-compressed"]
