"""vzdump.conf defaults and exclusion patterns (vzbackup.backup.defaults)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vzbackup.backup.defaults import (
    STD_EXCLUDES,
    DumpDefaults,
    ExcludeMatcher,
    load_defaults,
    merge,
)
from vzbackup.engine.keeppolicy import KeepPolicy
from vzbackup.errors import ConfigError, UsageError

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "conf" / "vzdump.conf"


def conf(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vzdump.conf"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ loading


def test_embedded_defaults_are_vzdumps() -> None:
    d = load_defaults(None)
    assert d == DumpDefaults()
    assert (d.storage, d.mode, d.zstd_level, d.zstd, d.tmpdir) == (None, "stop", 3, 0, None)
    assert (d.lockwait, d.stopwait, d.bwlimit, d.ionice) == (180, 10, 0, 7)
    assert (d.exclude_path, d.stdexcludes, d.remove) == ((), True, True)
    assert (d.script, d.notes_template, d.encryption_key) == (None, None, None)
    assert d.prune_backups.keep_all
    assert d.excludes() == STD_EXCLUDES == ("/tmp/?*", "/var/tmp/?*", "/var/run/?*.pid")


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    assert load_defaults(tmp_path / "absent.conf") == DumpDefaults()


def test_every_key(tmp_path: Path) -> None:
    path = conf(
        tmp_path,
        """# backup defaults
storage: nas-1
mode: snapshot
zstd-level: 19

