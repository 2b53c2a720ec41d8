"""A slow, forgetful or refusing controller neither holds the agent hostage nor makes it lose an event it owes.

Rules: the fake controller runs in-process (its fault injection: trickled answers, windows of refusals and
outages, tokens it accepts); time is the autojump clock, so a minute-long outage costs nothing. Every test
checks what the controller finally received, and the exit code.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

from fake_controller import FakeController, Settings
from fake_controller.fake_runner.behaviour import Job
from fake_controller.faults import Fault
from fake_controller.simulated_runner import SimulatedRunner
from miglet import exitcodes
from miglet.controller import LONG_POLL_MARGIN, REQUEST_DEADLINE
from miglet.machine import Phase, SignalReceived
from miglet.secret import Secret
from tests.agents import ConfigFactory, running_agent

ENDING = ["job_started", "job_completed", "runner_exited", "vm_stopping"]


async def test_a_trickled_poll_is_cut_by_its_deadline_and_a_shutdown_behind_it_arrives(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(command_wait=20)
    with trio.fail_after(600):
        async with running_agent(config, controller, runner) as running:
            await running.reach(Phase.IDLE)
            # The next poll is answered one byte every 2 s: each read is quick, the whole answer never comes.
            controller.faults.script("commands", [Fault(kind="trickle", delay_s=2)])
            polls = len(controller.requests_to("/commands"))
            while len(controller.requests_to("/commands")) == polls:
                await controller.request_arrived.wait()
            cut_at = trio.current_time() + config.command_wait + LONG_POLL_MARGIN
            # Once the held poll has been answered (empty, and trickling), the controller has a shutdown to send.
            await trio.sleep(config.command_wait + 1)
            controller.enqueue("vm-123", {"type": "shutdown", "parameters": {"reason": "scale-in"}})
            await running.reach(Phase.STOPPING)
            assert trio.current_time() >= cut_at - 0.1
            assert trio.current_time() < cut_at + config.poll_interval + 1
    assert running.exit_code == exitcodes.OK
    cut = [record for record in caplog.records if record.getMessage() == "Controller request cut short by its deadline"]
    assert [record.__dict__["deadline_s"] for record in cut] == [config.command_wait + LONG_POLL_MARGIN]


async def test_a_trickled_answer_to_an_event_is_retried(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(600):
        async with running_agent(make_config(), controller, runner) as running:
            await running.reach(Phase.IDLE)
            controller.faults.script("events", [Fault(kind="trickle", delay_s=5)])
            runner.submit_job(Job("build", duration_s=1))
    assert running.exit_code == exitcodes.OK
    assert running.event_types() == ["vm_started", "runner_registered", *ENDING]
    # The cut-off answer came after the controller had the event: the retry is a duplicate it drops.
    assert controller.vm("vm-123").duplicates == 1
    assert REQUEST_DEADLINE < 60


async def test_a_window_of_401_on_events_loses_nothing(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_agent(make_config(), controller, runner) as running:
        await running.reach(Phase.IDLE)
        now = trio.current_time()
        controller.faults.window("events", Fault(kind="status", status=401), start=now, end=now + 3)
        runner.submit_job(Job("build", duration_s=1))
    assert running.exit_code == exitcodes.OK
    assert running.event_types() == ["vm_started", "runner_registered", *ENDING]


@pytest.mark.parametrize("status", [401, 403, 405, 408, 429, 500, 503])
async def test_lifecycle_events_outlast_any_refusal_but_one_that_says_the_event_is_wrong(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
    status: int,
) -> None:
    async with running_agent(make_config(heartbeat_interval=5), controller, runner) as running:
        await running.reach(Phase.IDLE)
        now = trio.current_time()
        controller.faults.window("events", Fault(kind="status", status=status), start=now, end=now + 45)
        runner.submit_job(Job("build", duration_s=1))
    assert running.exit_code == exitcodes.OK
    assert running.event_types() == ["vm_started", "runner_registered", *ENDING]


async def test_a_controller_down_when_the_job_ends_still_gets_the_closing_events(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = make_config()
    async with running_agent(config, controller, runner) as running:
        await running.reach(Phase.IDLE)
        runner.submit_job(Job("build", duration_s=10))
        await running.reach(Phase.BUSY)
        now = trio.current_time()
        # Down from before the job ends until well after it: longer than any short flush, within the timeout.
        end = now + config.flush_timeout / 2
        controller.faults.window("events", Fault(kind="drop"), start=now, end=end)
    assert running.exit_code == exitcodes.OK
    assert running.event_types() == ["vm_started", "runner_registered", *ENDING]
    assert trio.current_time() >= end


async def test_events_still_owed_after_the_flush_timeout_exit_3_and_are_named(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(flush_timeout=30)
    async with running_agent(config, controller, runner) as running:
        await running.reach(Phase.IDLE)
        await running.agent.outbox.wait_empty()
        now = trio.current_time()
        controller.faults.window("events", Fault(kind="status", status=503), start=now, end=now + 3600)
        runner.submit_job(Job("build", duration_s=10))
        stopping = await running.reach(Phase.STOPPING)
        assert stopping.stop_reason == "ephemeral runner finished its job"
        started = trio.current_time()
    assert running.exit_code == exitcodes.UNDELIVERED
    assert trio.current_time() - started <= config.flush_timeout + 1
    assert running.event_types() == ["vm_started", "runner_registered"]
    [record] = [r for r in caplog.records if r.getMessage().startswith("Stopping without delivering")]
    assert [name.split()[0] for name in record.__dict__["missing"]] == ENDING
    assert record.__dict__["missing_count"] == len(ENDING)


async def test_a_rotated_token_is_read_again_on_401(
    make_config: ConfigFactory, runner: SimulatedRunner, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    controller = FakeController(Settings(accepted_tokens=["first-controller-token"]))
    token_file = tmp_path / "token"
    token_file.write_text("first-controller-token\n")
    config = make_config(controller_token=Secret("first-controller-token"), controller_token_file=token_file)
    async with running_agent(config, controller, runner) as running:
        await running.reach(Phase.IDLE)
        # The controller rotates the token; the file is rewritten a moment later.
        controller.settings.accepted_tokens = ["second-controller-token"]
        runner.submit_job(Job("build", duration_s=1))
        await running.reach(Phase.BUSY)
        await controller.request_arrived.wait()
        token_file.write_text("second-controller-token\n")
    assert running.exit_code == exitcodes.OK
    assert running.event_types() == ["vm_started", "runner_registered", *ENDING]
    authorizations = {request.headers.get("authorization") for request in controller.requests}
    assert authorizations == {"Bearer first-controller-token", "Bearer second-controller-token"}


async def test_the_outbox_stays_bounded_under_a_flood_of_unknown_commands_and_heartbeats_count_the_drops(
    make_config: ConfigFactory, runner: SimulatedRunner, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(outbox_capacity=100, heartbeat_interval=5, poll_interval=1)
    received: list[dict[str, Any]] = []
    polls = 0
    accepting = trio.Event()
    counted = trio.Event()
    queue_lengths: list[int] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal polls
        if request.method == "GET":
            polls += 1
            flood = [{"id": f"u{polls}-{index}", "type": "reboot"} for index in range(1000)]
            return httpx.Response(200, json={"commands": flood if polls <= 10 else [], "vm_id": "vm-123"})
        event = msgspec.json.decode(request.content)
        if event["type"] == "vm_started":
            return httpx.Response(200, json={"status": "acknowledged", "acknowledged": True})
        if not accepting.is_set():
            return httpx.Response(503)
        received.append(event)
        if event["type"] == "heartbeat" and "events_dropped" in event:
            counted.set()
        return httpx.Response(200, json={})

    controller = FakeController()
    async with running_agent(config, controller, runner, transport=httpx.MockTransport(handler)) as running:
        await running.agent.driver.wait_for(lambda state: state.phase is Phase.READY)
        while polls <= 10:
            await trio.sleep(1)
            queue_lengths.append(len(running.agent.outbox))
        accepting.set()
        await counted.wait()
        running.agent.request_stop("test over")
    assert max(queue_lengths) == config.outbox_capacity
    heartbeat = next(event for event in received if event["type"] == "heartbeat" and "events_dropped" in event)
    assert heartbeat["events_dropped"]["command_failed"] >= 10_000 - config.outbox_capacity
    # What went out is the newest of the flood, in order, with nothing owed by the VM's own story lost.
    failures = [event["command_id"] for event in received if event["type"] == "command_failed"]
    assert failures == sorted(failures, key=lambda command_id: tuple(map(int, command_id[1:].split("-"))))
    assert "u10-999" in failures


async def test_a_second_signal_still_leaves_a_short_flush(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="miglet")
    async with running_agent(make_config(), controller, runner) as running:
        await running.reach(Phase.IDLE)
        now = trio.current_time()
        controller.faults.window("events", Fault(kind="status", status=503), start=now, end=now + 2)
        running.agent.request_stop("signal")
        # A first signal while stopping cuts the grace; a second cuts the whole stop short.
        running.agent.driver.apply(SignalReceived("SIGTERM"))
        running.agent.driver.apply(SignalReceived("SIGTERM"))
    # The controller came back within the short flush: everything owed arrived, and the exit code says so.
    assert running.exit_code == exitcodes.OK
    assert running.event_types() == ["vm_started", "runner_registered", "vm_stopping", "runner_exited"]
