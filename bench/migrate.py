"""Benchmark: live migration between two nodes of the two-node bed, in one run.

For CTs holding ~100 MB, 500 MB and 1 GB of touched anonymous memory (bench/memhog.c, built
static and run inside the CT; it also records the longest gap between its 5 ms ticks, i.e. the
freeze as the process saw it), each method moves the CT from node A to node B:

  online+lazy   vzbackup migrate --online (post-copy: pages follow on demand)
  online        vzbackup migrate --online --no-lazy (all memory copied while frozen)
  restart       vzbackup migrate (stop, final sync, start at DEST: memory state is lost)
  online+lazy+plain, online+plain   the same with --plain-tcp (not run unless asked:
                what CRIU's TLS costs the page transfer)
  criu+rsync    the manual baseline: vzbackup chkpnt (criu dump) on A, rsync of images and
                private area over OpenSSH, vzbackup restore (criu restore) on B

Beside the busybox CTs, in the same run, the Debian 12 systemd CT of the real-system tests
(the template scripts/setup.sh builds; redis-server, postgresql, ssh and cron running, plus
a 16 MiB memhog for the freeze it sees) moves online with lazy pages (--debian-methods).

It reports the frozen time (vzbackup's own measure; the process-seen gap where it exists),
the total time, the frozen sub-steps, and the ratios against restart migration and the
baseline, then PASS/FAIL for each target of issue 13 measured in this run:

  online+lazy frozen <= 0.3 s (every size)
  online+lazy frozen <= 0.5 s for the Debian systemd CT (services running)
  online+lazy total <= 1.2x restart total (largest size, >= 1000 MiB)
  online (no lazy) frozen <= 2.5 s (largest size, >= 1000 MiB)

The nodes' prefixes live on a new journaled ext4 (a sparse image on a loop device, made
before the bed and removed after it), as a node's /vz would: this machine's root file system
has no journal, and there ext4 steps over every inode freed in the last minutes at each file
creation, which the images written in the freeze paid right after the previous case's
private area was deleted (bench/backup.py restores onto a new journaled ext4 likewise).
``--bed-fs root`` puts them on the root file system as before.

The machine is shared by other work: numbers are noisy; compare within one run.

    .venv/bin/python bench/migrate.py [--sizes 100,1000] [--rounds 1]
    .venv/bin/python bench/migrate.py --sizes '' --rounds 3    # the Debian CT alone

VZBACKUP_CRIU=/path/to/criu runs both nodes on that CRIU (the bed's sshd passes it on): A/B
runs of a CRIU patch against the installed one, alternating, on the same machine.

Results go to bench/results/migrate-TIMESTAMP.json.
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
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import twonode  # noqa: E402
from backup import fresh_fs  # noqa: E402 - bench/ is this script's directory

METHODS = ("online+lazy", "online", "restart", "criu+rsync")
BED_FS_BYTES = 16 << 30  # the nodes' file system (sparse): templates, CTs, 1 GiB images
CTID_BASE = int(os.environ.get("VZBACKUP_TEST_CTID_BASE", "8800"))
DEBIAN = "debian-12-x86_64"
DEBIAN_CACHE = Path(os.environ.get("VZBACKUP_DEMO_PREFIX", "/var/lib/vzbackup/demo"),
                    "vz/template/cache")
DEBIAN_MIB = 16  # the memhog in the Debian CT: a witness of the freeze, not a load
BOOT_WAIT = ("t=600; while [ ! -S /run/systemd/private ] && [ $t -gt 0 ]; do sleep 0.1; "
             "t=$((t-1)); done; timeout 120 systemctl is-system-running --wait")


def build_memhog(out: Path) -> Path:
    subprocess.run(["gcc", "-O2", "-static", "-o", str(out), str(ROOT / "bench/memhog.c")],
                   check=True)
    return out


def make_ct(node: twonode.BedNode, ctid: int, mib: int, memhog: Path) -> str:
    ip = node.new_ip()
    node.vz("create", str(ctid), "--ipadd", ip, "--privileged")  # lazy pages need it
    node.vz("set", str(ctid), "--ram", f"{mib + 512}M", "--save")  # room for the memory
    shutil.copy(memhog, node.prefix / f"vz/private/{ctid}/bin/memhog")
    node.vz("start", str(ctid))
    node.sh(ctid, f"setsid /bin/memhog {mib} </dev/null >/dev/null 2>&1 &")
    wait_memhog(node, ctid, 300)
    return ip


def wait_memhog(node: twonode.BedNode, ctid: int, timeout: float) -> None:
    """Until memhog in CT *ctid* has touched all its memory."""
    deadline = time.monotonic() + timeout
    while "ready" not in node.sh(ctid, "test -f /tmp/memhog.ready && echo ready", check=False):
        if time.monotonic() > deadline:
            raise RuntimeError(f"memhog did not start in CT {ctid}")
        time.sleep(0.2)
    time.sleep(0.3)


def make_debian_ct(node: twonode.BedNode, ctid: int, memhog: Path) -> None:
    """The Debian 12 systemd CT with its stock services up, and a small memhog."""
    node.vz("create", str(ctid), "--ostemplate", DEBIAN, "--ipadd", node.new_ip(), timeout=600)
    shutil.copy(memhog, node.prefix / f"vz/private/{ctid}/usr/local/bin/memhog")
    node.vz("start", str(ctid), timeout=300)
    state = node.sh(ctid, BOOT_WAIT, check=False).strip()
    if state != "running":
        raise RuntimeError(f"the Debian CT did not come up: systemd is {state!r}")
    node.sh(ctid, f"setsid /usr/local/bin/memhog {DEBIAN_MIB} </dev/null >/dev/null 2>&1 &")
    wait_memhog(node, ctid, 60)


def debian_template(bed: twonode.TwoNodes) -> bool:
    """Put the cached Debian template into both nodes' caches; False if there is none."""
    src = DEBIAN_CACHE / f"{DEBIAN}.tar.zst"
    if not src.is_file():
        return False
    for node in (bed.a, bed.b):
        for f in DEBIAN_CACHE.glob(f"{DEBIAN}.tar.zst*"):
            dst = node.prefix / "vz/template/cache" / f.name
            try:
                os.link(f, dst)
            except OSError:
                shutil.copy(f, dst)
    return True


