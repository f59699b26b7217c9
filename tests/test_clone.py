"""``vzbackup clone`` on real CTs: a stopped and a running busybox CT (plain copy, suspend
mode), btrfs (snapshots), the Debian systemd CT (a running clone that boots with its own
identity), and the refusals that must leave nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from nodebed import DEBIAN_TEMPLATE_NAME, NodeBed, wait_for
from test_debian import system_state
from treecmp import diff, make_rich_tree, tree_manifest

from vzbackup.config.ct import CTConfig
from vzbackup.config.net import parse_netif
from vzbackup.lock import Lock

# What clone rewrites in the copy (everything else must be identical).
REWRITTEN = {"etc/hostname", "etc/hosts", "etc/machine-id"}
BRIDGED = ("ifname=eth1,bridge=vzt-none0,mac=00:18:51:AA:BB:CC,host_ifname=vzt{ctid},"
           "ip=10.199.250.9/24")


def clone(bed: NodeBed, *args: str, check: bool = True) -> tuple[int, dict]:
    res = bed.vz("clone", *args, "--json", check=check, timeout=300)
    return res.returncode, (json.loads(res.stdout) if res.returncode == 0 else
                            {"stderr": res.stderr})


def conf_of(bed: NodeBed, ctid: int) -> CTConfig:
    return CTConfig.load(ctid, bed.prefix / f"etc/vz/conf/{ctid}.conf")


def leftovers(bed: NodeBed, ctid: int, private_dir: Path | None = None) -> list[str]:
    """What a failed clone to *ctid* could have left: config, name links, private areas."""
    private_dir = private_dir or bed.prefix / "vz/private"
    found = [str(p) for p in (bed.prefix / "etc/vz/conf").glob(f"{ctid}.conf*")]
    found += [str(p) for p in (bed.prefix / "etc/vz/names").iterdir()
              if os.readlink(p).endswith(f"/{ctid}.conf")]
    found += [str(p) for p in private_dir.iterdir() if str(ctid) in p.name]
    return found


def test_clone_of_a_stopped_ct_copies_every_file_and_gives_it_its_own_identity(node: NodeBed):
    src, ip = node.new_ctid(), node.new_ip()
    node.vz("create", str(src), "--ipadd", ip, "--hostname", "source", "--name", f"src{src}")
    private = node.prefix / f"vz/private/{src}"
    make_rich_tree(private / "srv/rich")  # hard links, ACLs, xattrs, holes, devices, suid
    subprocess.run(["setcap", "cap_net_raw+ep", str(private / "srv/rich/bin/sh")], check=True)
    (private / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    conf = conf_of(node, src)
    conf.set("NETIF", BRIDGED.format(ctid=src))
    conf.save()
    before = tree_manifest(private)

    new, new_ip = node.new_ctid(), node.new_ip()
    _, res = clone(node, str(src), str(new), "--name", f"clone{new}", "--hostname", "copy",
                    "--ipadd", new_ip)
    assert (res["mode"], res["frozen_seconds"]) == ("stop", 0.0)
    assert res["method"] in ("copy", "reflink")  # reflink where /var/tmp has them (xfs)
    assert res["reset"] == ["/etc/machine-id"] and res["ips"] == [new_ip]
    copy = node.prefix / f"vz/private/{new}"
    assert res["private"] == str(copy)
    after = tree_manifest(copy)
    assert diff({k: v for k, v in before.items() if k not in REWRITTEN},
                {k: v for k, v in after.items() if k not in REWRITTEN}) == []
    assert tree_manifest(private) == before  # the source is untouched
    assert (copy / "etc/machine-id").read_text() == ""
    assert (copy / "etc/hostname").read_text() == "copy\n"
    assert subprocess.run(["getcap", str(copy / "srv/rich/bin/sh")], capture_output=True,
                          text=True).stdout.split()[-1] == "cap_net_raw=ep"
    # Its own config: name, hostname, IP and MAC; no host interface name or bridged address
    # of the source; the source's id map.
    cconf, sconf = conf_of(node, new), conf_of(node, src)
    assert (cconf.name, cconf.hostname, cconf.ips) == (f"clone{new}", "copy", [new_ip])
    (nif,) = cconf.netifs
    assert nif.mac != "00:18:51:AA:BB:CC" and nif.mac.startswith("00:18:51:")
    assert (nif.host_ifname, nif.ip, nif.bridge) == (None, (), "vzt-none0")
    assert cconf.idmap == sconf.idmap and cconf.idmap.unprivileged
    assert os.readlink(node.prefix / f"etc/vz/names/clone{new}").endswith(f"/{new}.conf")
    assert sconf.netifs == parse_netif(BRIDGED.format(ctid=src)) and sconf.ips == [ip]
    # It runs as itself, beside the source.
    for c in (cconf, sconf):  # the test bridge doesn't exist: start without it
        c.file.delete("NETIF")
        c.save()
    node.vz("start", f"clone{new}")
    node.vz("start", str(src))
    assert node.sh(new, "hostname").strip() == "copy"
    assert node.sh(new, "ip -4 -o addr show eth0").split()[3] == f"{new_ip}/32"
    assert node.sh(new, "stat -c %u:%g /etc/passwd").strip() == "0:0"  # mapped as the source


def test_clone_of_a_running_ct_freezes_it_only_for_the_second_pass(node: NodeBed):
    src, _ = node.create_running()
    node.sh(src, "echo before > /root/marker")
    new, new_ip = node.new_ctid(), node.new_ip()
    _, res = clone(node, str(src), str(new), "--ipadd", new_ip, "--hostname", "live", "--start")
    assert (res["mode"], res["method"], res["started"]) == ("suspend", "rsync", True)
    assert 0 < res["frozen_seconds"] < res["seconds"]
    assert node.vz("status", str(src)).stdout.split()[-1] == "running"
    assert node.sh(new, "cat /root/marker; hostname").split() == ["before", "live"]
    assert not list((node.prefix / "vz/private").glob(".*"))  # no temporary copy left


def test_clone_refusals_leave_nothing_behind(node: NodeBed):
    src, ip = node.create_running("--name", "busy")
    other = node.new_ctid()
    node.vz("create", str(other), "--name", "other")
    other_private = tree_manifest(node.prefix / f"vz/private/{other}")
    new = node.new_ctid()
    # NEWID exists: the existing CT is untouched
    rc, res = clone(node, str(src), str(other), check=False)
    assert rc == 5 and "already exists" in res["stderr"]
    assert tree_manifest(node.prefix / f"vz/private/{other}") == other_private
    assert conf_of(node, other).name == "other"
    # a taken name or address
    assert clone(node, str(src), str(new), "--name", "other", check=False)[0] == 5
    assert clone(node, str(src), str(new), "--ipadd", ip, check=False)[0] == 5
    # no address and an address: refused (the address was taken, 'none' ignored)
    rc, res = clone(node, str(src), str(new), "--ipadd", "none", "--ipadd", node.new_ip(),
                    check=False)
    assert rc == 2 and "--ipadd none" in res["stderr"], res
    assert leftovers(node, new) == []
    # the source is being backed up or migrated (its backup lock is held)
    with Lock(node.prefix / f"vz/lock/{src}.backup.lock", what="test"):
        rc, res = clone(node, "busy", str(new), check=False)
    assert rc == 7 and "locked" in res["stderr"]
    assert leftovers(node, new) == []
    # the disk fills: the clone's private areas live on a 1 MiB tmpfs
    node.vz("stop", str(src))
    src_private = node.prefix / "vz/source"
    src_private.mkdir()
    os.rename(node.prefix / f"vz/private/{src}", src_private / str(src))
    conf = conf_of(node, src)
    conf.set("VE_PRIVATE", f"{src_private}/$VEID")
    conf.save()
    small = node.prefix / "vz/private"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "vzt-clone-full", str(small)],
                   check=True)
    try:
        rc, res = clone(node, str(src), str(new), "--name", "full", check=False)
        assert rc == 10 and "no space left" in res["stderr"], res
        assert leftovers(node, new, small) == [] and list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
    node.vz("start", str(src))  # the source is fine


def test_clone_on_btrfs_is_a_snapshot_stopped_or_running(btrfs_node: NodeBed):
    node = btrfs_node
    src, _ = node.create_running()
    node.sh(src, "echo live > /root/marker")
    new = node.new_ctid()
    _, res = clone(node, str(src), str(new))
    assert (res["mode"], res["method"]) == ("snapshot", "btrfs-snapshot")
    copy = Path(res["private"])
    assert copy.stat().st_ino == 256  # a subvolume of its own: backups can snapshot it
    assert (copy / "root/marker").read_text() == "live\n"
    assert not list((node.prefix / "vz/private").glob(".vzbackup-snap-*"))
    node.vz("stop", str(src))
    _, res = clone(node, str(src), str(node.new_ctid()))
    assert (res["mode"], res["method"]) == ("stop", "btrfs-snapshot")


def test_clone_of_a_running_debian_ct_boots_as_a_machine_of_its_own(debian_node: NodeBed):
    node = debian_node
    src, _ = node.create_running("--ostemplate", DEBIAN_TEMPLATE_NAME)
    assert system_state(node, src) == "running"
    ids = "cat /etc/machine-id; ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub"
    src_ids = node.sh(src, ids)
    new, new_ip = node.new_ctid(), node.new_ip()
    _, res = clone(node, str(src), str(new), "--hostname", "deb-clone", "--ipadd", new_ip,
                    "--start")
    assert res["mode"] == "suspend" and "/etc/machine-id" in res["reset"]
    assert any(r.startswith("/etc/ssh/ssh_host_") for r in res["reset"])
    assert system_state(node, new) == "running"
    assert system_state(node, src) == "running"  # the source ran on
    assert node.sh(new, "hostname").strip() == "deb-clone"
    assert node.sh(new, "ip -4 -o addr show eth0").split()[3] == f"{new_ip}/32"
    wait_for(lambda: node.sh(new, "test -s /etc/ssh/ssh_host_ed25519_key.pub; echo $?",
                             check=False).strip() == "0", what="the clone's SSH host keys")
    new_ids = node.sh(new, ids)
    assert new_ids.splitlines()[0] != src_ids.splitlines()[0]  # machine-id
    assert new_ids.splitlines()[1] != src_ids.splitlines()[1]  # SSH host key
