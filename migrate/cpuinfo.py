"""CPU compatibility for an online migration: ``criu cpuinfo dump`` here, ``check`` at DEST."""

from __future__ import annotations

import base64
import subprocess
import tempfile
from pathlib import Path

from vzbackup.criu.check import criu_binary


def cpuinfo_dump() -> str:
    """This node's CPU description (``criu cpuinfo dump``), base64 for the wire."""
    with tempfile.TemporaryDirectory(prefix="vzb-cpuinfo-") as d:
        subprocess.run(
            [criu_binary(), "cpuinfo", "dump", "-D", d], check=True, capture_output=True, timeout=60
        )
        return base64.b64encode(Path(d, "cpuinfo.img").read_bytes()).decode()


def cpuinfo_check(b64: str) -> str | None:
    """None when a task dumped on the node described by *b64* can run here, else why not."""
    with tempfile.TemporaryDirectory(prefix="vzb-cpuinfo-") as d:
        Path(d, "cpuinfo.img").write_bytes(base64.b64decode(b64))
        res = subprocess.run(
            [criu_binary(), "cpuinfo", "check", "-D", d, "-o", "check.log"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        if res.returncode == 0:
            return None
        logf = Path(d, "check.log")
        text = logf.read_text(errors="replace") if logf.exists() else ""
        errs = [ln for ln in text.splitlines() if "Error" in ln][-2:]
        return "CPU of the source is not compatible with this node: " + (
            "; ".join(errs) or "criu cpuinfo check failed"
        )
