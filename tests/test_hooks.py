"""vzdump hook scripts (vzbackup.backup.hooks), run for real as small shell scripts."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from vzbackup.backup.hooks import ABORTING_PHASES, CT_PHASES, JOB_PHASES, HookError, HookScript
from vzbackup.errors import ConfigError

RECORDER = """#!/bin/sh
# Record argv (one per line, after the count) and the environment, per phase.
{ echo "$#"; for a in "$@"; do echo "$a"; done; } > "$REC_DIR/$1.argv"
env > "$REC_DIR/$1.env"
echo "stdout of $1"
echo "stderr of $1" >&2
"""


def script(tmp_path: Path, body: str, name: str = "hook.sh", mode: int = 0o755) -> Path:
    path = tmp_path / name
    path.write_text(body)
    path.chmod(mode)
    return path


def recorded(rec: Path, phase: str) -> tuple[list[str], dict[str, str]]:
    lines = (rec / f"{phase}.argv").read_text().splitlines()
    assert int(lines[0]) == len(lines) - 1
    text = (rec / f"{phase}.env").read_text()
    env = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    return lines[1:], env


@pytest.fixture
def rec(tmp_path: Path) -> Path:
    d = tmp_path / "rec"
    d.mkdir()
    return d


def base_env(rec: Path) -> dict[str, str]:
    return {"REC_DIR": str(rec), "DUMPDIR": "/vz/dump", "STOREID": "local"}


def test_job_phases_get_only_the_phase(tmp_path: Path, rec: Path) -> None:
    lines: list[str] = []
    hook = HookScript(script(tmp_path, RECORDER), base_env(rec), log_line=lines.append)
    for phase in JOB_PHASES:
        assert hook.call(phase) is True
        argv, env = recorded(rec, phase)
        assert argv == [phase]
        assert env["DUMPDIR"] == "/vz/dump" and env["STOREID"] == "local"
        assert "VMTYPE" not in env and "HOSTNAME" not in env
        assert env["PATH"] == "/usr/sbin:/usr/bin:/sbin:/bin"  # base_env had none
    assert lines[:2] == ["stdout of job-init", "stderr of job-init"]


def test_ct_phases_get_phase_mode_ctid_and_vzdump_env(tmp_path: Path, rec: Path) -> None:
    hook = HookScript(script(tmp_path, RECORDER), {**base_env(rec), "PATH": "/bin:/usr/bin"})
    for phase in CT_PHASES:
        assert hook.call(phase, ctid=101, mode="snapshot", extra_env={"HOSTNAME": "ct101"})
        argv, env = recorded(rec, phase)
        assert argv == [phase, "snapshot", "101"]
        assert env["VMTYPE"] == "openvz"
        assert env["HOSTNAME"] == "ct101"  # the CT's, not the node's
        assert (env["DUMPDIR"], env["STOREID"]) == ("/vz/dump", "local")
        assert env["PATH"] == "/bin:/usr/bin"
        assert "TARGET" not in env and "LOGFILE" not in env

    target = "/vz/dump/vzdump-openvz-101-2026_01_02-03_04_05.tar.zst"
    hook.call("backup-end", ctid=101, mode="stop", extra_env={"TARGET": target})
    _, env = recorded(rec, "backup-end")
    assert env["TARGET"] == target and env["TARFILE"] == target  # old name too
    hook.call("log-end", ctid=101, mode="stop", extra_env={"LOGFILE": "/vz/dump/x.log"})
    assert recorded(rec, "log-end")[1]["LOGFILE"] == "/vz/dump/x.log"
    hook.call("backup-start", ctid=7, mode="stop", extra_env={"STOREID": None, "N": 3})
    _, env = recorded(rec, "backup-start")
    assert "STOREID" not in env and env["N"] == "3"


def test_environment_is_not_inherited(tmp_path: Path, rec: Path) -> None:
    os.environ["VZB_HOOK_LEAK"] = "1"
    try:
        HookScript(script(tmp_path, RECORDER), base_env(rec)).call("job-start")
    finally:
        del os.environ["VZB_HOOK_LEAK"]
    assert "VZB_HOOK_LEAK" not in recorded(rec, "job-start")[1]


FAILING = """#!/bin/sh
echo "working on $1"
for i in 1 2 3 4 5 6 7 8 9 10 11 12; do echo "err line $i" >&2; done
echo "cannot continue: disk on fire" >&2
exit 3
"""


@pytest.mark.parametrize("phase", sorted(ABORTING_PHASES))
def test_failure_before_work_aborts(tmp_path: Path, phase: str) -> None:
    path = script(tmp_path, FAILING)
    warnings: list[str] = []
    hook = HookScript(path, {}, on_warning=warnings.append, log_line=lambda _: None)
    kwargs: dict[str, object] = {"ctid": 101, "mode": "stop"} if phase in CT_PHASES else {}
    with pytest.raises(HookError) as exc:
        hook.call(phase, **kwargs)  # type: ignore[arg-type]
    msg = str(exc.value)
    assert f"hook script {path} failed in phase {phase}" in msg
    assert "exit code 3" in msg
    assert "cannot continue: disk on fire" in msg  # the stderr tail
    lines = msg.splitlines()
    assert lines[-1] == "  stderr: cannot continue: disk on fire"
    assert "  stderr: err line 4" in lines and "  stderr: err line 3" not in lines  # last 10
    assert "working on" not in msg  # stdout is logged, not part of the error
    assert exc.value.exit_code == 10
    assert warnings == []


@pytest.mark.parametrize(
    "phase", ["job-end", "job-abort", "backup-end", "backup-abort", "log-end", "post-restart"]
)
def test_failure_after_work_is_a_warning(tmp_path: Path, phase: str) -> None:
    path = script(tmp_path, FAILING)
    warnings: list[str] = []
    logged: list[str] = []
    hook = HookScript(path, {}, on_warning=warnings.append, log_line=logged.append)
    kwargs: dict[str, object] = {"ctid": 101, "mode": "stop"} if phase in CT_PHASES else {}
    assert hook.call(phase, **kwargs) is False  # type: ignore[arg-type]
    assert len(warnings) == 1
    assert f"failed in phase {phase}" in warnings[0] and "exit code 3" in warnings[0]
    assert ("for CT 101" in warnings[0]) is (phase in CT_PHASES)
    assert logged[0] == f"working on {phase}" and logged[-1] == "cannot continue: disk on fire"


def test_default_warning_goes_to_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hook = HookScript(script(tmp_path, FAILING), {})
    with caplog.at_level("INFO", logger="vzbackup.hooks"):
        assert hook.call("job-end") is False
    levels = {(r.levelname, r.getMessage().split(":")[0]) for r in caplog.records}
    assert ("WARNING", f"hook script {tmp_path / 'hook.sh'} failed in phase job-end") in levels
    assert ("INFO", "hook") in levels


def test_killed_by_signal(tmp_path: Path) -> None:
    hook = HookScript(script(tmp_path, "#!/bin/sh\nkill -TERM $$\n"), {})
    with pytest.raises(HookError, match="killed by signal SIGTERM"):
        hook.call("job-start")


def test_timeout_kills_the_script(tmp_path: Path) -> None:
    hook = HookScript(script(tmp_path, "#!/bin/sh\nexec sleep 30\n"), {}, timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(HookError, match=r"timed out after 0\.5 s"):
        hook.call("pre-stop", ctid=101, mode="stop")
    assert time.monotonic() - t0 < 10


def test_background_child_does_not_block(tmp_path: Path, rec: Path) -> None:
    body = '#!/bin/sh\nsleep 30 &\necho $! > "$REC_DIR/bg.pid"\necho started\n'
    hook = HookScript(script(tmp_path, body), base_env(rec))
    t0 = time.monotonic()
    try:
        assert hook.call("job-start") is True
        assert time.monotonic() - t0 < 10
    finally:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            os.kill(int((rec / "bg.pid").read_text()), signal.SIGKILL)


def test_no_script_does_nothing() -> None:
    for path in (None, ""):
        hook = HookScript(path, {})
        assert not hook.enabled
        assert hook.call("job-start") is True
        assert hook.call("backup-start", ctid=101, mode="stop") is True


def test_bad_script_is_a_config_error_up_front(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as exc:
        HookScript(tmp_path / "missing.sh", {})
    assert exc.value.exit_code == 3
    with pytest.raises(ConfigError, match="not a regular file"):
        HookScript(tmp_path, {})
    with pytest.raises(ConfigError, match="not executable"):
        HookScript(script(tmp_path, "#!/bin/sh\n", mode=0o644), {})


def test_unrunnable_script(tmp_path: Path) -> None:
    hook = HookScript(script(tmp_path, "#!/nonexistent/interpreter\n"), {})
    with pytest.raises(HookError, match="cannot execute it"):
        hook.call("job-start")
    assert hook.call("job-end") is False


def test_relative_path_is_made_absolute(tmp_path: Path, rec: Path) -> None:
    script(tmp_path, RECORDER)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        hook = HookScript("hook.sh", base_env(rec))
    finally:
        os.chdir(cwd)
    assert hook.path == tmp_path / "hook.sh"
    assert hook.call("job-start")


def test_phase_arguments_are_checked(tmp_path: Path) -> None:
    hook = HookScript(None, {})
    with pytest.raises(ValueError, match="unknown hook phase"):
        hook.call("backup-middle")
    with pytest.raises(ValueError, match="needs the CT's mode and ID"):
        hook.call("backup-start")
    with pytest.raises(ValueError, match="for the whole job"):
        hook.call("job-start", ctid=101, mode="stop")
