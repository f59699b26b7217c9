"""Retention planning (vzbackup.engine.prune) against Proxmox's prune-backups semantics."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from vzbackup.engine.keeppolicy import KeepPolicy
from vzbackup.engine.prune import Decision, Item, plan
from vzbackup.errors import UsageError


def at(text: str, ident: str | None = None, protected: bool = False) -> Item:
    """An item at a UTC time written as 'YYYY-MM-DD HH:MM'."""
    when = datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=UTC)
    return Item(ident or text, when, protected)


def verdicts(decisions: list[Decision]) -> dict[str, str]:
    return {d.item.id: d.reasons[0] for d in decisions}


def kept(decisions: list[Decision]) -> list[str]:
    return [d.item.id for d in decisions if d.keep]


def run(items: list[Item], spec: str, tz: object = UTC) -> list[Decision]:
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)  # input order must not matter
    return plan(shuffled, KeepPolicy.parse(spec), tz=tz)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------- policy


def test_policy_parse_and_to_string() -> None:
    pol = KeepPolicy.parse("keep-last=3,keep-daily=7")
    assert pol == KeepPolicy(last=3, daily=7)
    assert pol.to_string() == "keep-last=3,keep-daily=7"
    assert not pol.keep_all
    every = "keep-last=1,keep-hourly=2,keep-daily=3,keep-weekly=4,keep-monthly=5,keep-yearly=6"
    assert KeepPolicy.parse(every).to_string() == every
    assert KeepPolicy.parse(" keep-weekly = 2 , keep-last=1 ,") == KeepPolicy(last=1, weekly=2)
    for spec in ("", "keep-all=1", "keep-last=0", "keep-all=0"):
        assert KeepPolicy.parse(spec).keep_all, spec
        assert KeepPolicy.parse(spec).to_string() == "keep-all=1"
    assert KeepPolicy.parse("keep-all=0,keep-daily=2") == KeepPolicy(daily=2)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("keep-minutely=5", "unknown prune option 'keep-minutely'"),
        ("keep-last=-1", "non-negative integer"),
        ("keep-last=x", "non-negative integer"),
        ("keep-last=3.5", "non-negative integer"),
        ("keep-last=", "non-negative integer"),
        ("keep-last", "invalid prune option"),
        ("last=3", "invalid prune option"),
        ("keep-last=1,keep-last=2", "given twice"),
        ("keep-all=1,keep-daily=1", "cannot be combined"),
    ],
)
def test_policy_parse_errors(spec: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as exc:
        KeepPolicy.parse(spec)
    assert exc.value.exit_code == 2


def test_policy_rejects_negative_counts() -> None:
    with pytest.raises(UsageError):
        KeepPolicy(daily=-1)


# ------------------------------------------------------------------------------ single rules


def test_empty_input() -> None:
    assert plan([], KeepPolicy(last=3)) == []
    assert plan([], KeepPolicy()) == []


def test_no_options_keeps_everything() -> None:
    items = [at("2026-01-01 00:00"), at("2026-01-02 00:00", protected=True)]
    assert verdicts(run(items, "")) == {
        "2026-01-01 00:00": "keep-all",
        "2026-01-02 00:00": "protected",
    }


def test_keep_last() -> None:
    items = [at(f"2026-01-0{d} 12:00") for d in range(1, 6)]
    decisions = run(items, "keep-last=3")
    assert [d.item.id for d in decisions] == [it.id for it in reversed(items)]  # newest first
    assert verdicts(decisions) == {
        "2026-01-05 12:00": "keep-last 1",
        "2026-01-04 12:00": "keep-last 2",
        "2026-01-03 12:00": "keep-last 3",
        "2026-01-02 12:00": "removed",
        "2026-01-01 12:00": "removed",
    }
    assert [d.keep for d in decisions] == [True, True, True, False, False]


def test_keep_last_more_than_available() -> None:
    items = [at("2026-01-01 00:00"), at("2026-01-02 00:00")]
    assert kept(run(items, "keep-last=10")) == ["2026-01-02 00:00", "2026-01-01 00:00"]


def test_keep_hourly_newest_of_each_hour() -> None:
    times = ("10:05", "10:50", "11:15", "11:45", "12:30", "09:00")
    items = [at(f"2026-01-01 {t}") for t in times]
    assert verdicts(run(items, "keep-hourly=3")) == {
        "2026-01-01 12:30": "keep-hourly 2026-01-01T12",
        "2026-01-01 11:45": "keep-hourly 2026-01-01T11",
        "2026-01-01 11:15": "removed",
        "2026-01-01 10:50": "keep-hourly 2026-01-01T10",
        "2026-01-01 10:05": "removed",
        "2026-01-01 09:00": "removed",
    }


def test_keep_daily_skips_days_without_backups() -> None:
    # Two backups a day on 1, 2, 4, 5, 9 January: days without backups don't count.
    items = [at(f"2026-01-0{d} {h}") for d in (1, 2, 4, 5, 9) for h in ("01:00", "13:00")]
    decisions = run(items, "keep-daily=4")
    assert kept(decisions) == [
        "2026-01-09 13:00",
        "2026-01-05 13:00",
        "2026-01-04 13:00",
        "2026-01-02 13:00",
    ]
    assert verdicts(decisions)["2026-01-04 13:00"] == "keep-daily 2026-01-04"


def test_keep_weekly_uses_iso_weeks_across_new_year() -> None:
    # 2020-12-31 (Thu) and 2021-01-03 (Sun) are in ISO week 2020-W53; 2021-01-04 is 2021-W01.
    items = [at("2020-12-31 10:00"), at("2021-01-03 10:00"), at("2021-01-04 10:00"),
             at("2020-12-27 10:00")]
    assert verdicts(run(items, "keep-weekly=2")) == {
        "2021-01-04 10:00": "keep-weekly 2021-W01",
        "2021-01-03 10:00": "keep-weekly 2020-W53",
        "2020-12-31 10:00": "removed",
        "2020-12-27 10:00": "removed",  # 2020-W52: beyond the two weeks
    }


def test_keep_monthly_and_yearly() -> None:
    days = ("2024-12-31 23", "2025-01-15 00", "2025-01-31 00", "2025-02-01 00", "2025-03-10 00",
            "2023-06-01 00")
    items = [at(f"{d}:00") for d in days]
    assert kept(run(items, "keep-monthly=3")) == [
        "2025-03-10 00:00",
        "2025-02-01 00:00",
        "2025-01-31 00:00",
    ]
    assert verdicts(run(items, "keep-yearly=2")) == {
        "2025-03-10 00:00": "keep-yearly 2025",
        "2025-02-01 00:00": "removed",
        "2025-01-31 00:00": "removed",
        "2025-01-15 00:00": "removed",
        "2024-12-31 23:00": "keep-yearly 2024",
        "2023-06-01 00:00": "removed",
    }


# ------------------------------------------------------------------------------ combinations


def test_period_kept_by_earlier_rule_is_covered_but_not_counted() -> None:
    # keep-last keeps today; keep-daily then skips today's period without spending a count.
    items = [at(f"2026-01-0{d} 02:00") for d in range(1, 6)]
    assert verdicts(run(items, "keep-last=1,keep-daily=2")) == {
        "2026-01-05 02:00": "keep-last 1",
        "2026-01-04 02:00": "keep-daily 2026-01-04",
        "2026-01-03 02:00": "keep-daily 2026-01-03",
        "2026-01-02 02:00": "removed",
        "2026-01-01 02:00": "removed",
    }


def test_skipped_backups_of_covered_periods_stay_undecided_until_the_end() -> None:
    items = [at("2026-01-02 12:30"), at("2026-01-02 12:10"), at("2026-01-02 11:00"),
             at("2026-01-01 23:00"), at("2026-01-01 22:00")]
    assert verdicts(run(items, "keep-last=1,keep-hourly=1,keep-daily=1")) == {
        "2026-01-02 12:30": "keep-last 1",
        "2026-01-02 12:10": "removed",  # hour 12 and day 2 were covered by 12:30
        "2026-01-02 11:00": "keep-hourly 2026-01-02T11",
        "2026-01-01 23:00": "keep-daily 2026-01-01",
        "2026-01-01 22:00": "removed",
    }


def test_removal_by_an_earlier_rule_is_final() -> None:
    # keep-daily marks the older backup of its day for removal; keep-weekly can't revive it.
    items = [at("2026-01-12 10:00"), at("2026-01-12 08:00"), at("2026-01-11 12:00")]
    assert verdicts(run(items, "keep-daily=1,keep-weekly=2")) == {
        "2026-01-12 10:00": "keep-daily 2026-01-12",
        "2026-01-12 08:00": "removed",
        "2026-01-11 12:00": "keep-weekly 2026-W02",
    }


def test_daily_weekly_monthly_schedule() -> None:
    # Daily backups at 02:00 from 1 February to 31 March 2026 (Sundays: Mar 1, 8, 15, 22, 29).
    start = datetime(2026, 2, 1, 2, 0, tzinfo=UTC)
    items = [
        Item(f"{start + timedelta(days=n):%m-%d}", start + timedelta(days=n)) for n in range(59)
    ]
    decisions = run(items, "keep-daily=7,keep-weekly=4,keep-monthly=3")
    assert {d.item.id: d.reasons[0] for d in decisions if d.keep} == {
        **{f"03-{d}": f"keep-daily 2026-03-{d}" for d in range(25, 32)},
        # W14 and W13 are covered by the daily ones (Mar 24 and 23 are skipped, not counted)
        "03-22": "keep-weekly 2026-W12",
        "03-15": "keep-weekly 2026-W11",
        "03-08": "keep-weekly 2026-W10",
        "03-01": "keep-weekly 2026-W09",
        # Feb 23-28 belong to W09, whose newest (Mar 1) keep-weekly kept: they were removed
        # there, so February's monthly backup is Feb 22.
        "02-22": "keep-monthly 2026-02",
    }
    assert len(decisions) == 59


# ----------------------------------------------------------------------------- protected, ties


def test_protected_is_kept_and_does_not_count() -> None:
    items = [at("2026-01-05 00:00", protected=True), at("2026-01-04 00:00"),
             at("2026-01-03 00:00"), at("2026-01-02 00:00")]
    assert verdicts(run(items, "keep-last=2")) == {
        "2026-01-05 00:00": "protected",
        "2026-01-04 00:00": "keep-last 1",
        "2026-01-03 00:00": "keep-last 2",
        "2026-01-02 00:00": "removed",
    }


def test_protected_does_not_cover_its_period() -> None:
    items = [at("2026-01-05 18:00", protected=True), at("2026-01-05 06:00"),
             at("2026-01-04 06:00"), at("2026-01-01 06:00", protected=True)]
    assert verdicts(run(items, "keep-daily=1")) == {
        "2026-01-05 18:00": "protected",
        "2026-01-05 06:00": "keep-daily 2026-01-05",
        "2026-01-04 06:00": "removed",
        "2026-01-01 06:00": "protected",  # old and beyond every rule, still kept
    }


def test_ties_in_the_same_period_keep_the_newest() -> None:
    items = [at("2026-01-05 06:00", "a"), at("2026-01-05 06:01", "b"), at("2026-01-05 05:59", "c")]
    assert verdicts(run(items, "keep-daily=5")) == {
        "b": "keep-daily 2026-01-05",
        "a": "removed",
        "c": "removed",
    }


def test_identical_timestamps_share_one_keep_last_slot() -> None:
    same = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)
    items = [Item("first", same), Item("second", same), at("2026-01-04 06:00", "older")]
    decisions = plan(items, KeepPolicy(last=2))
    assert verdicts(decisions) == {
        "first": "keep-last 1",
        "second": "removed",
        "older": "keep-last 2",
    }


# ---------------------------------------------------------------------------------- time zones


def test_periods_follow_the_given_time_zone() -> None:
    # 22:30Z and 23:30Z on 1 March are 23:30 on 1 March and 00:30 on 2 March in Berlin.
    items = [at("2026-03-01 22:30", "a"), at("2026-03-01 23:30", "b")]
    assert kept(run(items, "keep-daily=2", tz=UTC)) == ["b"]
    assert kept(run(items, "keep-daily=2", tz=ZoneInfo("Europe/Berlin"))) == ["b", "a"]
    berlin = verdicts(run(items, "keep-daily=2", tz=ZoneInfo("Europe/Berlin")))
    assert berlin == {"b": "keep-daily 2026-03-02", "a": "keep-daily 2026-03-01"}


@pytest.fixture
def local_zone() -> Iterator[None]:
    """Run with the node's local zone set to Asia/Tokyo (UTC+9, no DST)."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Tokyo"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


def test_default_zone_is_the_nodes_local_time(local_zone: None) -> None:
    items = [at("2026-03-01 14:30", "a"), at("2026-03-01 15:30", "b")]  # 23:30, 00:30 in Tokyo
    assert verdicts(plan(items, KeepPolicy(daily=2))) == {
        "b": "keep-daily 2026-03-02",
        "a": "keep-daily 2026-03-01",
    }


def test_repeated_dst_hour_is_one_hourly_period() -> None:
    # Europe/Berlin falls back on 2026-10-25: 00:30Z and 01:30Z are both 02:30 local.
    items = [at("2026-10-25 00:30", "cest"), at("2026-10-25 01:30", "cet")]
    decisions = run(items, "keep-hourly=5", tz=ZoneInfo("Europe/Berlin"))
    assert verdicts(decisions) == {"cet": "keep-hourly 2026-10-25T02", "cest": "removed"}


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="no time zone"):
        plan([Item("x", datetime(2026, 1, 1))], KeepPolicy(last=1))
