"""Benchmark: vzbackup chkpnt+restore vs plain `criu dump` + `criu restore` on the same CT.

For each size, a CT holds SIZE MB in /dev/shm (tmpfs, dumped by CRIU with the mount
namespace) and runs a counter. Each round dumps and restores the CT, through vzbackup
(pycriu, supervisor) and then through the criu CLI with the same options, in one run.
Prints wall times and the ratio vzbackup / plain criu. Run as root after scripts/setup.sh:

    .venv/bin/python bench/checkpoint.py [--sizes 0,100,300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CTID = 3900
IP = "10.199.39.1"


def vz(prefix: Path, *args: str) -> str:
    env = {**os.environ, "VZBACKUP_PREFIX": str(prefix)}
    res = subprocess.run(
        [sys.executable, "-m", "vzbackup.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode:
        raise SystemExit(f"vzbackup {' '.join(args)} failed: {res.stderr}")
    return res.stdout


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def plain_criu_round(prefix: Path, criu: str, work: Path) -> tuple[float, float]:
    """criu dump + criu restore of the running CT with the options vzbackup uses."""
    from vzbackup.config.node import Node
    from vzbackup.ct import network
    from vzbackup.ct.container import Container

    ct = Container(Node.load(str(prefix)), CTID)
    st = ct.state()
    assert st is not None
    images = work / "plain"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir()
    common = ["--tcp-established", "--file-locks", "--manage-cgroups", "-D", str(images)]
    t_dump = timed(
        lambda: subprocess.run(
            [criu, "dump", "-t", str(st.init_pid), *common, "-o", "dump.log"], check=True
        )
    )
    # Our supervisor sees init go and tears the runtime down; wait, then re-mount for criu.
    while ct.state() is not None:
        time.sleep(0.02)
    veth = network.host_veth_name(CTID, 0)
    pidfile = work / "plain.pid"

    def restore() -> None:
        ct.mount()
        pidfile.unlink(missing_ok=True)
        ct.cgroup().create()  # as vzbackup's supervisor does; CRIU can't init a cpuset parent
        res = subprocess.run(
            [
                criu,
                "restore",
                *common,
                "-o",
                "restore.log",
                "--root",
                str(ct.ve_root()),
                "--restore-detached",
                "--pidfile",
                str(pidfile),
                "--external",
                f"veth[eth0]:{veth}",
            ],
            check=False,
        )
        if res.returncode:
            log = (images / "restore.log").read_text().splitlines()
            raise SystemExit(
                "plain criu restore failed:\n"
                + "\n".join(ln for ln in log if "Error" in ln or "rror" in ln)[-2000:]
            )
        network.configure_host_side(ct.net_config())

    t_restore = timed(restore)
    # Hand the CT back to vzbackup: kill the plain-restored tree, clean up like a stop.
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    time.sleep(0.3)
    network.teardown(ct.net_config())
    cg = ct.cgroup()
    cg.kill_all()
    cg.destroy()
    cg.prune_parents()
    ct.umount()
    return t_dump, t_restore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="0,100,300", help="MB held in the CT's /dev/shm")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from vzbackup.criu.check import criu_binary

    criu = criu_binary()
    prefix = Path(tempfile.mkdtemp(prefix="vzbench-", dir="/var/tmp"))
    work = prefix / "work"
    work.mkdir()
    cache = prefix / "vz/template/cache"
    cache.mkdir(parents=True)
    subprocess.run(
        [
            "bash",
            str(ROOT / "scripts/build-template.sh"),
            str(cache / "busybox-1.0-x86_64.tar.zst"),
        ],
        check=True,
        capture_output=True,
    )
    results = []
    try:
        vz(prefix, "create", str(CTID), "--ipadd", IP, "--config", "basic")
        vz(prefix, "set", str(CTID), "--ram", "2G", "--swap", "0", "--save")
        for size in [int(s) for s in args.sizes.split(",")]:
            vz(prefix, "start", str(CTID))
            vz(
                prefix,
                "exec",
                str(CTID),
                f"rm -f /dev/shm/blob; mount -o remount,size=2g "
                f"/dev/shm; dd if=/dev/urandom of=/dev/shm/blob bs=1M count={size} 2>/dev/null;"
                " true",
            )
            ours_d, ours_r, plain_d, plain_r = [], [], [], []
            for _ in range(args.rounds):
                ours_d.append(timed(lambda: vz(prefix, "chkpnt", str(CTID))))
                ours_r.append(timed(lambda: vz(prefix, "restore", str(CTID))))
                d, r = plain_criu_round(prefix, criu, work)
                plain_d.append(d)
                plain_r.append(r)
                vz(prefix, "start", str(CTID))  # fresh start; shm content is re-created
                vz(
                    prefix,
                    "exec",
                    str(CTID),
                    f"mount -o remount,size=2g /dev/shm; dd "
                    f"if=/dev/urandom of=/dev/shm/blob bs=1M count={size} 2>/dev/null; true",
                )
            vz(prefix, "stop", str(CTID), "--fast")
            med = statistics.median
            row = {
                "size_mb": size,
                "vzbackup_dump_s": med(ours_d),
                "vzbackup_restore_s": med(ours_r),
                "criu_dump_s": med(plain_d),
                "criu_restore_s": med(plain_r),
            }
            row["ratio_total"] = (row["vzbackup_dump_s"] + row["vzbackup_restore_s"]) / (
                row["criu_dump_s"] + row["criu_restore_s"]
            )
            results.append(row)
    finally:
        subprocess.run(
            [sys.executable, "-m", "vzbackup.cli", "stop", "--fast", str(CTID)],
            env={**os.environ, "VZBACKUP_PREFIX": str(prefix)},
            capture_output=True,
        )
        subprocess.run(["umount", "-l", str(prefix / f"vz/root/{CTID}")], capture_output=True)
        shutil.rmtree(prefix, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        f"{'MB':>5} {'vzb dump':>9} {'vzb rst':>8} {'criu dump':>10} {'criu rst':>9} "
        f"{'ratio':>6}   (seconds, median of {args.rounds}; ratio = vzbackup/plain criu)"
    )
    for r in results:
        print(
            f"{r['size_mb']:>5} {r['vzbackup_dump_s']:>9.3f} {r['vzbackup_restore_s']:>8.3f} "
            f"{r['criu_dump_s']:>10.3f} {r['criu_restore_s']:>9.3f} {r['ratio_total']:>6.2f}"
        )


if __name__ == "__main__":
    main()
