"""A controller that answers with something unusable costs the agent a retry, never its life or an event.

Rules: the whole agent in one trio run on the autojump clock, against the in-process fake controller, whose
scripted faults give the unusable answers; every wait is bounded in virtual time, so a dead task fails the test
instead of hanging it.
"""

from __future__ import annotations

import logging

import httpx
import pytest
import trio

from fake_controller import FakeController
from fake_controller.fake_runner.behaviour import Job
from fake_controller.faults import Fault, FaultKind
from fake_controller.simulated_runner import SimulatedRunner
from miglet.app import Agent
from miglet.machine import Phase
from tests.agents import ConfigFactory

ABSURD_RETRY_AFTER = "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"
FAILED = "A task of the agent failed; stopping"


def start(config_factory: ConfigFactory, controller: FakeController, runner: SimulatedRunner) -> Agent:
    config = config_factory(heartbeat_interval=0)
    return Agent(config, transport=httpx.ASGITransport(app=controller), backend=runner, handle_signals=False)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


@pytest.mark.parametrize("kind", ["nested", "bad_utf8"])
async def test_a_poll_answered_unusably_is_logged_and_the_agent_still_registers(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    kind: FaultKind,
) -> None:
    caplog.set_level(logging.INFO, logger="miglet")
    controller.faults.script("commands", [Fault(kind=kind)] * 3)
    agent = start(make_config, controller, runner)
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run)
            await agent.driver.wait_for(lambda state: state.phase is Phase.IDLE)
            agent.request_stop("test over")
    assert agent.exit_code == 0
    assert len(controller.requests_to("/commands")) >= 4  # the three unusable answers, then the registration
    logged = messages(caplog)
    if kind == "nested":
        assert logged.count("Command poll failed; will retry") == 3
    else:
        # The answer's one command (a shutdown) has an id that is not UTF-8: it alone is refused, not obeyed.
        assert logged.count("Rejected a command from the controller") == 3
    assert FAILED not in logged
    [stopping] = controller.events_of("vm-123", "vm_stopping")
    assert stopping["reason"] == "test over"


@pytest.mark.parametrize("kind", ["nested", "bad_utf8"])
async def test_an_unusable_acknowledgment_is_retried_until_acknowledged(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    kind: FaultKind,
) -> None:
    controller.faults.script("events", [Fault(kind=kind)] * 2)
    agent = start(make_config, controller, runner)
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run)
            await agent.driver.wait_for(lambda state: state.phase is Phase.READY)
            agent.request_stop("test over")
    assert agent.exit_code == 0
    problems = [
        r.__dict__["error"] for r in caplog.records if r.getMessage() == "vm_started not acknowledged; will retry"
    ]
    assert len(problems) == 2
    assert all(problem.startswith("unusable acknowledgment: ") for problem in problems)
    # Three tries, one event: the controller processed each and dedupes on event_id.
    assert len(controller.events_of("vm-123", "vm_started")) == 1
    assert controller.vm("vm-123").duplicates == 2
    assert FAILED not in messages(caplog)


async def test_an_absurd_retry_after_is_ignored_and_every_event_delivered(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    absurd = Fault(kind="status", status=503, retry_after=ABSURD_RETRY_AFTER)
    # The handshake, the poller and the outbox each meet it.
    controller.faults.script("events", [absurd])
    controller.faults.script("commands", [absurd])
    agent = start(make_config, controller, runner)
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.run)
            await agent.driver.wait_for(lambda state: state.phase is Phase.IDLE)
            controller.faults.script("events", [absurd, absurd])
            runner.submit_job(Job("build", "Succeeded", duration_s=30))
    assert agent.exit_code == 0
    assert [event["type"] for event in controller.events_of("vm-123")] == [
        "vm_started",
        "runner_registered",
        "job_started",
        "job_completed",
        "runner_exited",
        "vm_stopping",
    ]
    outbox = agent.outbox
    assert (outbox.delivered, outbox.dropped, len(outbox)) == (outbox.stamped, 0, 0)
    assert messages(caplog).count("Event not delivered; will retry") == 2
    assert FAILED not in messages(caplog)
