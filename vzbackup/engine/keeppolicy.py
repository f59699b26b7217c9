"""``prune-backups``: how many backups of a CT each retention rule keeps (what ``prune.plan``
applies). Apart from the planner, so reading backup defaults does not load it."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from vzbackup.errors import UsageError


@dataclass(frozen=True)
class KeepPolicy:
    """How many backups each rule keeps; all zero means keep everything (``keep-all=1``)."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(f"keep-{f.name} must be a non-negative integer, not {value!r}")

    @property
    def keep_all(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))

    @classmethod
    def parse(cls, text: str) -> KeepPolicy:
        """Parse Proxmox's property string, e.g. ``keep-last=3,keep-daily=7`` or ``keep-all=1``."""
        counts: dict[str, int] = {}
        names = {f.name for f in fields(cls)}
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            key, sep, value = (s.strip() for s in item.partition("="))
            if not sep or not key.startswith("keep-"):
                raise UsageError(
                    f"invalid prune option {item!r} in {text!r}",
                    hint="expected keep-last, keep-hourly, keep-daily, keep-weekly, "
                    "keep-monthly, keep-yearly or keep-all, as key=N separated by commas",
                )
            name = key[len("keep-") :]
            if name != "all" and name not in names:
                raise UsageError(f"unknown prune option {key!r} in {text!r}")
            if name in counts:
                raise UsageError(f"prune option {key!r} given twice in {text!r}")
            if not re.fullmatch(r"[0-9]+", value):
                raise UsageError(f"{key} needs a non-negative integer, not {value!r}")
            counts[name] = int(value)
        if counts.pop("all", 0) and any(counts.values()):
            raise UsageError(f"keep-all=1 cannot be combined with other options: {text!r}")
        return cls(**counts)

    def to_string(self) -> str:
        """The property string form; ``keep-all=1`` when nothing is limited."""
        if self.keep_all:
            return "keep-all=1"
        return ",".join(
            f"keep-{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name)
        )
