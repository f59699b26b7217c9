"""Job schedules: 5-field cron expressions or Proxmox VE (systemd-like) calendar events.

A calendar event is ``[WEEKDAY] [[YEARS-]MONTH-DAY] [HOURS:MINUTES[:SECONDS]]``:

- weekdays ``mon``..``sun`` as a list (``mon,wed,fri``) or ranges (``mon..fri``, ``sat..mon``);
- every other part is ``*``, a number, a range ``9..17``, a repetition ``START/STEP``
  (``0/2``, ``*/15``, ``8..17/2``), or a comma list of those (``12,14``);
- a time with one part is the minutes (``*/15`` is every 15 minutes, hours ``*``); seconds
  default to 0; without a time the event is at 00:00:00; without a date, every day; without a
  weekday, any weekday. All given parts must match (``sat *-1..7 15:00`` is the first
  Saturday of each month);
- special words: ``minutely``, ``hourly``, ``daily``, ``weekly`` (mon 00:00), ``monthly``
  (``*-*-01``), ``yearly``/``annually``, ``quarterly`` (``*-01,04,07,10-01``) and
  ``semiannually`` (``*-01,07-01``), all at 00:00:00 (minutely/hourly on the minute/hour).

Five whitespace-separated fields are a crontab line (``30 2 * * mon-fri``).
"""

from __future__ import annotations

import re
from datetime import datetime, tzinfo

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger

__all__ = ["ScheduleError", "describe", "next_runs", "parse_schedule"]


class ScheduleError(ValueError):
    """A schedule can't be parsed; the message names the bad part."""


WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_LONG_WEEKDAYS = {
    "monday": "mon", "tuesday": "tue", "wednesday": "wed", "thursday": "thu",
    "friday": "fri", "saturday": "sat", "sunday": "sun",
}

# Special words as calendar events (systemd's and Proxmox's meanings).
SPECIAL = {
    "minutely": "*-*-* *:*:00",
    "hourly": "*-*-* *:00:00",
    "daily": "*-*-* 00:00:00",
    "weekly": "mon *-*-* 00:00:00",
    "monthly": "*-*-01 00:00:00",
    "yearly": "*-01-01 00:00:00",
    "annually": "*-01-01 00:00:00",
    "quarterly": "*-01,04,07,10-01 00:00:00",
    "semiannually": "*-01,07-01 00:00:00",
}

# field -> (low, high) for values in a calendar event.
_LIMITS = {
    "year": (1970, 9999),
    "month": (1, 12),
    "day": (1, 31),
    "hour": (0, 23),
    "minute": (0, 59),
    "second": (0, 59),
}
_ITEM = re.compile(r"^(?P<first>\*|[0-9]+)(?:\.\.(?P<last>[0-9]+))?(?:/(?P<step>[0-9]+))?$")


def parse_schedule(text: str, *, timezone: tzinfo | str | None = None) -> BaseTrigger:
    """The trigger for *text*: a crontab line (5 fields) or a Proxmox calendar event.

    *timezone* is the zone the times are in (default: the local zone). Raises ScheduleError.
    """
    if not isinstance(text, str) or not text.strip():
        raise ScheduleError("empty schedule")
    words = text.split()
    if len(words) == 5:
        try:
            return CronTrigger.from_crontab(" ".join(words), timezone=timezone)
        except ValueError as e:
            raise ScheduleError(f"invalid cron expression {text!r}: {e}") from None
    fields = calendar_fields(text)
    try:
        trigger = CronTrigger(timezone=timezone, **fields)
    except ValueError as e:
        raise ScheduleError(f"invalid schedule {text!r}: {e}") from None
    if trigger.get_next_fire_time(None, datetime(1970, 1, 2, tzinfo=trigger.timezone)) is None:
        raise ScheduleError(f"schedule {text!r} never matches a date (e.g. *-02-30)")
    return trigger


def calendar_fields(text: str) -> dict[str, str]:
    """The CronTrigger fields (APScheduler syntax) of a Proxmox calendar event."""
    original = text
    text = " ".join(text.lower().split())
    if not text:
        raise ScheduleError("empty schedule")
    text = SPECIAL.get(text, text)
    words = text.split(" ")
    fields = {"year": "*", "month": "*", "day": "*", "day_of_week": "*",
              "hour": "0", "minute": "0", "second": "0"}
    stage = 0  # 0: weekday may come, 1: date may come, 2: time may come, 3: nothing more
    for word in words:
        if stage == 0 and word[0].isalpha() and not set(word) & set(":-"):
            fields["day_of_week"] = _weekdays(word, original)
            stage = 1
        elif stage <= 1 and "-" in word and ":" not in word:
            parts = word.split("-")
            if len(parts) not in (2, 3) or any(not p for p in parts):
                raise ScheduleError(
                    f"invalid date {word!r} in schedule {original!r} (expected [YEAR-]MONTH-DAY)"
                )
            names = ("year", "month", "day")[3 - len(parts):]
            for name, part in zip(names, parts, strict=True):
                fields[name] = _values(name, part, original)
            stage = 2
        elif stage <= 2 and "-" not in word:
            parts = word.split(":")
            if len(parts) > 3 or any(not p for p in parts):
                raise ScheduleError(
                    f"invalid time {word!r} in schedule {original!r} "
                    "(expected HOURS:MINUTES[:SECONDS] or MINUTES)"
                )
            if len(parts) == 1:
                fields["hour"] = "*"
                names: tuple[str, ...] = ("minute",)
            else:
                names = ("hour", "minute", "second")[: len(parts)]
            for name, part in zip(names, parts, strict=False):
                fields[name] = _values(name, part, original)
            stage = 3
        else:
            raise ScheduleError(
                f"unexpected {word!r} in schedule {original!r} "
                "(expected [WEEKDAY] [[YEARS-]MONTH-DAY] [HOURS:MINUTES[:SECONDS]])"
            )
    return fields