def seen_gap(node: twonode.BedNode, ctid: int) -> float | None:
    out = node.sh(ctid, "cat /tmp/memhog.gap_ms", check=False).strip()
    try:
        return float(out) / 1000
    except ValueError:
        return None


def run_vzbackup(bed: twonode.TwoNodes, ctid: int, flags: list[str]) -> dict:
    res = bed.a.vz("migrate", str(ctid), bed.dest(bed.b), *bed.ssh_args(), "--json", *flags,
                   timeout=1800)
    return json.loads(res.stdout)


def run_baseline(bed: twonode.TwoNodes, ctid: int) -> dict:
    """vzctl-style manual migration: chkpnt, rsync images + private + config, restore."""
    dump = bed.a.prefix / f"vz/dump/Dump.{ctid}"
    ssh = " ".join(["ssh", "-i", str(bed.ssh_key), "-o", f"UserKnownHostsFile={bed.known_hosts}",
                    "-o", "BatchMode=yes"])
    t0 = time.monotonic()
    bed.a.vz("chkpnt", str(ctid))
    t_dumped = time.monotonic()
    dest = bed.dest(bed.b)
    for src, dst in (
        (bed.a.prefix / f"vz/private/{ctid}", bed.b.prefix / f"vz/private/{ctid}"),
        (dump, bed.b.prefix / f"vz/dump/Dump.{ctid}"),
    ):
        r = bed.a.run(["rsync", "-aHAXS", "--numeric-ids", "-e", ssh, f"{src}/",
                       f"{dest}:{dst}/"], timeout=1800)
        if r.returncode:
            raise RuntimeError(r.stderr)
    conf = bed.b.prefix / f"etc/vz/conf/{ctid}.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(bed.a.prefix / f"etc/vz/conf/{ctid}.conf", conf)
    t_copied = time.monotonic()
    bed.b.vz("restore", str(ctid))
    t1 = time.monotonic()
    bed.a.vz("destroy", str(ctid))
    return {"mode": "criu+rsync", "frozen": t1 - t0, "total": t1 - t0,
            "times": {"dump": t_dumped - t0, "copy": t_copied - t_dumped,
                      "restore": t1 - t_copied}}


