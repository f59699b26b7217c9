"""vzbackup dump / restore / list / ls / extract / export / verify / prune / gc on real CTs.

Everything through the real CLI against a per-test node prefix; the repository is the
built-in ``local`` storage of that prefix unless a test configures another.
"""

from __future__ import annotations

import json
import os
import stat
import tarfile
import time
from pathlib import Path

import pytest
from nodebed import COUNTER, NodeBed, http_get, wait_for
from treecmp import diff, tree_manifest
from vzbackup.storage.local import DirBackend

from vzbackup.config.node import Node as VzNode
from vzbackup.ct.state import read_state
from vzbackup.engine.extract import load_tree
from vzbackup.engine.filescache import RACY_NS
from vzbackup.engine.repo import Repository


def dump(node: NodeBed, *args: str, check: bool = True) -> dict:
    res = node.vz("dump", *args, "--json", check=check, timeout=300)
    return json.loads(res.stdout) if res.stdout.strip() else {"rc": res.returncode}


def snapshots(node: NodeBed, *args: str) -> list[dict]:
    return json.loads(node.vz("list", "-b", "--json", *args).stdout)["snapshots"]


def private(node: NodeBed, ctid: int) -> Path:
    return node.prefix / "vz/private" / str(ctid)


def stopped_ct(node: NodeBed) -> tuple[int, str]:
    ctid, ip = node.create_running()
    node.sh(ctid, "mkdir -p /srv/data && echo hello > /srv/data/greeting && "
                  "ln -s greeting /srv/data/link && ln /srv/data/greeting /srv/data/hard")
    node.vz("stop", str(ctid))
    return ctid, ip


def test_stop_mode_backup_and_restore_to_new_ctid(node: NodeBed):
    ctid, _ = node.create_running()
    node.sh(ctid, "echo precious > /root/data")
    res = dump(node, str(ctid))["results"][0]
    assert res["ok"] and res["mode"] == "stop" and res["stats"]["was_running"]
    assert node.vz("status", str(ctid)).stdout.split()[-1] == "running"  # started again
    snaps = snapshots(node)
    assert [s["id"] for s in snaps] == [res["snapshot"]]
    assert snaps[0]["size"] > 0 and snaps[0]["files"] > 10
    # restore as a new CT with a new IP, started
    new, new_ip = node.new_ctid(), node.new_ip()
    node.vz("restore", res["snapshot"], str(new), "--ipadd", new_ip, "--start")
    assert node.sh(new, "cat /root/data").strip() == "precious"
    wait_for(lambda: http_get(new_ip), what="http on the restored CT")
    conf = (node.prefix / f"etc/vz/conf/{new}.conf").read_text()
    assert f'IP_ADDRESS="{new_ip}"' in conf and 'VE_PRIVATE="${PREFIX}/vz/private/$VEID"' in conf


def test_stopwait_0_waits_for_no_clean_stop(node: NodeBed):
    """(it waited the node's STOP_TIMEOUT, 30 s, as if no stopwait were given)"""
    ctid, _ = node.create_running()
    node.sh(ctid, "echo 'sleep 600' >> /etc/init.d/rcK")  # its halt hangs now
    res = dump(node, str(ctid), "--stopwait", "0")["results"][0]
    assert res["ok"] and res["stats"]["was_running"]
    log = node.vz("log", res["snapshot"]).stdout
    stopped = float(log.split("stopped in ")[1].split("s")[0])
    assert stopped < 10, log


def test_restored_tree_equals_original_and_incremental_is_cheap(node: NodeBed):
    ctid, _ = stopped_ct(node)
    src = private(node, ctid)
    os.setxattr(src / "srv/data/greeting", "user.note", b"xattr survives")
    os.chown(src / "srv/data/greeting", 1234, 5678)
    with open(src / "srv/sparse", "wb") as f:
        f.truncate(50 << 20)
        f.write(b"head")
    # what changed less than RACY_NS before a backup is read again by the next one (and a
    # dump's walk may start sooner than that after the writes above)
    time.sleep(2 * RACY_NS / 1e9)
    full = dump(node, str(ctid))["results"][0]
    assert full["stats"]["bytes_read"] > 0
    # unchanged: a metadata walk, nothing read, (almost) nothing stored
    again = dump(node, str(ctid))["results"][0]
    assert again["stats"]["bytes_read"] == 0
    assert again["stats"]["chunks_new"] <= 2
    # change one file: only it is read
    (src / "srv/data/greeting").write_text("changed\n")
    inc = dump(node, str(ctid))["results"][0]
    assert 0 < inc["stats"]["bytes_read"] < 100
    new = node.new_ctid()
    node.vz("restore", inc["snapshot"], str(new), "--ipadd", "none")
    assert diff(tree_manifest(src), tree_manifest(private(node, new))) == []
    # the first snapshot still restores the old content
    old = node.new_ctid()
    node.vz("restore", full["snapshot"], str(old), "--ipadd", "none")
    assert (private(node, old) / "srv/data/greeting").read_text() == "hello\n"


