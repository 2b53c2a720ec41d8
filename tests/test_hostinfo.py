"""What the agent says of itself and its VM: `vm_started`'s agent and host, `runner_registered`'s runner version.

Rules: the os name is read from a file a test points at; the whole agent runs in-process on the autojump clock.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import pytest
import trio

from fake_controller import FakeController
from fake_controller.simulated_runner import SimulatedRunner
from miglet import __version__, app, machine
from miglet.hostinfo import host_info
from miglet.machine import Phase
from miglet.runner.output import interpret
from tests.agents import ConfigFactory, running_agent


async def test_vm_started_says_what_the_agent_and_its_vm_are(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_agent(make_config(), controller, runner) as running:
        await running.reach(Phase.IDLE)
        running.agent.request_stop("test over")
    [started] = running.events("vm_started")
    assert started["agent"] == {
        "version": __version__,
        "capabilities": ["long_poll", "jit_config", "shutdown", "remove_token", "heartbeat", "job_identity"],
    }
    assert started["host"]["cpus"] >= 1
    assert started["host"]["hostname"]
    [registered] = running.events("runner_registered")
    assert registered["runner_version"] == runner.version


@pytest.mark.parametrize("os_release", ["missing", "unreadable"])
async def test_vm_started_goes_out_without_the_os_when_os_release_cannot_be_read(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    os_release: str,
) -> None:
    path = tmp_path / "os-release"
    if os_release == "unreadable":
        os.mkfifo(path)  # opening it without a writer would block: it is skipped, and nothing waits
    monkeypatch.setattr(app, "host_info", partial(host_info, os_release=path))
    async with running_agent(make_config(), controller, runner) as running:
        await running.reach(Phase.IDLE)
        running.agent.request_stop("test over")
    [started] = running.events("vm_started")
    assert "os" not in started["host"]
    assert started["host"]["kernel"] == os.uname().release
    assert running.events("runner_registered")


def test_a_fact_that_cannot_be_read_is_left_out(tmp_path: Path) -> None:
    facts = host_info(os_release=tmp_path / "missing")
    assert facts.os is None
    assert facts.kernel is not None
    assert facts.memory_mb is not None
    assert facts.memory_mb > 0
    assert facts.boot_time is not None
    assert facts.boot_time <= datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    (tmp_path / "directory").mkdir()
    assert host_info(os_release=tmp_path / "directory").os is None
    (tmp_path / "huge").write_bytes(b"PRETTY_NAME=" + b"x" * 200_000)
    assert host_info(os_release=tmp_path / "huge").os is None


def test_a_hostile_os_name_is_cleaned_and_bounded(tmp_path: Path) -> None:
    (tmp_path / "os-release").write_bytes(b'NAME="X"\nPRETTY_NAME="Debian \x1b[31m\xff(bookworm)' + b"y" * 500 + b'"\n')
    name = host_info(os_release=tmp_path / "os-release").os
    assert name is not None
    assert name.startswith("Debian [31m")
    assert "\x1b" not in name
    assert len(name) == 128


def test_only_a_plain_version_is_taken_from_the_runners_output() -> None:
    assert interpret("Current runner version: '2.330.0'") == machine.RunnerVersion("2.330.0")
    for hostile in ("Current runner version: '2.330.0 forged line'", "Current runner version: '" + "9" * 100 + "'"):
        assert interpret(hostile) is None
