"""Measure which systemd sandboxing options CRIU can dump: each option alone, on a real CT.

A Debian 12 CT from the cached template runs with SYSTEMD_CHECKPOINT="no" (no vzbackup
drop-ins, so every option acts as a unit says) and with the stock units that use the
options CRIU can't dump masked (redis-server, logind, hostnamed, timedated, localed). For
each option the stock Debian units use, a transient service (``systemd-run -p OPTION``)
runs ``sleep`` with that option alone; then ``vzbackup check`` and a real ``chkpnt`` +
``restore`` (the service must be active after it). Prints one row per option: which of the
template's units use it, what check reported, what CRIU did, and whether the drop-in keeps
it; PASS when every option the drop-in keeps dumps and restores. Run as root after
scripts/setup.sh (about 3 minutes; a shared machine makes the times noisy):

    .venv/bin/python bench/sandboxing.py [--json] [--only ProtectHostname,PrivateTmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from checkpoint import DEBIAN_TEMPLATE, DEMO_CACHE, WAIT_RUNNING, _stop, vz

from vzbackup.constants import SYSTEMD_DROPINS

CTID, IP = 3902, "10.199.39.3"
# Stock units whose options CRIU can't dump: masked so the CT starts checkpointable.
MASKED = ("redis-server", "systemd-logind", "systemd-hostnamed", "systemd-timedated",
          "systemd-localed")
# (systemd-run properties, what the option creates): every sandboxing option of the stock
# units in the Debian 12 template (redis-server, postgresql@, ssh, cron, dbus and systemd's
# own services).
OPTIONS: list[tuple[tuple[str, ...], str]] = [
    (("ProtectHostname=yes",), "nested UTS namespace"),
    (("PrivateUsers=yes",), "nested user namespace"),
    (("PrivateIPC=yes",), "nested IPC namespace"),
    (("IPAddressDeny=any",), "cgroup BPF program (none in a user namespace)"),
    (("DeviceAllow=/dev/null rw",), "cgroup BPF device program (none in a user namespace)"),
    (("PrivateTmp=yes",), "mount namespace, private /tmp"),
    (("PrivateDevices=yes",), "mount namespace, private /dev"),
    (("PrivateNetwork=yes",), "nested network namespace"),
    (("ProtectSystem=strict",), "mount namespace, read-only /"),
    (("ProtectHome=yes",), "mount namespace, hidden /home"),
    (("ReadWritePaths=-/var/lib/redis", "ProtectSystem=strict"), "mount namespace"),
    (("NoExecPaths=/", "ExecPaths=/usr/bin /usr/lib /lib"), "mount namespace, noexec binds"),
    (("ProtectKernelTunables=yes",), "mount namespace, read-only /proc/sys"),
    (("ProtectKernelModules=yes",), "mount namespace, capability dropped"),
    (("ProtectKernelLogs=yes",), "mount namespace, /proc/kmsg hidden"),
    (("ProtectControlGroups=yes",), "mount namespace, read-only cgroupfs"),
    (("ProtectClock=yes",), "seccomp filter (device program: none in a user namespace)"),
    (("ProtectProc=invisible",), "mount namespace, proc with hidepid"),
    (("CapabilityBoundingSet=",), "capability bounding set"),
    (("AmbientCapabilities=CAP_NET_BIND_SERVICE", "User=redis"), "ambient capabilities"),
    (("NoNewPrivileges=yes",), "no_new_privs"),
    (("LockPersonality=yes",), "seccomp filter"),
    (("MemoryDenyWriteExecute=yes",), "seccomp filter"),
    (("RestrictNamespaces=yes",), "seccomp filter"),
    (("RestrictRealtime=yes",), "seccomp filter"),
    (("RestrictSUIDSGID=yes",), "seccomp filter"),
    (("RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",), "seccomp filter"),
    (("SystemCallArchitectures=native",), "seccomp filter"),
    (("SystemCallFilter=@system-service",), "seccomp filter"),
    (("SystemCallFilter=~@privileged @resources", "SystemCallErrorNumber=EPERM"),
     "seccomp filter (deny list)"),
    (("User=redis", "RemoveIPC=yes"), "task of another uid"),
    (("UMask=0007",), "umask"),
    (("LimitNOFILE=65535",), "rlimit"),
    (("OOMScoreAdjust=-900",), "oom_score_adj"),
    (("RuntimeDirectory=vzopt", "StateDirectory=vzopt"), "directories"),
    (("IOSchedulingClass=idle",), "I/O priority"),
]


def dropped_by_dropin() -> set[str]:
    """Option names the vzbackup service drop-in turns off."""
    text = SYSTEMD_DROPINS["system/service.d/50-vzbackup-checkpoint.conf"]
    return {ln.split("=")[0] for ln in text.splitlines() if "=" in ln and ln[:1].isupper()}


def sh(prefix: Path, script: str) -> str:
    env = {**os.environ, "VZBACKUP_PREFIX": str(prefix)}
    res = subprocess.run([sys.executable, "-m", "vzbackup.cli", "exec", str(CTID), script],
                         env=env, capture_output=True, text=True, check=False)
    return res.stdout.strip()


def cli(prefix: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VZBACKUP_PREFIX": str(prefix)}
    return subprocess.run([sys.executable, "-m", "vzbackup.cli", *args], env=env,
                          capture_output=True, text=True, check=False, timeout=300)


def blockers(prefix: Path) -> list[str]:
    res = cli(prefix, "check", str(CTID), "--json")
    return sorted({f"{b['comm']}: {b['what']}" for b in json.loads(res.stdout)["blockers"]})


def wait_checkpointable(prefix: Path, timeout: float = 60) -> None:
    """systemd starts short-lived helpers now and then: wait until nothing blocks."""
    deadline = time.monotonic() + timeout
    while (found := blockers(prefix)) and time.monotonic() < deadline:
        time.sleep(1)
    if found:
        raise SystemExit(f"the CT is not checkpointable without the options: {found}")


def measure(prefix: Path, props: tuple[str, ...], n: int) -> dict:
    unit = f"vzopt{n}"
    args = " ".join(f"-p '{p}'" for p in props)
    sh(prefix, f"systemd-run -q --unit {unit} {args} /usr/bin/sleep infinity; sleep 0.5")
    row: dict = {"active": sh(prefix, f"systemctl is-active {unit}")}
    row["check"] = [b for b in blockers(prefix) if b.startswith("sleep")]
    t0 = time.perf_counter()
    res = cli(prefix, "chkpnt", str(CTID))
    if res.returncode:
        errs = [ln for ln in res.stderr.splitlines()
                if "Error (" in ln and "RLIMIT_NOFILE" not in ln]
        row["criu"] = "fails: " + (errs or [res.stderr.strip()])[0].split(": ", 1)[-1][:90]
    else:
        rst = cli(prefix, "restore", str(CTID))
        took = time.perf_counter() - t0
        after = sh(prefix, f"systemctl is-active {unit}") if not rst.returncode else "?"
        row["criu"] = (f"dumps + restores ({took:.1f} s), service {after}"
                       if not rst.returncode else f"restore fails: {rst.stderr[-120:]}")
        row["restored_active"] = after == "active"
    sh(prefix, f"systemctl stop {unit}; systemctl reset-failed {unit} 2>/dev/null; true")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated option names")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    options = [(p, w) for p, w in OPTIONS if not only or p[0].split("=")[0] in only]
    tarball = DEMO_CACHE / f"{DEBIAN_TEMPLATE}.tar.zst"
    if not tarball.exists():
        raise SystemExit(f"no {tarball}: run scripts/setup.sh")
    prefix = Path(tempfile.mkdtemp(prefix="vzbench-sandbox-", dir="/var/tmp"))
    (prefix / "vz/template/cache").mkdir(parents=True)
    os.link(tarball, prefix / "vz/template/cache" / tarball.name)
    rows = []
    try:
        vz(prefix, "create", str(CTID), "--ipadd", IP, "--ostemplate", DEBIAN_TEMPLATE)
        conf = prefix / f"etc/vz/conf/{CTID}.conf"
        conf.write_text(conf.read_text() + 'SYSTEMD_CHECKPOINT="no"\n')
        vz(prefix, "start", str(CTID))
        vz(prefix, "exec", str(CTID), WAIT_RUNNING)
        sh(prefix, f"systemctl mask -q --now {' '.join(MASKED)}")
        wait_checkpointable(prefix)
        for n, (props, creates) in enumerate(options):
            name = props[0].split("=")[0]
            users = sh(prefix, f"cd /lib/systemd/system && find . -maxdepth 1 -type f "
                               f"-name '*.service' | xargs grep -l '^{name}=' | sed "
                               "'s|^./||; s/.service$//' | sort | tr '\\n' ' '")
            rows.append({"option": " ".join(props), "name": name, "creates": creates,
                         "used_by": users, **measure(prefix, props, n)})
            print(_line(rows[-1]), file=sys.stderr, flush=True)
            wait_checkpointable(prefix)
    finally:
        _stop(prefix, CTID)
        shutil.rmtree(prefix, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print(_line(r))
    verdicts = _verdicts(rows)
    print("\n".join(verdicts))
    sys.exit(1 if any(v.startswith("FAIL") for v in verdicts) else 0)


def _line(r: dict) -> str:
    kept = "dropped" if r["name"] in dropped_by_dropin() else "kept"
    check = "; ".join(r["check"]) or "nothing"
    return (f"{r['option']:<48} {kept:<8} check: {check:<34} criu: {r['criu']}"
            f"   [{r['creates']}; used by: {r['used_by'] or '-'}]")


def _verdicts(rows: list[dict]) -> list[str]:
    """Every option the drop-in keeps must dump and restore with the service still active;
    check and CRIU must agree on every option."""
    dropped = dropped_by_dropin()
    out = []
    for r in rows:
        dumps = r["criu"].startswith("dumps") and r.get("restored_active")
        agree = bool(r["check"]) != bool(dumps)
        if r["name"] not in dropped and not dumps:
            out.append(f"FAIL {r['option']}: kept by the drop-in but CRIU: {r['criu']}")
        elif not agree:
            out.append(f"FAIL {r['option']}: check says {r['check'] or 'nothing'}, "
                       f"CRIU {r['criu']}")
    kept = sum(r["name"] not in dropped for r in rows)
    out.append(f"{'FAIL' if out else 'PASS'}: {kept} kept options dump and restore, "
               f"{len(rows) - kept} dropped ones measured; check agrees with CRIU on "
               f"{sum(bool(r['check']) != r['criu'].startswith('dumps') for r in rows)}/"
               f"{len(rows)}")
    return out


if __name__ == "__main__":
    main()
