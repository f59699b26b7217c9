"""Benchmark: vzbackup chkpnt+restore vs plain `criu dump` + `criu restore` on the same CT.

For each size, a busybox CT holds SIZE MB in /dev/shm (tmpfs, dumped by CRIU with the mount
namespace) and runs a counter; then a Debian 12 CT with systemd and the stock units (redis,
postgresql, sshd, cron; the template setup.sh caches) boots to ``running``. Each round dumps
and restores the CT through vzbackup (pycriu, supervisor) and then through the criu CLI with
the same options, by hand (an action script gives the restored CT its veth), in one run.
Prints wall times, the ratio vzbackup / plain criu, systemd's state after either restore,
and PASS/FAIL per target (exit 1 on a FAIL). Run as root after scripts/setup.sh:

    .venv/bin/python bench/checkpoint.py [--sizes 0,100,300] [--rounds 3] [--no-debian]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CTID = 3900
IP = "10.199.39.1"
DEBIAN_CTID, DEBIAN_IP = 3901, "10.199.39.2"
DEBIAN_TEMPLATE = "debian-12-x86_64"
DEMO_CACHE = Path("/var/lib/vzbackup/demo/vz/template/cache")  # where setup.sh caches it
# Targets: vzbackup's chkpnt + restore against plain criu dump + restore of the same CT.
# vzbackup adds a CLI start, locks, a supervisor and its notifications; on a small CT that
# fixed cost dominates the ratio, so either bound passes.
RATIO_TARGET = 1.5
OVERHEAD_TARGET_S = 1.0
WAIT_RUNNING = (
    "t=900; while [ ! -S /run/systemd/private ] && [ $t -gt 0 ]; do sleep 0.1; t=$((t-1)); "
    "done; timeout 90 systemctl is-system-running --wait"
)


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


# Run at CRIU's "setup-namespaces" (--empty-ns net): what a user writes by hand to give the
# restored CT its routed veth back (the CLI can't create veths in a CT's user namespace).
NET_ACTION_SCRIPT = """#!/bin/sh
[ "$CRTOOLS_SCRIPT_ACTION" = setup-namespaces ] || exit 0
set -e
ct() {{ nsenter --net=/proc/$CRTOOLS_INIT_PID/ns/net ip "$@"; }}
ip link add name {host} type veth peer name eth0 netns $CRTOOLS_INIT_PID
ip addr add {gw}/32 dev {host}
ip link set dev {host} up
echo 1 > /proc/sys/net/ipv4/conf/{host}/proxy_arp
echo 1 > /proc/sys/net/ipv4/conf/{host}/rp_filter
ip route add {ip}/32 dev {host} src {gw}
ct link set dev lo up
ct addr add {ip}/32 dev eth0
ct link set dev eth0 up
ct route add {gw} dev eth0 scope link
ct route add default via {gw} dev eth0
"""


def plain_criu_round(prefix: Path, criu: str, work: Path, ctid: int) -> tuple[float, float, int]:
    """``criu dump`` + ``criu restore`` of the running CT *ctid* by hand, with the options
    vzbackup passes over RPC; returns (dump s, restore s, host pid of the restored init).

    What the CLI needs besides: the console pty is a shell job's tty (the CLI has no
    orphan-pts-master), the network namespace comes back empty and NET_ACTION_SCRIPT makes
    the veth, and the restore runs where vzbackup's supervisor would (the CT's cgroup made,
    the root mounted, the images readable by the CT's root). The caller kills the tree
    (hand_back)."""
    from vzbackup.config.node import Node
    from vzbackup.criu import driver
    from vzbackup.ct import fencing, idmap, network
    from vzbackup.ct.container import Container

    ct = Container(Node.load(str(prefix)), ctid)
    st = ct.state()
    assert st is not None
    images = work / f"plain-{ctid}"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir()
    common = ["--tcp-established", "--file-locks", "--manage-cgroups", "-D", str(images),
              "--shell-job"]
    controllers = [f"--cgroup-dump-controller={c}"
                   for c in driver.own_cgroup_controllers(st.init_pid)]
    dump_ext = [a for e in fencing.criu_dump_externals() for a in ("--external", e)]
    restore_ext = [a for e in fencing.criu_restore_externals() for a in ("--external", e)]
    driver.save_cgroup_tree(st.init_pid, images)  # systemd's empty slices (see restore)
    dump_cmd = [criu, "dump", "-t", str(st.init_pid), *common, *controllers, "-o", "dump.log",
                "--external", "mnt[/dev/console]:console", *dump_ext]
    t_dump = timed(lambda: _criu(dump_cmd, images / "dump.log"))
    # vzbackup's supervisor sees init go and tears the runtime down: wait for it.
    while ct.state() is not None:
        time.sleep(0.02)
    conf = ct.conf
    host = network.host_veth_name(ctid, 0)
    script = work / "net-action.sh"
    ip = conf.ips[0]
    script.write_text(NET_ACTION_SCRIPT.format(host=host, ip=ip, gw=network.GATEWAY))
    script.chmod(0o755)
    pidfile = work / f"plain-{ctid}.pid"

    def restore() -> None:
        ct.mount()
        pidfile.unlink(missing_ok=True)
        cg = ct.cgroup()
        cg.create()  # CRIU can't set up a cpuset parent itself
        unified = cg.controller_paths().get("unified")
        if unified:
            driver.make_cgroup_tree(images, unified)  # else: systemd's fsnotify marks fail
        idmap.give_images(images, conf.idmap)
        # Without the RPC's orphan-pts-master the console comes from criu's stdin: a pty.
        master, slave = os.openpty()
        os.fchown(slave, conf.idmap.root, conf.idmap.root + 5)  # root:tty of the CT, as ours
        try:
            _criu([criu, "restore", *common, "-o", "restore.log", "--root", str(ct.ve_root()),
                   "--restore-detached", "--pidfile", str(pidfile), "--empty-ns", "net",
                   "--action-script", str(script), "--external",
                   f"mnt[console]:{os.ttyname(slave)}", *restore_ext],
                  images / "restore.log", stdin=slave)
        finally:
            os.close(slave)
            os.close(master)

    t_restore = timed(restore)
    return t_dump, t_restore, int(pidfile.read_text())


def _criu(cmd: list[str], log: Path, stdin: int | None = None) -> None:
    res = subprocess.run(cmd, stdin=stdin, check=False)
    if res.returncode:
        errors = [ln for ln in log.read_text(errors="replace").splitlines()
                  if "Error" in ln and "RLIMIT_NOFILE" not in ln]
        raise RuntimeError(f"plain criu {cmd[1]} failed: " + "\n".join(errors[-6:]))


def hand_back(prefix: Path, ctid: int, pid: int) -> None:
    """Kill a tree restored by plain criu and clean up like vzbackup's stop does."""
    from vzbackup.config.node import Node
    from vzbackup.ct import network
    from vzbackup.ct.container import Container

    ct = Container(Node.load(str(prefix)), ctid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    cg = ct.cgroup()
    cg.kill_all()
    time.sleep(0.3)
    with contextlib.suppress(Exception):
        network.teardown(ct.net_config())
    cg.destroy()
    cg.prune_parents()
    ct.umount()


def systemd_state(pid: int) -> str:
    """``systemctl is-system-running`` inside the CT whose init has host pid *pid*."""
    res = subprocess.run(["nsenter", "-t", str(pid), "-a", "timeout", "90", "systemctl",
                          "is-system-running", "--wait"], capture_output=True, text=True,
                         check=False)
    return res.stdout.strip() or res.stderr.strip()[-80:]


def debian_case(prefix: Path, criu: str, work: Path, rounds: int, template: str) -> dict:
    """A Debian 12 CT with systemd and the stock units: boot to running, then per round
    vzbackup chkpnt + restore and plain criu dump + restore of the same CT, and systemd's
    state after each restore. A failed vzbackup chkpnt is reported (FAIL) with CRIU's reason."""
    row: dict = {"case": f"{template} systemd"}
    tarball = DEMO_CACHE / f"{template}.tar.zst"
    if not tarball.exists():
        return {**row, "error": f"no {tarball}: scripts/setup.sh, or vzbackup --prefix "
                                f"{DEMO_CACHE.parents[2]} template build {template}"}
    os.link(tarball, prefix / "vz/template/cache" / tarball.name)
    ct = str(DEBIAN_CTID)
    vz(prefix, "create", ct, "--ipadd", DEBIAN_IP, "--ostemplate", template)
    row["boot_s"] = timed(lambda: (vz(prefix, "start", ct), vz(prefix, "exec", ct, WAIT_RUNNING)))
    s = Samples()

    def check(pid: int) -> None:
        row["state_after_plain"] = systemd_state(pid)

    for i in range(rounds):
        if i:
            vz(prefix, "start", ct)
            vz(prefix, "exec", ct, WAIT_RUNNING)
        # plain CRIU first, on a CT vzbackup booted: after vzbackup's restore systemd holds
        # files on mounts only vzbackup's dump finds (see vzbackup/criu/detached.py)
        plain_ok = s.plain_round(prefix, criu, work, DEBIAN_CTID, row, check)
        vz(prefix, "start", ct)
        vz(prefix, "exec", ct, WAIT_RUNNING)
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "vzbackup.cli", "chkpnt", ct],
                             env={**os.environ, "VZBACKUP_PREFIX": str(prefix)},
                             capture_output=True, text=True, check=False)
        if res.returncode:
            errors = [ln for ln in res.stderr.splitlines()
                      if "Error (" in ln and "RLIMIT_NOFILE" not in ln]
            _stop(prefix, DEBIAN_CTID)
            return {**row, "error": (errors or [res.stderr.strip()])[0][-160:]}
        s.ours_d.append(time.perf_counter() - t0)
        s.ours_r.append(timed(lambda: vz(prefix, "restore", ct)))
        row["state_after"] = vz(prefix, "exec", ct, WAIT_RUNNING).strip()
        _stop(prefix, DEBIAN_CTID)
        if not plain_ok:
            break
    return {**row, **s.medians()}


