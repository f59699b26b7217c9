"""jobs.cfg: parsing, errors with file:line and job id, and editing that keeps the rest."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from vzbackup.scheduler.calendar import describe
from vzbackup.scheduler.config import (
    SchedulerOptions,
    add_job,
    jobs_path,
    load_jobs,
    parse_jobs,
    remove_job,
    set_enabled,
)

from vzbackup.config.node import Node
from vzbackup.engine.keeppolicy import KeepPolicy
from vzbackup.errors import ConfigError, ExistsError, NotFoundError

ROOT = Path(__file__).resolve().parent.parent

GOOD = """\
# site jobs
scheduler: options
\tmax-workers 2
\tshutdown-timeout 30
\tnotify always
\tmailto root@localhost, admin@example.com
\tmail-from vzbackup@example.com
\tsmtp-server mail.example.com:587
\twebhook https://hooks.example.com/x

# nightly, all but 105
vzdump: nightly
\tschedule 02:00
\tall 1
\texclude 105,106
\tstorage local
\tmode snapshot
\tzstd-level 5
\tzstd 2
\tprune-backups keep-daily=7,keep-weekly=4
\tnotes-template {{guestname}}
\trepeat-missed 1
\tjitter 300
\tlockwait 10
\tkeyfile /etc/vzbackup/key
\tcomment every night

vzdump: some
    schedule mon..fri 22:30
    vmid 101,102
    enabled 0

prune: weekly-prune
\tschedule sun 04:00
\tprune-backups keep-last=3

verify: check
\tschedule sat *-1..7 05:00
\tvmid 101

