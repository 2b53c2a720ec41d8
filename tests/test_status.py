"""`miglet status`: healthy while the agent lives and is not stopped; a clear reason otherwise.

Rules: state files are written by the same code the agent uses; the command runs in-process (`cli.main`).
"""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from miglet.cli import main
from miglet.driver import OUTSIDE_CHARS, Driver
from miglet.machine import Acknowledged, CommandArrived, JobRunning, RunnerListening, Start, StopRequested
from miglet.statefile import StateFileWriter, StateRecord, read_state_file, write_atomic
from tests.agents import register_runner


def exited_pid() -> int:
    """The pid of a process that has come and gone: no other takes it until pids wrap around."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def record(**overrides: object) -> StateRecord:
    values: dict[str, object] = {
        "state": "Idle",
        "since": "2024-01-15T10:30:00.000Z",
        "updated_at": datetime.now(UTC).isoformat(),
        "vm_id": "vm-123",
        "pool_id": "pool-001",
        "runner_name": "vm-123",
        "job": None,
        "pid": os.getpid(),
        "version": "0.1.0",
    }
    values.update(overrides)
    return msgspec.convert(values, StateRecord)


def write(path: Path, state: StateRecord) -> Path:
    write_atomic(path, msgspec.json.encode(state))
    return path


def test_healthy_idle_agent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "state.json", record())
    assert main(["status", "--state-file", str(path)]) == 0
    assert capsys.readouterr().out.startswith("Idle since 2024-01-15T10:30:00.000Z (vm vm-123, runner vm-123)")


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "state.json", record(state="Busy", job="build"))
    assert main(["status", "--json", "--state-file", str(path)]) == 0
    shown = msgspec.json.decode(capsys.readouterr().out)
    assert (shown["state"], shown["job"]) == ("Busy", "build")


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"state": "Stopped"}, "agent is Stopped"),
        ({"updated_at": (datetime.now(UTC) - timedelta(minutes=5)).isoformat()}, "state file is stale"),
        ({"pid": exited_pid()}, "is not running"),
        ({"updated_at": "yesterday"}, "unreadable updated_at"),
    ],
)
def test_unhealthy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: dict[str, object], reason: str
) -> None:
    path = write(tmp_path / "state.json", record(**overrides))
    assert main(["status", "--state-file", str(path)]) == 1
    assert reason in capsys.readouterr().err


def test_missing_or_corrupt_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--state-file", str(tmp_path / "absent.json")]) == 1
    assert "no state file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["status", "--state-file", str(tmp_path / "bad.json")]) == 1
    assert "cannot read state file" in capsys.readouterr().err


def test_state_file_is_private(tmp_path: Path) -> None:
    path = write(tmp_path / "dir" / "state.json", record())
    assert path.stat().st_mode & 0o777 == 0o600


def test_a_huge_job_name_or_stop_reason_keeps_the_state_file_readable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "state.json"
    driver = Driver(vm_id="vm-123", pool_id="pool-001", send=lambda event: None, state_file=StateFileWriter(path))
    driver.apply(Start(runner_name="vm-123", ephemeral=True))
    driver.apply(Acknowledged())
    driver.apply(CommandArrived(register_runner("c1")))
    driver.apply(RunnerListening())
    # The longest name a runner's output line can carry, of characters that take four bytes each.
    driver.apply(JobRunning(name="\U0001f680" * 16_000))
    driver.apply(StopRequested(reason="\U0001f6d1" * 100_000))
    written = read_state_file(path)
    assert written.job is not None
    assert written.stop_reason is not None
    assert (len(written.job), len(written.stop_reason)) == (OUTSIDE_CHARS + 1, OUTSIDE_CHARS + 1)
    assert main(["status", "--state-file", str(path)]) == 0
