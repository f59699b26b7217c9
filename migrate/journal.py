"""The migration journal: what one side did so far, enough to undo or finish it after a crash.

Kept as ``LOCKDIR/CTID.migrate.json`` on both ends, written atomically at every step that
creates something. ``vzbackup migrate-cleanup CTID`` acts on it when a migration died.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vzbackup.config.node import Node

JOURNAL = "{ctid}.migrate.json"  # in LOCKDIR, on both ends


@dataclass
class Journal:
    """One side's record of a migration in progress."""

    ctid: int
    role: str  # "dest" | "source"
    state: str = "preparing"  # preparing | restored | committed | kept
    pid: int = field(default_factory=os.getpid)
    peer: str = ""
    private: str = ""  # DEST: the private area this migration created
    conf: bool = False  # DEST: CTID.conf was written by this migration
    name: str = ""  # DEST: names/ link created
    images: str = ""  # DEST: image dir to remove
    remove_area: bool = True  # source: what finishing a committed migration does here
    since: float = field(default_factory=time.time)

    @staticmethod
    def path(node: Node, ctid: int) -> Path:
        return node.lockdir / JOURNAL.format(ctid=ctid)

    def save(self, node: Node) -> None:
        p = self.path(node, self.ctid)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)

    @classmethod
    def load(cls, node: Node, ctid: int) -> Journal | None:
        try:
            return cls(**json.loads(cls.path(node, ctid).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def remove(self, node: Node) -> None:
        self.path(node, self.ctid).unlink(missing_ok=True)
