"""Retention: which backups of one CT to keep, with vzdump/Proxmox ``prune-backups`` semantics.

Mirrors ``PVE::Storage::prune_mark_backup_group``. Backups are taken newest first and the rules
are applied one after another in the order of ``RULES`` (last, hourly, daily, weekly, monthly,
yearly). A rule with count N keeps the newest backup of each of the N newest periods that hold
a backup not yet decided on; "periods" of keep-last are single backups. Periods that contain a
backup an earlier rule kept are already covered: the rule skips them without spending any of
its N on them, and its other backups stay open for later rules. A backup that is not the
newest of its period is marked for removal as soon as one rule looks at that period, and no
later rule reconsiders it. Protected backups are always kept and are invisible to the rules:
they neither cover a period nor count. Without any positive count everything is kept.

Periods are taken on the wall clock of ``tz`` (the node's local time zone by default, like
Proxmox's ``localtime``); weeks are ISO weeks (Monday to Sunday, ISO week-numbering year).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, tzinfo

from vzbackup.engine.keeppolicy import KeepPolicy


@dataclass
class Item:
    """One backup of a group (the caller groups per CT); ``time`` is timezone-aware."""

    id: str
    time: datetime
    protected: bool = False


@dataclass
class Decision:
    """The verdict for one item and why, e.g. ``["keep-daily 2026-11-20"]`` or ``["removed"]``."""

    item: Item
    keep: bool
    reasons: list[str]


_REMOVED = "removed"

# The one table of rules, in Proxmox's order: (KeepPolicy field, period of a local time). The
# period doubles as the label shown in reasons. keep-last's period is the exact time (PVE uses
# the ctime), so two backups with the very same timestamp share one slot.
RULES: tuple[tuple[str, Callable[[datetime], str]], ...] = (
    ("last", lambda t: t.isoformat()),
    ("hourly", lambda t: t.strftime("%Y-%m-%dT%H")),
    ("daily", lambda t: t.strftime("%Y-%m-%d")),
    ("weekly", lambda t: t.strftime("%G-W%V")),  # ISO week-numbering year and week
    ("monthly", lambda t: t.strftime("%Y-%m")),
    ("yearly", lambda t: t.strftime("%Y")),
)


def plan(
    items: Iterable[Item],
    policy: KeepPolicy,
    now: datetime | None = None,
    *,
    tz: tzinfo | None = None,
) -> list[Decision]:
    """Decide keep/remove for every item; the result is ordered newest first.

    *tz* is the zone whose calendar defines hours, days, weeks, months and years (None: the
    node's local zone). *now* is accepted for callers' convenience but, as in Proxmox, the
    result doesn't depend on it: rules count periods that hold backups, not calendar periods
    back from today.
    """
    del now
    ordered = sorted(items, key=lambda it: it.time, reverse=True)  # stable for equal times
    for it in ordered:
        if it.time.tzinfo is None or it.time.utcoffset() is None:
            raise ValueError(f"backup {it.id}: time {it.time} has no time zone")
    local = [it.time.astimezone(tz) for it in ordered]
    reasons: list[str | None] = ["protected" if it.protected else None for it in ordered]
    if policy.keep_all:
        reasons = [r or "keep-all" for r in reasons]
    else:
        for name, period in RULES:
            count = getattr(policy, name)
            if count:
                _mark(name, period, count, local, reasons)
    decisions = []
    for it, reason in zip(ordered, reasons, strict=True):
        reason = reason or _REMOVED
        decisions.append(Decision(it, reason != _REMOVED, [reason]))
    return decisions


def _mark(
    name: str,
    period_of: Callable[[datetime], str],
    count: int,
    local: list[datetime],
    reasons: list[str | None],
) -> None:
    """Apply one rule to the undecided items (Proxmox's ``$prune_mark``)."""
    periods = [period_of(t) for t in local]
    # Periods holding a backup an earlier rule kept; protected ones don't cover anything.
    covered = {p for p, r in zip(periods, reasons, strict=True) if r and r.startswith("keep-")}
    included: set[str] = set()
    for i, period in enumerate(periods):
        if reasons[i] is not None or period in covered:
            continue
        if period in included:
            reasons[i] = _REMOVED  # an older backup of a period this rule keeps: final
            continue
        if len(included) >= count:
            break
        included.add(period)
        reasons[i] = f"keep-{name} {len(included) if name == 'last' else period}"
