"""Benchmark: vzbackup backup to / restore from S3 (the local Ceph RGW) vs raw boto3, in one run.

The CT and its private area are bench/backup.py's data set (same generator, same seed).
Per round, with empty buckets and an empty local cache:

  upload    vzbackup dump --storage s3 (chunk, compress, dedup, upload) vs every file of the
            private area uploaded by boto3's ``upload_file`` with its defaults, files in
            parallel (a pool of as many threads as boto3's default connection pool: 10);
            and, as the ceiling for big sequential transfers, one uncompressed tar of the
            tree (made beforehand, not timed) by ``upload_file`` (parallel multipart)
  download  vzbackup restore --storage s3 SNAPSHOT NEWCTID vs every object of the raw upload
            downloaded by ``download_file`` with its defaults, in the same kind of pool;
            and the tar by ``download_file`` (parallel ranged GETs), not unpacked

Ratios are raw seconds / vzbackup seconds (>= 1: vzbackup is faster). Issue 14's target,
printed as PASS/FAIL: vzbackup >= 0.8x one raw boto3 transfer of one object holding the same
bytes (the tar), both ways; the S3 requests of each backup are reported (vzbackup counts
them: ``storage_requests`` in the dump's stats, publishing adds about four).
Throughput is the logical size of the private area per second for both. The RGW is started
with scripts/s3-server.sh unless it already answers (and stopped again only then). Results
go to bench/results/s3-TIMESTAMP.json. Run as root after scripts/setup.sh:

    .venv/bin/python bench/s3.py [--size-mb 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
from botocore.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from backup import MARKER, MB, TEMPLATE, DataSet, log, measure, tree_size

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench/results"
SERVER = ROOT / "scripts/s3-server.sh"
ENDPOINT = "http://127.0.0.1:7480"
ACCESS_KEY, SECRET_KEY = "test", "testtest"
RAW_THREADS = 10  # boto3's default max_pool_connections


def client() -> object:
    """A boto3 client with its defaults, but path-style addressing for the local RGW."""
    return boto3.client("s3", endpoint_url=ENDPOINT, aws_access_key_id=ACCESS_KEY,
                        aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}))


def empty_bucket(s3: object, bucket: str) -> None:
    with contextlib.suppress(Exception):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            for o in keys:
                s3.delete_object(Bucket=bucket, Key=o["Key"])
        s3.delete_bucket(Bucket=bucket)


class S3Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.prefix = Path(args.prefix).absolute()
        self.private = self.prefix / "vz/private" / str(args.ctid)
        self.work = self.prefix / "bench"
        exe = Path(sys.executable).parent / "vzbackup"
        self.vz_cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "vzbackup.cli"]
        self.s3 = client()
        self.buckets: list[str] = []
        self.started_server = False

    def vz(self, *args: str) -> object:
        return measure([*self.vz_cmd, "--prefix", str(self.prefix), *args])

    def setup(self) -> dict:
        if subprocess.run(["bash", str(SERVER), "status"]).returncode != 0:
            log("starting the Ceph RGW")
            subprocess.run(["bash", str(SERVER), "start"], check=True)
            self.started_server = True
        if self.prefix.exists():
            if not (self.prefix / MARKER).exists():
                raise SystemExit(f"{self.prefix} exists and is not a bench prefix; not touching it")
            self.cleanup_prefix()
        cache = self.prefix / "vz/template/cache"
        cache.mkdir(parents=True)
        (self.prefix / MARKER).touch()
        if not TEMPLATE.exists():
            raise SystemExit(f"{TEMPLATE} is missing: run scripts/setup.sh first")
        shutil.copy(TEMPLATE, cache / TEMPLATE.name)
        self.work.mkdir()
        self.vz("create", str(self.args.ctid))
        log(f"generating {self.args.size_mb} MB into {self.private}")
        DataSet(self.private, self.args.size_mb, self.args.seed).generate()
        info = tree_size(self.private)
        info["files"] = sum(len(f) for _, _, f in os.walk(self.private))
        log(f"data set: {info}")
        return info

    def new_bucket(self) -> str:
        name = f"vzbench-{uuid.uuid4().hex[:12]}"
        self.s3.create_bucket(Bucket=name)
        self.buckets.append(name)
        return name

    def configure(self, bucket: str) -> None:
        cfg = self.prefix / "etc/vzbackup/storage.cfg"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text(f"s3: s3\n\tbucket {bucket}\n\tendpoint {ENDPOINT}\n\tpath-style 1\n"
                       f"\taccess-key {ACCESS_KEY}\n\tsecret-key {SECRET_KEY}\n")

    def round(self, n: int) -> dict:
        vz_bucket, raw_bucket = self.new_bucket(), self.new_bucket()
        self.configure(vz_bucket)
        shutil.rmtree(self.prefix / "var/cache/vzbackup", ignore_errors=True)
        files = [p for p in self.private.rglob("*") if p.is_file() and not p.is_symlink()]
        os.sync()
        r = self.vz("dump", "--storage", "s3", str(self.args.ctid), "--json")
        res = json.loads(r.out)["results"][0]
        if not res["ok"]:
            raise RuntimeError(f"vzbackup dump failed: {res}")
        vz_up = r.seconds
        log(f"round {n}: vzbackup dump {vz_up:.2f} s")

        t0 = time.perf_counter()
        with ThreadPoolExecutor(RAW_THREADS) as pool:
            list(pool.map(lambda p: self.s3.upload_file(
                str(p), raw_bucket, p.relative_to(self.private).as_posix()), files))
        raw_up = time.perf_counter() - t0
        log(f"round {n}: raw upload_file {raw_up:.2f} s ({len(files)} files)")

        shutil.rmtree(self.prefix / "var/cache/vzbackup", ignore_errors=True)
        os.sync()
        rctid = str(self.args.restore_ctid)
        r = self.vz("restore", "--storage", "s3", res["snapshot"], rctid, "--ipadd", "none")
        vz_down = r.seconds
        self.vz("destroy", rctid)
        log(f"round {n}: vzbackup restore {vz_down:.2f} s")

        dest = self.work / "raw-download"
        keys = [o["Key"] for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=raw_bucket) for o in page.get("Contents", [])]
        for k in keys:
            (dest / k).parent.mkdir(parents=True, exist_ok=True)
        os.sync()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(RAW_THREADS) as pool:
            list(pool.map(lambda k: self.s3.download_file(raw_bucket, k, str(dest / k)), keys))
        raw_down = time.perf_counter() - t0
        shutil.rmtree(dest)
        log(f"round {n}: raw download_file {raw_down:.2f} s")

        tar = self.work / "tree.tar"
        measure(["tar", "-C", str(self.private), "-cf", str(tar), "."])
        os.sync()
        t0 = time.perf_counter()
        self.s3.upload_file(str(tar), raw_bucket, "tree.tar")
        tar_up = time.perf_counter() - t0
        tar.unlink()
        os.sync()
        t0 = time.perf_counter()
        self.s3.download_file(raw_bucket, "tree.tar", str(tar))
        tar_down = time.perf_counter() - t0
        tar.unlink()
        log(f"round {n}: one tar: upload_file {tar_up:.2f} s, download_file {tar_down:.2f} s")
        for b in (vz_bucket, raw_bucket):
            empty_bucket(self.s3, b)
            self.buckets.remove(b)
        return {"vz_upload_s": vz_up, "raw_upload_s": raw_up, "vz_download_s": vz_down,
                "raw_download_s": raw_down, "tar_upload_s": tar_up, "tar_download_s": tar_down,
                "stored_new": res["stats"].get("stored_new"),
                "requests": res["stats"].get("storage_requests"),
                "chunks_new": res["stats"].get("chunks_new")}

    def cleanup_prefix(self) -> None:
        for ctid in (self.args.restore_ctid, self.args.ctid):
            subprocess.run([*self.vz_cmd, "--prefix", str(self.prefix), "destroy", str(ctid)],
                           capture_output=True, timeout=120, check=False)
        shutil.rmtree(self.prefix, ignore_errors=True)

    def cleanup(self) -> None:
        for b in self.buckets:
            empty_bucket(self.s3, b)
        self.cleanup_prefix()
        if self.started_server:
            subprocess.run(["bash", str(SERVER), "stop"], check=False)


def summarise(rounds: list[dict], logical: int) -> dict:
    med = {k: statistics.median(r[k] or 0 for r in rounds) for k in rounds[0]}
    mb = logical / MB
    return {
        "median": med,
        "upload_ratio": round(med["raw_upload_s"] / med["vz_upload_s"], 2),
        "download_ratio": round(med["raw_download_s"] / med["vz_download_s"], 2),
        "tar_upload_ratio": round(med["tar_upload_s"] / med["vz_upload_s"], 2),
        "tar_download_ratio": round(med["tar_download_s"] / med["vz_download_s"], 2),
        "mb_per_s": {k: round(mb / v, 1) for k, v in med.items() if k.endswith("_s")},
        "targets": {way: med[f"tar_{way}_s"] / med[f"vz_{way}_s"] >= 0.8
                    for way in ("upload", "download")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=300, help="size of the generated data")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--prefix", default="/var/tmp/vzbench-s3", help="private node prefix")
    ap.add_argument("--ctid", type=int, default=9201)
    ap.add_argument("--restore-ctid", type=int, default=9202)
    args = ap.parse_args()
    if os.geteuid():
        raise SystemExit("run as root")
    stamp = time.strftime("%Y%m%dT%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS / f"s3-{stamp}.json"
    bench = S3Bench(args)
    doc: dict = {"benchmark": "s3", "time": stamp, "args": vars(args), "rounds": []}
    try:
        doc["data"] = bench.setup()
        for n in range(args.rounds):
            doc["rounds"].append(bench.round(n))
        doc["summary"] = summarise(doc["rounds"], doc["data"]["bytes"])
    finally:
        bench.cleanup()
        out_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        log(f"results: {out_path}")
    s, mbs = doc["summary"], doc["summary"]["mb_per_s"]
    print(f"data: {doc['data']['bytes'] / MB:.0f} MB in {doc['data']['files']} files, "
          f"{args.rounds} rounds (medians)")
    print(f"{'':10} {'vzbackup':>12} {'raw files':>12} {'ratio':>7} {'one tar':>12} {'ratio':>7}"
          "  target  result")
    for way in ("upload", "download"):
        res = "PASS" if s["targets"][way] else "FAIL"
        print(f"{way:10} {mbs[f'vz_{way}_s']:>7} MB/s {mbs[f'raw_{way}_s']:>7} MB/s "
              f"{s[f'{way}_ratio']:>6}x {mbs[f'tar_{way}_s']:>7} MB/s {s[f'tar_{way}_ratio']:>6}x"
              f"  >=0.8x  {res}")
    med = s["median"]
    print(f"S3 requests per backup: {med['requests']:.0f} for {med['chunks_new']:.0f} new chunks "
          f"({med['stored_new'] / MB:.0f} MB stored)")
    print(f"\nJSON: {out_path}")


if __name__ == "__main__":
    main()