@dataclass
class Samples:
    """Dump and restore seconds per round, ours and plain CRIU's."""

    ours_d: list[float] = field(default_factory=list)
    ours_r: list[float] = field(default_factory=list)
    plain_d: list[float] = field(default_factory=list)
    plain_r: list[float] = field(default_factory=list)

    def plain_round(self, prefix: Path, criu: str, work: Path, ctid: int, row: dict,
                    check: Callable[[int], None] | None = None) -> bool:
        """One plain criu dump + restore of the running CT, *check* on the restored init,
        the CT handed back to vzbackup. False (the reason in *row*) when CRIU failed."""
        try:
            d, r, pid = plain_criu_round(prefix, criu, work, ctid)
        except RuntimeError as e:
            row["plain_error"] = str(e)[-300:]
            _stop(prefix, ctid)
            return False
        try:
            if check:
                check(pid)
        finally:
            hand_back(prefix, ctid, pid)
        self.plain_d.append(d)
        self.plain_r.append(r)
        return True

    def medians(self) -> dict:
        med = statistics.median
        row = {"vzbackup_dump_s": med(self.ours_d), "vzbackup_restore_s": med(self.ours_r)}
        if self.plain_d:
            row |= {"criu_dump_s": med(self.plain_d), "criu_restore_s": med(self.plain_r)}
            row["ratio_total"] = (row["vzbackup_dump_s"] + row["vzbackup_restore_s"]) / (
                row["criu_dump_s"] + row["criu_restore_s"])
        return row


