"""Deadlines: a VM stuck in one phase gives up (or, idle, simply stops) instead of idling forever.

Rules: the whole agent in-process on the autojump clock, so each deadline is asserted to the second.
"""

from __future__ import annotations

import httpx
import trio

from fake_controller import FakeController, Settings
from fake_controller.simulated_runner import SimulatedRunner
from miglet.app import Agent
from miglet.config import Config
from miglet.machine import Phase
from tests.agents import ConfigFactory


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