def one(bed: twonode.TwoNodes, method: str, mib: int | str, ctid: int, memhog: Path) -> dict:
    if mib == "debian":
        make_debian_ct(bed.a, ctid, memhog)
    else:
        make_ct(bed.a, ctid, int(mib), memhog)
    try:
        if method == "criu+rsync":
            rep = run_baseline(bed, ctid)
        else:
            flags = {"online+lazy": ["--online", "--lazy"], "online": ["--online", "--no-lazy"],
                     "online+lazy+plain": ["--online", "--lazy", "--plain-tcp"],
                     "online+plain": ["--online", "--no-lazy", "--plain-tcp"],
                     "restart": []}[method]
            rep = run_vzbackup(bed, ctid, flags)
        rep["seen_gap"] = seen_gap(bed.b, ctid) if method != "restart" else None
        if mib == "debian":
            rep["systemd"] = bed.b.sh(ctid, BOOT_WAIT, check=False).strip()
        return rep
    finally:
        bed.b.vz("stop", "--fast", str(ctid), check=False)
        bed.b.vz("destroy", str(ctid), check=False)
        bed.a.vz("stop", "--fast", str(ctid), check=False)
        bed.a.vz("destroy", str(ctid), check=False)


def page_rate(rep: dict) -> str:
    """How fast the memory moved: lazy pages after the restore, else the dump's page stream."""
    pages = (rep.get("bytes_sent") or {}).get("pages", 0)
    secs = (rep.get("times") or {}).get("lazy_pages") or (rep.get("times") or {}).get("dump")
    return f"  pages {pages / secs / 1e6:.0f} MB/s" if pages > 2**20 and secs else ""


def _dirs(rep: dict) -> str:
    """How much of the tree the final sync visited (migrate.changes)."""
    n = rep.get("final_sync_dirs")
    return "all" if n is None else str(n)


def print_run(label: str, method: str, rep: dict) -> None:
    gap = rep.get("seen_gap")
    steps = rep.get("frozen_steps") or {}
    print(f"{label} {method:<12} frozen {rep['frozen']:7.3f} s"
          f"  seen {gap if gap is None else round(gap, 3)!s:>6}"
          f"  total {rep['total']:7.2f} s  load {rep['load']:.1f}{page_rate(rep)}  "
          f"final sync dirs {_dirs(rep)}  "
          + " ".join(f"{k}={v:.2f}" for k, v in rep.get("times", {}).items())
          + ("  frozen: " + " ".join(f"{k}={v:.3f}" for k, v in steps.items()) if steps else ""),
          flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000",
                    help="MiB of touched memory, comma list (empty: the Debian CT only)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--debian-methods", default="online+lazy",
                    help="methods for the Debian systemd CT (empty: leave it out)")
    ap.add_argument("--bed-fs", choices=("ext4", "root"), default="ext4",
                    help="the nodes' prefixes on a new journaled ext4 (default; what a node's "
                    "/vz is) or on this machine's root file system")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vzb-bench-"))
    mount = twonode.BED_BASE / f"vzbench-bed-fs-{os.getpid()}"
    try:
        memhog = build_memhog(tmp / "memhog")
        with contextlib.ExitStack() as stack:
            base = twonode.BED_BASE
            if args.bed_fs == "ext4":
                base = stack.enter_context(fresh_fs(mount, BED_FS_BYTES))
            run_cases(args, twonode.up(f"bench{os.getpid()}", base=base), memhog)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            mount.rmdir()
    return 0


