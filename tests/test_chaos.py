"""Chaos: many agents, one controller that fails about a third of the time, and nothing lost.

Rules: one trio run on the autojump clock; every agent is in-process with a simulated runner; the controller
is the fake one with random faults (errors with and without Retry-After, malformed answers, connections
dropped before and after the request was processed). The controller records each event once by `event_id`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
import trio

from fake_controller import FakeController, Settings
from fake_controller.faults import FaultPlan
from fake_controller.simulated_runner import SimulatedRunner
from miglet.app import Agent
from miglet.machine import Phase
from tests.agents import ConfigFactory

AGENTS = 60
CHAOS = FaultPlan(
    error_rate=0.15, retry_after_s=2, malformed_rate=0.05, drop_rate=0.05, drop_after_rate=0.05, latency_s=1.0, seed=7
)


async def run_fleet(controller: FakeController, agents: list[Agent]) -> None:
    async with trio.open_nursery() as nursery:
        for agent in agents:
            nursery.start_soon(agent.run)
        for agent in agents:
            await agent.driver.wait_for(lambda state: state.phase is Phase.IDLE)
        for agent in agents:
            await agent.outbox.wait_empty()
        assert controller.faults.injected > AGENTS  # the chaos really happened
        controller.faults.set_plan(FaultPlan())
        for agent in agents:
            agent.request_stop("test over")


async def test_many_agents_through_a_faulty_controller(
    make_config: ConfigFactory, tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="miglet")
    controller = FakeController(Settings(registration_delay_s=3), faults=CHAOS)
    transport = httpx.ASGITransport(app=controller)
    agents: list[Agent] = []
    runners: list[SimulatedRunner] = []
    for index in range(AGENTS):
        config = make_config(vm_id=f"vm-{index:03d}", heartbeat_interval=7, state_file=tmp_path / f"{index}.json")
        runners.append(SimulatedRunner(configure_delay_s=1 + index % 5))
        agents.append(
            Agent(config, transport=transport, backend=runners[-1], handle_signals=False, write_state_file=False)
        )

    with trio.fail_after(3600):  # virtual seconds: a hang fails the test instead of spinning forever
        await run_fleet(controller, agents)

    assert sum(vm.duplicates for vm in controller.vms.values()) > 0  # some answers were lost after processing
    for agent, runner in zip(agents, runners, strict=True):
        vm_id = agent.config.vm_id
        events = controller.events_of(vm_id)
        assert agent.phase is Phase.STOPPED
        assert len(runner.configure_calls) == 1, vm_id
        assert len(controller.events_of(vm_id, "runner_registered")) == 1
        assert len(controller.events_of(vm_id, "vm_started")) == 1
        assert len(controller.events_of(vm_id, "vm_stopping")) == 1
        # Every delivery of an event_id, the retries included, carries the same event: no id names two events.
        first_of: dict[str, dict[str, object]] = {}
        for delivery in controller.vm(vm_id).deliveries:
            assert first_of.setdefault(delivery["event_id"], delivery) == delivery
        # Exactly once by event_id: every event the outbox delivered is recorded once, none dropped or left.
        assert len(events) == 1 + agent.outbox.delivered, [(e["type"], e["event_id"][:6]) for e in events]
        assert (agent.outbox.dropped, len(agent.outbox)) == (0, 0)
    assert not [record for record in caplog.records if record.exc_info]
