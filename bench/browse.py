"""Benchmark: reading a backup through `vzbackup browse` vs `restic mount`, in one run.

One private area (--size-mb MB: host binaries and libraries as large files, ~2000 small text
files, one sparse file) is backed up once by vzbackup (local repository) and once by restic
(repository version 2). Then, per round and in a rotating order, each tool's mount is started
fresh (cold: nothing decoded yet) and the tree is copied out with `cp -a`, timed until the
copy is complete; `vzbackup extract` and `restic restore` (no mount) are timed too. Every
copy is compared with the source (path, type, mode, owner, size, sha256, symlink target).
Ratios are restic/vzbackup (> 1: vzbackup is faster). Target: a copy out of `vzbackup
browse` takes at most 1.5x the time of one out of `restic mount` (same data, same disk).
The machine is shared: treat single-digit-percent differences as noise.

    .venv/bin/python bench/browse.py [--size-mb 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = 1.5  # browse cp -a / restic mount cp -a, at most
PASSWORD = "bench"


def fill(root: Path, size_mb: int) -> None:
    big = root / "usr/lib"
    big.mkdir(parents=True)
    budget = size_mb << 20
    for src in sorted(Path("/usr/lib/x86_64-linux-gnu").rglob("*.so*")):
        if budget <= 0:
            break
        if src.is_file() and not src.is_symlink() and src.stat().st_size > 64 << 10:
            dst = big / src.name
            if not dst.exists():
                shutil.copyfile(src, dst)
                budget -= dst.stat().st_size
    etc = root / "etc"
    etc.mkdir()
    for i in range(2000):
        (etc / f"conf{i}").write_text(f"key_{i % 97} = value {i}\n" * (1 + i % 40))
    with open(root / "sparse.img", "wb") as f:
        f.seek(50 << 20)
        f.write(b"data" * 1024)
    os.symlink("usr/lib", root / "lib")


def digest(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            p = Path(dirpath, name)
            st = os.lstat(p)
            row: tuple = (st.st_mode, st.st_uid, st.st_gid)
            if p.is_symlink():
                row += (os.readlink(p),)
            elif p.is_file():
                row += (st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            out[str(p.relative_to(root))] = row
    return out


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def timed_mount_copy(argv: list[str], env: dict, mnt: Path, inner: str, dest: Path) -> float:
    """Start a mount, copy *inner* out of it with cp -a, unmount; seconds from start to copy."""
    mnt.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    deadline = time.monotonic() + 120
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        src = mnt / inner
        # restic fills its snapshot directories after mounting
        while not (mounted(mnt) and src.exists()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{shlex.join(argv)}: no {src} (exit {proc.poll()})")
            time.sleep(0.01)
        subprocess.run(["cp", "-a", f"{src}/.", str(dest)], check=True)
        return time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        if mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def timed(argv: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vzbench-browse-", dir="/var/tmp"))
    try:
        return run(work, args)
    finally:
        for m in (work / "mnt-vz", work / "mnt-restic"):
            if mounted(m):
                subprocess.run(["umount", "-l", str(m)], check=False)
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, args: argparse.Namespace) -> int:
    vz = [sys.executable, "-m", "vzbackup.cli"]
    env = {**os.environ, "VZBACKUP_PREFIX": str(work / "node"),
           "RESTIC_REPOSITORY": str(work / "restic"), "RESTIC_PASSWORD": PASSWORD,
           "RESTIC_CACHE_DIR": str(work / "restic-cache")}
    ctid = "9990"
    private = work / "node/vz/private" / ctid
    conf = work / "node/etc/vz/conf"
    conf.mkdir(parents=True)
    (conf / f"{ctid}.conf").write_text('HOSTNAME="bench"\n')
    fill(private, args.size_mb)
    source = digest(private)
    size = sum(r[3] for r in source.values() if len(r) == 5)
    subprocess.run([*vz, "dump", ctid], env=env, check=True, capture_output=True)
    subprocess.run(["restic", "init", "--repository-version", "2"], env=env, check=True,
                   capture_output=True)
    subprocess.run(["restic", "backup", "--host", "bench", str(private)], env=env, check=True,
                   capture_output=True)
    sid = subprocess.run([*vz, "list", "-b", "-H"], env=env, check=True, capture_output=True,
                         text=True).stdout.split()[0]
    tools = {
        "vzbackup browse + cp -a": lambda d: timed_mount_copy(
            [*vz, "browse", str(work / "mnt-vz"), sid], env, work / "mnt-vz", ".", d),
        "restic mount + cp -a": lambda d: timed_mount_copy(
            ["restic", "mount", str(work / "mnt-restic")], env, work / "mnt-restic",
            f"hosts/bench/latest{private}", d),
        "vzbackup extract": lambda d: timed([*vz, "extract", sid, "/", str(d / "x")], env),
        "restic restore": lambda d: timed(["restic", "restore", "latest", "--target",
                                           str(d)], env),
    }
    times: dict[str, list[float]] = {k: [] for k in tools}
    names = list(tools)
    for rnd in range(args.rounds):
        for name in names[rnd % len(names):] + names[: rnd % len(names)]:
            dest = work / "out"
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir()
            os.sync()
            times[name].append(tools[name](dest))
            got = dest / "x" if name == "vzbackup extract" else dest
            if name == "restic restore":
                got = dest / str(private).lstrip("/")
            copied = digest(got)
            diff = sorted(k for k in source if copied.get(k) != source[k])
            if diff:
                raise SystemExit(f"{name}: copy differs at {diff[:5]}")
    print(f"data: {size / 2**20:.0f} MiB in {len(source)} entries, {args.rounds} rounds "
          "(median seconds; shared machine: expect noise)")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k:<26} {v:7.2f} s  {size / 2**20 / v:7.1f} MiB/s")
    mount_ratio = med["restic mount + cp -a"] / med["vzbackup browse + cp -a"]
    restore_ratio = med["restic restore"] / med["vzbackup extract"]
    print(f"ratio restic mount / vzbackup browse: {mount_ratio:.2f}x")
    print(f"ratio restic restore / vzbackup extract: {restore_ratio:.2f}x")
    ok = 1 / mount_ratio <= TARGET
    print(f"{'PASS' if ok else 'FAIL'}: browse copy at most {TARGET}x restic mount's "
          f"({1 / mount_ratio:.2f}x)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
