"""Benchmark: a node "reboot" of a Debian 12 systemd CT with VE_STOP_MODE=suspend against the
classic stop mode, in one run.

The CT (redis, postgresql, sshd, cron: the template scripts/setup.sh caches) boots to
``running``; each round runs ``vzbackup shutdown`` then ``vzbackup boot`` and waits until
systemd says ``running`` again. Suspend mode checkpoints the CT and restores it; stop mode
halts systemd and boots it afresh. Prints the time of each step, the time the CT was out of
service (shutdown + boot + back to running), the ratio suspend / stop, whether a value held
only in redis's memory survived, and PASS/FAIL (exit 1 on a FAIL) for: suspend keeps the
processes, stop does not, no fallback was needed. Run as root after scripts/setup.sh
(numbers are noisy on a shared machine):

    .venv/bin/python bench/nodeboot.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CTID, IP = 3960, "10.199.39.60"
DEBIAN_TEMPLATE = "debian-12-x86_64"
DEMO_CACHE = Path("/var/lib/vzbackup/demo/vz/template/cache")  # where setup.sh caches it
WAIT_RUNNING = (
    "t=900; while [ ! -S /run/systemd/private ] && [ $t -gt 0 ]; do sleep 0.1; t=$((t-1)); "
    "done; timeout 90 systemctl is-system-running --wait"
)


def vz(prefix: Path, *args: str, check: bool = True) -> str:
    res = subprocess.run([sys.executable, "-m", "vzbackup.cli", *args],
                         env={**os.environ, "VZBACKUP_PREFIX": str(prefix)},
                         capture_output=True, text=True, check=False)
    if check and res.returncode:
        raise SystemExit(f"vzbackup {' '.join(args)} failed: {res.stderr}")
    return res.stdout


def redis(prefix: Path, command: str) -> str:
    return vz(prefix, "exec", str(CTID), f"redis-cli {command}", check=False).strip()


def reboot(prefix: Path) -> dict:
    """One shutdown + boot of the node; seconds of each step and what happened."""
    t0 = time.monotonic()
    down = json.loads(vz(prefix, "shutdown", "--json"))
    t1 = time.monotonic()
    up = json.loads(vz(prefix, "boot", "--json"))
    t2 = time.monotonic()
    state = vz(prefix, "exec", str(CTID), WAIT_RUNNING, check=False).strip()
    t3 = time.monotonic()
    return {"shutdown": t1 - t0, "boot": t2 - t1, "to_running": t3 - t2, "out": t3 - t0,
            "actions": (down["cts"][0]["action"], up["cts"][0]["action"]),
            "fallback": [s["fallback"] for s in down["cts"] + up["cts"] if s["fallback"]],
            "state": state}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    prefix = Path(tempfile.mkdtemp(prefix="vzb-nodeboot-", dir="/var/tmp"))
    cache = prefix / "vz/template/cache"
    cache.mkdir(parents=True)
    for f in DEMO_CACHE.glob(f"{DEBIAN_TEMPLATE}.tar.zst*"):
        shutil.copy(f, cache)
    try:
        vz(prefix, "create", str(CTID), "--ostemplate", DEBIAN_TEMPLATE, "--ipadd", IP)
        vz(prefix, "set", str(CTID), "--onboot", "yes", "--save")
        vz(prefix, "start", str(CTID))
        vz(prefix, "exec", str(CTID), WAIT_RUNNING, check=False)
        runs: dict[str, list[dict]] = {"suspend": [], "stop": []}
        for _ in range(args.rounds):
            for mode in runs:
                vz(prefix, "set", str(CTID), "--stop-mode", mode, "--save")
                # a value held in redis's memory only (no snapshot to disk): a restored redis
                # still has it, a freshly booted one doesn't
                witness = os.urandom(8).hex()
                redis(prefix, "config set save ''")
                redis(prefix, f"set witness {witness}")
                r = reboot(prefix)
                r["kept"] = redis(prefix, "get witness") == witness
                runs[mode].append(r)
                print(f"{mode:<8} shutdown {r['shutdown']:6.2f}s  boot {r['boot']:6.2f}s  "
                      f"to running {r['to_running']:6.2f}s  out of service {r['out']:6.2f}s  "
                      f"{'/'.join(r['actions'])}  memory kept: {r['kept']}  "
                      f"systemd: {r['state']}", flush=True)
        out = {m: statistics.median(r["out"] for r in rs) for m, rs in runs.items()}
        print(f"median out of service: suspend {out['suspend']:.2f}s, stop {out['stop']:.2f}s, "
              f"ratio suspend/stop {out['suspend'] / out['stop']:.2f}")
        checks = {
            "suspend keeps the processes (redis's memory) and systemd is running":
                all(r["kept"] and r["state"] == "running" for r in runs["suspend"]),
            "stop mode boots afresh (redis's memory gone) to running":
                all(not r["kept"] and r["state"] == "running" for r in runs["stop"]),
            "no checkpoint or restore fell back":
                not any(r["fallback"] for rs in runs.values() for r in rs),
        }
        for what, ok in checks.items():
            print(f"{'PASS' if ok else 'FAIL'}  {what}")
        return 0 if all(checks.values()) else 1
    finally:
        vz(prefix, "stop", "--fast", str(CTID), check=False)
        vz(prefix, "umount", str(CTID), check=False)
        shutil.rmtree(prefix, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
