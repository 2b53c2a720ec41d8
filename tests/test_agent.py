"""The whole agent in one trio run: fake controller in-process, simulated runner, autojump clock.

Rules: no subprocess and no socket; sequencing by waiting on the agent's state, never by sleeping for it.
The seed's verification lines are checked verbatim and in order.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import trio

from fake_controller import FakeController, Settings
from fake_controller.fake_runner.behaviour import Job
from fake_controller.faults import FaultPlan
from fake_controller.simulated_runner import SimulatedRunner
from miglet import exitcodes
from miglet.app import CUT_SHORT_FLUSH_S, Agent
from miglet.machine import Phase, SignalReceived
from miglet.runner.backend import Exited, Line, Registration, RunEvent
from miglet.statefile import read_state_file
from tests.agents import ConfigFactory, running_agent

SEED_LINES = [
    "Controller acknowledgment received, transitioning to ready state",
    "MIGlet is ready - polling controller for registration config",
    "Received register_runner command from controller",
    "Registration config received, transitioning to registering runner",
]


async def test_seed_flow_to_idle_with_the_four_lines_in_order(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="miglet")
    config = make_config()
    async with running_agent(config, controller, runner) as running:
        await running.reach(Phase.IDLE)
        record = read_state_file(config.state_file)
        assert (record.state, record.vm_id, record.runner_name) == ("Idle", "vm-123", "vm-123")
        running.agent.request_stop("test over")
    assert running.exit_code == 0
    messages = [record.getMessage() for record in caplog.records]
    assert [message for message in messages if message in SEED_LINES] == SEED_LINES
    # Polling started only after the acknowledgment.
    first_poll = next(i for i, r in enumerate(controller.requests) if r.path.endswith("/commands"))
    assert controller.requests[first_poll - 1].path.endswith("/events")
    [call] = runner.configure_calls
    assert call.token == controller.vm("vm-123").registration_token
    assert call.registration.labels == ("self-hosted", "linux", "x64")
    assert call.registration.name == "vm-123"
    assert call.registration.ephemeral is True
    transitions = [(r.__dict__.get("from"), r.__dict__.get("to")) for r in caplog.records if "to" in r.__dict__]
    assert transitions == [
        ("Initializing", "WaitingForController"),
        ("WaitingForController", "Ready"),
        ("Ready", "RegisteringRunner"),
        ("RegisteringRunner", "Idle"),
        ("Idle", "Stopping"),
        ("Stopping", "Stopped"),
    ]
    assert read_state_file(config.state_file).state == "Stopped"
    assert running.event_types() == ["vm_started", "runner_registered", "vm_stopping", "runner_exited"]
    assert controller.events_of("vm-123", "runner_exited")[0]["reason"] == "stopped"


async def test_ephemeral_job_then_clean_exit(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_agent(make_config(), controller, runner) as running:
        await running.reach(Phase.IDLE)
        runner.submit_job(Job("build", "Succeeded", duration_s=30))
        busy = await running.reach(Phase.BUSY)
        assert busy.job == "build"
    assert running.exit_code == 0
    assert running.agent.phase is Phase.STOPPED
    assert running.event_types() == [
        "vm_started",
        "runner_registered",
        "job_started",
        "job_completed",
        "runner_exited",
        "vm_stopping",
    ]
    completed = controller.events_of("vm-123", "job_completed")[0]
    assert (completed["job_name"], completed["result"]) == ("build", "Succeeded")
    # Without faults, nothing is sent twice: the controller saw no repeated event_id.
    assert all(event["event_id"] for event in controller.events_of("vm-123"))
    assert controller.vm("vm-123").duplicates == 0


async def test_shutdown_command_during_a_job_cancels_it_and_stops(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_agent(make_config(), controller, runner) as running:
        await running.reach(Phase.IDLE)
        runner.submit_job(Job("long", duration_s=3600))
        await running.reach(Phase.BUSY)
        controller.enqueue(
            "vm-123",
            {
                "type": "shutdown",
                "parameters": {"reason": "scale-in", "grace_period_s": 5, "remove_token": "remove-token-xyz"},
            },
        )
        await running.reach(Phase.STOPPED)
    assert running.exit_code == 0
    assert runner.interrupted
    assert runner.remove_calls == ["remove-token-xyz"]
    [stopping] = controller.events_of("vm-123", "vm_stopping")
    assert (stopping["reason"], stopping["runner_name"]) == ("scale-in", "vm-123")
    [completed] = controller.events_of("vm-123", "job_completed")
    assert (completed["job_name"], completed["result"]) == ("long", "Canceled")


async def test_expired_and_rejected_tokens_then_a_good_one(
    make_config: ConfigFactory,
    autojump_clock: trio.testing.MockClock,
) -> None:
    controller = FakeController(Settings(send_registration=False))
    runner = SimulatedRunner(reject_tokens=frozenset({"AHT-REJECTED-TOKEN"}))
    expired = controller.registration_command("vm-123") | {"id": "expired"}
    expired["parameters"] = expired["parameters"] | {
        "expires_at": (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    }
    rejected = controller.registration_command("vm-123") | {"id": "rejected"}
    rejected["parameters"] = rejected["parameters"] | {"registration_token": "AHT-REJECTED-TOKEN"}
    good = controller.registration_command("vm-123") | {"id": "good"}
    async with running_agent(make_config(), controller, runner) as running:
        await running.reach(Phase.READY)
        for command in (expired, rejected, good, good):
            controller.enqueue("vm-123", command)
        await running.reach(Phase.IDLE)
        running.agent.request_stop("test over")
    failures = [(e["command_id"], e["reason"]) for e in controller.events_of("vm-123", "registration_failed")]
    assert failures == [("expired", "token_expired"), ("rejected", "configure_failed")]
    assert [call.token for call in runner.configure_calls] == [
        "AHT-REJECTED-TOKEN",
        good["parameters"]["registration_token"],
    ]
    rejected_event = controller.events_of("vm-123", "registration_failed")[1]
    assert "NotFound" in rejected_event["error"]
    assert "AHT-REJECTED-TOKEN" not in rejected_event["error"]


async def test_runner_crash_goes_back_to_ready_for_a_fresh_command(
    make_config: ConfigFactory,
    controller: FakeController,
    autojump_clock: trio.testing.MockClock,
) -> None:
    runner = SimulatedRunner(exit_after_listening=1)
    async with running_agent(make_config(), controller, runner) as running:
        await running.reach(Phase.IDLE)
        await running.reach(Phase.READY)
        runner.exit_after_listening = None
        controller.enqueue("vm-123", controller.registration_command("vm-123") | {"id": "second"})
        await running.reach(Phase.IDLE)
        running.agent.request_stop("test over")
    crashed, stopped = controller.events_of("vm-123", "runner_exited")
    assert (crashed["exit_code"], crashed["reason"]) == (1, "unexpected")
    assert stopped["reason"] == "stopped"
    assert len(runner.configure_calls) == 2


async def test_stop_while_waiting_for_the_controller(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    async def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    agent = Agent(
        make_config(), transport=httpx.MockTransport(unreachable), backend=SimulatedRunner(), handle_signals=False
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        await agent.driver.wait_for(lambda state: state.phase is Phase.WAITING_FOR_CONTROLLER)
        await trio.sleep(120)
        start = trio.current_time()
        agent.request_stop("signal")
    assert agent.phase is Phase.STOPPED
    # The undeliverable vm_stopping gets the bounded flush time, no more.
    assert trio.current_time() - start <= agent.config.flush_timeout + 0.5


@pytest.mark.parametrize(
    "phase",
    [Phase.WAITING_FOR_CONTROLLER, Phase.READY, Phase.REGISTERING_RUNNER, Phase.IDLE, Phase.BUSY],
)
async def test_stop_in_every_phase_ends_cleanly(
    make_config: ConfigFactory, phase: Phase, autojump_clock: trio.testing.MockClock
) -> None:
    controller = FakeController(Settings(registration_delay_s=5))
    runner = SimulatedRunner(configure_delay_s=30)
    hold = trio.Event()

    async def handshake_gate(request: httpx.Request) -> httpx.Response:
        if phase is Phase.WAITING_FOR_CONTROLLER:
            await hold.wait()
        return await httpx.ASGITransport(app=controller).handle_async_request(request)

    agent = Agent(make_config(), transport=httpx.MockTransport(handshake_gate), backend=runner, handle_signals=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(agent.run)
        before = Phase.IDLE if phase is Phase.BUSY else phase
        await agent.driver.wait_for(lambda state: state.phase is before)
        if phase is Phase.BUSY:
            runner.submit_job(Job("build", duration_s=600))
            await agent.driver.wait_for(lambda state: state.phase is Phase.BUSY)
        await trio.testing.wait_all_tasks_blocked()
        agent.request_stop("signal")
        hold.set()
    assert agent.phase is Phase.STOPPED
    assert not runner.running
    assert runner.interrupted is (phase is Phase.BUSY)
    [stopping] = controller.events_of("vm-123", "vm_stopping")
    assert stopping["reason"] == "signal"


async def test_a_shutdown_is_not_held_up_by_a_slow_registration(
    make_config: ConfigFactory, controller: FakeController, autojump_clock: trio.testing.MockClock
) -> None:
    runner = SimulatedRunner(configure_delay_s=600)
    async with running_agent(make_config(), controller, runner) as running:
        await running.reach(Phase.REGISTERING_RUNNER)
        start = trio.current_time()
        controller.enqueue("vm-123", {"type": "shutdown", "parameters": {"reason": "scale-in"}})
        await running.reach(Phase.STOPPED)
        assert trio.current_time() - start <= 5  # the next poll, not the end of config.sh
    assert running.exit_code == 0


async def test_a_runner_listening_after_its_deadline_is_not_taken_for_registered(
    make_config: ConfigFactory, controller: FakeController, autojump_clock: trio.testing.MockClock
) -> None:
    class LateListener(SimulatedRunner):
        async def run(self, registration: Registration, events: trio.MemorySendChannel[RunEvent]) -> None:
            try:
                await trio.sleep_forever()
            finally:
                # Told to stop, it prints what it would have printed long ago.
                with trio.CancelScope(shield=True):
                    await events.send(Line("stdout", "2024-01-15 10:30:00Z: Listening for Jobs"))
                    await events.send(Exited(0))

    async with running_agent(make_config(listen_timeout=30), controller, LateListener()) as running:
        await running.reach(Phase.REGISTERING_RUNNER)
        await running.reach(Phase.READY)
        assert controller.events_of("vm-123", "runner_registered") == []
        running.agent.request_stop("test over")
    [failed] = controller.events_of("vm-123", "registration_failed")
    assert failed["reason"] == "runner_start_failed"


async def test_a_second_stop_request_does_not_wait_for_the_controller(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running_agent(make_config(), controller, runner) as running:
        await running.reach(Phase.IDLE)
        controller.faults.set_plan(FaultPlan(error_rate=1.0, error_statuses=[503]))
        running.agent.request_stop("signal")
        await running.reach(Phase.STOPPING)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        # A first signal while stopping cuts the grace; a second cuts the whole stop short.
        running.agent.driver.apply(SignalReceived("SIGTERM"))
        running.agent.driver.apply(SignalReceived("SIGTERM"))
        await running.reach(Phase.STOPPED)
        assert trio.current_time() - start <= CUT_SHORT_FLUSH_S + 0.5
    # The controller never took vm_stopping: the stop says so.
    assert running.exit_code == exitcodes.UNDELIVERED
