"""Command-to-`config.sh` latency: long-poll against the seed's fixed 5 s polling, side by side.

Agents run in this process over real HTTP on loopback against one fake controller. Once all are Ready, each
gets its `register_runner` command at a random moment; the latency is from the moment the command exists at
the controller to the moment the agent's runner backend is asked to configure.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import trio

from benchmarks.common import agent_config, served_controller, summary_ms
from fake_controller import FakeController, Settings
from fake_controller.simulated_runner import SimulatedRunner
from miglet.app import Agent
from miglet.machine import Phase
from miglet.runner.backend import LineSink, Registration

MODES = {"long-poll": {"command_wait": 20}, "seed polling (5 s)": {"command_wait": 0}}


class StopwatchRunner(SimulatedRunner):
    """Notes when it is asked to configure."""

    def __init__(self) -> None:
        super().__init__()
        self.configure_at: float | None = None
        self.configure_called = trio.Event()

    async def configure(self, registration: Registration, on_line: LineSink) -> None:
        self.configure_at = time.monotonic()
        self.configure_called.set()
        await super().configure(registration, on_line)


async def run(workdir: Path, trials: int = 30) -> dict[str, Any]:
    controller = FakeController(Settings(send_registration=False))
    rng = random.Random(42)
    results: dict[str, list[float]] = {mode: [] for mode in MODES}
    async with served_controller(controller) as url:
        agents: list[tuple[str, Agent, StopwatchRunner]] = []
        for mode, overrides in MODES.items():
            for index in range(trials):
                runner = StopwatchRunner()
                config = agent_config(f"{mode[:4]}-{index}", url, workdir, poll_interval=5.0, **overrides)
                agents.append(
                    (mode, Agent(config, backend=runner, handle_signals=False, write_state_file=False), runner)
                )
        async with trio.open_nursery() as nursery:
            for _, agent, _ in agents:
                nursery.start_soon(agent.run)
            for _, agent, _ in agents:
                await agent.driver.wait_for(lambda state: state.phase is Phase.READY)

            async def trial(mode: str, agent: Agent, runner: StopwatchRunner) -> None:
                # A random moment within one polling period, so the seed cadence is sampled fairly.
                await trio.sleep(rng.uniform(0, 5))
                command = controller.registration_command(agent.config.vm_id)
                created = time.monotonic()
                controller.enqueue(agent.config.vm_id, command)
                await runner.configure_called.wait()
                assert runner.configure_at is not None
                results[mode].append(runner.configure_at - created)
                agent.request_stop("benchmark over")

            async with trio.open_nursery() as trials_nursery:
                for mode, agent, runner in agents:
                    trials_nursery.start_soon(trial, mode, agent, runner)
    return {mode: summary_ms(values) for mode, values in results.items()}
