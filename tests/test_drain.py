"""vzbackup drain: every CT of node A moves to node B; one that can't stays running on A."""

from __future__ import annotations

import json

import pytest
from nodebed import COUNTER, next_ctid, wait_for
from twonode_fixture import twonode
from vzbackup.migrate.drain import Capacity, Need, place

Bed = twonode.TwoNodes
Node = twonode.BedNode
G = 1 << 30


@pytest.mark.parametrize(
    ("needs", "caps", "expected"),
    [
        # the biggest CT first, each onto the DEST with the most memory left
        ([Need(101, 3 * G, G), Need(102, 2 * G, G), Need(103, G, G)],
         [Capacity("a", 4 * G, 10 * G), Capacity("b", 3 * G, 10 * G)],
         {101: "a", 102: "b", 103: "a"}),
        # not enough disk at the roomiest DEST (files need 1.1x): the other one
        ([Need(101, G, 5 * G)], [Capacity("a", 8 * G, 5 * G), Capacity("b", 2 * G, 6 * G)],
         {101: "b"}),
        # stopped CTs need no memory; a CT that fits nowhere gets None
        ([Need(101, 0, G), Need(102, 9 * G, G)], [Capacity("a", 2 * G, 4 * G)],
         {101: "a", 102: None}),
        # an unreachable DEST takes nothing
        ([Need(101, G, G)], [Capacity("a", error="unreachable"), Capacity("b", 2 * G, 4 * G)],
         {101: "b"}),
    ],
)
def test_place(needs, caps, expected) -> None:
    assert place(needs, caps) == expected


def _running_ct(node: Node) -> tuple[int, str]:
    ctid, ip = next_ctid(), node.new_ip()
    node.vz("create", str(ctid), "--ipadd", ip, "--hostname", f"d{ctid}")
    node.vz("start", str(ctid))
    node.sh(ctid, COUNTER)
    return ctid, ip


def _counter(node: Node, ctid: int) -> int:
    return int(wait_for(lambda: node.sh(ctid, "cat /tmp/counter").strip(), what="counter"))


def _status(node: Node, ctid: int) -> str:
    return node.vz("status", str(ctid), check=False).stdout


def _drain(bed: Bed, *extra: str, dests: str = "") -> tuple[int, dict]:
    res = bed.a.vz("drain", dests or bed.dest(bed.b), *bed.ssh_args(), "--json", *extra,
                   check=False, timeout=400)
    assert res.stdout.strip(), res.stderr
    return res.returncode, json.loads(res.stdout)


@pytest.mark.slow
def test_drain_moves_all_but_the_failing_ct(two_nodes: Bed) -> None:
    bed = two_nodes
    live, _ = _running_ct(bed.a)
    stopped = next_ctid()
    bed.a.vz("create", str(stopped))
    clash, _ = _running_ct(bed.a)
    bed.b.vz("create", str(clash))  # DEST already has a CT with that CTID
    before = {c: _counter(bed.a, c) for c in (live, clash)}

    # a second DEST without sshd (refused on node A's loopback) takes nothing
    rc, dry = _drain(bed, "--online", "--dry-run", dests=f"{bed.dest(bed.b)},root@127.0.0.1")
    assert rc == 15 and dry["dry_run"] and dry["failed"] == 1
    dest, nowhere = dry["dests"]
    assert dest["mem_available"] > 0 and dest["disk_free"] > 0 and not dest["error"]
    assert nowhere["error"] and {r["dest"] for r in dry["results"]} == {bed.dest(bed.b)}
    assert all("running" in _status(bed.a, c) for c in (live, clash))
    assert "deleted" in _status(bed.b, live)

    broken = next_ctid()  # a config that can't be read: reported, the others go on
    (bed.a.prefix / f"etc/vz/conf/{broken}.conf").write_text('ONBOOT="perhaps"\n')
    rc, rep = _drain(bed, "--online", "--parallel", "2")
    assert rc == 15, rep
    by_ct = {r["ctid"]: r for r in rep["results"]}
    assert set(by_ct) == {live, stopped, clash, broken}
    assert (rep["moved"], rep["failed"]) == (2, 2)
    assert "ONBOOT" in by_ct[broken]["error"] and by_ct[broken]["dest"] is None
    assert by_ct[live]["ok"] and by_ct[live]["mode"].startswith("online")
    assert by_ct[live]["runs_on"] == "dest" and by_ct[live]["times"]["dump"] > 0
    assert by_ct[stopped]["ok"] and by_ct[stopped]["mode"] == "stopped"
    assert not by_ct[clash]["ok"] and "already exists" in by_ct[clash]["error"]
    assert by_ct[clash]["runs_on"] == "source"
    # the moved CTs: at B, the live one with its memory (no restart from 1)
    assert "running" in _status(bed.b, live) and _counter(bed.b, live) >= before[live]
    assert "exist" in _status(bed.b, stopped) and "deleted" in _status(bed.a, stopped)
    # the failed one runs on at A as before; B's own CT of that CTID is untouched
    assert "running" in _status(bed.a, clash)
    wait_for(lambda: _counter(bed.a, clash) > before[clash], what="counter runs on at A")
    assert "stopped" in _status(bed.b, clash)
    # the terminal summary of a second drain: only the failing CT is left
    (bed.a.prefix / f"etc/vz/conf/{broken}.conf").unlink()
    res = bed.a.vz("drain", bed.dest(bed.b), *bed.ssh_args(), check=False, timeout=200)
    assert res.returncode == 15
    assert "0 moved, 1 failed" in res.stdout and "FAILED" in res.stdout


@pytest.mark.slow
def test_drain_with_plain_tcp_warns_as_migrate_does(two_nodes: Bed) -> None:
    """--plain-tcp sends every moved CT's memory unencrypted: drain warns, as migrate does
    (it said nothing)."""
    bed = two_nodes
    ctid = next_ctid()
    bed.a.vz("create", str(ctid))
    res = bed.a.vz("drain", bed.dest(bed.b), *bed.ssh_args(), "--online", "--plain-tcp",
                   "--dry-run", timeout=200)
    assert "WARNING: --plain-tcp" in res.stderr and "unencrypted" in res.stderr, res.stderr
    assert "1 checked, 0 failed" in res.stdout and "exist" in bed.a.vz("status", str(ctid)).stdout
