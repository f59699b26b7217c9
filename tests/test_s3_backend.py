"""The S3 backend against the real Ceph RGW: the Backend contract, big objects, conditional
writes and their fallback, touch, Object Lock, and one clear error per kind of bad setup."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from s3fixture import ACCESS_KEY, ENDPOINT, SECRET_KEY, Bucket
from test_repository import backup, rich_tree_to_split
from treecmp import diff, tree_manifest
from vzbackup.storage.backend import BackendError, Kind, ObjectMissing
from vzbackup.storage.s3 import CLAIM_PREFIX, OUTER_ATTEMPTS, S3Backend
from vzbackup.storage.s3options import S3Options

from vzbackup.config import storage as storage_config
from vzbackup.engine import extract
from vzbackup.engine import tree as T
from vzbackup.engine.extract import _split_files, load_tree, plan_reads, restore_tree
from vzbackup.engine.repo import Repository
from vzbackup.errors import ConfigError, DamagedError


def backend(bucket: Bucket, **kw: object) -> S3Backend:
    opts = {"endpoint": ENDPOINT, "path_style": True, "access_key": ACCESS_KEY,
            "secret_key": SECRET_KEY, **kw}
    return S3Backend(S3Options(bucket.name, **opts), name="t")  # type: ignore[arg-type]


def test_contract_with_prefix(s3_bucket: Bucket):
    be = backend(s3_bucket, prefix="repo/one")
    be.put("chunks/ab/abc", b"data")
    be.put("snapshots/101/x", b"manifest")
    assert be.get("chunks/ab/abc") == b"data"
    assert be.get_range("chunks/ab/abc", 1, 2) == b"at"
    assert s3_bucket.object_keys() == ["repo/one/chunks/ab/abc", "repo/one/snapshots/101/x"]
    assert sorted(i.key for i in be.list()) == ["chunks/ab/abc", "snapshots/101/x"]
    assert [(i.key, i.size) for i in be.list("chunks/")] == [("chunks/ab/abc", 4)]
    assert be.exists("chunks/ab/abc") and not be.exists("chunks/ab/nope")
    assert be.stat("snapshots/101/x").size == 8
    with pytest.raises(ObjectMissing):
        be.get("nope")
    with pytest.raises(ObjectMissing):
        be.stat("nope")
    be.delete("chunks/ab/abc")
    be.delete("chunks/ab/abc")  # missing is not an error
    assert not be.exists("chunks/ab/abc")
    be.put("empty", b"")
    assert be.get("empty") == b""
    for n in range(3):
        be.put(f"index/{n}", b"i")
    be.delete_many(["index/0", "index/2", "index/9"])  # one request; missing ones are fine
    assert [i.key for i in be.list("index/")] == ["index/1"]
    assert s3_bucket.object_keys("repo/one/index/") == ["repo/one/index/1"]
    with pytest.raises(BackendError, match="invalid object key"):
        be.put("../escape", b"")
    be.close()


def test_a_body_put_with_its_known_sha256_is_checked_against_it_by_the_server(
        s3_bucket: Bucket):
    """A pack's name (the SHA-256 of its bytes) signs its PutObject instead of the body
    hashed again: the server stores the bytes only if they match it."""
    be = backend(s3_bucket)
    parts = [os.urandom(1000), b"", os.urandom(5000)]
    data = b"".join(parts)
    be.put_parts("data/ab/good", parts, Kind.PACK, hashlib.sha256(data).hexdigest())
    assert be.get("data/ab/good") == data
    with pytest.raises(BackendError, match="XAmzContentSHA256Mismatch"):
        be.put_parts("data/ab/bad", parts, Kind.PACK, hashlib.sha256(b"other").hexdigest())
    assert not be.exists("data/ab/bad")
    be.put("index/after", b"i")  # the next request of the thread hashes its own body
    assert be.get("index/after") == b"i"
    be.close()


def test_packs_of_any_size_one_after_another_are_stored_whole(s3_bucket: Bucket):
    """put_parts joins into a buffer the thread keeps: a smaller pack after a bigger one
    and a bigger one after that are stored as they are, not cut or padded."""
    be = backend(s3_bucket)
    for n, size in enumerate((300_000, 1000, 0, 450_000, 299_999)):
        parts = [os.urandom(size // 3), os.urandom(size - size // 3)]
        be.put_parts(f"data/ab/{n}", parts, Kind.PACK, hashlib.sha256(b"".join(parts)).hexdigest())
        assert be.get(f"data/ab/{n}") == b"".join(parts)
    be.close()


def test_large_objects_multipart_and_ranged_reads(s3_bucket: Bucket):
    be = backend(s3_bucket, multipart_threshold=5, multipart_chunksize=5)
    data = os.urandom(13 * 1024 * 1024 + 7)
    be.put("big", data)
    assert be.stat("big").size == len(data)
    assert be.get("big") == data
    assert be.put_if_absent("big-once", data)  # one PutObject however large
    assert be.get("big-once") == data


def test_parallel_puts_share_one_client(s3_bucket: Bucket):
    be = backend(s3_bucket, max_connections=4)
    blobs = {f"chunks/{i:02x}/{i}": os.urandom(64 * 1024) for i in range(64)}
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: be.put(*kv), blobs.items()))
        got = dict(zip(blobs, pool.map(be.get, blobs), strict=True))
    assert got == blobs


@pytest.mark.parametrize("conditional", ["yes", "no"], ids=["if-none-match", "claims"])
def test_put_if_absent_has_exactly_one_winner(s3_bucket: Bucket, conditional: str):
    be = backend(s3_bucket, conditional_writes=conditional)
    assert be.put_if_absent("config", b"first")
    assert not be.put_if_absent("config", b"second")
    assert be.get("config") == b"first"
    start = threading.Barrier(6)

    def race(i: int) -> bool:
        start.wait()
        return be.put_if_absent("snapshots/101/t", f"writer {i}".encode())

    with ThreadPoolExecutor(6) as pool:
        wins = list(pool.map(race, range(6)))
    assert wins.count(True) == 1
    assert be.get("snapshots/101/t") == f"writer {wins.index(True)}".encode()
    assert not list(be.list(CLAIM_PREFIX))  # claims are cleaned up


def test_stale_claim_does_not_block(s3_bucket: Bucket):
    be = backend(s3_bucket, conditional_writes="no")
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=f"{CLAIM_PREFIX}lk/0000", Body=b"")
    # a crashed writer's claim older than the lease: pretend the lease is over
    import vzbackup.storage.s3 as s3mod

    lease, s3mod.CLAIM_LEASE = s3mod.CLAIM_LEASE, -1.0
    try:
        assert be.put_if_absent("lk", b"mine")
    finally:
        s3mod.CLAIM_LEASE = lease
    assert be.get("lk") == b"mine"
    assert not list(be.list(CLAIM_PREFIX))


def test_conditional_writes_are_detected(s3_bucket: Bucket):
    be = backend(s3_bucket)
    assert be.put_if_absent("a", b"1")
    assert be.conditional is True  # Ceph RGW honours If-None-Match: *
    assert not list(be.list(CLAIM_PREFIX))  # the probe object is gone


def test_first_lock_starts_the_probe_in_the_background(s3_bucket: Bucket):
    be = backend(s3_bucket)
    be.put("data/p1", b"pack", Kind.PACK)
    be.put("index/i1", b"index", Kind.INDEX)
    assert be._probe is None  # only a lock (a backup's first write) starts it
    be.put("locks/backup-1", b"lock", Kind.LOCK)
    assert be._probe is not None
    assert be._probe.result(timeout=60) is True
    assert be.conditional is True
    before = be.requests
    assert be.put_if_absent("m", b"manifest", Kind.SNAPSHOT)
    assert be.requests == before + 1  # the answer was ready: one PutObject
    be.close()
    assert not list(backend(s3_bucket).list(CLAIM_PREFIX))
    # a backup opening its repository starts it too (its first write may be the config)
    be = backend(s3_bucket)
    Repository.open(be, create=True)
    assert be._probe is not None and be._probe.result(timeout=60) is True
    be.close()


def test_touch_moves_mtime_and_keeps_content(s3_bucket: Bucket):
    be = backend(s3_bucket)
    be.put("chunks/aa/aa", b"x" * 100)
    before = be.stat("chunks/aa/aa").mtime
    time.sleep(1.1)  # LastModified has whole seconds
    be.touch("chunks/aa/aa")
    assert be.stat("chunks/aa/aa").mtime > before
    assert be.get("chunks/aa/aa") == b"x" * 100
    with pytest.raises(ObjectMissing):
        be.touch("chunks/aa/missing")


def test_object_lock_on_manifests_only(s3_lock_bucket: Bucket):
    be = backend(s3_lock_bucket, object_lock_days=1, multipart_threshold=5)
    be.put("snapshots/101/2026-01-01T00:00:00Z", b"m", Kind.SNAPSHOT)
    be.put("snapshots/101/2026-01-01T00:00:00Z.log", b"log", Kind.LOG)
    be.put("chunks/aa/aa", b"c", Kind.PACK)
    until = be.retained_until("snapshots/101/2026-01-01T00:00:00Z")
    assert until and until > time.time() + 3600
    # a manifest above the multipart threshold: one PutObject still (Ceph would drop the
    # retention of a multipart upload)
    big = os.urandom(6 << 20)
    be.put("snapshots/102/2026-01-01T00:00:00Z", big, Kind.SNAPSHOT)
    assert be.get("snapshots/102/2026-01-01T00:00:00Z") == big
    assert (be.retained_until("snapshots/102/2026-01-01T00:00:00Z") or 0) > time.time() + 3600
    assert be.retained_until("snapshots/101/2026-01-01T00:00:00Z.log") is None
    assert be.retained_until("chunks/aa/aa") is None


def test_missing_bucket_is_one_clear_error(s3_server: str):
    be = S3Backend(S3Options("vzt-no-such-bucket", endpoint=ENDPOINT, path_style=True,
                             access_key=ACCESS_KEY, secret_key=SECRET_KEY), name="offsite")
    with pytest.raises(BackendError) as e:
        be.get("config")
    assert str(e.value).startswith("S3 storage 'offsite': bucket vzt-no-such-bucket does not exist")
    assert not isinstance(e.value, ObjectMissing)


def test_create_bucket_option(s3_server: str):
    from s3fixture import admin_client, empty_bucket, new_bucket_name

    name = new_bucket_name()
    try:
        be = S3Backend(S3Options(name, endpoint=ENDPOINT, path_style=True, access_key=ACCESS_KEY,
                                 secret_key=SECRET_KEY, create_bucket=True))
        be.put("x", b"1")
        assert be.get("x") == b"1"
    finally:
        empty_bucket(admin_client(), name)


def test_wrong_credentials_never_echo_the_secret(s3_bucket: Bucket):
    be = backend(s3_bucket, secret_key="wrong-secret-123")
    with pytest.raises(BackendError) as e:
        be.get("config")
    assert "access denied" in str(e.value) and "check the credentials" in str(e.value)
    assert "wrong-secret-123" not in str(e.value) and "wrong-secret-123" not in be.url


def test_unreachable_endpoint(s3_bucket: Bucket):
    be = backend(s3_bucket, endpoint="http://127.0.0.1:9", retries=0, connect_timeout=1)
    with pytest.raises(BackendError, match=r"cannot reach endpoint http://127.0.0.1:9"):
        be.get("config")
    with pytest.raises(BackendError, match=r"cannot reach endpoint"):
        be.put("locks/backup-1", b"", Kind.LOCK)  # its background probe fails too, quietly
    assert be._probe is not None and be._probe.result(timeout=60) is None
    assert be.conditional is None  # unknown: the next put_if_absent probes and says why
    with pytest.raises(BackendError, match=r"cannot reach endpoint.*probing"):
        be.put_if_absent("m", b"x", Kind.SNAPSHOT)
    be.close()


@pytest.mark.parametrize("retries", [0, 2])
def test_retries_is_how_often_botocore_sends_a_request_again(retries: int):
    be = S3Backend(S3Options("b", endpoint="http://127.0.0.1:9", path_style=True,
                             access_key=ACCESS_KEY, secret_key=SECRET_KEY, retries=retries,
                             connect_timeout=1), name="t")
    with pytest.raises(BackendError, match=r"cannot reach endpoint"):
        be.get("config")
    assert be.requests == OUTER_ATTEMPTS * (1 + retries)  # each operation is tried 3 times
    be.close()


def test_storage_cfg_s3_section(s3_bucket: Bucket, tmp_path):
    cfg = tmp_path / "storage.cfg"
    cfg.write_text(s3_bucket.storage_cfg("offsite", prefix="pve1"))
    storages = storage_config.load(cfg, tmp_path / "local")
    assert set(storages) == {"offsite", "local"}
    be = storages["offsite"].open()
    assert isinstance(be, S3Backend) and be.prefix == "pve1/"
    assert SECRET_KEY not in be.url
    with pytest.raises(ConfigError, match="needs a bucket"):
        storage_config.parse("s3: x\n\tendpoint http://h\n")
    cfg.write_text("s3: x\n\tbucket b\n\tsecret-key only\n")
    with pytest.raises(ConfigError, match=f"^{cfg}:1: s3 storage 'x': set both access-key"):
        storage_config.load(cfg, tmp_path)


def test_example_storage_cfg_is_valid(tmp_path):
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "conf/storage.cfg"
    storages = storage_config.parse(example.read_text(), str(example))
    offsite = storages["offsite"]
    be = offsite.open()  # every documented key is an accepted option (no request is made)
    assert isinstance(be, S3Backend) and be.prefix == "node-pve1/" and be.lock_days == 30
    assert "example-secret" not in be.url


def test_remove_incomplete_aborts_old_multipart_uploads_only(s3_bucket: Bucket):
    be = backend(s3_bucket, prefix="repo")

    def start_upload(key: str) -> str:
        up = be.client.create_multipart_upload(Bucket=s3_bucket.name, Key=f"repo/{key}")
        be.client.upload_part(Bucket=s3_bucket.name, Key=f"repo/{key}", PartNumber=1,
                              UploadId=up["UploadId"], Body=os.urandom(5 << 20))
        return up["UploadId"]

    start_upload("data/aa/killed")
    time.sleep(1.1)  # storage times have a one-second resolution
    be.put("clock", b"")
    between = be.stat("clock").mtime
    time.sleep(1.1)
    start_upload("data/bb/running")
    assert be.remove_incomplete(between) == ["data/aa/killed"]
    left = be.client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads", [])
    assert [u["Key"] for u in left] == ["repo/data/bb/running"]
    assert be.remove_incomplete(time.time() + 3600) == ["data/bb/running"]
    assert not be.client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads")


def test_reopened_backend_shares_no_client_pool_or_lock(s3_bucket: Bucket):
    be = backend(s3_bucket, prefix="p", conditional_writes="yes")
    be.put("k", b"v")
    copy = be.reopened()
    assert copy.client is not be.client and copy._ranges is not be._ranges
    assert copy.limiter is not be.limiter and copy._probe_lock is not be._probe_lock
    assert copy.get("k") == b"v" and copy.conditional is True and be.get("k") == b"v"
    assert not backend(s3_bucket, bwlimit=1000).shared_by_processes


def test_restore_from_s3_in_two_processes_makes_the_same_tree(
        s3_bucket: Bucket, tmp_path, monkeypatch: pytest.MonkeyPatch):
    src = tmp_path / "src"
    rich_tree_to_split(src)
    repo = Repository.init(backend(s3_bucket))
    m, _ = backup(repo, src)
    entries = load_tree(repo, repo.tree_of(m))
    cut = _split_files(repo, entries)
    assert cut is not None
    sent = repo.backend.requests
    written = restore_tree(repo, entries, tmp_path / "out")
    assert diff(tree_manifest(src), tree_manifest(tmp_path / "out")) == []
    # each half reads its packs' ranges: the child's requests are counted too
    files = [e for e in entries if e.kind == T.FILE]
    halves = [[c for e in part for c, _, _ in e.chunks] for part in (files[:cut], files[cut:])]
    assert repo.backend.requests - sent >= sum(len(plan_reads(repo, h)) for h in halves)
    monkeypatch.setattr(extract, "SPLIT_MIN_FILES", len(files) + 1)  # in one process
    assert restore_tree(repo, entries, tmp_path / "out1") == written  # the parent's client
    slow = Repository.open(backend(s3_bucket, bwlimit=1 << 20))
    assert _split_files(slow, entries) is None  # each process would take the whole limit


def test_restore_from_s3_in_two_processes_reports_damage_in_the_second(
        s3_bucket: Bucket, tmp_path):
    src = tmp_path / "src"
    rich_tree_to_split(src)
    repo = Repository.init(backend(s3_bucket))
    m, _ = backup(repo, src)
    entries = load_tree(repo, repo.tree_of(m))
    last = [e for e in entries if e.kind == T.FILE][-1]  # the second process's
    key, loc = repo.locate(last.chunks[0][0])
    assert loc is not None
    data = bytearray(repo.backend.get(key))
    data[loc.offset + loc.length - 10 : loc.offset + loc.length] = b"0123456789"
    repo.backend.put(key, bytes(data))
    with pytest.raises(DamagedError, match="corrupt") as err:
        restore_tree(repo, entries, tmp_path / "out")
    files = [e.path for e in entries if e.kind == T.FILE]  # (the chunk may start in another)
    assert str(err.value).split(":")[0] in files[_split_files(repo, entries):]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
