"""Pre-flight: `miglet check-config` reports every problem at once, and `miglet run` refuses a broken runner
directory before it announces the VM.

Rules: `main` in-process with the environment given by monkeypatch; the controller endpoint is a closed loopback
port, so that a request sent by mistake fails instead of reaching anything.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fake_controller.fake_runner import install
from miglet import exitcodes
from miglet.cli import main
from miglet.preflight import misspelt, runner_dir_problems, state_dir_problem


def environment(monkeypatch: pytest.MonkeyPatch, runner_dir: Path, state_file: Path, **extra: str) -> None:
    for name, value in {
        "MIGLET_VM_ID": "vm-1",
        "MIGLET_POOL_ID": "pool-1",
        "MIGLET_CONTROLLER_ENDPOINT": "http://127.0.0.1:9",
        "MIGLET_RUNNER_DIR": str(runner_dir),
        "MIGLET_STATE_FILE": str(state_file),
        **extra,
    }.items():
        monkeypatch.setenv(name, value)


def test_check_config_catches_an_empty_runner_directory_and_every_other_problem_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    environment(monkeypatch, tmp_path / "empty", tmp_path / "state.json", MIGLET_POLL_INTERVAL="often")
    monkeypatch.setenv("MIGLET_HEARTBEAT_INTERVAL", "-1")
    assert main(["check-config"]) == exitcodes.CONFIG
    errors = [line for line in capsys.readouterr().err.splitlines() if "configuration error" in line]
    # The two values, and the runner directory all the same: at image build time the VM has no id yet.
    assert len(errors) == 4
    monkeypatch.delenv("MIGLET_POLL_INTERVAL")
    monkeypatch.delenv("MIGLET_HEARTBEAT_INTERVAL")
    assert main(["check-config"]) == exitcodes.CONFIG
    err = capsys.readouterr().err
    assert "MIGLET_RUNNER_DIR: config.sh is missing" in err
    assert "MIGLET_RUNNER_DIR: run.sh is missing" in err


def test_check_config_prints_the_effective_values_and_passes_a_good_setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    environment(monkeypatch, install(tmp_path / "runner"), tmp_path / "new" / "dir" / "state.json")
    assert main(["check-config"]) == exitcodes.OK
    assert "runner_name = vm-1" in capsys.readouterr().out  # defaulting to the VM id


def test_run_refuses_a_broken_runner_directory_before_announcing_the_vm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    runner_dir = install(tmp_path / "runner")
    (runner_dir / "run.sh").chmod(0o644)
    environment(monkeypatch, runner_dir, tmp_path / "state.json")
    monkeypatch.setattr("miglet.cli.harden_process", list)
    assert main(["run"]) == exitcodes.CONFIG
    assert "run.sh is not executable" in capsys.readouterr().err
    assert not (tmp_path / "state.json").exists()


def test_a_misspelt_variable_is_named_with_the_closest_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert misspelt({"MIGLET_POLL_INTERVALL": "5", "MIGLET_POLL_INTERVAL": "5", "PATH": "/bin"}) == [
        "MIGLET_POLL_INTERVALL is not a MIGlet setting and is ignored; did you mean MIGLET_POLL_INTERVAL?"
    ]
    assert misspelt({"MIGLET_SOMETHING_ELSE": "1"}) == ["MIGLET_SOMETHING_ELSE is not a MIGlet setting and is ignored"]
    environment(monkeypatch, install(tmp_path / "runner"), tmp_path / "state.json", MIGLET_SHUTDOWN_GRACE="90")
    monkeypatch.setenv("MIGLET_EPHEMERAL_", "1")
    assert main(["check-config"]) == exitcodes.OK
    err = capsys.readouterr().err
    assert "did you mean MIGLET_EPHEMERAL?" in err
    assert "TimeoutStopSec=100" in err  # 90 s of grace and 60 s of flush do not fit


def test_the_runner_listener_and_the_state_directory_are_checked(tmp_path: Path) -> None:
    runner_dir = install(tmp_path / "runner")
    (runner_dir / "bin" / "Runner.Listener").chmod(0o644)
    assert [str(problem) for problem in runner_dir_problems(runner_dir)] == [
        "MIGLET_RUNNER_DIR: bin/Runner.Listener is not executable"
    ]
    (tmp_path / "a-file").write_text("")
    problem = state_dir_problem(tmp_path / "a-file" / "state.json")
    assert problem is not None
    assert "is not a directory" in str(problem)
    assert state_dir_problem(tmp_path / "new" / "state.json") is None


def test_check_config_warns_when_the_runners_user_could_not_run_miglets_job_hooks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # pytest's directories are root's alone: the runner's user could not reach the hooks beside the state file.
    runner_dir = install(tmp_path / "runner", owner="nobody")
    environment(monkeypatch, runner_dir, tmp_path / "state" / "state.json", MIGLET_RUNNER_USER="nobody")
    assert main(["check-config"]) == exitcodes.OK  # a warning: the runner works, only without job identity
    err = capsys.readouterr().err
    assert "warning: job identity will be off" in err
    assert "'nobody' cannot reach" in err
    monkeypatch.setenv("MIGLET_JOB_IDENTITY", "false")
    assert main(["check-config"]) == exitcodes.OK
    assert "job identity" not in capsys.readouterr().err
