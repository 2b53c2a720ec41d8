"""A bug in one of MIGlet's own tasks never costs a job: the task is reported, restarted, and the job goes on.

Rules: bugs are injected through the agent's own seams (a state observer that raises, an HTTP transport that
raises a plain exception as a bug in the HTTP stack would), never by patching MIGlet's modules. The fake
controller runs in-process and time is the autojump clock.
"""

from __future__ import annotations

import logging
import random

import httpx
import pytest
import trio

from fake_controller import FakeController
from fake_controller.simulated_runner import Job, SimulatedRunner
from miglet import exitcodes, protocol
from miglet.machine import AgentState, Phase
from miglet.secret import Secret
from miglet.supervision import MAX_FAILURES, WINDOW_S, TaskSupervisor
from tests.agents import BuggyTransport, running_agent
from tests.conftest import ConfigFactory


async def test_a_failing_task_is_reported_and_restarted_with_backoff(autojump_clock: trio.testing.MockClock) -> None:
    reports: list[protocol.AnyEvent] = []
    gave_up: list[bool] = []
    supervisor = TaskSupervisor(report=reports.append, give_up=lambda: gave_up.append(True), rng=random.Random(1))
    starts: list[float] = []

    async def flaky() -> None:
        starts.append(trio.current_time())
        if len(starts) < 3:
            raise KeyError("a bug")

    await supervisor.run("poller", flaky)
    assert len(starts) == 3
    assert starts[1] > starts[0]  # restarted after a backoff, not in a busy loop
    assert reports == [
        protocol.InternalError(task="poller", error_class="KeyError", error="'a bug'"),
        protocol.InternalError(task="poller", error_class="KeyError", error="'a bug'"),
    ]
    assert gave_up == []


async def test_repeated_failures_within_the_window_give_up(autojump_clock: trio.testing.MockClock) -> None:
    gave_up: list[float] = []
    supervisor = TaskSupervisor(report=lambda event: None, give_up=lambda: gave_up.append(trio.current_time()))
    runs = 0

    async def broken() -> None:
        nonlocal runs
        runs += 1
        raise RuntimeError("always")

    await supervisor.run("outbox", broken)
    assert runs == MAX_FAILURES
    assert len(gave_up) == 1


async def test_failures_spread_over_more_than_the_window_never_give_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    supervisor = TaskSupervisor(report=lambda event: None, give_up=lambda: pytest.fail("gave up"))
    for _ in range(3 * MAX_FAILURES):
        assert not supervisor.failed("heartbeat", ValueError("now and then"))
        await trio.sleep(WINDOW_S / (MAX_FAILURES - 1))


async def test_the_report_masks_secrets_and_survives_a_broken_message(autojump_clock: trio.testing.MockClock) -> None:
    reports: list[protocol.AnyEvent] = []
    supervisor = TaskSupervisor(report=reports.append, give_up=lambda: None)
    token = Secret("AHTSUPERVISIONSECRET123")

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    supervisor.failed("poller", ValueError(f"token {token.reveal()} rejected"))
    supervisor.failed("poller", Unprintable())
    errors = [event.error for event in reports if isinstance(event, protocol.InternalError)]
    assert errors == ["token *** rejected", "<the exception's message could not be read>"]


async def test_a_bug_in_following_the_runner_costs_no_job(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken_observer(before: AgentState, after: AgentState) -> None:
        if after.phase is Phase.BUSY:
            raise RuntimeError("a bug met on the job's first line")

    async with running_agent(make_config(), controller, runner) as running:
        running.agent.holder.observers.append(broken_observer)
        await running.reach(Phase.IDLE)
        runner.submit_job(Job("build", "Succeeded", duration_s=60))
    assert running.exit_code == exitcodes.OK
    assert not runner.interrupted
    assert running.event_types() == [
        "vm_started",
        "runner_registered",
        "job_started",
        "internal_error",
        "job_completed",
        "runner_exited",
        "vm_stopping",
    ]
    [report] = running.events("internal_error")
    assert (report["task"], report["error_class"]) == ("runner_output", "RuntimeError")
    assert running.events("job_completed")[0]["result"] == "Succeeded"
    assert "A task of the agent failed" in [record.getMessage() for record in caplog.records]


async def test_a_poller_bug_mid_job_is_restarted_and_a_later_shutdown_still_arrives(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    busy = trio.Event()
    transport = BuggyTransport(
        controller, lambda request: busy.is_set() and request.method == "GET" and transport.raised == 0
    )
    async with running_agent(make_config(), controller, runner, transport=transport) as running:
        await running.reach(Phase.IDLE)
        runner.submit_job(Job("long", duration_s=3600))
        await running.reach(Phase.BUSY)
        busy.set()
        await running.agent.outbox.wait_empty()
        while not running.events("internal_error"):
            await controller.request_arrived.wait()
        assert running.agent.phase is Phase.BUSY  # the job goes on
        controller.enqueue("vm-123", {"type": "shutdown", "parameters": {"reason": "scale-in"}})
    assert transport.raised == 1
    assert running.exit_code == exitcodes.OK
    [report] = running.events("internal_error")
    assert report["task"] == "poller"
    assert running.events("vm_stopping")[0]["reason"] == "scale-in"
    assert running.events("job_completed")[0]["result"] == "Canceled"


async def test_an_outbox_bug_loses_no_event(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    def fails(request: httpx.Request) -> bool:
        return request.method == "POST" and b'"job_started"' in request.content and transport.raised == 0

    transport = BuggyTransport(controller, fails)
    async with running_agent(make_config(), controller, runner, transport=transport) as running:
        await running.reach(Phase.IDLE)
        runner.submit_job(Job("build", duration_s=5))
    assert transport.raised == 1
    assert running.exit_code == exitcodes.OK
    assert running.event_types() == [
        "vm_started",
        "runner_registered",
        "job_started",
        "internal_error",
        "job_completed",
        "runner_exited",
        "vm_stopping",
    ]
    assert running.events("internal_error")[0]["task"] == "outbox"


async def test_bugs_that_keep_recurring_stop_the_agent_the_ordinary_way(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="miglet")
    busy = trio.Event()
    transport = BuggyTransport(controller, lambda request: busy.is_set() and request.method == "GET")
    async with running_agent(make_config(), controller, runner, transport=transport) as running:
        await running.reach(Phase.IDLE)
        runner.submit_job(Job("long", duration_s=3600))
        await running.reach(Phase.BUSY)
        busy.set()
    assert transport.raised == MAX_FAILURES
    assert running.exit_code == exitcodes.FAILURE
    assert len(running.events("internal_error")) == MAX_FAILURES
    assert running.events("vm_stopping")[0]["reason"] == "internal_error"
    # The ordinary stop: the job is cancelled and reported, the runner's exit too.
    assert running.events("job_completed")[0]["result"] == "Canceled"
    assert running.events("runner_exited")[0]["reason"] == "stopped"
    assert "Too many internal errors; stopping" in [record.getMessage() for record in caplog.records]