def test_suspend_mode_keeps_ct_running_and_backs_up_a_copy(node: NodeBed):
    ctid, _ = node.create_running()
    node.sh(ctid, COUNTER)
    node.sh(ctid, "echo consistent > /root/mark")
    res = dump(node, str(ctid), "--mode", "suspend")["results"][0]
    assert res["ok"] and res["stats"]["frozen_seconds"] < 30
    assert node.vz("status", str(ctid)).stdout.split()[-1] == "running"
    out = node.prefix / "extract"
    node.vz("extract", res["snapshot"], "/root", str(out))
    assert (out / "root/mark").read_text() == "consistent\n"
    assert not list((node.prefix / "vz/dump").glob("*suspend*"))  # temp copy gone


def test_snapshot_mode_needs_btrfs(node: NodeBed):
    ctid, _ = node.create_running()
    res = node.vz("dump", str(ctid), "--mode", "snapshot", check=False)
    assert res.returncode == 2
    assert "stop" in res.stderr and "suspend" in res.stderr and "checkpoint" in res.stderr
    assert snapshots(node) == []


def test_snapshot_mode_on_btrfs(btrfs_node: NodeBed):
    node = btrfs_node
    ctid, _ = node.create_running()
    node.sh(ctid, "echo on-btrfs > /root/mark")
    res = dump(node, str(ctid), "--mode", "snapshot")["results"][0]
    assert res["ok"]
    assert node.vz("status", str(ctid)).stdout.split()[-1] == "running"
    assert not list(private(node, ctid).parent.glob(".vzbackup-snap-*"))
    new = node.new_ctid()
    node.vz("restore", res["snapshot"], str(new), "--ipadd", "none")
    assert (private(node, new) / "root/mark").read_text() == "on-btrfs\n"


@pytest.mark.parametrize("btrfs", [False, True], ids=["copy", "btrfs"])
def test_checkpoint_mode_restores_running_state(request: pytest.FixtureRequest, btrfs: bool):
    node: NodeBed = request.getfixturevalue("btrfs_node" if btrfs else "node")
    ctid, ip = node.create_running()
    node.sh(ctid, COUNTER)
    wait_for(lambda: int(node.sh(ctid, "cat /tmp/counter").strip() or 0) > 5, what="counter")
    res = dump(node, str(ctid), "--mode", "checkpoint")["results"][0]
    assert res["ok"], res
    assert snapshots(node)[0]["with_state"]
    at_dump = int(node.sh(ctid, "cat /tmp/counter").strip())
    node.vz("stop", str(ctid), "--fast")
    node.vz("destroy", str(ctid))
    node.vz("restore", res["snapshot"], str(ctid), "--with-state")
    assert node.vz("status", str(ctid)).stdout.split()[-1] == "running"
    value = int(node.sh(ctid, "cat /tmp/counter").strip())
    assert value > 5, "the counter restarted: the state was not restored"
    assert value <= at_dump + 50
    assert http_get(ip)


def test_restore_never_touches_a_running_ct_and_needs_force(node: NodeBed):
    ctid, _ = node.create_running()
    node.sh(ctid, "echo v1 > /root/v")
    snap = dump(node, str(ctid))["results"][0]["snapshot"]
    node.sh(ctid, "echo v2 > /root/v")
    res = node.vz("restore", snap, str(ctid), "--force", check=False)
    assert res.returncode == 6 and "running" in res.stderr
    assert node.sh(ctid, "cat /root/v").strip() == "v2"
    node.vz("stop", str(ctid))
    res = node.vz("restore", snap, str(ctid), check=False)
    assert res.returncode == 5 and "--force" in res.stderr
    node.vz("restore", snap, str(ctid), "--force", "--start")
    assert node.sh(ctid, "cat /root/v").strip() == "v1"
    assert not [p for p in private(node, ctid).parent.iterdir() if p.name.startswith(".")]


