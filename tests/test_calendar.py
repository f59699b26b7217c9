"""Schedules: Proxmox calendar events and crontab lines to APScheduler triggers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from apscheduler.triggers.cron import CronTrigger
from vzbackup.scheduler.calendar import (
    ScheduleError,
    calendar_fields,
    describe,
    next_runs,
    parse_schedule,
)

NOW = datetime(2026, 11, 21, 7, 40, 13, tzinfo=UTC)  # a Saturday


def runs(text: str, n: int = 3) -> list[str]:
    return [d.strftime("%a %Y-%m-%d %H:%M:%S") for d in
            next_runs(parse_schedule(text, timezone="UTC"), n, NOW)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("02:00", ["Sun 2026-11-22 02:00:00", "Mon 2026-11-23 02:00:00"]),
        ("mon..fri 22:30", ["Mon 2026-11-23 22:30:00", "Tue 2026-11-24 22:30:00"]),
        ("sat 03:00", ["Sat 2026-11-28 03:00:00", "Sat 2026-12-05 03:00:00"]),
        ("sat", ["Sat 2026-11-28 00:00:00", "Sat 2026-12-05 00:00:00"]),
        ("*/15", ["Sat 2026-11-21 07:45:00", "Sat 2026-11-21 08:00:00"]),
        ("*:*:0/2", ["Sat 2026-11-21 07:40:14", "Sat 2026-11-21 07:40:16"]),
        ("*", ["Sat 2026-11-21 07:41:00", "Sat 2026-11-21 07:42:00"]),
        ("minutely", ["Sat 2026-11-21 07:41:00", "Sat 2026-11-21 07:42:00"]),
        ("hourly", ["Sat 2026-11-21 08:00:00", "Sat 2026-11-21 09:00:00"]),
        ("daily", ["Sun 2026-11-22 00:00:00", "Mon 2026-11-23 00:00:00"]),
        ("weekly", ["Mon 2026-11-23 00:00:00", "Mon 2026-11-30 00:00:00"]),
        ("monthly", ["Tue 2026-12-01 00:00:00", "Fri 2027-01-01 00:00:00"]),
        ("yearly", ["Fri 2027-01-01 00:00:00", "Sat 2028-01-01 00:00:00"]),
        ("annually", ["Fri 2027-01-01 00:00:00", "Sat 2028-01-01 00:00:00"]),
        ("quarterly", ["Fri 2027-01-01 00:00:00", "Thu 2027-04-01 00:00:00"]),
        ("semiannually", ["Fri 2027-01-01 00:00:00", "Thu 2027-07-01 00:00:00"]),
        ("mon,wed,fri 1:05", ["Mon 2026-11-23 01:05:00", "Wed 2026-11-25 01:05:00"]),
        ("sat,sun 03:00", ["Sun 2026-11-22 03:00:00", "Sat 2026-11-28 03:00:00"]),
        ("sat..mon 5:00", ["Sun 2026-11-22 05:00:00", "Mon 2026-11-23 05:00:00"]),
        ("*-*-01 00:00", ["Tue 2026-12-01 00:00:00", "Fri 2027-01-01 00:00:00"]),
        ("*-05", ["Sat 2026-12-05 00:00:00", "Tue 2027-01-05 00:00:00"]),
        ("sat *-1..7 15:00", ["Sat 2026-12-05 15:00:00", "Sat 2027-01-02 15:00:00"]),
        ("2027-03-04 12:00", ["Thu 2027-03-04 12:00:00"]),
        ("12/2:5", ["Sat 2026-11-21 12:05:00", "Sat 2026-11-21 14:05:00"]),
        ("fri 12..13:5/20", ["Fri 2026-11-27 12:05:00", "Fri 2026-11-27 12:25:00"]),
        ("mon..fri 8..17,22:0/15", ["Mon 2026-11-23 08:00:00", "Mon 2026-11-23 08:15:00"]),
        ("MON..Fri  22:30", ["Mon 2026-11-23 22:30:00", "Tue 2026-11-24 22:30:00"]),
        ("30 2 * * mon-fri", ["Mon 2026-11-23 02:30:00", "Tue 2026-11-24 02:30:00"]),
        ("*/20 * * * *", ["Sat 2026-11-21 08:00:00", "Sat 2026-11-21 08:20:00"]),
    ],
)
def test_next_fire_times(text: str, expected: list[str]) -> None:
    assert runs(text, len(expected)) == expected


def test_fields_and_trigger_type() -> None:
    assert calendar_fields("mon..fri 22:30") == {
        "year": "*", "month": "*", "day": "*", "day_of_week": "mon,tue,wed,thu,fri",
        "hour": "22", "minute": "30", "second": "0",
    }
    assert calendar_fields("*/15")["hour"] == "*"
    assert isinstance(parse_schedule("02:00"), CronTrigger)


def test_one_shot_date_in_the_past_never_fires_again() -> None:
    assert next_runs(parse_schedule("2015-10-21", timezone="UTC"), 3, NOW) == []


def test_next_runs_naive_now_is_in_trigger_zone() -> None:
    trigger = parse_schedule("02:00", timezone="Europe/Berlin")
    [first] = next_runs(trigger, 1, datetime(2026, 11, 21, 1, 0))
    assert (first.hour, first.day, str(first.tzinfo)) == (2, 21, "Europe/Berlin")


def test_next_runs_is_inclusive_and_strictly_increasing() -> None:
    at = datetime(2026, 11, 22, 2, 0, tzinfo=UTC)
    got = next_runs(parse_schedule("02:00", timezone="UTC"), 2, at)
    assert got == [at, datetime(2026, 11, 23, 2, 0, tzinfo=UTC)]


def test_describe() -> None:
    assert describe(parse_schedule("02:00", timezone="UTC")) == "daily at 02:00:00 (UTC)"
    assert describe(parse_schedule("mon..fri 22:30", timezone="UTC")) == (
        "mon,tue,wed,thu,fri at 22:30:00 (UTC)"
    )
    assert "minute */15" in describe(parse_schedule("*/15", timezone="UTC"))
    assert "day 1" in describe(parse_schedule("monthly", timezone="UTC"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("25:00", "hour 25 out of range"),
        ("12:60", "minute 60 out of range"),
        ("*:*:61", "second 61 out of range"),
        ("mon..xyz", "unknown weekday 'xyz'"),
        ("funday 02:00", "unknown weekday 'funday'"),
        ("", "empty schedule"),
        ("   ", "empty schedule"),
        ("*/0", "step 0"),
        ("5..3", "runs backwards"),
        ("*-13-01", "month 13 out of range"),
        ("*-02-30", "never matches"),
        ("1:2:3:4", "invalid time '1:2:3:4'"),
        ("02:00 mon", "unexpected 'mon'"),
        ("02:00 03:00", "unexpected '03:00'"),
        ("a:00", "invalid hour 'a'"),
        ("1-2-3-4", "invalid date '1-2-3-4'"),
        ("x..5", "unknown weekday"),
        ("1,,2", "invalid minute ''"),
        ("*..5", "invalid minute '*..5'"),
        ("61 * * * *", "invalid cron expression"),
        ("* * * * funday", "invalid cron expression"),
    ],
)
def test_errors(text: str, message: str) -> None:
    with pytest.raises(ScheduleError) as info:
        parse_schedule(text)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)
