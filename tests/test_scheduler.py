"""The scheduler daemon as a real process: real backups of a real CT on a schedule, restarts,
missed runs, the concurrency limit, SIGHUP reloads and failure notifications by SMTP
(aiosmtpd) and webhook (http.server), all on loopback."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodebed import NodeBed, wait_for

EVERY_2S = "*:*:0/2"


class Daemon:
    def __init__(self, node: NodeBed) -> None:
        self.node = node
        self.log = node.prefix / "scheduler.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        out = open(self.log, "a")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vzbackup.cli", "scheduler", "run"], env=self.node.env(),
            stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        out.close()
        wait_for(lambda: "scheduler running" in self.log.read_text(), what="scheduler start")

    def stop(self) -> int:
        assert self.proc
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(120)
        self.proc = None
        return rc

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def daemon(node: NodeBed) -> Iterator[Daemon]:
    d = Daemon(node)
    try:
        yield d
    finally:
        d.kill()


def jobs_cfg(node: NodeBed, text: str) -> Path:
    p = node.prefix / "etc/vzbackup/jobs.cfg"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def history(node: NodeBed, job: str | None = None) -> list[dict]:
    args = ["jobs", "history", "--json", "-n", "200"] + ([job] if job else [])
    return json.loads(node.vz(*args).stdout)


def stopped_ct(node: NodeBed) -> int:
    ctid = node.new_ctid()
    node.vz("create", str(ctid))
    return ctid


def test_daemon_runs_real_backups_and_restart_keeps_history(node: NodeBed, daemon: Daemon):
    ctid = stopped_ct(node)
    jobs_cfg(node, f"vzdump: often\n    schedule {EVERY_2S}\n    vmid {ctid}\n")
    daemon.start()
    wait_for(lambda: len([r for r in history(node) if r["status"] == "ok"]) >= 2,
             timeout=60, what="two scheduled backups")
    assert daemon.stop() == 0
    runs = history(node, "often")
    assert all(r["status"] in ("ok",) for r in runs), runs
    snaps = json.loads(node.vz("list", "-b", "--json").stdout)["snapshots"]
    assert {s["id"] for s in snaps} >= {r["snapshots"][0] for r in runs}
    nxt = json.loads(node.vz("jobs", "next", "--json").stdout)["often"]
    assert nxt != "-"
    # a restart keeps the history and goes on
    daemon.start()
    wait_for(lambda: len(history(node, "often")) > len(runs), timeout=30, what="next run")
    assert daemon.stop() == 0
    assert [r["id"] for r in history(node, "often")][-len(runs):] == [r["id"] for r in runs]


@pytest.mark.parametrize("repeat", [True, False], ids=["repeat-missed", "skip-missed"])
def test_missed_run_after_downtime(node: NodeBed, daemon: Daemon, repeat: bool):
    ctid = stopped_ct(node)
    # every 20 s; the daemon is down over one slot
    jobs_cfg(node, f"vzdump: slow\n    schedule *:*:0/20\n    vmid {ctid}\n"
                   f"    repeat-missed {int(repeat)}\n")
    daemon.start()
    daemon.stop()
    due = json.loads(node.vz("jobs", "next", "--json").stdout)["slow"]
    from datetime import datetime

    wait_for(lambda: datetime.now().astimezone() > datetime.fromisoformat(due),
             timeout=30, what="the slot to pass")
    time.sleep(1)
    daemon.start()
    time.sleep(4)  # well before the next slot (20 s apart)
    ran = len(history(node, "slow"))
    daemon.stop()
    assert ran == (1 if repeat else 0)
    if not repeat:
        assert "missed" in daemon.log.read_text()


def test_concurrency_limit_and_run_now(node: NodeBed, daemon: Daemon):
    a, b = stopped_ct(node), stopped_ct(node)
    jobs_cfg(node, "scheduler: options\n    max-workers 1\n"
                   f"vzdump: ja\n    schedule {EVERY_2S}\n    vmid {a}\n"
                   f"vzdump: jb\n    schedule {EVERY_2S}\n    vmid {b}\n"
                   f"verify: check\n    schedule 03:00\n")
    daemon.start()
    wait_for(lambda: len([r for r in history(node) if r["ended"]]) >= 4, timeout=90,
             what="four runs")
    res = node.vz("jobs", "run-now", "check", "--json")
    assert json.loads(res.stdout)["status"] == "ok"
    daemon.stop()
    runs = sorted((r for r in history(node) if r["ended"]), key=lambda r: r["started"])
    from datetime import datetime

    spans = [(datetime.fromisoformat(r["started"]).timestamp(),
              datetime.fromisoformat(r["ended"]).timestamp()) for r in runs]
    for (_s1, e1), (s2, _) in itertools.pairwise(spans):
        assert s2 >= e1 - 1.0, "two jobs ran at once with max-workers 1"  # 1 s: iso rounding


def test_sighup_reload_good_and_bad(node: NodeBed, daemon: Daemon):
    ctid = stopped_ct(node)
    path = jobs_cfg(node, f"vzdump: first\n    schedule 02:00\n    vmid {ctid}\n")
    daemon.start()
    node.vz("jobs", "add", "second", "--vmid", str(ctid), "--schedule", EVERY_2S)
    wait_for(lambda: len(history(node, "second")) >= 1, timeout=30, what="added job runs")
    good = path.read_text()
    path.write_text(good + "vzdump: broken\n    schedule 25:99\n    vmid 1\n")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in daemon.log.read_text(), what="bad reload reported")
    n = len(history(node, "second"))
    wait_for(lambda: len(history(node, "second")) > n, timeout=30, what="old schedule kept")
    assert "broken" in daemon.log.read_text() and "25:99" in daemon.log.read_text()
    assert daemon.stop() == 0



def test_jitter_moves_the_next_run_and_reloads(node: NodeBed, daemon: Daemon):
    """jitter delays a run by up to that many seconds; a reload that changes only the
    jitter reschedules the job."""
    path = jobs_cfg(node, "verify: spread\n    schedule 02:00\n    jitter 86400\n")

    def next_time() -> str:
        return json.loads(node.vz("jobs", "next", "--json").stdout)["spread"][11:19]

    daemon.start()
    assert next_time() != "02:00:00"  # off by less than a second: 1 in 86400
    path.write_text("verify: spread\n    schedule 02:00\n")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloaded" in daemon.log.read_text(), what="reload")
    assert next_time() == "02:00:00"
    assert daemon.stop() == 0

def test_bad_jobs_file_refuses_to_start(node: NodeBed):
    jobs_cfg(node, "vzdump: x\n    schedule mon..fry 02:00\n    vmid 101\n")
    res = node.vz("scheduler", "run", check=False, timeout=30)
    assert res.returncode == 3
    assert "jobs.cfg:2" in res.stderr and "x" in res.stderr
    jobs_cfg(node, "vzdump: x\n    schedule 02:00\n    vmid 101\n    storage nowhere\n")
    res = node.vz("scheduler", "run", check=False, timeout=30)
    assert res.returncode == 3 and "nowhere" in res.stderr


def test_failure_is_notified_by_mail_and_webhook(node: NodeBed, daemon: Daemon, smtp, web):
    server, mail = smtp
    jobs_cfg(node, "scheduler: options\n    notify failure\n    mailto ops@example.test\n"
                   f"    smtp-server {server}\n    webhook {web.url}\n"
                   f"vzdump: doomed\n    schedule {EVERY_2S}\n    vmid 4242\n")
    daemon.start()
    wait_for(lambda: mail.messages and web.posts, timeout=60, what="notifications")
    daemon.stop()
    _, rcpts, msg = mail.messages[0]
    assert rcpts == ["ops@example.test"]
    assert "doomed" in msg["Subject"] and "FAILED" in msg["Subject"]
    assert "4242" in msg.get_body(("plain",)).get_content()
    event = json.loads(web.posts[0][1])
    assert event["job"] == "doomed" and event["status"] == "failed" and "4242" in event["error"]
    assert (node.prefix / "var/lib/vzbackup/scheduler.db").exists()


def test_restore_test_and_prune_jobs_run_now_without_daemon(node: NodeBed):
    ctid = stopped_ct(node)
    node.vz("dump", str(ctid))
    node.vz("dump", str(ctid))
    scratch = node.new_ctid()
    jobs_cfg(node, f"restore-test: drill\n    schedule sat 03:00\n    vmid {ctid}\n"
                   f"    scratch-ctid {scratch}\n"
                   "prune: tidy\n    schedule sun 04:00\n    prune-backups keep-last=1\n")
    run = json.loads(node.vz("jobs", "run-now", "drill", "--json").stdout)
    assert run["status"] == "ok", run
    assert f"as CT {scratch}: running" in run["details"][0]
    assert " deleted " in node.vz("status", str(scratch)).stdout  # scratch CT is gone
    run = json.loads(node.vz("jobs", "run-now", "tidy", "--json").stdout)
    assert run["status"] == "ok" and "pruned 1 snapshots" in run["details"][0]
    assert len(json.loads(node.vz("list", "-b", "--json").stdout)["snapshots"]) == 1
    assert [r["job"] for r in history(node)] == ["tidy", "drill"]


def test_prune_and_verify_jobs_keep_to_their_cts(node: NodeBed):
    """vmid and exclude choose the CTs whose snapshots a verify or prune job touches: an
    excluded CT's snapshots are never pruned."""
    a, b = stopped_ct(node), stopped_ct(node)
    for ctid in (a, a, b, b):
        node.vz("dump", str(ctid))
    jobs_cfg(node, f"verify: only-a\n    schedule 03:00\n    vmid {a}\n"
                   f"verify: all-but-a\n    schedule 03:00\n    exclude {a}\n"
                   f"prune: tidy\n    schedule sun 04:00\n    prune-backups keep-last=1\n"
                   f"    exclude {b}\n")

    def run(job: str) -> dict:
        out = json.loads(node.vz("jobs", "run-now", job, "--json").stdout)
        assert out["status"] == "ok", out
        return out

    assert run("only-a")["details"][0].startswith("verified 2 snapshots")
    assert run("tidy")["details"][0].startswith("pruned 1 snapshots")
    left = [s["id"] for s in json.loads(node.vz("list", "-b", "--json").stdout)["snapshots"]]
    assert sorted(int(sid.split("/")[0]) for sid in left) == [a, b, b]
    assert run("all-but-a")["details"][0].startswith("verified 2 snapshots")
    res = node.vz("verify", "--ct", str(b), "--json")
    assert sorted(json.loads(res.stdout)["snapshots"]) == sorted(s for s in left
                                                                if s.startswith(f"{b}/"))
    for bad in (["prune", str(a), "--exclude", str(b), "--keep-last", "1"],
                ["verify", str(a), "--exclude", str(b)]):
        res = node.vz(*bad, check=False)
        assert res.returncode != 0 and "--exclude" in res.stderr
    assert len(json.loads(node.vz("list", "-b", "--json").stdout)["snapshots"]) == 3