def _stop(prefix: Path, ctid: int) -> None:
    """Stop the CT if vzbackup runs it (a failed plain dump leaves it so), drop its mount."""
    subprocess.run([sys.executable, "-m", "vzbackup.cli", "stop", "--fast", str(ctid)],
                   env={**os.environ, "VZBACKUP_PREFIX": str(prefix)}, capture_output=True,
                   check=False)
    _drop_mount(prefix, ctid)


def _drop_mount(prefix: Path, ctid: int) -> None:
    subprocess.run(["umount", "-l", str(prefix / f"vz/root/{ctid}")], capture_output=True,
                   check=False)


def busybox_size(prefix: Path, criu: str, work: Path, size: int, rounds: int) -> dict:
    """Per round: vzbackup chkpnt + restore, then plain criu dump + restore, of a busybox CT
    holding *size* MB in /dev/shm (filled again after each round's fresh start)."""
    fill = (f"rm -f /dev/shm/blob; mount -o remount,size=2g /dev/shm; dd if=/dev/urandom "
            f"of=/dev/shm/blob bs=1M count={size} 2>/dev/null; true")
    s = Samples()
    row: dict = {"size_mb": size}
    for _ in range(rounds):
        vz(prefix, "start", str(CTID))
        vz(prefix, "exec", str(CTID), fill)
        s.ours_d.append(timed(lambda: vz(prefix, "chkpnt", str(CTID))))
        s.ours_r.append(timed(lambda: vz(prefix, "restore", str(CTID))))
        s.plain_round(prefix, criu, work, CTID, row)
    return {**row, **s.medians()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="0,100,300", help="MB held in the CT's /dev/shm")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--debian", action=argparse.BooleanOptionalAction, default=True,
                    help="also a Debian CT with systemd (the cached template)")
    ap.add_argument("--debian-template", default=DEBIAN_TEMPLATE,
                    help="e.g. debian-13-x86_64 (built into the demo prefix's cache first)")
    args = ap.parse_args()
    from vzbackup.criu.check import criu_binary

    criu = criu_binary()
    prefix = Path(tempfile.mkdtemp(prefix="vzbench-", dir="/var/tmp"))
    work = prefix / "work"
    work.mkdir()
    cache = prefix / "vz/template/cache"
    cache.mkdir(parents=True)
    subprocess.run(["bash", str(ROOT / "scripts/build-template.sh"),
                    str(cache / "busybox-1.0-x86_64.tar.zst")], check=True, capture_output=True)
    results, debian = [], None
    try:
        vz(prefix, "create", str(CTID), "--ipadd", IP, "--config", "basic", "--privileged")
        vz(prefix, "set", str(CTID), "--ram", "2G", "--swap", "0", "--save")
        for size in [int(s) for s in args.sizes.split(",") if s]:
            results.append(busybox_size(prefix, criu, work, size, args.rounds))
        if args.debian:
            debian = debian_case(prefix, criu, work, args.rounds, args.debian_template)
    finally:
        for ctid in (CTID, DEBIAN_CTID):
            _stop(prefix, ctid)
        shutil.rmtree(prefix, ignore_errors=True)
    if args.json:
        print(json.dumps({"busybox": results, "debian": debian}, indent=2))
        return
    print(f"{'case':>12} {'vzb dump':>9} {'vzb rst':>8} {'criu dump':>10} {'criu rst':>9} "
          f"{'ratio':>6}   (seconds, median of {args.rounds}; ratio = vzbackup/plain criu)")
    rows = [(f"busybox {r['size_mb']}MB", r) for r in results]
    if debian and "vzbackup_dump_s" in debian:
        rows.append((debian["case"].split("-x86")[0], debian))
    for name, r in rows:
        plain = (f"{r['criu_dump_s']:>10.3f} {r['criu_restore_s']:>9.3f} "
                 f"{r['ratio_total']:>6.2f}" if "ratio_total" in r else
                 f"plain criu FAILED: {r.get('plain_error', '?')}")
        print(f"{name:>12} {r['vzbackup_dump_s']:>9.3f} {r['vzbackup_restore_s']:>8.3f} {plain}")
    if debian:
        print(_debian_line(debian))
    verdicts = _verdicts(results, debian)
    for line in verdicts:
        print(line)
    print("(shared 2-core machine: times are noisy)")
    if any(line.startswith("FAIL") for line in verdicts):
        sys.exit(1)


