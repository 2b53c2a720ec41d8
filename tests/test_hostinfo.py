"""What the agent says of itself and its VM: `vm_started`'s agent and host, `runner_registered`'s runner version.

Rules: host facts are read from files a test points at; the whole agent runs in-process on the autojump clock.
"""

from __future__ import annotations

from pathlib import Path

import trio

from fake_controller import FakeController
from fake_controller.simulated_runner import SimulatedRunner
from miglet import __version__, machine
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
        "capabilities": ["long_poll", "jit_config", "shutdown", "remove_token", "heartbeat"],
    }
    assert started["host"]["cpus"] >= 1
    assert started["host"]["hostname"]
    [registered] = running.events("runner_registered")
    assert registered["runner_version"] == runner.version


def test_a_fact_that_cannot_be_read_is_left_out(tmp_path: Path) -> None:
    (tmp_path / "stat").write_text("cpu 1 2 3\nbtime nonsense\n")
    facts = host_info(os_release=tmp_path / "missing", proc=tmp_path)
    assert (facts.os, facts.memory_mb, facts.boot_time) == (None, None, None)
    assert facts.kernel is not None
    (tmp_path / "os-release").write_text('NAME="X"\nPRETTY_NAME="Debian GNU/Linux 12 \\x1b[31m(bookworm)"\n')
    (tmp_path / "meminfo").write_text("MemTotal:       2048000 kB\n")
    (tmp_path / "stat").write_text("btime 1700000000\n")
    facts = host_info(os_release=tmp_path / "os-release", proc=tmp_path)
    assert facts.memory_mb == 2000
    assert facts.boot_time == "2023-11-14T22:13:20Z"
    assert facts.os is not None
    assert "\x1b" not in facts.os


def test_only_a_plain_version_is_taken_from_the_runners_output() -> None:
    assert interpret("Current runner version: '2.330.0'") == machine.RunnerVersion("2.330.0")
    for hostile in ("Current runner version: '2.330.0 forged line'", "Current runner version: '" + "9" * 100 + "'"):
        assert interpret(hostile) is None
