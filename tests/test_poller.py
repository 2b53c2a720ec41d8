"""The command-poller task in isolation: cadence, long-poll, and routing of every kind of command.

Rules: the controller is the fake controller in-process (`httpx.ASGITransport`) or a MockTransport; time is the
autojump clock, so poll times are asserted exactly. The agent is put in Ready by feeding its machine.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from fake_controller import FakeController, Settings
from miglet import protocol
from miglet.config import Config
from miglet.controller import open_controller_client
from miglet.driver import Driver
from miglet.machine import (
    Acknowledged,
    Effect,
    Phase,
    Register,
    RegistrationAborted,
    RunnerListening,
    Start,
    StopRequested,
)
from miglet.outbox import Outbox
from miglet.retry import RetryPolicy
from miglet.stamp import Stamper
from miglet.tasks.poller import poller_task
from tests.agents import ConfigFactory


class Harness:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.outbox = Outbox(Stamper("vm-123", "pool-001", None))
        self.driver = Driver(vm_id="vm-123", pool_id="pool-001", send=self.outbox.put)
        self.driver.apply(Start(runner_name="vm-123", ephemeral=True))
        self.registrations: list[protocol.RegisterRunner] = []
        self.driver.carry_out = self._carry_out

    def _carry_out(self, effect: Effect) -> None:
        if isinstance(effect, Register):
            self.registrations.append(effect.command)

    def queued(self, kind: type[protocol.Event]) -> list[Any]:
        return [event for event in self.outbox.queued() if isinstance(event, kind)]


@asynccontextmanager
async def polling(config: Config, transport: httpx.AsyncBaseTransport, *, ready: bool = True) -> AsyncIterator[Harness]:
    harness = Harness(config)
    async with open_controller_client(config, transport) as client, trio.open_nursery() as nursery:
        nursery.start_soon(poller_task, config, client, harness.driver, RetryPolicy(base=1, cap=60), random.Random(1))
        if ready:
            harness.driver.apply(Acknowledged())
        yield harness
        nursery.cancel_scope.cancel()


def poll_times(controller: FakeController) -> list[float]:
    return [request.at for request in controller.requests_to("/commands")]


async def vm_started(controller: FakeController) -> None:
    transport = httpx.ASGITransport(app=controller)
    async with httpx.AsyncClient(transport=transport, base_url="http://c") as http:
        header = {"pool_id": "pool-001", "event_id": "e1", "timestamp": "2024-01-15T10:30:00.000Z"}
        await http.post("/api/v1/vms/vm-123/events", json={"type": "vm_started", "vm_id": "vm-123", **header})


async def test_no_poll_before_ready(make_config: ConfigFactory, autojump_clock: trio.testing.MockClock) -> None:
    controller = FakeController()
    async with polling(make_config(), httpx.ASGITransport(app=controller), ready=False):
        await trio.sleep(60)
        assert poll_times(controller) == []


async def test_seed_cadence_first_poll_immediately_then_every_interval(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    # A controller that ignores ?wait=N sees exactly the seed's 5 s cadence.
    controller = FakeController(Settings(long_poll=False, send_registration=False))
    config = make_config(command_wait=20)
    start = trio.current_time()
    async with polling(config, httpx.ASGITransport(app=controller)):
        await trio.sleep(12)
    assert [t - start for t in poll_times(controller)] == [0, 5, 10]
    assert all(request.query == "wait=20" for request in controller.requests_to("/commands"))


async def test_without_long_poll_no_wait_parameter_is_sent(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    controller = FakeController(Settings(send_registration=False))
    async with polling(make_config(command_wait=0), httpx.ASGITransport(app=controller)):
        await trio.sleep(6)
    assert [request.query for request in controller.requests_to("/commands")] == ["", ""]


async def test_long_poll_delivers_a_command_the_moment_it_exists(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    controller = FakeController(Settings(registration_delay_s=7.25))
    await vm_started(controller)
    start = trio.current_time()
    async with polling(make_config(command_wait=20), httpx.ASGITransport(app=controller)) as harness:
        await harness.driver.wait_for(lambda state: state.phase is Phase.REGISTERING_RUNNER)
        assert trio.current_time() - start == 7.25
        await trio.testing.wait_all_tasks_blocked()
    [command] = harness.registrations
    assert command.parameters.registration_token is not None
    assert command.parameters.registration_token.reveal() == controller.vm("vm-123").registration_token


async def test_long_poll_cadence_is_the_later_of_answer_and_interval(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    controller = FakeController(Settings(send_registration=False))
    start = trio.current_time()
    async with polling(make_config(command_wait=2, poll_interval=5), httpx.ASGITransport(app=controller)):
        await trio.sleep(11)
    # Each poll is held 2 s (nothing to send); the next starts when the interval has passed.
    assert [t - start for t in poll_times(controller)] == [0, 5, 10]
    async with polling(make_config(command_wait=20, poll_interval=5), httpx.ASGITransport(app=controller)):
        start = trio.current_time()
        controller.requests.clear()
        await trio.sleep(41)
    assert [t - start for t in poll_times(controller)] == [0, 20, 40]


async def test_routing_of_duplicates_unknown_and_malformed_commands(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    controller = FakeController(Settings(send_registration=False))
    good = controller.registration_command("vm-123")
    for command in [
        {"id": "x-1", "type": "reboot", "parameters": {}},
        {"id": "bad-1", "type": "register_runner", "parameters": {"labels": 5}},
        good,
        good,
    ]:
        controller.enqueue("vm-123", command)
    caplog.set_level(logging.INFO, logger="miglet")
    async with polling(make_config(), httpx.ASGITransport(app=controller)) as harness:
        await trio.sleep(1)
        controller.enqueue("vm-123", good)  # the same id again, in a later poll
        await trio.sleep(10)
    assert [command.id for command in harness.registrations] == [good["id"]]
    [failed] = harness.queued(protocol.CommandFailed)
    assert (failed.command_id, failed.command_type, failed.error) == ("x-1", "reboot", "unknown command type 'reboot'")
    [invalid] = harness.queued(protocol.RegistrationFailed)
    assert (invalid.command_id, invalid.reason) == ("bad-1", "invalid_command")
    assert "Expected `array`" in invalid.error
    messages = [record.getMessage() for record in caplog.records]
    assert messages.count("Received register_runner command from controller") == 1
    assert messages.count("Ignoring a command seen before") == 2


async def test_registration_refused_once_a_runner_is_registered(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    controller = FakeController(Settings(send_registration=False))
    first = controller.enqueue("vm-123", controller.registration_command("vm-123") | {"id": "r-1"})
    async with polling(make_config(), httpx.ASGITransport(app=controller)) as harness:
        await harness.driver.wait_for(lambda state: state.phase is Phase.REGISTERING_RUNNER)
        harness.driver.apply(RunnerListening())
        controller.enqueue("vm-123", controller.registration_command("vm-123") | {"id": "r-2"})
        await trio.sleep(6)
    assert [command.id for command in harness.registrations] == [first["id"]]
    [refused] = harness.queued(protocol.CommandFailed)
    assert refused.command_id == "r-2"
    assert refused.error == "cannot register a runner while Idle"


async def test_a_later_registration_waits_for_the_outcome_of_the_current_one(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    controller = FakeController(Settings(send_registration=False))
    for command_id in ("r-1", "r-2"):
        controller.enqueue("vm-123", controller.registration_command("vm-123") | {"id": command_id})
    async with polling(make_config(), httpx.ASGITransport(app=controller)) as harness:
        await harness.driver.wait_for(lambda state: state.phase is Phase.REGISTERING_RUNNER)
        await trio.sleep(30)
        assert [command.id for command in harness.registrations] == ["r-1"]
        harness.driver.apply(RegistrationAborted("r-1", "configure_failed", "404"))
        await harness.driver.wait_for(lambda state: state.command_id == "r-2")
        await trio.testing.wait_all_tasks_blocked()
    assert [command.id for command in harness.registrations] == ["r-1", "r-2"]
    assert harness.queued(protocol.CommandFailed) == []


async def test_registrations_still_waiting_when_the_agent_stops_are_refused(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    controller = FakeController(Settings(send_registration=False))
    for command_id in ("r-1", "r-2", "r-3"):
        controller.enqueue("vm-123", controller.registration_command("vm-123") | {"id": command_id})
    async with polling(make_config(), httpx.ASGITransport(app=controller)) as harness:
        await harness.driver.wait_for(lambda state: state.phase is Phase.REGISTERING_RUNNER)
        await trio.testing.wait_all_tasks_blocked()
        harness.driver.apply(StopRequested(reason="signal"))
    assert [command.id for command in harness.registrations] == ["r-1"]
    refused = harness.queued(protocol.CommandFailed)
    assert [(event.command_id, event.error) for event in refused] == [
        ("r-2", "the agent is stopping"),
        ("r-3", "the agent is stopping"),
    ]


async def test_shutdown_command_stops_the_agent_as_asked(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    controller = FakeController(Settings(send_registration=False))
    controller.enqueue(
        "vm-123", {"id": "s-1", "type": "shutdown", "parameters": {"reason": "scale-in", "grace_period_s": 3}}
    )
    async with polling(make_config(), httpx.ASGITransport(app=controller)) as harness:
        await trio.sleep(1)
    plan = harness.driver.state.stop
    assert plan is not None
    assert (plan.reason, plan.grace_s) == ("scale-in", 3)


async def test_failed_polls_back_off_and_recover(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    answers: list[Callable[[], httpx.Response]] = [
        lambda: httpx.Response(500, text="boom"),
        lambda: httpx.Response(200, text="not json"),
        lambda: httpx.Response(200, json={"commands": "nope"}),
        lambda: httpx.Response(503, headers={"Retry-After": "30"}),
    ]
    times: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        times.append(trio.current_time())
        if answers:
            return answers.pop(0)()
        return httpx.Response(200, json={"commands": [], "vm_id": "vm-123"})

    caplog.set_level(logging.WARNING, logger="miglet")
    start = trio.current_time()
    async with polling(make_config(poll_interval=5), httpx.MockTransport(handler)):
        await trio.sleep(60)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(gap >= 5 for gap in gaps)
    assert gaps[3] == 30  # Retry-After honoured
    assert times[0] == start
    errors = [
        getattr(record, "error", "")
        for record in caplog.records
        if record.getMessage() == "Command poll failed; will retry"
    ]
    assert len(errors) == 4
    assert "HTTP 500" in errors[0]
    assert "unusable commands response" in errors[1]
    assert "HTTP 503" in errors[3]
    assert not any(record.exc_info for record in caplog.records)