def test_export_to_vzdump_archive_and_back(node: NodeBed):
    ctid, _ = stopped_ct(node)
    snap = dump(node, str(ctid))["results"][0]["snapshot"]
    out = node.prefix / "exports"
    res = json.loads(node.vz("export", snap, "--dumpdir", str(out), "--json").stdout)
    archive = Path(res["archive"])
    assert archive.name.startswith(f"vzdump-openvz-{ctid}-") and archive.name.endswith(".tar.zst")
    import zstandard

    with open(archive, "rb") as f, tarfile.open(
        fileobj=zstandard.ZstdDecompressor().stream_reader(f), mode="r|"
    ) as tf:
        names = [m.name for m in tf]
    assert "./etc/vzdump/vps.conf" in names
    new = node.new_ctid()
    node.vz("restore", str(archive), str(new), "--ipadd", "none")
    assert diff(tree_manifest(private(node, ctid)), tree_manifest(private(node, new))) == []



def test_notes_template_fills_in_every_variable(node: NodeBed):
    """vzdump.conf's notes-template: {{vmid}}, {{guestname}}, {{node}} and {{cluster}} (none:
    nodes form no cluster) are replaced."""
    ctid = node.new_ctid()
    node.vz("create", str(ctid), "--hostname", "web1")
    conf = node.prefix / "etc/vzbackup/vzdump.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text("notes-template: {{vmid}}: {{guestname}} on {{node}}{{cluster}}\n")
    dump(node, str(ctid))
    assert snapshots(node)[0]["notes"] == f"{ctid}: web1 on {os.uname().nodename}"

def test_ls_extract_log_and_hooks(node: NodeBed, tmp_path: Path):
    ctid, _ = stopped_ct(node)
    hook = tmp_path / "hook.sh"
    record = tmp_path / "phases"
    hook.write_text(f'#!/bin/sh\necho "$1 $2 $3 $STOREID $DUMPDIR" >> {record}\n'
                    f'echo hook says hi\nionice -p $$ > {record}.io\n')
    hook.chmod(0o755)
    snap = dump(node, str(ctid), "--script", str(hook), "--notes-template", "nightly {{vmid}}"
                )["results"][0]["snapshot"]
    assert "best-effort: prio 7" in Path(f"{record}.io").read_text()  # vzdump's ionice 7
    phases = record.read_text().splitlines()
    here = f"local {node.prefix / 'vz/backup'}"
    assert phases == [f"job-start   {here}", f"backup-start stop {ctid} {here}",
                      f"backup-end stop {ctid} {here}", f"job-end   {here}"]
    usb = tmp_path / "usb"  # another directory storage: its path, as vzdump gives it
    cfg = node.prefix / "etc/vzbackup/storage.cfg"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(f"dir: usb\n\tpath {usb}\n")
    record.unlink()
    dump(node, str(ctid), "--script", str(hook), "--storage", "usb")
    assert record.read_text().splitlines()[0] == f"job-start   usb {usb}"
    listing = node.vz("ls", snap, "/srv/data").stdout
    assert "greeting" in listing and "link -> greeting" in listing
    assert snapshots(node)[0]["notes"] == f"nightly {ctid}"
    out = tmp_path / "out"
    node.vz("extract", snap, "/srv/data/greeting", str(out))
    assert (out / "greeting").read_text() == "hello\n"
    log = node.vz("log", snap).stdout
    assert f"starting backup of CT {ctid}" in log and "finished backup" in log


