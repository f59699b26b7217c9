"""The one admission check ("can this CT land here?") and the process/kernel helpers of
vzbackup.syscalls that replaced their copies (pid_alive, rename_exchange, ioprio_set)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from vzbackup.storage.ratelimit import Limiter

from vzbackup import syscalls as S
from vzbackup.config.node import Node
from vzbackup.ct import admission, registry


@pytest.fixture
def node(tmp_path: Path) -> Node:
    node = Node.load(str(tmp_path))
    node.confdir.mkdir(parents=True)
    (node.confdir / "101.conf").write_text('IP_ADDRESS="10.199.7.1 10.199.7.2/24"\nNAME="web"\n')
    registry.set_name(node, 101, "web")
    return node


def whats(clashes: list[admission.Clash]) -> list[str]:
    return [c.what for c in clashes]


def test_a_free_ct_lands(node: Node) -> None:
    assert admission.clashes(node, 102, name="db", ips=["10.199.7.3"]) == []
    assert admission.ips_of_other_cts(node, 102) == {"10.199.7.1": 101, "10.199.7.2": 101}
    assert admission.ips_of_other_cts(node, 101) == {}


def test_every_clash_is_named(node: Node, tmp_path: Path) -> None:
    private = tmp_path / "area"
    private.mkdir()
    (private / "file").write_text("x")
    found = admission.clashes(node, 101, name="web", ips=["10.199.7.2/24"], private=private)
    assert whats(found) == ["ctid", "private"]  # its own name and addresses are no clash
    found = admission.clashes(node, 102, name="web", ips=["10.199.7.2/24", "10.199.7.9"],
                              private=private, empty_private_ok=True)
    assert whats(found) == ["name", "ip", "private"]
    assert found[0].message == "name 'web' is already used by CT 101"
    assert found[1].message == "IP 10.199.7.2/24 is already used by CT 101"
    err = found[2].error()
    assert f"private area {private} already exists" in str(err) and err.hint


def test_an_existing_ct_may_be_asked_for_and_an_empty_area_may_stay(node: Node,
                                                                   tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert admission.clashes(node, 101, new=False, private=empty, empty_private_ok=True) == []
    assert whats(admission.clashes(node, 101, new=False, private=empty)) == ["private"]


@pytest.mark.skipif(os.geteuid() != 0, reason="reads the host's addresses with ip(8)")
def test_host_addresses_count_when_asked(node: Node) -> None:
    assert admission.clashes(node, 102, ips=["127.0.0.1"]) == []
    assert [c.message for c in admission.clashes(node, 102, ips=["127.0.0.1"], host=True)] == [
        "IP 127.0.0.1 is already in use on this host"]


def test_pid_alive() -> None:
    assert S.pid_alive(os.getpid())
    assert not S.pid_alive(0) and not S.pid_alive(-1)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    while not _zombie(child.pid):  # exited, not reaped yet
        pass
    assert not S.pid_alive(child.pid)  # a zombie is dead
    child.wait()
    assert not S.pid_alive(child.pid)


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_rename_exchange(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a/one").touch()
    (tmp_path / "b").mkdir()
    S.rename_exchange(tmp_path / "a", tmp_path / "b")
    assert os.listdir(tmp_path / "b") == ["one"] and os.listdir(tmp_path / "a") == []
    with pytest.raises(FileNotFoundError):
        S.rename_exchange(tmp_path / "a", tmp_path / "missing")


@pytest.mark.parametrize(("ioclass", "level", "shown"), [
    ("IOPRIO_CLASS_BE", 6, "best-effort: prio 6"), ("IOPRIO_CLASS_IDLE", 0, "idle")])
def test_ioprio_set(ioclass: str, level: int, shown: str) -> None:
    code = (f"from vzbackup import syscalls as S; import os, subprocess; "
            f"assert S.ioprio_set(S.{ioclass}, {level}); "
            f"print(subprocess.run(['ionice', '-p', str(os.getpid())], capture_output=True, "
            f"text=True).stdout.strip())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == shown


def test_limiter_counts_what_it_paces() -> None:
    unlimited = Limiter(None)
    threads = [threading.Thread(target=lambda: [unlimited.take(3) for _ in range(1000)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert unlimited.total == 4 * 1000 * 3
