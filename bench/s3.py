"""Benchmark: vzbackup backup to / restore from S3 (the local Ceph RGW) vs raw boto3, in one run.

The CT and its private area are bench/backup.py's: a generated set (same generator, same
seed) or, with ``--dataset debian``, the Debian 12 template's root filesystem. Per round,
with empty buckets and an empty local cache:

  upload    vzbackup dump --storage s3 (walk, chunk, compress, dedup, upload) vs one
            uncompressed tar of the tree (made beforehand, not timed) uploaded by boto3's
            ``upload_file`` with its defaults (parallel multipart)
  download  vzbackup restore --storage s3 SNAPSHOT NEWCTID (a new CT, written to disk) vs
            the tar downloaded by ``download_file`` (parallel ranged GETs), not unpacked
  local     the same dump and restore with a dir storage (a fresh one per round): the part
            of either that is not S3 (walk, chunking, compression; writing the files)
  command   the same two boto3 transfers as a user's script runs them: a new Python process
            (``python -c``: start, boto3's import and client included, as they are in every
            vzbackup command); printed beside the target, not judged
  files     the tar unpacked by ``tar -x`` into a new directory beside the restored CTs: what
            creating the same files alone costs on this file system (no network, no
            decompression, no hashing), the floor of any restore of the tree
  per file  with --per-file, also every file uploaded by ``upload_file`` and downloaded by
            ``download_file``, files in parallel (a pool of as many threads as boto3's
            default connection pool: 10); slow, what a naive sync script would do

Ratios are raw seconds / vzbackup seconds (>= 1: vzbackup is faster). Issue 14's target,
printed as PASS/FAIL: vzbackup >= 0.8x one raw boto3 transfer of one object holding the same
bytes (the tar), both ways. The S3 requests of each backup and restore are reported
(``storage_requests`` in the JSON of dump and restore), and the CPU seconds each transfer
cost the client and the S3 server (radosgw + ceph-osd, read from /proc): on a machine
with few cores the server competes with the backup's compression for them, and their sum
over the CPUs is a floor for the wall time (printed beside what 0.8x allows). Throughput
is the logical size of the private area per second. The load average is printed with
the results: on a shared machine they are noisy.

Every restore and every ``tar -x`` goes onto a new journaled ext4 (bench/backup.py's
restore_fs: a loop device, made before and removed after the command), as a restore onto a
node's /vz finds it. On this machine's root file system (ext4 without a journal) inode
allocation skips (and re-reads, at every allocation) the inodes deleted in the last minutes
(ext4's ``recently_deleted``): a restore after an earlier one was deleted spent most of its
time there, in the kernel, whatever the tool (tar -x of the Debian tree: 7.8 s).

The RGW is started with scripts/s3-server.sh unless it already
answers (and stopped again only then). Results go to bench/results/s3-TIMESTAMP.json.
Run as root after scripts/setup.sh:

    .venv/bin/python bench/s3.py [--size-mb 300] [--rounds 3] [--dataset debian] [--per-file]
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
from backup import (
    DEBIAN_TEMPLATE,
    MARKER,
    MB,
    TEMPLATE,
    DataSet,
    log,
    measure,
    own_cpu_s,
    restore_fs,
    restores_on_fresh_fs,
    tree_size,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench/results"
SERVER = ROOT / "scripts/s3-server.sh"
ENDPOINT = f"http://127.0.0.1:{os.environ.get('VZBACKUP_S3_PORT', '7480')}"  # as the tests
ACCESS_KEY, SECRET_KEY = "test", "testtest"
RAW_THREADS = 10  # boto3's default max_pool_connections
SERVER_PROCESSES = ("radosgw", "ceph-osd")
RAW_SCRIPT = """import sys, boto3
from botocore.config import Config
way, endpoint, access, secret, bucket, key, path = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access,
                  aws_secret_access_key=secret, region_name="us-east-1",
                  config=Config(s3={"addressing_style": "path"}))
if way == "upload":
    s3.upload_file(path, bucket, key)
else:
    s3.download_file(bucket, key, path)