zstd: 0
tmpdir: /var/tmp/vzb
lockwait: 0
stopwait: 5
bwlimit: 10240
exclude-path: /srv/cache/?* '/home/a b/' *.swp
exclude-path: /var/log/**.gz
stdexcludes: 0
script: /usr/local/bin/hook.sh
notes-template: {{guestname}}: nightly # not a comment
prune-backups: keep-last=3,keep-daily=7
encryption-key: /etc/vzbackup/key
  ionice :  8
remove: no
""",
    )
    d = load_defaults(path)
    assert d == DumpDefaults(
        storage="nas-1",
        mode="snapshot",
        zstd_level=19,
        zstd=0,
        tmpdir=Path("/var/tmp/vzb"),
        lockwait=0,
        stopwait=5,
        bwlimit=10240,
        exclude_path=("/srv/cache/?*", "/home/a b/", "*.swp", "/var/log/**.gz"),
        stdexcludes=False,
        script=Path("/usr/local/bin/hook.sh"),
        notes_template="{{guestname}}: nightly # not a comment",
        prune_backups=KeepPolicy(last=3, daily=7),
        encryption_key=Path("/etc/vzbackup/key"),
        ionice=8,
        remove=False,
    )
    assert d.excludes() == d.exclude_path  # stdexcludes: 0


def test_sample_documents_every_key_with_its_default(tmp_path: Path) -> None:
    text = SAMPLE.read_text()
    assert load_defaults(SAMPLE) == DumpDefaults()  # all commented out
    settings = re.findall(r"^#([a-z-]+): (.*)$", text, re.M)
    keys = [k for k, _ in settings]
    assert keys == [
        "storage", "mode", "zstd-level", "zstd", "tmpdir", "lockwait", "stopwait", "bwlimit",
        "exclude-path", "stdexcludes", "script", "notes-template", "prune-backups",
        "encryption-key", "ionice", "remove",
    ]
    uncommented = conf(tmp_path, "\n".join(f"{k}: {v}" for k, v in settings) + "\n")
    d = load_defaults(uncommented)  # every example value parses
    defaults = DumpDefaults()
    for key in ("mode", "zstd_level", "zstd", "lockwait", "stopwait", "bwlimit", "ionice",
                "stdexcludes", "remove", "prune_backups"):
        assert getattr(d, key) == getattr(defaults, key), key


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("mode: stop\nmode: snapshot\n", 2, "'mode' given twice (first on line 1)"),
        ("# c\n\nmode: fast\n", 3, "unknown mode 'fast'"),
        ("zstd-level: 20\n", 1, "20 is out of range (1..19)"),
        ("zstd-level: 0\n", 1, "out of range"),
        ("zstd: -1\n", 1, "expected a whole number"),
        ("lockwait: 1.5\n", 1, "expected a whole number"),
        ("bwlimit: lots\n", 1, "expected a whole number"),
        ("ionice: 9\n", 1, "out of range (0..8)"),
        ("stdexcludes: maybe\n", 1, "expected 0 or 1"),
        ("remove: 2\n", 1, "expected 0 or 1"),
        ("tmpdir: relative/dir\n", 1, "expected an absolute path"),
        ("script: hook.sh\n", 1, "expected an absolute path"),
        ("encryption-key: key\n", 1, "expected an absolute path"),
        ("storage: -bad\n", 1, "invalid storage name"),
        ("prune-backups: keep-often=3\n", 1, "unknown prune option"),
        ("prune-backups: keep-last=-1\n", 1, "non-negative integer"),
        ("exclude-path: 'unterminated\n", 1, "bad quoting"),
        ("exclude-path: /\n", 1, "would exclude the whole CT"),
        ("notes-template: " + "x" * 1025 + "\n", 1, "longer than 1024"),
        ("mode:\n", 1, "'mode' has no value"),
        ("\nfrobnicate: 1\n", 2, "unknown key 'frobnicate'"),
        ("compress: zstd\n", 1, "unsupported key 'compress'"),
        ("mode = stop\n", 1, "malformed line"),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = conf(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_defaults(path)
    assert str(exc.value).startswith(f"{path}:{line}: ")
    assert message in str(exc.value)
    assert exc.value.exit_code == 3


def test_unsupported_and_unknown_keys_have_hints(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_defaults(conf(tmp_path, "maxfiles: 3\n"))
    assert exc.value.hint and "prune-backups" in exc.value.hint
    with pytest.raises(ConfigError) as exc:
        load_defaults(conf(tmp_path, "stop-wait: 3\n"))
    assert exc.value.hint and "stopwait" in exc.value.hint


def test_unreadable_files(tmp_path: Path) -> None:
    binary = tmp_path / "bin.conf"
    binary.write_bytes(b"mode: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not a text file"):
        load_defaults(binary)
    with pytest.raises(ConfigError, match="cannot read"):
        load_defaults(tmp_path)  # a directory


# -------------------------------------------------------------------------------- merging


def test_cli_values_win(tmp_path: Path) -> None:
    base = load_defaults(conf(tmp_path, "mode: snapshot\nzstd: 4\nexclude-path: /a\n"))
    merged = merge(
        base,
        {
            "mode": "suspend",
            "zstd_level": 7,  # field name and typed value
            "zstd": None,  # not given on the command line: the file's value stays
            "stdexcludes": False,
            "prune-backups": "keep-last=2",
            "tmpdir": Path("/scratch"),
            "exclude-path": ["/b", "*.tmp"],
        },
    )
    assert merged.mode == "suspend"
    assert merged.zstd_level == 7
    assert merged.zstd == 4
    assert merged.stdexcludes is False
    assert merged.prune_backups == KeepPolicy(last=2)
    assert merged.tmpdir == Path("/scratch")
    assert merged.exclude_path == ("/a", "/b", "*.tmp")  # added to the file's, like vzdump
    assert merge(base, {"exclude_path": "/c d"}).exclude_path == ("/a", "/c d")  # one pattern
    assert merge(base, {"prune_backups": KeepPolicy(daily=1)}).prune_backups.daily == 1
    assert merge(base, {}) == base
    here = merge(base, {"script": "hooks/run.sh", "encryption_key": Path("k"), "tmpdir": "/t"})
    assert here.script == Path.cwd() / "hooks/run.sh"  # command-line paths: from the cwd
    assert here.encryption_key == Path.cwd() / "k" and here.tmpdir == Path("/t")
    assert base.mode == "snapshot"  # unchanged


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode": "fast"}, "--mode: unknown mode 'fast'"),
        ({"zstd-level": 42}, "--zstd-level: 42 is out of range"),
        ({"ionice": "x"}, "--ionice: expected a whole number"),
        ({"prune-backups": "keep-last=a"}, "--prune-backups:"),
        ({"exclude-path": [""]}, "--exclude-path: invalid exclude pattern"),
        ({"colour": "blue"}, "unknown backup option 'colour'"),
        ({"lockwait": 2.5}, "--lockwait: unsupported value"),
    ],
)
def test_merge_errors_are_usage_errors(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)) as exc:
        merge(DumpDefaults(), overrides)
    assert exc.value.exit_code == 2


# ------------------------------------------------------------------------------ exclusions


@pytest.mark.parametrize(
    ("path", "is_dir", "excluded"),
    [
        ("tmp", True, False),  # "?*" needs at least one character: /tmp itself stays
        ("tmp/x", False, True),
        ("tmp/.X11-unix", True, True),
        ("tmp/.X11-unix/X0", False, True),  # below an excluded directory
        ("./tmp/x", False, True),
        ("/tmp/x", False, True),
        ("srv/tmp/x", False, False),  # anchored: only the CT's /tmp
        ("var/tmp/cache", True, True),
        ("var/tmp", True, False),
        ("var/run/sshd.pid", False, True),
        ("var/run/.pid", False, False),
        ("var/run/sshd/sshd.pid", False, False),  # * and ? stop at /
        ("var/run/sshd.pid.old", False, False),
        ("var/run", True, False),
        ("", True, False),
        (".", True, False),
    ],
)
def test_standard_excludes(path: str, is_dir: bool, excluded: bool) -> None:
    assert ExcludeMatcher(STD_EXCLUDES).excluded(path, is_dir) is excluded


def test_pattern_semantics() -> None:
    m = ExcludeMatcher(["*.swp", "cache/", "/srv/data/**/old", "log/*.gz", "core.[0-9]*",
                        "/home/a b", "file[!x]", "lit\\*eral"])
    cases = {
        ("a.swp", False): True,  # unanchored: at any depth
        ("home/u/.a.swp", False): True,
        ("a.swp.bak", False): False,
        ("var/cache", True): True,  # trailing /: directories only
        ("var/cache", False): False,
        ("var/cache/apt/x", False): True,  # below it
        ("cache", True): True,
        ("srv/data/x/y/old", True): True,  # ** crosses /
        ("srv/data/old", False): False,  # "/**/" needs at least one directory level
        ("x/srv/data/a/old", False): False,
        ("var/log/syslog.1.gz", False): True,  # multi-component, unanchored: a path suffix
        ("log/a.gz", False): True,
        ("xlog/a.gz", False): False,  # only at a component boundary
        ("var/log/old/a.gz", False): False,
        ("core.123", False): True,
        ("core.x", False): False,
        ("home/a b", True): True,
        ("home/a b/c", False): True,
        ("filey", False): True,
        ("filex", False): False,
        ("lit*eral", False): True,
        ("litteral", False): False,
    }
    for (path, is_dir), want in cases.items():
        assert m.excluded(path, is_dir) is want, (path, is_dir)
    assert m and not ExcludeMatcher([])
    assert not ExcludeMatcher([]).excluded("anything", False)


def test_matcher_from_defaults() -> None:
    d = DumpDefaults(exclude_path=("/srv/?*",))
    assert d.matcher().patterns == ("/srv/?*", *STD_EXCLUDES)
    assert d.matcher().excluded("srv/a", False)
    assert d.matcher().excluded("tmp/a", False)


@pytest.mark.parametrize("bad", ["", "/", "//", "*", "/*", "**", "."])
def test_matcher_refuses_patterns_that_exclude_everything(bad: str) -> None:
    with pytest.raises(ValueError):
        ExcludeMatcher([bad])
