"""Deadlines: a VM stuck in one phase gives up (or, idle, simply stops) instead of idling forever.

Rules: the whole agent in-process on the autojump clock, so each deadline is asserted to the second.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
import trio

from fake_controller import FakeController, Settings
from fake_controller.simulated_runner import SimulatedRunner
from miglet.app import Agent
from miglet.config import Config
from miglet.machine import Acknowledged, AgentState, CommandArrived, Phase, RegistrationAborted, Start, Step
from tests.agents import ConfigFactory, register_runner


async def run_until_stopped(
    config: Config, transport: httpx.AsyncBaseTransport, runner: SimulatedRunner
) -> tuple[int, float]:
    agent = Agent(config, transport=transport, backend=runner, handle_signals=False)
    start = trio.current_time()
    code = await agent.run()
    assert agent.phase is Phase.STOPPED
    return code, trio.current_time() - start


async def test_ack_timeout_gives_up_with_exit_1(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    async def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503)

    code, elapsed = await run_until_stopped(
        make_config(ack_timeout=60, flush_timeout=10), httpx.MockTransport(refuse), SimulatedRunner()
    )
    assert code == 1
    assert 60 <= elapsed <= 60 + 10.5  # the deadline, then at most the bounded flush


async def test_registration_timeout_gives_up_with_exit_1(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    controller = FakeController(Settings(send_registration=False))
    code, elapsed = await run_until_stopped(
        make_config(registration_timeout=120), httpx.ASGITransport(app=controller), SimulatedRunner()
    )
    assert code == 1
    assert elapsed == 120
    [stopping] = controller.events_of("vm-123", "vm_stopping")
    assert stopping["reason"] == "registration_timeout"


async def test_idle_timeout_stops_cleanly(make_config: ConfigFactory, autojump_clock: trio.testing.MockClock) -> None:
    controller = FakeController()
    runner = SimulatedRunner()
    code, elapsed = await run_until_stopped(make_config(idle_timeout=300), httpx.ASGITransport(app=controller), runner)
    assert code == 0
    assert elapsed == 300
    assert not runner.running
    assert controller.events_of("vm-123", "vm_stopping")[0]["reason"] == "idle_timeout"


async def test_runner_that_never_listens_is_stopped_and_reported(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    controller = FakeController()
    runner = SimulatedRunner(connect_delay_s=10_000)
    agent = Agent(
        make_config(listen_timeout=45),
        transport=httpx.ASGITransport(app=controller),
        backend=runner,
        handle_signals=False,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await agent.driver.wait_for(lambda state: state.phase is Phase.REGISTERING_RUNNER)
        start = trio.current_time()
        await agent.driver.wait_for(lambda state: state.phase is Phase.READY)
        assert trio.current_time() - start == 45
        assert not runner.running
        agent.request_stop("test over")
    [failed] = controller.events_of("vm-123", "registration_failed")
    assert (failed["reason"], failed["error"]) == ("runner_start_failed", "runner did not listen for jobs within 45 s")


async def test_a_deadline_whose_phase_changed_in_the_same_moment_keeps_watching(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = Agent(make_config(), backend=SimulatedRunner(), write_state_file=False, handle_signals=False)
    driver = agent.driver
    driver.apply(Start(runner_name="vm-123", ephemeral=True))
    driver.apply(Acknowledged())
    real_wait_for = driver.wait_for
    raced: list[Step] = []

    async def racing_wait_for(predicate: Callable[[AgentState], bool], *, held_for: float = 0) -> AgentState:
        state = await real_wait_for(predicate, held_for=held_for)
        if not raced:
            # A registration arrives in the very moment the deadline passes, and fails soon after.
            raced.append(driver.apply(CommandArrived(register_runner("c1"))))
        return state

    monkeypatch.setattr(driver, "wait_for", racing_wait_for)
    start = trio.current_time()
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent._deadline, Phase.READY, 10.0)
            await trio.sleep(15)
            assert driver.phase is Phase.REGISTERING_RUNNER
            driver.apply(RegistrationAborted("c1", "configure_failed", "404"))
            await driver.wait_for(lambda state: state.phase is Phase.STOPPING)
    assert trio.current_time() - start == 25  # Ready again at 15, for 10 s
    assert driver.state.stop_reason == "registration_timeout"