"""  # one raw transfer as a script: the in-process one without Python's start and boto3's import


def server_cpu_s() -> float:
    """CPU seconds the S3 server's processes (radosgw, ceph-osd) have used so far."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat.rsplit(")", 1)[1]
            if name in SERVER_PROCESSES:
                utime, stime = fields.split()[11:13]
                total += int(utime) + int(stime)
    return total / os.sysconf("SC_CLK_TCK")


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
        self.template = DEBIAN_TEMPLATE if args.dataset == "debian" else TEMPLATE
        self.s3 = client()
        self.buckets: list[str] = []
        self.started_server = False

    def vz(self, *args: str) -> object:
        return measure([*self.vz_cmd, "--prefix", str(self.prefix), *args])

    def vz_cpu(self, *args: str) -> tuple[object, float]:
        """A vzbackup command's Run and the S3 server's CPU seconds meanwhile."""
        before = server_cpu_s()
        r = self.vz(*args)
        return r, server_cpu_s() - before

    def setup(self) -> dict:
        # byte code for the project's modules, fresh (PYTHONDONTWRITEBYTECODE would have
        # every command compile them anew, as an installed package never does)
        subprocess.run([sys.executable, "-m", "compileall", "-q",
                        *(str(ROOT / d) for d in ("vzbackup", "migrate", "storage", "scheduler"))],
                       stdout=subprocess.DEVNULL, check=False)
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
        if not self.template.exists():
            raise SystemExit(f"{self.template} is missing: run scripts/setup.sh first")
        shutil.copy(self.template, cache / self.template.name)
        self.work.mkdir()
        self.vz("create", str(self.args.ctid), "--ostemplate",
                self.template.name.removesuffix(".tar.zst"))
        restores_on_fresh_fs(self.prefix)
        if self.args.dataset == "generated":
            log(f"generating {self.args.size_mb} MB into {self.private}")
            DataSet(self.private, self.args.size_mb, self.args.seed).generate()
        info = tree_size(self.private)
        info["files"] = sum(len(f) for _, _, f in os.walk(self.private))
        info["dataset"] = self.args.dataset
        log(f"data set: {info}")
        tar = self.work / "tree.tar"
        measure(["tar", "-C", str(self.private), "-cf", str(tar), "."])
        info["tar_bytes"] = tar.stat().st_size
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

    def drop_cache(self) -> None:
        shutil.rmtree(self.prefix / "var/cache/vzbackup", ignore_errors=True)
        os.sync()

    def restore(self, ctid: int, *args: str) -> tuple[object, float, int]:
        """Run, server CPU seconds and S3 requests of a restore into the new CT *ctid* (on a
        new file system, destroyed after)."""
        with restore_fs(self.prefix, self.private):
            r, server = self.vz_cpu("restore", *args, str(ctid), "--ipadd", "none", "--json")
            self.vz("destroy", str(ctid))
        return r, server, json.loads(r.out).get("storage_requests", 0)

    def timed(self, fn: object) -> tuple[float, float, float]:
        """Seconds, this process's CPU seconds and the S3 server's of *fn*."""
        os.sync()
        c0, s0, t0 = own_cpu_s(), server_cpu_s(), time.perf_counter()
        fn()
        return time.perf_counter() - t0, own_cpu_s() - c0, server_cpu_s() - s0

    def round(self, n: int) -> dict:
        vz_bucket, raw_bucket = self.new_bucket(), self.new_bucket()
        self.configure(vz_bucket)
        shutil.rmtree(self.prefix / "vz/backup", ignore_errors=True)
        self.drop_cache()
        r = self.vz("dump", str(self.args.ctid), "--json")
        local_snapshot = json.loads(r.out)["results"][0]["snapshot"]
        out = {"local_upload_s": r.seconds}
        log(f"round {n}: vzbackup dump to the dir storage {r.seconds:.2f} s")
        self.drop_cache()
        r, server = self.vz_cpu("dump", "--storage", "s3", str(self.args.ctid), "--json")
        res = json.loads(r.out)["results"][0]
        if not res["ok"]:
            raise RuntimeError(f"vzbackup dump failed: {res}")
        out.update({"vz_upload_s": r.seconds, "stored_new": res["stats"].get("stored_new"),
                    "requests": res["stats"].get("storage_requests"),
                    "chunks_new": res["stats"].get("chunks_new"),
                    "vz_upload_cpu": r.cpu_s, "vz_upload_server_cpu": server})
        log(f"round {n}: vzbackup dump {r.seconds:.2f} s")

        # in turns, each into its own new CT on its own new file system
        ctids = {"s3": self.args.restore_ctid + 2 * n, "local": self.args.restore_ctid + 2 * n + 1}
        for way in ("s3", "local") if n % 2 == 0 else ("local", "s3"):
            self.drop_cache()  # a disaster restore: nothing but the bucket
            if way == "s3":
                r, server, out["restore_requests"] = self.restore(
                    ctids[way], "--storage", "s3", res["snapshot"])
                out.update({"vz_download_s": r.seconds, "vz_download_cpu": r.cpu_s,
                            "vz_download_server_cpu": server})
                log(f"round {n}: vzbackup restore {r.seconds:.2f} s "
                    f"({out['restore_requests']} requests)")
            else:
                r, _, _ = self.restore(ctids[way], local_snapshot)
                out["local_download_s"] = r.seconds
                log(f"round {n}: vzbackup restore from the dir storage {r.seconds:.2f} s")

        tar = self.work / "tree.tar"
        back = self.work / "tree.tar.back"
        for way, fn in (("upload", lambda: self.s3.upload_file(str(tar), raw_bucket, "tree.tar")),
                        ("download", lambda: self.s3.download_file(raw_bucket, "tree.tar",
                                                                   str(back)))):
            out[f"tar_{way}_s"], out[f"tar_{way}_cpu"], out[f"tar_{way}_server_cpu"] = \
                self.timed(fn)
        back.unlink()
        for way, path in (("upload", tar), ("download", back)):
            os.sync()
            out[f"cmd_{way}_s"] = measure([sys.executable, "-c", RAW_SCRIPT, way, ENDPOINT,
                                           ACCESS_KEY, SECRET_KEY, raw_bucket, "tree-cmd.tar",
                                           str(path)]).seconds
        back.unlink()
        log(f"round {n}: one tar: upload_file {out['tar_upload_s']:.2f} s, "
            f"download_file {out['tar_download_s']:.2f} s; as a command "
            f"{out['cmd_upload_s']:.2f} s, {out['cmd_download_s']:.2f} s")
        with restore_fs(self.prefix, self.private) as fs:
            files = fs / "files"
            files.mkdir()
            os.sync()
            r = measure(["tar", "-C", str(files), "-xf", str(tar)])
        out["files_s"], out["files_cpu"] = r.seconds, r.cpu_s
        log(f"round {n}: tar -x of the tar (creating the files alone) {r.seconds:.2f} s")
        if self.args.per_file:
            out.update(self.per_file(n, raw_bucket))
        for b in (vz_bucket, raw_bucket):
            empty_bucket(self.s3, b)
            self.buckets.remove(b)
        return out

    def per_file(self, n: int, bucket: str) -> dict:
        files = [p for p in self.private.rglob("*") if p.is_file() and not p.is_symlink()]
        with ThreadPoolExecutor(RAW_THREADS) as pool:
            up, _, _ = self.timed(lambda: list(pool.map(lambda p: self.s3.upload_file(
                str(p), bucket, "files/" + p.relative_to(self.private).as_posix()), files)))
        dest = self.work / "raw-download"
        keys = [o["Key"] for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix="files/") for o in page.get("Contents", [])]
        for k in keys:
            (dest / k).parent.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(RAW_THREADS) as pool:
            down, _, _ = self.timed(lambda: list(pool.map(
                lambda k: self.s3.download_file(bucket, k, str(dest / k)), keys)))
        shutil.rmtree(dest)
        log(f"round {n}: per file ({len(files)}): upload_file {up:.2f} s, "
            f"download_file {down:.2f} s")
        return {"raw_upload_s": up, "raw_download_s": down}

    def cleanup_prefix(self) -> None:
        restored = range(self.args.restore_ctid, self.args.restore_ctid + 2 * self.args.rounds)
        for ctid in (*restored, self.args.ctid):
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
    ratio = {k[: -len("_s")]: round(med[k.replace("vz_", "tar_")] / med[k], 2)
             for k in ("vz_upload_s", "vz_download_s")}
    return {
        "median": med,
        "tar_ratio": {way.removeprefix("vz_"): r for way, r in ratio.items()},
        "mb_per_s": {k: round(mb / v, 1) for k, v in med.items() if k.endswith("_s") and v},
        "s3_vs_local": {way: round(med[f"local_{way}_s"] / med[f"vz_{way}_s"], 2)
                        for way in ("upload", "download")},
        "command_ratio": {way: round(med[f"cmd_{way}_s"] / med[f"vz_{way}_s"], 2)
                          for way in ("upload", "download")},
        "targets": {way: med[f"tar_{way}_s"] / med[f"vz_{way}_s"] >= 0.8
                    for way in ("upload", "download")},
        # what 0.8x of the raw transfer allows, and floors no vzbackup could beat here
        "allowed_s": {way: med[f"tar_{way}_s"] / 0.8 for way in ("upload", "download")},
        "cpu_floor_s": {way: (med[f"vz_{way}_cpu"] + med[f"vz_{way}_server_cpu"])
                        / (os.cpu_count() or 1) for way in ("upload", "download")},
        "files_floor_s": med["files_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=("generated", "debian"), default="generated",
                    help="bench/backup.py's generated tree, or the Debian 12 template's rootfs")
    ap.add_argument("--size-mb", type=int, default=300, help="size of the generated data")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--per-file", action="store_true",
                    help="also upload and download every file with boto3 (slow)")
    ap.add_argument("--prefix", default="/var/tmp/vzbench-s3", help="private node prefix")
    ap.add_argument("--ctid", type=int, default=9201)
    ap.add_argument("--restore-ctid", type=int, default=9202,
                    help="the restores go to this CT and the next 2 x rounds - 1")
    args = ap.parse_args()
    if os.geteuid():
        raise SystemExit("run as root")
    stamp = time.strftime("%Y%m%dT%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS / f"s3-{stamp}.json"
    bench = S3Bench(args)
    doc: dict = {"benchmark": "s3", "time": stamp, "args": vars(args), "rounds": [],
                 "load_before": os.getloadavg()}
    try:
        doc["data"] = bench.setup()
        for n in range(args.rounds):
            doc["rounds"].append(bench.round(n))
        doc["summary"] = summarise(doc["rounds"], doc["data"]["bytes"])
    finally:
        doc["load_after"] = os.getloadavg()
        bench.cleanup()
        out_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        log(f"results: {out_path}")
    s, mbs, med = doc["summary"], doc["summary"]["mb_per_s"], doc["summary"]["median"]
    load = ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(doc["load_before"], doc["load_after"],
                                                         strict=True))
    print(f"data: {args.dataset}, {doc['data']['bytes'] / MB:.0f} MB in {doc['data']['files']} "
          f"files, {args.rounds} rounds (medians); load average before/after (1, 5, 15 min): "
          f"{load} on {os.cpu_count()} CPUs")
    print(f"{'':10} {'vzbackup':>10} {'one tar':>12} {'ratio':>7}  target  result"
          f"  {'dir storage':>11} {'ratio':>6}" + (f" {'per file':>12}" if args.per_file else ""))
    for way in ("upload", "download"):
        res = "PASS" if s["targets"][way] else "FAIL"
        line = (f"{way:10} {med[f'vz_{way}_s']:>8.2f} s {med[f'tar_{way}_s']:>10.2f} s "
                f"{s['tar_ratio'][way]:>6}x  >=0.8x  {res:6}  {med[f'local_{way}_s']:>9.2f} s "
                f"{s['s3_vs_local'][way]:>5}x")
        if args.per_file:
            line += f" {mbs[f'raw_{way}_s']:>7} MB/s"
        print(line)
    print("(ratios: the other's seconds / vzbackup's with S3; dir storage: the same vzbackup "
          "command on a local directory, i.e. what S3 adds)")
    print("one tar as a command (python -c, boto3's import and client included; not judged): "
          + ", ".join(f"{way} {med[f'cmd_{way}_s']:.2f} s, {s['command_ratio'][way]}x"
                      for way in ("upload", "download")))
    print("CPU s, client + S3 server: " + ", ".join(
        f"{way} vzbackup {med[f'vz_{way}_cpu']:.2f} + {med[f'vz_{way}_server_cpu']:.2f}, "
        f"one tar {med[f'tar_{way}_cpu']:.2f} + {med[f'tar_{way}_server_cpu']:.2f}"
        for way in ("upload", "download")))
    print(f"0.8x allows: upload {s['allowed_s']['upload']:.2f} s (CPU floor, client + server "
          f"over {os.cpu_count()} CPUs: {s['cpu_floor_s']['upload']:.2f} s), download "
          f"{s['allowed_s']['download']:.2f} s (CPU floor {s['cpu_floor_s']['download']:.2f} s; "
          f"creating the files alone, tar -x of the tar: {s['files_floor_s']:.2f} s, "
          f"{med['files_cpu']:.2f} s CPU)")
    print(f"S3 requests: {med['requests']:.0f} per backup ({med['chunks_new']:.0f} new chunks, "
          f"{med['stored_new'] / MB:.0f} MB stored), {med['restore_requests']:.0f} per restore")
    print(f"\nJSON: {out_path}")


if __name__ == "__main__":
    main()