def run_cases(args: argparse.Namespace, bed: twonode.TwoNodes, memhog: Path) -> None:
    """Every case of *args* on *bed* (removed at the end), then medians, ratios, targets."""
    sizes = [int(s) for s in args.sizes.split(",") if s]
    methods = args.methods.split(",")
    deb_methods = [m for m in args.debian_methods.split(",") if m]
    results: dict[str, dict[str, list[dict]]] = {}
    ctid = CTID_BASE
    cases: list[tuple[int | str, str]] = [(mib, m) for mib in sizes for m in methods]
    if deb_methods and debian_template(bed):
        cases += [("debian", m) for m in deb_methods]
    elif deb_methods:
        print(f"no {DEBIAN} template in {DEBIAN_CACHE} (scripts/setup.sh builds it): "
              "the Debian CT is left out")
    print(f"load average at start: {os.getloadavg()[0]:.2f} (2 cores; other work shares them);"
          f" the nodes' prefixes on {'a new journaled ext4' if args.bed_fs == 'ext4' else '/'}")
    try:
        for _ in range(args.rounds):
            for mib, method in cases:
                ctid += 1
                rep = one(bed, method, mib, ctid, memhog)
                rep["load"] = os.getloadavg()[0]
                results.setdefault(str(mib), {}).setdefault(method, []).append(rep)
                label = "Debian   " if mib == "debian" else f"{mib:>5} MiB"
                print_run(label, method, rep)
    finally:
        bed.cleanup()

    def med(mib: int | str, method: str, key: str) -> float:
        vals = [r[key] for r in results.get(str(mib), {}).get(method, [])
                if r.get(key) is not None]
        return statistics.median(vals) if vals else float("nan")

    if sizes:
        print("\nmedians (s)      " + "".join(f"{m:>24}" for m in methods))
    for mib in sizes:
        row = "".join(f"{med(mib, m, 'frozen'):>11.3f} /{med(mib, m, 'total'):>10.2f}  "
                      for m in methods)
        print(f"{mib:>5} MiB frozen/total {row}")
    if sizes:
        print("\nratios")
    for mib in sizes:
        lz_f, lz_t = med(mib, "online+lazy", "frozen"), med(mib, "online+lazy", "total")
        print(f"{mib:>5} MiB  lazy total / restart total "
              f"{lz_t / med(mib, 'restart', 'total'):.2f}x"
              f"  baseline frozen / lazy frozen {med(mib, 'criu+rsync', 'frozen') / lz_f:.1f}x"
              f"  online(no lazy) frozen / lazy frozen {med(mib, 'online', 'frozen') / lz_f:.1f}x")
    print("\ntargets (issue 13; noisy shared machine)")
    big = max(sizes, default=0)
    checks = [(f"online+lazy frozen at {mib} MiB", med(mib, "online+lazy", "frozen"), 0.3, "s")
              for mib in sizes]
    if "debian" in results:
        for m in deb_methods:
            print(f"Debian systemd CT {m}: frozen {med('debian', m, 'frozen'):.3f} s, seen "
                  f"{med('debian', m, 'seen_gap'):.3f} s, total {med('debian', m, 'total'):.2f}"
                  f" s, systemd at DEST: {results['debian'][m][-1].get('systemd')}")
        checks.append(("online+lazy frozen, Debian systemd CT",
                       med("debian", "online+lazy", "frozen"), 0.5, "s"))
    if big >= 1000:
        checks += [
            (f"online+lazy total / restart total at {big} MiB",
             med(big, "online+lazy", "total") / med(big, "restart", "total"), 1.2, "x"),
            (f"online frozen at {big} MiB", med(big, "online", "frozen"), 2.5, "s"),
        ]
    for label, value, limit, unit in checks:
        verdict = "n/a" if value != value else ("PASS" if value <= limit else "FAIL")
        print(f"  {label:<44} {value:7.3f}{unit} (<= {limit}{unit}): {verdict}")
    out = ROOT / "bench/results" / f"migrate-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"sizes": sizes, "bed_fs": args.bed_fs, "results": results},
                              indent=2))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    sys.exit(main())
