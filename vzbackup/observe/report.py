"""The HTML report: one self-contained page (inline SVG plots made with matplotlib's Agg/SVG
back ends, text drawn as paths, no scripts, no external files) about a node's backups, jobs
and migrations over a period.
"""

from __future__ import annotations

import html
import io
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure

from vzbackup.config.node import Node
from vzbackup.observe import facts as F

matplotlib.rcParams.update({"svg.fonttype": "path", "font.size": 9,
                            "axes.spines.top": False, "axes.spines.right": False})

# One color per meaning, the same in every plot (the rendering test looks for them).
COLORS = {
    "new": "#1f77b4",  # new data a snapshot stored
    "logical": "#2ca02c",  # logical size
    "ratio": "#9467bd",  # dedup + compression ratio
    "growth": "#8c564b",  # repository growth
    "frozen": "#d62728",  # CT frozen during a migration
    "failed": "#d62728",
}
PHASE_ORDER = ("preflight", "first_sync", "stop", "dump", "final_sync", "image_transfer",
               "restore", "start", "commit", "lazy_pages", "cleanup")
PHASE_COLORS = ("#c7c7c7", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
                "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#bcbd22", "#17becf")
JOB_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
              "#bcbd22", "#17becf")
WIDTH, HEIGHT = 9.0, 2.8  # inches (at 100 dpi in the page)
GiB = 1024**3

CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; background: #fff; max-width: 1000px }
h1 { font-size: 22px } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc }
h3 { font-size: 15px } table { border-collapse: collapse; font-size: 12px; margin: 8px 0 }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right }
th:first-child, td:first-child { text-align: left } .bad { color: #d62728; font-weight: bold }
.plot svg { width: 900px; height: auto } .muted { color: #777 }
"""


@dataclass
class ReportData:
    node_name: str
    since: float
    repos: list[F.RepoFacts]
    runs: list
    migrations: list[dict]


def gather(node: Node, storage: str | None, since: float) -> ReportData:
    repos = [F.repo_facts(node, name, key)
             for name, key in F.watched_storages(node, storage).items()]
    for r in repos:
        r.snapshots = [s for s in r.snapshots if s.time.timestamp() >= since]
    return ReportData(socket.gethostname(), since, repos, F.job_runs(node, since),
                      F.migrations(node, since))


def render(data: ReportData) -> str:
    """The whole page."""
    now = datetime.now(UTC)
    start = datetime.fromtimestamp(data.since, UTC)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>vzbackup report: {_e(data.node_name)}</title><style>{CSS}</style></head><body>",
        f"<h1>vzbackup report: {_e(data.node_name)}</h1>",
        f"<p class='muted'>From {_day(start)} to {_day(now)} (generated {_day(now)}).</p>",
        _overview(data.repos, data.runs, now),
        _repositories(data.repos),
        _snapshot_history(data.repos),
        _jobs(data.runs),
        _migrations(data.migrations),
        "</body></html>",
    ]
    return "\n".join(parts)


# ---------------------------------------------------------------- sections


def _overview(repos: list[F.RepoFacts], runs: list, now: datetime) -> str:
    """One line per CT: its newest snapshot and whether its latest scheduled backup worked."""
    attempts = F.ct_backup_results(runs)
    rows = []
    seen: set[int] = set()
    for r in repos:
        for ctid, s in sorted(r.latest_per_ct().items()):
            seen.add(ctid)
            ended, ok = attempts.get(ctid, (0.0, True))
            failed = not ok and ended > s.time.timestamp()
            age = (now - s.time).total_seconds() / 3600
            rows.append([str(ctid), r.storage, s.id, f"{age:.1f} h", _size(s.size),
                         _size(int(s.stats.get("stored_new", 0))),
                         "<span class='bad'>failed since</span>" if failed else "ok"])
    for ctid, (_, ok) in sorted(attempts.items()):
        if ctid not in seen:
            rows.append([str(ctid), "", "none", "", "", "",
                         "ok" if ok else "<span class='bad'>failed since</span>"])
    if not rows:
        return ""
    return "<h2 id='overview'>Latest backup per CT</h2>" + _table(
        ["CT", "storage", "newest snapshot", "age", "logical", "new", "latest attempt"], rows,
        raw_cols={6})


def _repositories(repos: list[F.RepoFacts]) -> str:
    rows = []
    for r in repos:
        if not r.up:
            rows.append([r.storage, r.error or "", "", "", "", ""])
            continue
        ratio = f"{r.dedup_ratio:.2f}x" if r.dedup_ratio else "-"
        rows.append([r.storage, r.url, str(len(r.snapshots)), _size(r.logical_bytes),
                     _size(r.stored_bytes), ratio])
    out = ["<h2 id='repositories'>Repositories</h2>",
           _table(["storage", "where", "snapshots", "logical", "stored", "dedup+compression"],
                  rows)]
    plot = _plot("repository-growth", _growth_figure, repos) if any(
        r.snapshots for r in repos) else "<p class='muted'>No snapshots in this period.</p>"
    out += ["<h3>Repository growth</h3>", plot]
    return "\n".join(out)


def _growth_figure(fig: Figure, repos: list[F.RepoFacts]) -> None:
    ax = fig.subplots()
    series = []
    for r in repos:
        snaps = sorted(r.snapshots, key=lambda s: s.time)
        total, xs, ys = 0, [], []
        for s in snaps:
            total += int(s.stats.get("stored_new", 0))
            xs.append(s.time)
            ys.append(total)
        if xs:
            series.append((r.storage, xs, ys))
    div, unit = _unit(max(max(ys) for _, _, ys in series))
    for storage, xs, ys in series:
        ys = [y / div for y in ys]
        ax.step(xs, ys, where="post", color=COLORS["growth"], linewidth=2, label=storage,
                marker="o", markersize=4)
        ax.fill_between(xs, ys, step="post", color=COLORS["growth"], alpha=0.15)
    ax.set_ylabel(f"{unit} stored (cumulative)")
    ax.set_ylim(bottom=0)
    ax.set_title("Data added to the repository by the snapshots of the period")
    ax.legend(loc="upper left", frameon=False)
    _date_axis(fig, ax)


def _snapshot_history(repos: list[F.RepoFacts]) -> str:
    out = ["<h2 id='snapshots'>Snapshots per CT</h2>"]
    per_ct: dict[tuple[int, str], list] = {}
    for r in repos:
        for s in r.snapshots:
            per_ct.setdefault((s.ctid, r.storage), []).append(s)
    if not per_ct:
        return out[0] + "<p class='muted'>No snapshots in this period.</p>"
    for (ctid, storage), snaps in sorted(per_ct.items()):
        snaps.sort(key=lambda s: s.time)
        out.append(f"<h3 id='ct-{ctid}-{_e(storage)}'>CT {ctid} on {_e(storage)}</h3>")
        out.append(_plot(f"ct-{ctid}-{storage}", _ct_figure, snaps))
        rows, logical, stored = [], 0, 0
        for s in snaps:
            logical += s.size
            stored += int(s.stats.get("stored_new", 0))
            rows.append([s.id, s.mode + ("+state" if s.has_state else ""), _size(s.size),
                         _size(int(s.stats.get("stored_new", 0))),
                         f"{logical / stored:.1f}x" if stored else "-",
                         f"{float(s.stats.get('duration', 0)):.1f} s"])
        out.append(_table(["snapshot", "mode", "logical", "new", "dedup+compression",
                           "duration"], rows))
    return "\n".join(out)


def _ct_figure(fig: Figure, snaps: Sequence) -> None:
    ax = fig.subplots()
    xs = list(range(len(snaps)))
    div, unit = _unit(max(max(s.size, int(s.stats.get("stored_new", 0))) for s in snaps))
    new = [int(s.stats.get("stored_new", 0)) / div for s in snaps]
    logical = [s.size / div for s in snaps]
    ax.bar(xs, new, color=COLORS["new"], width=0.6, label=f"new data stored ({unit})")
    ax.plot(xs, logical, color=COLORS["logical"], marker="o", linewidth=2,
            label=f"logical size ({unit})")
    ax.set_ylabel(unit)
    ax.set_ylim(bottom=0)
    ratio_ax = ax.twinx()
    ratios, total_l, total_s = [], 0, 0
    for s in snaps:
        total_l += s.size
        total_s += int(s.stats.get("stored_new", 0))
        ratios.append(total_l / total_s if total_s else float("nan"))
    ratio_ax.plot(xs, ratios, color=COLORS["ratio"], linestyle="--", marker="s", linewidth=1.5,
                  label="dedup+compression (x)")
    ratio_ax.set_ylabel("ratio (x)")
    ratio_ax.spines["right"].set_visible(True)
    ratio_ax.set_ylim(bottom=0)
    ax.set_xticks(xs, [s.time.strftime("%m-%d %H:%M") for s in snaps],
                  rotation=30, ha="right")
    lines = ax.get_legend_handles_labels()
    more = ratio_ax.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower left", frameon=False,
              ncols=3, fontsize=8, bbox_to_anchor=(0, 1.0))


def _jobs(runs: list) -> str:
    out = ["<h2 id='jobs'>Scheduled jobs</h2>"]
    done = [r for r in runs if r.ended is not None]
    if not done:
        return out[0] + "<p class='muted'>No job runs in this period.</p>"
    out.append(_plot("jobs", _jobs_figure, done))
    stats: dict[str, list] = {}
    for r in done:
        stats.setdefault(r.job, []).append(r)
    rows = []
    for job, rs in sorted(stats.items()):
        failed = sum(r.status != "ok" for r in rs)
        durations = [r.ended - r.started for r in rs]
        rows.append([job, rs[0].kind, str(len(rs)),
                     f"<span class='bad'>{failed}</span>" if failed else "0",
                     f"{sum(durations) / len(durations):.1f} s", f"{max(durations):.1f} s"])
    out.append(_table(["job", "kind", "runs", "failed", "mean duration", "longest"], rows,
                      raw_cols={3}))
    failures = [r for r in done if r.status != "ok"][-20:]
    if failures:
        out.append("<h3>Failures</h3>")
        out.append(_table(["time", "job", "status", "error"], [
            [_day(datetime.fromtimestamp(r.started, UTC)), r.job, r.status, r.error or ""]
            for r in reversed(failures)]))
    return "\n".join(out)


def _jobs_figure(fig: Figure, runs: list) -> None:
    ax = fig.subplots()
    jobs = sorted({r.job for r in runs})
    for i, job in enumerate(jobs):
        ok = [r for r in runs if r.job == job and r.status == "ok"]
        ax.plot([_dt(r.started) for r in ok], [r.ended - r.started for r in ok], "o",
                color=JOB_COLORS[i % len(JOB_COLORS)], label=job, markersize=5)
    bad = [r for r in runs if r.status != "ok"]
    if bad:
        ax.plot([_dt(r.started) for r in bad], [r.ended - r.started for r in bad], "X",
                color=COLORS["failed"], markersize=9, label="failed")
    ax.set_ylabel("duration (s)")
    ax.set_ylim(bottom=0)
    ax.set_title("Job durations (failures marked X)")
    ax.legend(loc="upper left", frameon=False, ncols=4, fontsize=8)
    _date_axis(fig, ax)


def _migrations(records: list[dict]) -> str:
    out = ["<h2 id='migrations'>Migrations from this node</h2>"]
    if not records:
        return out[0] + "<p class='muted'>No migrations in this period.</p>"
    out.append(_plot("migrations", _migrations_figure, records,
                     height=max(HEIGHT, 0.9 + 0.45 * len(records[-15:]))))
    rows = []
    for rec in reversed(records[-50:]):
        ph = rec.get("phases") or {}
        b = rec.get("bytes") or {}
        ok = rec.get("result") == "ok"
        moved = f"{_e(rec.get('ctid'))} &rarr; {_e(rec.get('new_ctid'))}"
        rows.append([str(rec.get("time", "")), moved,
                     str(rec.get("mode", "")), str(rec.get("dest", "")),
                     "ok" if ok else "<span class='bad'>failed</span>",
                     f"{float(ph.get('frozen', 0)):.3f} s", f"{float(ph.get('total', 0)):.2f} s",
                     _size(sum(int(v) for v in b.values() if isinstance(v, int | float))),
                     str(rec.get("error") or "")])
    out.append(_table(["time", "CT", "mode", "destination", "result", "frozen", "total",
                       "sent", "error"], rows, raw_cols={1, 4}))
    return "\n".join(out)


def _migrations_figure(fig: Figure, records: list[dict]) -> None:
    recs = records[-15:]
    ax = fig.subplots()
    names = [*PHASE_ORDER]
    for rec in recs:
        names += [k for k in (rec.get("phases") or {}) if k not in names and k not in
                  ("frozen", "total")]
    labels, seen = [], set()
    for i, rec in enumerate(recs):
        ph = rec.get("phases") or {}
        y = len(recs) - 1 - i
        left = 0.0
        for j, name in enumerate(names):
            v = float(ph.get(name, 0) or 0)
            if v <= 0:
                continue
            ax.barh(y + 0.12, v, left=left, height=0.5, color=PHASE_COLORS[j % len(PHASE_COLORS)],
                    edgecolor="white", label=name if name not in seen else None)
            seen.add(name)
            left += v
        frozen = float(ph.get("frozen", 0) or 0)
        ax.barh(y - 0.3, frozen, height=0.22, color=COLORS["frozen"],
                label="frozen" if "frozen" not in seen else None)
        seen.add("frozen")
        ax.text(max(left, frozen), y - 0.3, f" frozen {frozen:.2f} s", va="center", fontsize=7,
                color=COLORS["frozen"])
        mark = "" if rec.get("result") == "ok" else " FAILED"
        labels.append((y, f"CT {rec.get('ctid')} {rec.get('mode', '')}{mark}\n"
                          f"{str(rec.get('time', ''))[:16]}"))
    ax.set_yticks([y for y, _ in labels], [t for _, t in labels], fontsize=7)
    ax.set_xlabel("seconds")
    ax.set_title("Migration phases (stacked) and time frozen (red)")
    ax.legend(loc="center left", frameon=False, fontsize=7, bbox_to_anchor=(1.0, 0.5))


# ---------------------------------------------------------------- helpers


def _plot(name: str, draw: Callable, data, height: float = HEIGHT) -> str:
    fig = Figure(figsize=(WIDTH, height), dpi=100)
    draw(fig, data)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and doctype: inline in HTML
    return f"<figure class='plot' id='plot-{_e(name)}'>{svg}</figure>"


def _date_axis(fig: Figure, ax) -> None:
    import matplotlib.dates as mdates

    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(ax.xaxis.get_major_locator()))


def _table(head: list[str], rows: list[list[str]], raw_cols: set[int] | None = None) -> str:
    raw = raw_cols or set()
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if i in raw else _e(c)}</td>" for i, c in enumerate(r))
        + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def _day(t: datetime) -> str:
    return t.strftime("%Y-%m-%d %H:%M UTC")


def _unit(largest: float) -> tuple[float, str]:
    """A divisor and unit name that suit values up to *largest* bytes."""
    for div, name in ((GiB * 1024, "TiB"), (GiB, "GiB"), (2**20, "MiB"), (1024, "KiB")):
        if largest >= div:
            return div, name
    return 1, "bytes"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def write(node: Node, storage: str | None, since: float, path: Path) -> dict:
    """Render the report into *path*; returns counts for the CLI's summary."""
    t0 = time.monotonic()
    data = gather(node, storage, since)
    page = render(data)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(page)
    os.replace(tmp, path)  # a reader never sees half a page
    return {"file": str(path), "snapshots": sum(len(r.snapshots) for r in data.repos),
            "runs": len(data.runs), "migrations": len(data.migrations),
            "seconds": round(time.monotonic() - t0, 2)}
