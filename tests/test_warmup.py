"""The runner's warmup while the agent waits in Ready: a whole agent on the autojump clock, with the simulated
runner (whose warmup takes as long as the test says). Its real process is in test_runner_integration.py."""

from __future__ import annotations

import trio
import trio.testing

from fake_controller import FakeController, Settings
from fake_controller.fake_runner.behaviour import Job
from fake_controller.simulated_runner import SimulatedRunner
from miglet.machine import Phase
from tests.agents import ConfigFactory, running_agent


async def test_a_registration_stops_the_warmup_and_waits_for_nothing(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    controller = FakeController(Settings(send_registration=False))
    runner = SimulatedRunner(warmup_s=600)
    async with running_agent(make_config(), controller, runner) as running:
        await running.reach(Phase.READY)
        ready = trio.current_time()
        await trio.sleep(30)  # the VM waits in Ready for its registration; the runner warms up meanwhile
        assert runner.warmups == ["stopped"]  # under way
        controller.enqueue("vm-123", controller.registration_command("vm-123"))
        await running.reach(Phase.REGISTERING_RUNNER)
        received = trio.current_time()
        await running.reach(Phase.IDLE)
        # config.sh started at once: the registration did not wait for the rest of the warmup's 600 s.
        assert trio.current_time() - received < 1
        runner.submit_job(Job("build"))
    assert runner.warmups == ["stopped"]
    timings = running.events("runner_registered")[0]["timings"]
    # From a second after Ready until the registration came (at the agent's next poll).
    assert abs(timings["warmup_s"] - (received - ready - 1)) < 0.1


async def test_a_warmup_done_before_the_registration_is_reported_and_not_repeated(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    controller = FakeController(Settings(registration_delay_s=100))
    runner = SimulatedRunner(warmup_s=8, reject_tokens=frozenset())
    async with running_agent(make_config(), controller, runner) as running:
        await running.reach(Phase.IDLE)
        runner.crash()  # the runner exits by itself: the agent is Ready again, and warms nothing up again
        await running.reach(Phase.READY)
        controller.enqueue("vm-123", {**controller.registration_command("vm-123"), "id": "second"})
        await running.reach(Phase.IDLE)
        runner.submit_job(Job("build"))
    assert runner.warmups == ["done"]
    assert running.events("runner_registered")[0]["timings"]["warmup_s"] == 8


async def test_warmup_off_warms_nothing_up(make_config: ConfigFactory, autojump_clock: trio.testing.MockClock) -> None:
    controller = FakeController()
    runner = SimulatedRunner(warmup_s=600)
    async with running_agent(make_config(runner_warmup="off"), controller, runner) as running:
        await running.reach(Phase.IDLE)
        runner.submit_job(Job("build"))
    assert runner.warmups == []
    assert "warmup_s" not in running.events("runner_registered")[0]["timings"]


async def test_a_registration_waiting_for_the_vm_finds_no_warmup_to_compete_with(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    controller = FakeController()  # the registration is there as soon as the VM is Ready
    runner = SimulatedRunner(warmup_s=600)
    async with running_agent(make_config(), controller, runner) as running:
        await running.reach(Phase.IDLE)
        runner.submit_job(Job("build"))
    assert runner.warmups == []
    assert "warmup_s" not in running.events("runner_registered")[0]["timings"]