def _verdicts(results: list[dict], debian: dict | None) -> list[str]:
    """PASS/FAIL per target: vzbackup's overhead over plain criu, and the Debian CT."""
    out = []
    for r in [*results, *([debian] if debian else [])]:
        name = f"busybox {r['size_mb']} MB" if "size_mb" in r else r["case"]
        if "error" in r:
            out.append(f"FAIL {name}: vzbackup chkpnt failed: {r['error']}")
            continue
        if "ratio_total" not in r:
            out.append(f"FAIL {name}: plain criu baseline failed: {r.get('plain_error')}")
            continue
        extra = (r["vzbackup_dump_s"] + r["vzbackup_restore_s"]
                 - r["criu_dump_s"] - r["criu_restore_s"])
        ok = r["ratio_total"] <= RATIO_TARGET or extra <= OVERHEAD_TARGET_S
        out.append(f"{'PASS' if ok else 'FAIL'} {name}: chkpnt+restore {r['ratio_total']:.2f}x "
                   f"plain criu (+{extra:.2f} s; target <= {RATIO_TARGET}x or "
                   f"+{OVERHEAD_TARGET_S} s)")
    if debian and "state_after" in debian:
        ok = debian["state_after"] == "running"
        out.append(f"{'PASS' if ok else 'FAIL'} {debian['case']}: after vzbackup restore: "
                   f"{debian['state_after']} (target running)")
    return out


def _debian_line(row: dict) -> str:
    boot = f"boot to running {row['boot_s']:.1f}s" if "boot_s" in row else "not booted"
    states = (f", systemd after restore: {row.get('state_after', '-')} (vzbackup), "
              f"{row.get('state_after_plain', '-')} (plain criu)")
    return f"{row['case']}: {boot}{states}"


if __name__ == "__main__":
    main()
