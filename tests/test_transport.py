"""The SSH control channel (migrate/ssh.py) against the two-node bed's real sshd."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import paramiko
import pytest
from twonode_fixture import ssh_target as target
from twonode_fixture import twonode
from vzbackup.migrate.ssh import (
    AuthError,
    HostKeyError,
    Session,
    SSHTarget,
    UnreachableError,
    fingerprint,
)

from vzbackup.errors import RuntimeFailure, UsageError

pytestmark = pytest.mark.slow


@pytest.fixture
def bed(shared_two_nodes: twonode.TwoNodes) -> twonode.TwoNodes:
    return shared_two_nodes


def host_key(bed: twonode.TwoNodes, node: twonode.BedNode) -> paramiko.PKey:
    kind, b64 = (bed.dir / node.name / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    return paramiko.PKey.from_type_string(kind, base64.b64decode(b64))


def test_parse() -> None:
    t = SSHTarget.parse("admin@node2", port=2222, key="/k",
                        opts=["ConnectTimeout=3", "StrictHostKeyChecking=accept-new",
                              "userknownhostsfile=/kh"])
    assert (t.user, t.host, t.port, t.key_filename, t.known_hosts) == (
        "admin", "node2", 2222, "/k", "/kh")
    assert t.accept_new and t.hostname_key == "[node2]:2222"
    assert t.options["ConnectTimeout"] == "3"
    assert SSHTarget.parse("node2").user == "root"
    assert SSHTarget.parse("node2").known_hosts_files()[1][1] == Path("/etc/ssh/ssh_known_hosts")
    for bad in (["StrictHostKeyChecking=no"], ["ProxyCommand=nc x"], ["Port=abc"], ["x"]):
        with pytest.raises(UsageError):
            SSHTarget.parse("h", opts=bad)
    with pytest.raises(UsageError):
        SSHTarget.parse("root@")


def test_run_commands(bed: twonode.TwoNodes) -> None:
    with Session(target(bed)) as s:
        assert s.alive()
        assert s.run(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False) == (
            3, b"out\n", b"err\n")
        odd = ["a b", "$HOME", "'q'", '"d"', "*", "x;y"]
        assert s.run(["printf", "%s|", *odd])[1] == "|".join(odd).encode() + b"|"
        data = os.urandom(3 << 20)
        assert s.run(["cat"], input_=data)[1] == data
        assert s.run(["sh", "-c", "head -c 4000000 /dev/zero; exit 4"], check=False)[:2] == (
            4, bytes(4000000))
        rc, out, _ = s.vzbackup("list", "-a")
        assert rc == 0 and out.startswith(b"CTID")
        assert s.run(["sh", "-c", "echo $VZBACKUP_PREFIX"])[1].decode().strip() == str(
            bed.b.prefix)
        with pytest.raises(RuntimeFailure, match="No such file"):
            s.run(["ls", "/nonexistent-vzbed"])
        with pytest.raises(RuntimeFailure, match="timed out"):
            s.run(["sleep", "30"], timeout=0.5)
    assert not s.alive()


def test_open_exec_is_a_long_lived_channel(bed: twonode.TwoNodes) -> None:
    with Session(target(bed)) as s:
        chan = s.open_exec(["sh", "-c", "while read -r l; do echo \"$l\"; done"])
        f = chan.makefile("rb")
        for i in range(3):
            chan.sendall(json.dumps({"n": i}).encode() + b"\n")
            assert json.loads(f.readline()) == {"n": i}
        chan.shutdown_write()
        assert chan.recv_exit_status() == 0


def test_unknown_host_key_refused_then_accepted_new(
    bed: twonode.TwoNodes, tmp_path: Path
) -> None:
    known = tmp_path / "ssh/known_hosts"
    with pytest.raises(HostKeyError) as e:
        Session(target(bed, known=known)).connect()
    msg = str(e.value)
    assert "unknown host key" in msg and bed.b.lan_ip in msg
    assert fingerprint(host_key(bed, bed.b)) in msg and "accept-new" in msg
    assert not known.exists()
    with Session(target(bed, "StrictHostKeyChecking=accept-new", known=known)) as s:
        assert s.run(["true"])[0] == 0
    assert known.read_text().split() == [bed.b.lan_ip, "ssh-ed25519",
                                        host_key(bed, bed.b).get_base64()]
    with Session(target(bed, known=known)) as s:  # now known: strict checking passes
        assert s.alive()
    r = subprocess.run(["ssh-keygen", "-F", bed.b.lan_ip, "-f", str(known)], capture_output=True)
    assert r.returncode == 0  # OpenSSH reads what we wrote


def test_changed_host_key_refused_even_with_accept_new(
    bed: twonode.TwoNodes, tmp_path: Path
) -> None:
    known = tmp_path / "known_hosts"
    a_key = host_key(bed, bed.a)  # B's address with another key: a changed host key
    known.write_text(f"# comment\nother ssh-ed25519 {a_key.get_base64()}\n"
                     f"{bed.b.lan_ip} ssh-ed25519 {a_key.get_base64()}\n")
    before = known.read_text()
    for opts in ((), ("StrictHostKeyChecking=accept-new",)):
        with pytest.raises(HostKeyError) as e:
            Session(target(bed, *opts, known=known)).connect()
        msg = str(e.value)
        assert "CHANGED" in msg and f"{known}:3" in msg
        assert fingerprint(host_key(bed, bed.b)) in msg and fingerprint(a_key) in msg
        assert "ssh-keygen -R" in msg
    assert known.read_text() == before


def test_hashed_known_hosts_entry(bed: twonode.TwoNodes, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    shutil.copy(bed.known_hosts, known)
    subprocess.run(["ssh-keygen", "-H", "-f", str(known)], check=True, capture_output=True)
    assert bed.b.lan_ip not in known.read_text()
    with Session(target(bed, known=known)) as s:
        assert s.alive()


def test_wrong_client_key_is_auth_error(bed: twonode.TwoNodes, tmp_path: Path) -> None:
    other = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    t = target(bed)
    t.key_filename = str(other)
    with pytest.raises(AuthError, match=r"authentication as root@.* failed") as e:
        Session(t).connect()
    assert e.value.exit_code == 14
    t.key_filename = str(tmp_path / "missing")
    with pytest.raises(AuthError, match="does not exist"):
        Session(t).connect()


def test_unreachable(bed: twonode.TwoNodes) -> None:
    with pytest.raises(UnreachableError, match=f"{bed.b.lan_ip}:2: Connection refused") as e:
        Session(target(bed, port=2)).connect()
    assert e.value.exit_code == 14
    t = target(bed)
    t.host = bed.b.new_ip()  # nobody answers ARP for it
    with pytest.raises(UnreachableError, match=t.host):
        Session(t, timeout=1).connect()
    t.host = "no-such-host.invalid"
    with pytest.raises(UnreachableError, match="cannot resolve"):
        Session(t).connect()


def test_connection_loss_is_reported(bed: twonode.TwoNodes) -> None:
    s = Session(target(bed)).connect()
    try:
        s.transport.sock.close()
        with pytest.raises(UnreachableError, match="connection lost"):
            s.run(["true"])
    finally:
        s.close()
