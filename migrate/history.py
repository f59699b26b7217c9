"""One JSON line per migration run in ``STATEDIR/migrations.jsonl``: what to plot from.

Each record: ``time`` (ISO-8601 UTC), ``ctid``, ``new_ctid``, ``mode``, ``dest``, ``result``
(ok | failed), ``error``, ``bytes`` ({tree, images, pages}) and ``phases`` (seconds per phase,
plus ``frozen`` and ``total``). Appends are single ``write()`` calls of one line, so
concurrent migrations on one node don't interleave.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vzbackup.config.node import Node

HISTORY_FILE = "migrations.jsonl"
BYTE_KINDS = ("tree", "images", "pages")


def history_path(node: Node) -> Path:
    return node.statedir / HISTORY_FILE


def make_record(
    *, ctid: int, new_ctid: int, mode: str, dest: str, ok: bool, error: str | None,
    bytes_sent: dict[str, int], phases: dict[str, float], frozen: float, total: float,
) -> dict[str, Any]:
    """A history record with exactly the documented keys."""
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "ctid": ctid,
        "new_ctid": new_ctid,
        "mode": mode,
        "dest": dest,
        "result": "ok" if ok else "failed",
        "error": error or None,
        "bytes": {k: int(bytes_sent.get(k, 0)) for k in BYTE_KINDS},
        "phases": {**{k: round(v, 4) for k, v in phases.items()},
                   "frozen": round(frozen, 4), "total": round(total, 4)},
    }


def append(node: Node, record: dict[str, Any]) -> None:
    path = history_path(node)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def records(node: Node) -> Iterator[dict[str, Any]]:
    """Every readable record, oldest first (a torn or foreign line is skipped)."""
    try:
        lines = history_path(node).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            yield rec
