"""Backups in an S3 bucket (the real Ceph RGW) with real CTs, through the real CLI.

The disaster path end to end: a node with nothing but storage.cfg (and the key file)
lists and restores from the bucket. Plus incremental uploads, prune and GC on S3, two
backups at once into one bucket, faults between client and server, and bad setups.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultproxy import FaultProxy
from nodebed import COUNTER, NodeBed, http_get, wait_for
from s3fixture import ENDPOINT, TLS_CA, TLS_ENDPOINT, Bucket
from treecmp import diff, tree_manifest


def configure(node: NodeBed, cfg: str) -> None:
    conf = node.prefix / "etc/vzbackup/storage.cfg"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(cfg)


def dump(node: NodeBed, *args: str, check: bool = True) -> dict:
    res = node.vz("dump", "--storage", "s3", *args, "--json", check=check, timeout=300)
    return json.loads(res.stdout)


def snapshots(node: NodeBed, *args: str) -> list[dict]:
    return json.loads(node.vz("list", "--storage", "s3", "--json", *args).stdout)["snapshots"]


def private(node: NodeBed, ctid: int) -> Path:
    return node.prefix / "vz/private" / str(ctid)


def pack_keys(bucket: Bucket) -> set[str]:
    return set(bucket.object_keys("data/"))


@contextlib.contextmanager
def empty_node() -> Iterator[NodeBed]:
    """A brand-new node: an empty prefix, no template, no repository, no cache."""
    bed = NodeBed(Path(tempfile.mkdtemp(prefix="vzt-dr-", dir="/var/tmp")))
    try:
        yield bed
    finally:
        bed.cleanup()


@pytest.fixture
def s3_node(node: NodeBed, s3_bucket: Bucket) -> NodeBed:
    configure(node, s3_bucket.storage_cfg())
    return node


def test_disaster_restore_from_the_bucket_alone(s3_node: NodeBed, s3_bucket: Bucket,
                                                tmp_path: Path):
    node = s3_node
    key = tmp_path / "repo.key"
    node.vz("key", "create", str(key))
    ctid, ip = node.create_running()
    node.sh(ctid, "mkdir -p /srv && echo precious > /srv/data && "
                  "dd if=/dev/urandom of=/srv/blob bs=64k count=40 2>/dev/null")
    first = dump(node, str(ctid), "--keyfile", str(key))["results"][0]
    assert first["ok"], first
    node.sh(ctid, "echo newer > /srv/data")
    node.vz("stop", str(ctid))  # a start rewrites files: back up what stays on disk
    latest = dump(node, str(ctid), "--keyfile", str(key))["results"][0]
    assert latest["ok"], latest
    assert "config" in s3_bucket.object_keys() and pack_keys(s3_bucket)
    with empty_node() as fresh:
        configure(fresh, s3_bucket.storage_cfg())
        saved_key = fresh.prefix / "root/repo.key"
        saved_key.parent.mkdir(parents=True)
        shutil.copy(key, saved_key)
        res = fresh.vz("list", "--storage", "s3", check=False)
        assert res.returncode == 3 and "encrypted" in res.stderr
        listed = fresh.vz("list", "--storage", "s3", "--keyfile", str(saved_key)).stdout
        assert first["snapshot"] in listed and latest["snapshot"] in listed
        fresh.vz("restore", "--storage", "s3", "--keyfile", str(saved_key), str(ctid))
        assert diff(tree_manifest(private(node, ctid)), tree_manifest(private(fresh, ctid))) == []
        conf = (fresh.prefix / f"etc/vz/conf/{ctid}.conf").read_text()
        assert f'IP_ADDRESS="{ip}"' in conf
        fresh.vz("start", str(ctid))
        assert fresh.sh(ctid, "cat /srv/data").strip() == "newer"
        wait_for(lambda: http_get(ip), what="http on the restored CT")
        # an older snapshot by id, as another CT, started by restore
        other = fresh.new_ctid()
        fresh.vz("restore", "--storage", "s3", "--keyfile", str(saved_key), first["snapshot"],
                 str(other), "--ipadd", "none", "--start")
        assert fresh.sh(other, "cat /srv/data").strip() == "precious"


def stopped_ct(node: NodeBed) -> int:
    ctid, _ = node.create_running()
    node.sh(ctid, "mkdir -p /srv && echo hello > /srv/greeting")
    node.vz("stop", str(ctid))
    return ctid


def verify(node: NodeBed, storage: str = "s3") -> None:
    res = node.vz("verify", "--storage", storage, check=False, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr


def test_s3_over_tls_with_a_private_ca(node: NodeBed, s3_bucket: Bucket):
    """The RGW's TLS endpoint, its certificate signed by a private CA: refused with a clear
    error until storage.cfg names the CA (ca-bundle), then backup, verify and a restore in
    two processes (each with a TLS client of its own) go over it."""
    ctid = stopped_ct(node)
    many = private(node, ctid) / "srv/many"  # enough files for a restore in two processes
    many.mkdir()
    for i in range(600):
        (many / str(i)).write_text(f"{i}\n")
    configure(node, s3_bucket.storage_cfg(endpoint=TLS_ENDPOINT))
    res = node.vz("dump", "--storage", "s3", str(ctid), check=False)
    assert res.returncode != 0 and "certificate verify failed" in res.stderr, res.stderr
    assert "ca-bundle" in res.stderr and s3_bucket.object_keys() == []
    configure(node, s3_bucket.storage_cfg(endpoint=TLS_ENDPOINT, **{"ca-bundle": str(TLS_CA)}))
    done = dump(node, str(ctid))["results"][0]
    assert done["ok"], done
    verify(node)
    other = node.new_ctid()
    node.vz("restore", "--storage", "s3", done["snapshot"], str(other), "--ipadd", "none")
    assert diff(tree_manifest(private(node, ctid)), tree_manifest(private(node, other))) == []


def test_incremental_uploads_only_new_chunks_and_caches_manifests(s3_node: NodeBed,
                                                                 s3_bucket: Bucket):
    node = s3_node
    ctid = stopped_ct(node)
    full = dump(node, str(ctid))["results"][0]
    before = pack_keys(s3_bucket)
    assert full["stats"]["chunks_new"] > len(before) == 1  # a small CT: one pack
    (private(node, ctid) / "srv/new").write_bytes(os.urandom(3 << 20))
    inc = dump(node, str(ctid))["results"][0]
    added = pack_keys(s3_bucket) - before
    assert len(added) == 1 and inc["stats"]["chunks_new"] > 3  # 3 MiB in 128 KiB chunks
    assert (3 << 20) < inc["stats"]["stored_new"] < (3 << 20) + 100_000
    assert inc["stats"]["bytes_read"] < (3 << 20) + 4096  # only the new file was read
    # one index file per pack, cached locally like the manifests
    index_cache = next((node.prefix / "var/cache/vzbackup").glob("*/index"))
    assert sorted(p.name for p in index_cache.iterdir()) == sorted(
        k.split("/")[1] for k in s3_bucket.object_keys("index/"))
    # the manifests are cached locally; a lost cache is rebuilt from the bucket
    listed = sorted(s["id"].split("/")[1] for s in snapshots(node))
    cache = next((node.prefix / "var/cache/vzbackup").glob("*/manifests"))
    assert sorted(p.name for p in cache.glob("*/*")) == listed
    shutil.rmtree(cache)
    assert len(snapshots(node)) == 2 and len(list(cache.glob("*/*"))) == 2
    verify(node)


def test_prune_and_gc_on_s3(s3_node: NodeBed, s3_bucket: Bucket):
    node = s3_node
    ctid = stopped_ct(node)
    ids = []
    for i in range(3):  # each snapshot has a file of its own
        (private(node, ctid) / f"srv/file{i}").write_bytes(os.urandom(600_000))
        if i:
            (private(node, ctid) / f"srv/file{i - 1}").unlink()
        ids.append(dump(node, str(ctid))["results"][0]["snapshot"])
    node.vz("protect", "--storage", "s3", ids[0])
    with_all = pack_keys(s3_bucket)
    node.vz("prune", "--storage", "s3", "--keep-last", "1")
    assert [s["id"] for s in snapshots(node)] == [ids[0], ids[2]]
    # a writer killed in the middle of a multipart upload left it behind
    s3_bucket.client.create_multipart_upload(Bucket=s3_bucket.name, Key="data/ee/killed")
    time.sleep(1.1)  # storage times have a one-second resolution
    gc = json.loads(node.vz("gc", "--storage", "s3", "--grace", "0", "--json").stdout)
    assert gc["trash_deleted"] == [ids[1]] and gc["chunks_deleted"] > 0
    assert gc["incomplete_removed"] == ["data/ee/killed"]
    assert not s3_bucket.client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads")
    gone = gc["packs_deleted"] + gc["packs_repacked"]
    # the pruned snapshot's own pack: deleted, or repacked when the kept one reuses an id
    # list chunk it stored (lists are cut by their ids: FORMAT.md)
    assert gone == 1
    assert len(pack_keys(s3_bucket)) == len(with_all) - gone + gc["packs_written"]
    assert len(s3_bucket.object_keys("index/")) == 1  # consolidated
    assert not s3_bucket.object_keys("locks/")
    verify(node)


def test_two_backups_at_once_into_one_bucket(s3_node: NodeBed):
    node = s3_node
    a, b = stopped_ct(node), stopped_ct(node)
    (private(node, b) / "srv/only-b").write_bytes(os.urandom(1 << 20))
    procs = [
        subprocess.Popen([sys.executable, "-m", "vzbackup.cli", "dump", "--storage", "s3",
                          str(ct), "--json"], env=node.env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for ct in (a, b)
    ]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert json.loads(out)["results"][0]["ok"]
    assert sorted(s["ctid"] for s in snapshots(node)) == [a, b]
    verify(node)
    new = node.new_ctid()
    node.vz("restore", "--storage", "s3", str(b), str(new), "--ipadd", "none")
    assert diff(tree_manifest(private(node, b)), tree_manifest(private(node, new))) == []


@pytest.fixture
def proxy_node(s3_node: NodeBed, s3_bucket: Bucket) -> Iterator[tuple[NodeBed, list]]:
    """The s3 node plus a way to add 'flaky' storages through fault proxies."""
    proxies: list[FaultProxy] = []
    try:
        yield s3_node, proxies
    finally:
        for p in proxies:
            p.close()


def flaky(node: NodeBed, bucket: Bucket, proxies: list, **faults: object) -> FaultProxy:
    proxy = FaultProxy(int(ENDPOINT.rsplit(":", 1)[1]), **faults)
    proxies.append(proxy)
    configure(node, bucket.storage_cfg() + bucket.storage_cfg(
        "flaky", endpoint=proxy.endpoint, retries="2", **{"connect-timeout": "2"}))
    return proxy


def test_resets_and_5xx_backup_completes_and_verifies(proxy_node, s3_bucket: Bucket):
    node, proxies = proxy_node
    ctid = stopped_ct(node)
    (private(node, ctid) / "srv/blob").write_bytes(os.urandom(6 << 20))
    proxy = flaky(node, s3_bucket, proxies, error_rate=0.15, reset_rate=0.25, seed=7)
    res = node.vz("dump", "--storage", "flaky", str(ctid), "--json", check=False, timeout=300)
    assert proxy.faults["503"] and proxy.faults["reset"], proxy.faults
    out = json.loads(res.stdout)["results"][0]
    if res.returncode:  # failing is allowed, but cleanly: a storage error, no snapshot
        assert out["exit_code"] == 13 and not out["ok"]
    verify(node)
    again = dump(node, str(ctid))["results"][0]
    assert again["ok"]
    verify(node)


def test_network_dies_mid_backup_then_resume_uploads_only_the_rest(proxy_node,
                                                                   s3_bucket: Bucket):
    node, proxies = proxy_node
    ctid = stopped_ct(node)
    (private(node, ctid) / "srv/blob").write_bytes(os.urandom(72 << 20))
    # packs are written two at a time: the first two (~33 MiB with the CT's own files) are
    # complete with their index file (one for both: INDEX_EVERY) long before 52 MiB have
    # gone out, while the later ones are cut (at 36 MiB the cut came as the first two
    # finished: one of them could be stored and its index file cut off)
    flaky(node, s3_bucket, proxies, cut_after=52 << 20)
    res = node.vz("dump", "--storage", "flaky", str(ctid), "--json", check=False, timeout=300)
    assert res.returncode == 13, res.stderr
    out = json.loads(res.stdout)["results"][0]
    assert not out["ok"] and "cannot reach endpoint" in out["error"]
    assert snapshots(node) == []
    assert pack_keys(s3_bucket) and s3_bucket.object_keys("index/")  # a pack got through
    resumed = dump(node, str(ctid))["results"][0]
    assert resumed["ok"]
    assert resumed["stats"]["bytes_new"] < (72 - 16 + 1) << 20  # the stored packs are reused
    verify(node)


def test_bad_setups_give_one_clear_error_each(s3_node: NodeBed, s3_bucket: Bucket,
                                              tmp_path: Path):
    node = s3_node
    ctid = stopped_ct(node)
    key = tmp_path / "key"
    node.vz("key", "create", str(key))
    snap = dump(node, str(ctid), "--keyfile", str(key))["results"][0]["snapshot"]
    objects = sorted(s3_bucket.object_keys())

    configure(node, s3_bucket.storage_cfg(**{"secret-key": "not-the-secret"}))
    res = node.vz("list", "--storage", "s3", "--keyfile", str(key), check=False)
    assert res.returncode == 13 and "access denied" in res.stderr
    assert "not-the-secret" not in res.stderr + res.stdout

    configure(node, s3_bucket.storage_cfg(bucket="vzt-gone-bucket"))
    res = node.vz("dump", "--storage", "s3", str(ctid), check=False)
    assert res.returncode == 13 and "bucket vzt-gone-bucket does not exist" in res.stderr
    res = node.vz("list", "--storage", "s3", check=False)
    assert res.returncode == 13 and "does not exist" in res.stderr

    configure(node, s3_bucket.storage_cfg())
    res = node.vz("list", "--storage", "nosuch", check=False)
    assert res.returncode == 4 and "no storage named 'nosuch'" in res.stderr
    other = tmp_path / "other-key"
    node.vz("key", "create", str(other))
    res = node.vz("list", "--storage", "s3", "--keyfile", str(other), check=False)
    assert res.returncode == 3 and "does not belong" in res.stderr

    # a corrupt pack and a truncated manifest: named, exit 12, nothing deleted
    chunk = max(s3_bucket.object_keys("data/"), key=lambda k: s3_bucket.client.head_object(
        Bucket=s3_bucket.name, Key=k)["ContentLength"])
    body = bytearray(s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=chunk)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=chunk, Body=bytes(body))
    res = node.vz("verify", "--storage", "s3", "--keyfile", str(key), check=False)
    assert res.returncode == 12 and "DAMAGED" in res.stderr
    new = node.new_ctid()
    res = node.vz("restore", "--storage", "s3", "--keyfile", str(key), snap, str(new),
                  "--ipadd", "none", check=False)
    assert res.returncode == 12 and not private(node, new).exists()
    manifest = f"snapshots/{snap}"
    blob = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=manifest)["Body"].read()
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=manifest, Body=blob[: len(blob) // 2])
    shutil.rmtree(node.prefix / "var/cache/vzbackup", ignore_errors=True)
    res = node.vz("list", "--storage", "s3", "--keyfile", str(key), check=False)
    assert res.returncode == 12 and snap.split("/")[1] in res.stderr
    assert sorted(s3_bucket.object_keys()) == objects


def test_object_lock_keeps_snapshots_from_prune(node: NodeBed, s3_lock_bucket: Bucket):
    configure(node, s3_lock_bucket.storage_cfg(**{"object-lock-days": "1"}))
    ctid = stopped_ct(node)
    ids = [dump(node, str(ctid))["results"][0]["snapshot"] for _ in range(2)]
    res = json.loads(node.vz("prune", "--storage", "s3", "--keep-last", "1", "--json").stdout)
    assert all(s["keep"] for s in res["snapshots"])
    assert [s["id"] for s in snapshots(node)] == ids
    head = s3_lock_bucket.client.head_object(Bucket=s3_lock_bucket.name, Key=f"snapshots/{ids[0]}")
    assert head["ObjectLockMode"] == "GOVERNANCE"


def test_disaster_restore_with_running_state(s3_node: NodeBed, s3_bucket: Bucket, criu_ready):
    """The node is reinstalled at the same path (CRIU images name the node's cgroups)."""
    node = s3_node
    ctid, ip = node.create_running()
    node.sh(ctid, COUNTER)
    wait_for(lambda: int(node.sh(ctid, "cat /tmp/counter").strip() or 0) > 5, what="counter")
    res = dump(node, str(ctid), "--mode", "checkpoint")["results"][0]
    assert res["ok"], res
    node.vz("stop", str(ctid), "--fast")
    node.vz("destroy", str(ctid))
    for child in node.prefix.iterdir():  # nothing of the old node survives
        shutil.rmtree(child)
    configure(node, s3_bucket.storage_cfg())
    node.vz("restore", "--storage", "s3", str(ctid), "--with-state")
    assert node.vz("status", str(ctid)).stdout.split()[-1] == "running"
    value = int(node.sh(ctid, "cat /tmp/counter").strip())
    assert value > 5, "the counter restarted: the state was not restored"
    assert http_get(ip)


def test_rebuild_index_after_the_index_was_deleted(s3_node: NodeBed, s3_bucket: Bucket,
                                                   tmp_path: Path):
    node = s3_node
    key = tmp_path / "repo.key"
    node.vz("key", "create", str(key))
    ctid = node.new_ctid()
    node.vz("create", str(ctid))  # never started: its template's files are enough
    snap = dump(node, str(ctid), "--keyfile", str(key))["results"][0]["snapshot"]
    for k in s3_bucket.object_keys("index/"):
        s3_bucket.client.delete_object(Bucket=s3_bucket.name, Key=k)
    other = node.new_ctid()
    restore = ("restore", "--storage", "s3", "--keyfile", str(key), snap, str(other),
               "--ipadd", "none")
    res = node.vz(*restore, check=False)
    assert res.returncode == 12 and "missing" in res.stderr, res.stderr
    out = json.loads(node.vz("rebuild-index", "--storage", "s3", "--keyfile", str(key),
                             "--json").stdout)
    assert out["packs"] == len(pack_keys(s3_bucket)) > 0 and not out["unreadable"]
    assert len(s3_bucket.object_keys("index/")) == out["index_files_written"] == 1
    node.vz(*restore)
    assert diff(tree_manifest(private(node, ctid)), tree_manifest(private(node, other))) == []