restore-test: try-101
\tschedule wed 06:00
\tvmid 101
\tscratch-ctid 9101
"""


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node.load(str(tmp_path))


@pytest.fixture
def cfg(node: Node) -> Path:
    path = jobs_path(node)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- parsing


def test_missing_file_means_no_jobs_and_defaults(cfg: Path, node: Node) -> None:
    options, jobs = load_jobs(cfg, node)
    assert jobs == {}
    assert options == SchedulerOptions()
    assert (options.max_workers, options.shutdown_timeout, options.notify) == (1, 60, "failure")
    assert (options.smtp_host, options.smtp_port) == ("localhost", 25)


def test_jobs_path(node: Node) -> None:
    assert jobs_path(node) == node.vzbackup_confdir / "jobs.cfg"
    assert str(jobs_path(node)).endswith("etc/vzbackup/jobs.cfg")


def test_parse_everything(cfg: Path, node: Node) -> None:
    options, jobs = load_jobs(write(cfg, GOOD), node)
    assert options.max_workers == 2 and options.shutdown_timeout == 30
    assert options.notify == "always"
    assert options.mailto == ["root@localhost", "admin@example.com"]
    assert options.mail_from == "vzbackup@example.com"
    assert (options.smtp_host, options.smtp_port) == ("mail.example.com", 587)
    assert options.webhook == "https://hooks.example.com/x"
    assert list(jobs) == ["nightly", "some", "weekly-prune", "check", "try-101"]

    n = jobs["nightly"]
    assert (n.kind, n.schedule_text, n.enabled, n.all, n.ctids, n.exclude) == (
        "vzdump", "02:00", True, True, [], [105, 106])
    assert n.storage == "local"
    assert n.options == {
        "mode": "snapshot", "zstd-level": "5", "zstd": "2",
        "prune-backups": "keep-daily=7,keep-weekly=4", "notes-template": "{{guestname}}",
        "lockwait": "10",
    }
    assert n.prune == KeepPolicy(daily=7, weekly=4)
    assert (n.repeat_missed, n.jitter, n.lockwait) == (True, 300, 10)
    assert n.keyfile == Path("/etc/vzbackup/key")
    assert n.comment == "every night"
    assert n.source == f"{cfg}:12"
    assert "at 02:00:00" in describe(n.trigger)

    s = jobs["some"]
    assert (s.enabled, s.all, s.ctids, s.repeat_missed, s.jitter, s.storage) == (
        False, False, [101, 102], False, 0, None)
    assert s.options == {} and s.prune is None and s.lockwait is None

    p = jobs["weekly-prune"]
    assert (p.kind, p.all, p.prune, p.options) == ("prune", True, KeepPolicy(last=3), {})
    v = jobs["check"]
    assert (v.kind, v.all, v.ctids) == ("verify", False, [101])
    r = jobs["try-101"]
    assert (r.kind, r.ctids, r.scratch_ctid, r.all) == ("restore-test", [101], 9101, False)


def test_example_file_is_all_comments_and_valid_when_uncommented(node: Node) -> None:
    text = (ROOT / "conf/jobs.cfg").read_text()
    assert all(not line.strip() or line.startswith("#") for line in text.splitlines())
    options, jobs = parse_jobs(text, "jobs.cfg", node)
    assert jobs == {} and options == SchedulerOptions()
    uncommented = re.sub(r"^#(?=[a-z-]+: |\t)", "", text, flags=re.M)
    options, jobs = parse_jobs(uncommented, "jobs.cfg", node)
    assert {j.kind for j in jobs.values()} == {"vzdump", "prune", "verify", "restore-test"}
    assert jobs["nightly"].schedule_text == "02:00" and jobs["nightly"].all
    assert options.max_workers == 1


@pytest.mark.parametrize(("word", "value"), [("1", True), ("yes", True), ("On", True),
                                             ("true", True), ("0", False), ("no", False),
                                             ("off", False), ("FALSE", False)])
def test_booleans_follow_the_one_rule(cfg: Path, node: Node, word: str, value: bool) -> None:
    text = f"vzdump: a\n\tschedule 02:00\n\tall 1\n\tenabled {word}\n\trepeat-missed {word}\n"
    job = load_jobs(write(cfg, text), node)[1]["a"]
    assert (job.enabled, job.repeat_missed) == (value, value)


def test_storage_from_storage_cfg(cfg: Path, node: Node, tmp_path: Path) -> None:
    write(cfg.parent / "storage.cfg", f"dir: offsite\n\tpath {tmp_path / 'offsite'}\n")
    _, jobs = load_jobs(write(cfg, "verify: v\n\tschedule daily\n\tstorage offsite\n"), node)
    assert jobs["v"].storage == "offsite"


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("vzdump: a\n\tschedule 02:00\n\tall 1\nvzdump: a\n\tschedule 03:00\n\tall 1\n",
         4, "job a: defined twice (first on line 1)"),
        ("verify: a\n\tschedule 02:00\nprune: a\n\tschedule 03:00\n",
         3, "job a: defined twice"),
        ("backup: a\n\tschedule 02:00\n", 1, "job a: unknown job type 'backup'"),
        ("vzdump: 1bad\n\tschedule 02:00\n", 1, "job 1bad: invalid job id"),
        ("vzdump:\n", 1, "expected 'KIND: ID'"),
        ("\tschedule 02:00\n", 1, "outside a section"),
        ("vzdump: a\n\tschedule 02:00\n\tall 1\n\tcolour blue\n", 4, "job a: unknown key 'colour'"),
        ("verify: a\n\tschedule 02:00\n\tmode stop\n", 3,
         "job a: 'mode' is not valid for verify jobs"),
        ("verify: a\n\tschedule 02:00\n\tlockwait 5\n", 3,
         "job a: 'lockwait' is not valid for verify jobs"),
        ("restore-test: r\n\tschedule 02:00\n\tvmid 101\n\tscratch-ctid 9000\n\tlockwait 5\n",
         5, "job r: 'lockwait' is not valid for restore-test jobs"),
        ("vzdump: a\n\tschedule 25:00\n\tall 1\n", 2, "job a: schedule: hour 25 out of range"),
        ("vzdump: a\n\tschedule mon..xyz\n\tall 1\n", 2, "job a: schedule: unknown weekday"),
        ("vzdump: a\n\tall 1\n", 1, "job a: no schedule"),
        ("vzdump: a\n\tschedule\n\tall 1\n", 2, "job a: 'schedule' has no value"),
        ("vzdump: a\n\tschedule 02:00\n\tall 1\n\tall 1\n", 4,
         "job a: 'all' given twice (first on line 3)"),
        ("vzdump: a\n\tschedule 02:00\n\tall 1\n\tstorage nowhere\n", 4,
         "job a: unknown storage 'nowhere'"),
        ("vzdump: a\n\tschedule 02:00\n\tvmid 101\n\tall 1\n", 4,
         "job a: give either vmid or 'all 1', not both"),
        ("vzdump: a\n\tschedule 02:00\n", 1, "job a: no CTs to back up"),
        ("vzdump: a\n\tschedule 02:00\n\tall 0\n", 1, "job a: no CTs to back up"),
        ("prune: a\n\tschedule 02:00\n\tall 0\n", 3, "job a: 'all 0' needs a vmid list"),
        ("verify: a\n\tschedule 02:00\n\tall 0\n\texclude 101\n", 3,
         "job a: 'all 0' needs a vmid list"),
        ("vzdump: a\n\tschedule 02:00\n\tvmid 101,abc\n", 3, "job a: vmid: invalid CTID 'abc'"),
        ("vzdump: a\n\tschedule 02:00\n\tvmid 100\n", 3, "job a: vmid: invalid CTID '100'"),
        ("vzdump: a\n\tschedule 02:00\n\tvmid 101,101\n", 3, "job a: vmid: CTID 101 listed twice"),
        ("vzdump: a\n\tschedule 02:00\n\tall 1\n\texclude x\n", 4, "job a: exclude: invalid"),
        ("vzdump: a\n\tschedule 02:00\n\tvmid 101\n\texclude 102\n", 4,
         "job a: exclude needs 'all 1'"),
        ("vzdump: a\n\tschedule 02:00\n\tall 1\n\tenabled maybe\n", 4,
         "job a: enabled: expected 0 or 1 (or yes/no, on/off, true/false), not 'maybe'"),
        ("vzdump: a\n\tschedule 02:00\n\tall 1\n\tmode fast\n", 4, "job a: mode: unknown mode"),
        ("vzdump: a\n\tschedule 02:00\n\tall 1\n\tzstd-level 30\n", 4,
         "job a: zstd-level: 30 is out of range"),
        ("vzdump: a\n\tschedule 02:00\n\tall 1\n\tprune-backups keep-often=3\n", 4,
         "job a: prune-backups: unknown prune option"),
        ("vzdump: a\n\tschedule 02:00\n\tall 1\n\tjitter -5\n", 4, "job a: jitter:"),
        ("vzdump: a\n\tschedule 02:00\n\tall 1\n\tkeyfile key.json\n", 4,
         "job a: keyfile: expected an absolute path"),
        ("restore-test: r\n\tschedule 02:00\n\tvmid 101\n", 1, "job r: no scratch-ctid"),
        ("restore-test: r\n\tschedule 02:00\n\tscratch-ctid 9000\n", 1,
         "job r: restore-test needs exactly one vmid"),
        ("restore-test: r\n\tschedule 02:00\n\tvmid 101,102\n\tscratch-ctid 9000\n", 3,
         "job r: restore-test needs exactly one vmid"),
        ("restore-test: r\n\tschedule 02:00\n\tvmid 101\n\tscratch-ctid 101\n", 4,
         "job r: scratch-ctid must differ from vmid"),
        ("restore-test: r\n\tschedule 02:00\n\tvmid 101\n\tscratch-ctid 9000\n\tall 1\n", 5,
         "job r: 'all' is not valid for restore-test jobs"),
        ("scheduler: options\n\tmax-workers 0\n", 2,
         "scheduler options: max-workers: 0 is out of range"),
        ("scheduler: options\n\tnotify sometimes\n", 2, "scheduler options: notify: expected"),
        ("scheduler: options\n\tmailto root\n", 2, "scheduler options: mailto: invalid mail"),
        ("scheduler: options\n\tsmtp-server host:99999\n", 2, "scheduler options: smtp-server:"),
        ("scheduler: options\n\twebhook ftp://x\n", 2, "scheduler options: webhook: expected"),
        ("scheduler: options\n\tworkers 3\n", 2, "scheduler options: unknown key 'workers'"),
        ("scheduler: global\n", 1, "the global section is 'scheduler: options'"),
        ("scheduler: options\nscheduler: options\n", 2, "section: defined twice"),
    ],
)
def test_errors(cfg: Path, node: Node, text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_jobs(write(cfg, text), node)
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"{cfg}:{line}: "), first
    assert message in first


# ----------------------------------------------------------------------------- editing



@pytest.fixture
def jobs_file(cfg: Path) -> Path:
    return write(cfg, (
        "# header comment\n"
        "\n"
        "# nightly backup\n"
        "vzdump: nightly\n"
        "    schedule 02:00\n"
        "    # keep it all\n"
        "    all 1\n"
        "\n"
        "# weekly check\n"
        "verify: check\n"
        "\tschedule sun 04:00\n"
        "\n"
        "# trailing comment\n"
    ))


def test_add_appends_and_keeps_everything(jobs_file: Path, node: Node) -> None:
    before = jobs_file.read_text()
    job = add_job(jobs_file, "prune", "p1",
                  {"storage": "local", "schedule": "sat 03:00", "prune-backups": "keep-last=2"},
                  node)
    assert job.kind == "prune" and job.prune == KeepPolicy(last=2)
    after = jobs_file.read_text()
    assert after.startswith(before)
    assert after[len(before):] == (
        "\nprune: p1\n\tschedule sat 03:00\n\tstorage local\n\tprune-backups keep-last=2\n"
    )
    _, jobs = load_jobs(jobs_file, node)
    assert list(jobs) == ["nightly", "check", "p1"]


def test_add_creates_the_file(cfg: Path, node: Node) -> None:
    add_job(cfg, "vzdump", "n", {"schedule": "02:00", "vmid": "101,102"}, node)
    assert cfg.read_text() == "vzdump: n\n\tschedule 02:00\n\tvmid 101,102\n"
    assert load_jobs(cfg, node)[1]["n"].ctids == [101, 102]


def test_add_duplicate_is_exists_error(jobs_file: Path, node: Node) -> None:
    before = jobs_file.read_text()
    with pytest.raises(ExistsError):
        add_job(jobs_file, "prune", "check", {"schedule": "daily"}, node)
    assert jobs_file.read_text() == before


@pytest.mark.parametrize(
    ("kind", "settings", "message"),
    [
        ("vzdump", {"schedule": "25:00", "all": "1"}, "job bad: schedule: hour 25"),
        ("vzdump", {"schedule": "02:00"}, "job bad: no CTs to back up"),
        ("vzdump", {"schedule": "02:00", "all": "1", "storage": "nowhere"}, "unknown storage"),
        ("vzdump", {"schedule": "02:00", "all": "1", "colour": "blue"}, "unknown key 'colour'"),
        ("vzdump", {"schedule": "02:00", "comment": "two\nlines", "all": "1"}, "one line"),
        ("backup", {"schedule": "02:00", "all": "1"}, "unknown job type 'backup'"),
        ("vzdump", {"schedule": "02:00", "all 1\nx": "1"}, "invalid key"),
        ("restore-test", {"schedule": "02:00", "vmid": "101"}, "no scratch-ctid"),
    ],
)
def test_bad_add_changes_nothing(jobs_file: Path, node: Node, kind: str,
                                 settings: dict[str, str], message: str) -> None:
    before = jobs_file.read_text()
    with pytest.raises(ConfigError) as info:
        add_job(jobs_file, kind, "bad", settings, node)
    assert message in str(info.value)
    assert jobs_file.read_text() == before
    assert [p.name for p in jobs_file.parent.iterdir()] == ["jobs.cfg"]  # no temp left


def test_remove_keeps_other_sections_and_comments(jobs_file: Path, node: Node) -> None:
    remove_job(jobs_file, "nightly", node)
    assert jobs_file.read_text() == (
        "# header comment\n"
        "\n"
        "# nightly backup\n"
        "\n"
        "# weekly check\n"
        "verify: check\n"
        "\tschedule sun 04:00\n"
        "\n"
        "# trailing comment\n"
    )
    remove_job(jobs_file, "check", node)
    assert list(load_jobs(jobs_file, node)[1]) == []
    assert "# trailing comment\n" in jobs_file.read_text()
    assert "# header comment\n" in jobs_file.read_text()


def test_remove_unknown_is_not_found(jobs_file: Path, cfg: Path) -> None:
    with pytest.raises(NotFoundError):
        remove_job(jobs_file, "nope")
    with pytest.raises(NotFoundError):
        remove_job(jobs_file, "options")
    with pytest.raises(NotFoundError):
        set_enabled(jobs_file, "nope", False)
    cfg.unlink()
    with pytest.raises(NotFoundError):
        remove_job(cfg, "nightly")


def test_add_then_remove_round_trip(jobs_file: Path, node: Node) -> None:
    before = jobs_file.read_text()
    add_job(jobs_file, "verify", "v2", {"schedule": "monthly"}, node)
    remove_job(jobs_file, "v2", node)
    assert jobs_file.read_text() == before


def test_enable_disable_round_trip(jobs_file: Path, node: Node) -> None:
    before = jobs_file.read_text()
    set_enabled(jobs_file, "nightly", False, node)
    text = jobs_file.read_text()
    assert "    all 1\n    enabled 0\n\n# weekly check\n" in text
    assert not load_jobs(jobs_file, node)[1]["nightly"].enabled
    assert load_jobs(jobs_file, node)[1]["check"].enabled
    set_enabled(jobs_file, "nightly", True, node)
    assert "    enabled 1\n" in jobs_file.read_text()
    assert load_jobs(jobs_file, node)[1]["nightly"].enabled
    set_enabled(jobs_file, "check", True, node)  # already on (default): nothing written
    set_enabled(jobs_file, "check", False, node)
    assert "\tschedule sun 04:00\n\tenabled 0\n" in jobs_file.read_text()
    assert jobs_file.read_text().replace("    enabled 1\n", "").replace(
        "\tenabled 0\n", "") == before


def test_enabled_value_replaced_in_place(cfg: Path, node: Node) -> None:
    write(cfg, "verify: v\n  enabled   0   \n  schedule daily\n# end\n")
    set_enabled(cfg, "v", True, node)
    assert cfg.read_text() == "verify: v\n  enabled   1\n  schedule daily\n# end\n"


def test_edit_keeps_file_mode(jobs_file: Path, node: Node) -> None:
    jobs_file.chmod(0o600)
    set_enabled(jobs_file, "nightly", False, node)
    assert jobs_file.stat().st_mode & 0o777 == 0o600