def test_prune_job_without_a_rule_uses_vzdump_conf(node: NodeBed):
    """A prune job without prune-backups prunes by vzdump.conf's (as jobs.cfg documents)."""
    ctid = stopped_ct(node)
    node.vz("dump", str(ctid))
    node.vz("dump", str(ctid))
    jobs_cfg(node, "prune: tidy\n    schedule sun 04:00\n")
    (node.prefix / "etc/vzbackup/vzdump.conf").write_text("prune-backups: keep-last=1\n")
    run = json.loads(node.vz("jobs", "run-now", "tidy", "--json", check=False).stdout)
    assert run["status"] == "ok" and "pruned 1 snapshots" in run["details"][0], run
    assert len(json.loads(node.vz("list", "-b", "--json").stdout)["snapshots"]) == 1

HOLD_MAINTENANCE_LOCK = """
import select, sys
from vzbackup.backup.session import open_repository
from vzbackup.config.node import Node
from vzbackup.engine import locks
with locks.RepoLock(open_repository(Node.load(), None, None), locks.MAINTENANCE, what="test"):
    print("held", flush=True)
    select.select([sys.stdin], [], [], float(sys.argv[1]))  # until stdin closes, at most
"""


def test_prune_job_waits_for_the_lock_as_long_as_its_lockwait(node: NodeBed):
    """A prune job's lockwait reaches prune and gc: with 0 it fails at once on a held
    maintenance lock (the commands' own default, a minute, would outwait the 30 s hold)."""
    ctid = stopped_ct(node)
    node.vz("dump", str(ctid))
    node.vz("dump", str(ctid))
    jobs_cfg(node, "prune: tidy\n    schedule sun 04:00\n    prune-backups keep-last=1\n"
                   "    lockwait 0\n")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_MAINTENANCE_LOCK, "30"],
                              env=node.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = json.loads(node.vz("jobs", "run-now", "tidy", "--json", check=False).stdout)
    finally:
        holder.stdin.close()  # the holder lets go of the lock and exits
        holder.wait(30)
    assert out["status"] == "failed" and "lock" in out["error"], out
    assert len(json.loads(node.vz("list", "-b", "--json").stdout)["snapshots"]) == 2


def test_sigterm_aborts_a_long_run_cleanly(node: NodeBed, daemon: Daemon):
    ctid = stopped_ct(node)
    (node.prefix / f"vz/private/{ctid}/big").write_bytes(os.urandom(6 << 20))
    conf = node.prefix / "etc/vzbackup/vzdump.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text("bwlimit: 256\n")  # KiB/s: the backup would take ~25 s
    jobs_cfg(node, "scheduler: options\n    shutdown-timeout 1\n"
                   f"vzdump: slow\n    schedule {EVERY_2S}\n    vmid {ctid}\n")
    daemon.start()
    wait_for(lambda: any(r["status"] == "running" for r in history(node)), timeout=30,
             what="a run in progress")
    time.sleep(1)
    t0 = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - t0 < 20
    assert [r["status"] for r in history(node, "slow")] == ["aborted"]
    assert json.loads(node.vz("list", "-b", "--json").stdout)["snapshots"] == []
    assert node.vz("verify").returncode == 0
    # the next backup of that CT is not blocked by anything the aborted run left
    conf.write_text("")
    assert json.loads(node.vz("dump", str(ctid), "--json").stdout)["results"][0]["ok"]
