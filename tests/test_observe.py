"""Metrics and the report from real records: a real scheduler daemon scraped over HTTP and
parsed with prometheus_client's parser, the textfile without a daemon, and the HTML report
rendered by headless Chromium (Debian's package) and looked at pixel by pixel."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from nodebed import NodeBed, need, wait_for
from prometheus_client.parser import text_string_to_metric_families

MIGRATIONS = [  # what vzbackup.migrate.history writes, one line per run
    {"time": "2026-11-20T01:00:00Z", "ctid": 4242, "new_ctid": 4242, "mode": "restart",
     "dest": "root@node2", "result": "failed", "error": "DEST disk full",
     "bytes": {"tree": 1000, "images": 0, "pages": 0},
     "phases": {"preflight": 0.3, "first_sync": 2.0, "stop": 1.0, "frozen": 1.2, "total": 3.5}},
    {"time": "2026-11-21T01:00:00Z", "ctid": 4242, "new_ctid": 4243, "mode": "online+lazy",
     "dest": "root@node2", "result": "ok", "error": None,
     "bytes": {"tree": 5000000, "images": 2000000, "pages": 90000000},
     "phases": {"preflight": 0.4, "first_sync": 3.0, "dump": 0.4, "final_sync": 0.2,
                "image_transfer": 0.3, "restore": 0.5, "commit": 0.1, "lazy_pages": 4.0,
                "frozen": 0.75, "total": 8.9}},
]


def write_migrations(node: NodeBed, records: list[dict]) -> None:
    state = node.prefix / "var/lib/vzbackup"
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "migrations.jsonl", "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write("a torn line from a crash\n")  # skipped, not fatal


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(m: dict, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in m, f"{name}{labels} not in {sorted(k for k in m if k[0] == name)}"
    return m[key]


def snapshots(node: NodeBed) -> dict:
    return json.loads(node.vz("list", "-b", "--json").stdout)


def jobs_cfg(node: NodeBed, text: str) -> None:
    p = node.prefix / "etc/vzbackup/jobs.cfg"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


class Daemon:
    def __init__(self, node: NodeBed) -> None:
        self.log = node.prefix / "scheduler.log"
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vzbackup.cli", "scheduler", "run"], env=node.env(),
                stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        found = wait_for(lambda: re.search(r"metrics on (http://\S+/)metrics",
                                           self.log.read_text()), what="the metrics endpoint")
        self.url = found.group(1)

    def get(self, path: str) -> tuple[str, str]:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return r.headers["Content-Type"], r.read().decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def daemon(node: NodeBed) -> Iterator:
    started: list[Daemon] = []

    def start() -> Daemon:
        d = Daemon(node)
        started.append(d)
        return d

    try:
        yield start
    finally:
        for d in started:
            d.stop()


def busy_ct(node: NodeBed) -> int:
    ctid = node.new_ctid()
    node.vz("create", str(ctid))
    data = node.prefix / "vz/private" / str(ctid) / "data"
    data.mkdir()
    (data / "blob").write_bytes(os.urandom(2 << 20))
    return ctid


def test_daemon_serves_metrics_and_the_report(node: NodeBed, daemon):
    ctid, missing = busy_ct(node), node.new_ctid()
    jobs_cfg(node, "scheduler: options\n    metrics-listen 127.0.0.1:0\n"
                   f"vzdump: nightly\n    schedule yearly\n    vmid {ctid}\n"
                   f"vzdump: broken\n    schedule yearly\n    vmid {missing}\n"
                   "verify: check\n    schedule yearly\n")
    write_migrations(node, MIGRATIONS)
    d = daemon()
    for job in ("nightly", "broken", "nightly", "check"):
        node.vz("jobs", "run-now", job, check=job != "broken", timeout=300)
    content_type, text = d.get("metrics")
    assert content_type.startswith("text/plain")
    m = samples(text)
    listing = snapshots(node)
    newest = max((s for s in listing["snapshots"] if s["ctid"] == ctid), key=lambda s: s["time"])
    ct = {"storage": "local", "ctid": str(ctid)}
    assert value(m, "vzbackup_backup_last_size_bytes", **ct) == newest["size"]
    assert value(m, "vzbackup_backup_last_new_bytes", **ct) == newest["new_bytes"]
    assert value(m, "vzbackup_backup_snapshots", **ct) == 2
    assert value(m, "vzbackup_backup_last_duration_seconds", **ct) > 0
    assert value(m, "vzbackup_backup_last_success", ctid=str(ctid)) == 1
    assert value(m, "vzbackup_backup_last_success", ctid=str(missing)) == 0
    assert value(m, "vzbackup_repository_up", storage="local") == 1
    assert round(value(m, "vzbackup_repository_dedup_ratio", storage="local"), 2) == \
        listing["dedup_ratio"]
    assert value(m, "vzbackup_repository_stored_bytes", storage="local") == \
        listing["stored_bytes"]
    assert value(m, "vzbackup_job_runs_total", job="nightly", kind="vzdump", status="ok") == 2
    assert value(m, "vzbackup_job_failures_total", job="broken", kind="vzdump") == 1
    assert value(m, "vzbackup_job_failures_total", job="nightly", kind="vzdump") == 0
    assert value(m, "vzbackup_job_last_success", job="broken", kind="vzdump") == 0
    assert value(m, "vzbackup_verify_last_success", job="check") == 1
    mig = {"ctid": "4242", "mode": "online+lazy", "dest": "root@node2"}
    assert value(m, "vzbackup_migration_last_frozen_seconds", **mig) == 0.75
    assert value(m, "vzbackup_migration_last_total_seconds", **mig) == 8.9
    assert value(m, "vzbackup_migrations_total", mode="restart", result="failed") == 1
    # the same page as 'vzbackup report', served
    content_type, page = d.get("")
    assert content_type.startswith("text/html")
    for words in (f"CT {ctid} on local", "broken", "Latest backup per CT",
                  "failed since", "DEST disk full", "<svg"):
        assert words in page
    _, page = d.get("?since=1h&storage=local")  # the migrations were days ago
    assert "No migrations in this period" in page and f"CT {ctid} on local" in page
    with pytest.raises(urllib.error.HTTPError) as bad:
        d.get("?since=yesterday")
    assert bad.value.code == 400


def test_textfile_without_a_daemon_and_restore_test_result(node: NodeBed, tmp_path: Path):
    ctid = busy_ct(node)
    node.vz("dump", str(ctid))
    jobs_cfg(node, f"restore-test: drill\n    schedule sat 03:00\n    vmid {ctid}\n"
                   f"    scratch-ctid {node.new_ctid()}\n")
    node.vz("jobs", "run-now", "drill", timeout=300)
    write_migrations(node, MIGRATIONS[:1])
    out = tmp_path / "textfiles"
    node.vz("metrics", "--textfile", str(out))
    assert sorted(os.listdir(out)) == ["vzbackup.prom"]  # no temporary file left behind
    m = samples((out / "vzbackup.prom").read_text())
    assert value(m, "vzbackup_restore_test_last_success", job="drill", ctid=str(ctid)) == 1
    assert value(m, "vzbackup_backup_snapshots", storage="local", ctid=str(ctid)) == 1
    mig = {"ctid": "4242", "mode": "restart", "dest": "root@node2"}
    assert value(m, "vzbackup_migration_last_success", **mig) == 0
    assert value(m, "vzbackup_migration_last_frozen_seconds", **mig) == 1.2
    printed = samples(node.vz("metrics").stdout)
    assert printed.keys() == m.keys()


def test_bad_report_and_metrics_input(node: NodeBed, tmp_path: Path):
    res = node.vz("report", "--html", str(tmp_path / "r.html"), "--since", "soon", check=False)
    assert res.returncode == 2 and "--since" in res.stderr
    res = node.vz("report", "--html", str(tmp_path / "r.html"), "--storage", "nope",
                  check=False)
    assert res.returncode == 4 and "no storage named 'nope'" in res.stderr
    assert not (tmp_path / "r.html").exists()
    # a storage that can't be read is shown in the page, not fatal
    res = node.vz("report", "--html", str(tmp_path / "r.html"))
    assert "no backup repository" in (tmp_path / "r.html").read_text()
    jobs_cfg(node, "scheduler: options\n    metrics-listen 127.0.0.1\n")
    res = node.vz("jobs", "list", check=False)
    assert res.returncode == 3 and "metrics-listen" in res.stderr


# ---------------------------------------------------------------- the report in a browser

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync")
PLOT_COLORS = {  # report.COLORS: one meaning per color
    "new data bars": (0x1F, 0x77, 0xB4), "logical size line": (0x2C, 0xA0, 0x2C),
    "ratio line": (0x94, 0x67, 0xBD), "repository growth": (0x8C, 0x56, 0x4B),
    "frozen bars": (0xD6, 0x27, 0x28),
}


def screenshot(html: Path, png: Path, profile: Path) -> None:
    chromium = shutil.which("chromium")
    need(chromium is not None, "chromium is not installed (scripts/setup.sh)")
    res = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                          f"--screenshot={png}", "--window-size=1100,2400",
                          html.as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and png.exists(), res.stderr


def color_box(img, rgb: tuple[int, int, int], tol: int = 12) -> tuple[int, int, int, int, int]:
    """(pixels, left, top, right, bottom) of the pixels close to *rgb*."""
    n, box = 0, [10**9, 10**9, -1, -1]
    width, height = img.size
    px = img.load()
    for y in range(0, height, 2):
        for x in range(0, width, 2):
            r, g, b = px[x, y][:3]
            if abs(r - rgb[0]) <= tol and abs(g - rgb[1]) <= tol and abs(b - rgb[2]) <= tol:
                n += 1
                box = [min(box[0], x), min(box[1], y), max(box[2], x), max(box[3], y)]
    return (n, *box)


def test_report_renders_in_chromium_with_its_plots(node: NodeBed, tmp_path: Path):
    from PIL import Image

    ctid = busy_ct(node)
    node.vz("dump", str(ctid))
    blob = node.prefix / "vz/private" / str(ctid) / "data/blob2"
    blob.write_bytes(os.urandom(1 << 20))
    node.vz("dump", str(ctid))
    write_migrations(node, MIGRATIONS)
    html = tmp_path / "report.html"
    res = json.loads(node.vz("report", "--html", str(html), "--since", "3650d", "--json").stdout)
    assert res["snapshots"] == 2 and res["migrations"] == 2
    page = html.read_text()
    assert "<script" not in page and "<link" not in page  # nothing to load: works offline
    assert not re.search(r"""(src|href)=["']?(https?:|//)|url\((?!#)""", page)
    for words in (f"CT {ctid} on local", "Repository growth", "Migrations from this node",
                  "DEST disk full", "online+lazy", "frozen"):
        assert words in page, words
    assert page.count("<svg") == 3  # growth, CT history, migrations (no job runs here)
    png = tmp_path / "report.png"
    screenshot(html, png, tmp_path / "chromium-profile")
    img = Image.open(png).convert("RGB")
    width, height = img.size
    inked = color_box(img, (255, 255, 255), tol=0)[0]
    assert inked < (width // 2) * (height // 2) * 0.97  # not a blank page
    boxes = {}
    for what, rgb in PLOT_COLORS.items():
        n, left, top, right, bottom = color_box(img, rgb)
        assert n > 20, f"no {what} in the screenshot"
        boxes[what] = (left, top, right, bottom)
    # the plots come in the page's order: growth, then the CT's history, then migrations
    assert boxes["repository growth"][1] < boxes["new data bars"][1] < boxes["frozen bars"][1]
    frozen = boxes["frozen bars"]
    assert frozen[2] - frozen[0] > 40  # a bar, not a speck