def test_corrupt_chunk_verify_names_the_file_and_restore_fails_clean(node: NodeBed):
    ctid, _ = stopped_ct(node)
    (private(node, ctid) / "srv/data/big").write_bytes(os.urandom(3 << 20))
    snap = dump(node, str(ctid))["results"][0]["snapshot"]
    assert node.vz("verify").returncode == 0
    repo = Repository.open(DirBackend(node.prefix / "vz/backup"))
    entries = load_tree(repo, repo.tree_of(repo.resolve(snap)))
    big = next(e for e in entries if e.path == "srv/data/big")
    key, loc = repo.locate(big.chunks[1][0])  # flip a byte in the middle of one of its chunks
    victim = node.prefix / "vz/backup" / key
    data = bytearray(victim.read_bytes())
    data[loc.offset + loc.length // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    res = node.vz("verify", check=False)
    assert res.returncode == 12
    assert f"{snap}:/srv/data/big" in res.stderr
    new = node.new_ctid()
    res = node.vz("restore", snap, str(new), "--ipadd", "none", check=False)
    assert res.returncode == 12 and "srv/data/big" in res.stderr
    assert not (node.prefix / f"etc/vz/conf/{new}.conf").exists()
    assert not private(node, new).exists()
    assert [p.name for p in private(node, new).parent.iterdir()] == [str(ctid)]


def test_damaged_chunker_in_the_config_fails_a_dump_before_the_ct_stops(node: NodeBed):
    """A writer cuts with the config's chunkers; damaged ones (a max of 1 TiB would map a
    buffer that big) fail the dump with a clear error before the CT is stopped, and nothing
    is written. Readers don't use them: the repository still restores."""
    ctid, _ = node.create_running()
    node.sh(ctid, "echo precious > /root/data")
    snap = dump(node, str(ctid))["results"][0]["snapshot"]
    init_pid = read_state(VzNode.load(str(node.prefix)), ctid).init_pid
    cfg = node.prefix / "vz/backup/config"
    config = json.loads(cfg.read_text())
    stored = sorted(p for p in (node.prefix / "vz/backup").rglob("*"))
    for bad in ({"min": 1024, "avg": 4096, "max": 1 << 40}, {"min": "4k", "avg": 1, "max": 2}):
        config["tree_chunker"] = bad
        cfg.write_text(json.dumps(config))
        res = node.vz("dump", str(ctid), check=False)
        assert res.returncode == 12 and "config: tree_chunker" in res.stderr, res.stderr
        assert read_state(VzNode.load(str(node.prefix)), ctid).init_pid == init_pid
        assert sorted(p for p in (node.prefix / "vz/backup").rglob("*")) == stored
    new = node.new_ctid()
    node.vz("restore", snap, str(new), "--ipadd", "none")
    assert (private(node, new) / "root/data").read_text() == "precious\n"


def test_upgrade_repo_makes_new_snapshots_store_their_id_lists(node: NodeBed):
    """A version 3 repository (made by an older vzbackup) keeps its version and writes its
    id lists into the manifests; ``upgrade-repo`` makes it version 4 under the maintenance
    lock, its next snapshot stores them as chunks, and the old snapshot still restores."""
    ctid, _ = stopped_ct(node)
    backend = DirBackend(node.prefix / "vz/backup")
    Repository.init(backend)
    config = {**json.loads(backend.get("config")), "version": 3}
    backend.put("config", json.dumps(config).encode())
    old = dump(node, str(ctid))["results"][0]["snapshot"]
    manifest = Repository.open(backend).load_manifest(old)
    assert manifest.lists == {} and manifest.refs and manifest.version == 3
    locked = node.prefix / "vz/backup/locks/maintenance-0"  # a gc of another node
    locked.write_text(json.dumps({"kind": "maintenance", "host": "elsewhere", "boot": "x",
                                  "pid": 1, "started": time.time()}))
    res = node.vz("upgrade-repo", "--lockwait", "0", check=False)
    assert res.returncode == 7 and json.loads(backend.get("config")) == config, res.stderr
    locked.unlink()
    up = json.loads(node.vz("upgrade-repo", "--json").stdout)
    assert (up["from"], up["to"]) == (3, 4) and json.loads(backend.get("config"))["version"] == 4
    assert "already format version 4" in node.vz("upgrade-repo").stdout
    (private(node, ctid) / "srv/after").write_text("upgraded\n")
    new_snap = dump(node, str(ctid))["results"][0]["snapshot"]
    repo = Repository.open(backend)
    manifest = repo.load_manifest(new_snap)
    assert set(manifest.lists) == {"tree", "refs"} and manifest.refs == [] and manifest.version == 4
    assert node.vz("verify").returncode == 0
    for snap, after in ((old, False), (new_snap, True)):
        new = node.new_ctid()
        node.vz("restore", snap, str(new), "--ipadd", "none")
        assert (private(node, new) / "srv/data/greeting").read_text() == "hello\n"
        assert (private(node, new) / "srv/after").exists() == after


def test_encrypted_backups_via_cli(node: NodeBed, tmp_path: Path):
    ctid, _ = stopped_ct(node)
    key = tmp_path / "key"
    node.vz("key", "create", str(key))
    snap = dump(node, str(ctid), "--keyfile", str(key))["results"][0]["snapshot"]
    res = node.vz("list", "-b", check=False)
    assert res.returncode == 3 and "encrypted" in res.stderr
    assert snap in node.vz("list", "-b", "--keyfile", str(key)).stdout
    new = node.new_ctid()
    node.vz("restore", snap, str(new), "--keyfile", str(key), "--ipadd", "none")
    assert (private(node, new) / "srv/data/greeting").read_text() == "hello\n"


def test_prune_and_gc_via_cli(node: NodeBed):
    ctid, _ = stopped_ct(node)
    ids = []
    for i in range(3):
        (private(node, ctid) / f"srv/file{i}").write_bytes(os.urandom(200_000))
        ids.append(dump(node, str(ctid))["results"][0]["snapshot"])
    node.vz("protect", ids[0])
    dry = json.loads(node.vz("prune", "--keep-last", "1", "--dry-run", "--json").stdout)
    assert [s["snapshot"] for s in dry["snapshots"] if not s["keep"]] == [ids[1]]
    assert len(snapshots(node)) == 3
    node.vz("prune", "--keep-last", "1")
    assert [s["id"] for s in snapshots(node)] == [ids[0], ids[2]]
    gc = json.loads(node.vz("gc", "--grace", "0", "--json").stdout)
    assert gc["trash_deleted"] == [ids[1]]
    assert node.vz("verify").returncode == 0


def test_dump_all_with_exclude_and_bad_input(node: NodeBed):
    a, _ = stopped_ct(node)
    b, _ = stopped_ct(node)
    res = dump(node, "--all", "--exclude", str(b))
    assert [r["ctid"] for r in res["results"]] == [a]
    bad = node.vz("dump", "4242", check=False)
    assert bad.returncode == 4 and "4242" in bad.stderr
    assert node.vz("dump", check=False).returncode == 2
    assert node.vz("restore", "101/not-a-time", "500", check=False).returncode == 2
    missing = node.vz("restore", f"{a}/2001-01-01T00:00:00Z", "500", check=False)
    assert missing.returncode == 4
    assert node.vz("dump", str(a), "--storage", "nowhere", check=False).returncode == 4
    cfg = node.prefix / "etc/vzbackup/storage.cfg"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("dir: usb\n    fsync 0\n")
    res = node.vz("dump", str(a), "--storage", "usb", check=False)
    assert res.returncode == 3 and "storage.cfg:1" in res.stderr


def test_two_nodes_share_a_repository(node: NodeBed, tmp_path: Path):
    """Restore on another node that only knows the storage (no CT config there)."""
    ctid, _ = stopped_ct(node)
    snap = dump(node, str(ctid))["results"][0]["snapshot"]
    other = NodeBed(tmp_path / "node-b")
    cfg = other.prefix / "etc/vzbackup/storage.cfg"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(f"dir: shared\n    path {node.prefix / 'vz/backup'}\n")
    try:
        assert snap in other.vz("list", "--storage", "shared").stdout
        other.vz("restore", "--storage", "shared", str(ctid), "--ipadd", "none")
        assert diff(tree_manifest(private(node, ctid)),
                    tree_manifest(private(other, ctid))) == []
    finally:
        other.cleanup()


def test_hardlinks_devices_and_modes_survive_via_cli(node: NodeBed):
    ctid, _ = stopped_ct(node)
    p = private(node, ctid)
    os.mknod(p / "srv/tty9", 0o620 | stat.S_IFCHR, os.makedev(4, 9))
    os.chmod(p / "srv/data/greeting", 0o4750)
    snap = dump(node, str(ctid))["results"][0]["snapshot"]
    new = node.new_ctid()
    node.vz("restore", snap, str(new), "--ipadd", "none")
    q = private(node, new)
    assert os.stat(q / "srv/data/greeting").st_ino == os.stat(q / "srv/data/hard").st_ino
    assert os.lstat(q / "srv/tty9").st_rdev == os.makedev(4, 9)
    assert stat.S_IMODE(os.stat(q / "srv/data/greeting").st_mode) == 0o4750


def test_one_backup_per_ct_at_a_time(node: NodeBed):
    from vzbackup.lock import Lock

    ctid, _ = stopped_ct(node)
    with Lock(node.prefix / f"vz/lock/{ctid}.backup.lock"):
        res = node.vz("dump", str(ctid), "--lockwait", "0", "--json", check=False)
    assert res.returncode == 7
    error = json.loads(res.stdout)["results"][0]["error"]
    assert error.startswith(f"backup of CT {ctid} is locked")
    assert snapshots(node) == []
    assert dump(node, str(ctid))["results"][0]["ok"]  # and works once the lock is free


def test_bwlimit_slows_the_backup_down(node: NodeBed):
    ctid, _ = stopped_ct(node)
    (private(node, ctid) / "srv/noise").write_bytes(os.urandom(3 << 20))
    res = dump(node, str(ctid), "--bwlimit", "1024")["results"][0]  # 1 MiB/s
    assert res["stats"]["read_seconds"] >= 2.0