def _weekdays(word: str, original: str) -> str:
    out: list[str] = []
    for item in word.split(","):
        first, sep, last = item.partition("..")
        names = [_weekday(first, original)]
        if sep:
            start, end = WEEKDAYS.index(names[0]), WEEKDAYS.index(_weekday(last, original))
            span = (end - start) % 7  # sat..mon wraps around the week
            names = [WEEKDAYS[(start + i) % 7] for i in range(span + 1)]
        out.extend(n for n in names if n not in out)
    return ",".join(out)


def _weekday(name: str, original: str) -> str:
    name = _LONG_WEEKDAYS.get(name, name)
    if name not in WEEKDAYS:
        raise ScheduleError(
            f"unknown weekday {name!r} in schedule {original!r} (mon, tue, ..., sun)"
        )
    return name


def _values(field: str, spec: str, original: str) -> str:
    """One calendar field (``*``, ``N``, ``A..B``, ``N/S``, lists) in APScheduler's syntax."""
    low, high = _LIMITS[field]
    out: list[str] = []
    for item in spec.split(","):
        m = _ITEM.match(item)
        if not m:
            raise ScheduleError(f"invalid {field} {item!r} in schedule {original!r}")
        first, last, step = m.group("first"), m.group("last"), m.group("step")
        numbers = [int(v) for v in (first, last) if v not in (None, "*")]
        for value in numbers:
            if not low <= value <= high:
                raise ScheduleError(
                    f"{field} {value} out of range ({low}..{high}) in schedule {original!r}"
                )
        if first == "*" and last is not None:
            raise ScheduleError(f"invalid {field} {item!r} in schedule {original!r}")
        if last is not None and int(last) < int(first):
            raise ScheduleError(f"{field} range {item!r} runs backwards in schedule {original!r}")
        if step is not None and int(step) == 0:
            raise ScheduleError(f"{field} repetition {item!r} has step 0 in schedule {original!r}")
        text = first if first == "*" else str(int(first))
        if last is not None:
            text += f"-{int(last)}"
        if step is not None:
            text += f"/{int(step)}"
        out.append(text)
    return ",".join(out)


def describe(trigger: BaseTrigger) -> str:
    """A short human description of *trigger* (e.g. ``mon-fri at 22:30:00 (UTC)``)."""
    if not isinstance(trigger, CronTrigger):
        return str(trigger)
    values = {f.name: str(f) for f in trigger.fields}
    parts: list[str] = []
    if values["day_of_week"] != "*":
        parts.append(values["day_of_week"])
    for name in ("year", "month", "day", "week"):
        if values[name] != "*":
            parts.append(f"{name} {values[name]}")
    clock = [values[n] for n in ("hour", "minute", "second")]
    if all(v.isdigit() for v in clock):
        parts.append("at " + ":".join(f"{int(v):02d}" for v in clock))
    else:
        parts.append(" ".join(f"{n} {v}" for n, v in zip(("hour", "minute", "second"), clock,
                                                          strict=True) if v != "*"))
        if not parts[-1]:
            parts[-1] = "every second"
    if len(parts) == 1 and parts[0].startswith("at "):
        parts.insert(0, "daily")
    return f"{' '.join(parts)} ({trigger.timezone})"


def next_runs(trigger: BaseTrigger, n: int, now: datetime | None = None) -> list[datetime]:
    """The next *n* fire times of *trigger* at or after *now* (default: the current time).

    A naive *now* is taken to be in the trigger's time zone (or the local one).
    """
    zone = getattr(trigger, "timezone", None)
    if now is None:
        now = datetime.now(zone).astimezone(zone) if zone else datetime.now().astimezone()
    elif now.tzinfo is None:
        now = now.replace(tzinfo=zone) if zone else now.astimezone()
    out: list[datetime] = []
    previous: datetime | None = None
    while len(out) < n:
        fire = trigger.get_next_fire_time(previous, previous or now)
        if fire is None:
            break
        out.append(fire)
        previous = fire
    return out
