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

from fake_controller import FakeController, Settings
from fake_controller.fake_runner.behaviour import Job
from fake_controller.simulated_runner import SimulatedRunner
from miglet import exitcodes, protocol
from miglet.machine import AgentState, Phase
from miglet.outbox import MAX_BUG_STRIKES
from miglet.secret import Secret
from miglet.supervision import MAX_FAILURES, WINDOW_S, TaskSupervisor
from tests.agents import BuggyTransport, ConfigFactory, running_agent


async def test_a_failing_task_is_reported_and_restarted_with_backoff(autojump_clock: trio.testing.MockClock) -> None:
    reports: list[protocol.AnyEvent] = []
    gave_up: list[bool] = []
    supervisor = TaskSupervisor(report=reports.append, give_up=lambda: gave_up.append(True), rng=random.Random(1))
    starts: list[float] = []

    async def flaky() -> None:
        starts.append(trio.current_time())
        if len(starts) < 3:
            raise KeyError(f"a bug, the {len(starts)}st time")

    await supervisor.run("poller", flaky)
    assert len(starts) == 3
    assert starts[1] > starts[0]  # restarted after a backoff, not in a busy loop
    assert [(event.task, event.error_class) for event in reports if isinstance(event, protocol.InternalError)] == [
        ("poller", "KeyError"),
        ("poller", "KeyError"),
    ]
    assert gave_up == []


async def test_tasks_that_keep_failing_give_up_once_and_are_still_restarted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gave_up: list[float] = []
    supervisor = TaskSupervisor(report=lambda event: None, give_up=lambda: gave_up.append(trio.current_time()))
    runs = 0

    async def broken() -> None:
        nonlocal runs
        runs += 1
        raise RuntimeError("always")

    with trio.move_on_after(WINDOW_S):
        await supervisor.run("outbox", broken)
    assert len(gave_up) == 1
    # The stop needs its tasks (the outbox above all): giving up does not stop restarting them.
    assert runs > 2 * MAX_FAILURES


async def test_failures_spread_over_more_than_the_window_never_give_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    supervisor = TaskSupervisor(report=lambda event: None, give_up=lambda: pytest.fail("gave up"))
    runs = 0

    async def now_and_then() -> None:
        nonlocal runs
        runs += 1
        if runs < 3 * MAX_FAILURES:
            await trio.sleep(WINDOW_S / (MAX_FAILURES - 1))
            raise ValueError("now and then")

    await supervisor.run("heartbeat", now_and_then)
    assert runs == 3 * MAX_FAILURES


async def test_bugs_a_task_survives_are_reported_once_a_minute_and_never_stop_the_agent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reports: list[protocol.AnyEvent] = []
    supervisor = TaskSupervisor(report=reports.append, give_up=lambda: pytest.fail("gave up"))
    for _ in range(100):
        supervisor.bug("runner_output", ValueError("a line it cannot read"))
        await trio.sleep(1)
    assert supervisor.bugs == 100
    assert len(reports) == 2  # at 0 s and at 60 s


async def test_the_report_masks_secrets_and_survives_a_broken_message(autojump_clock: trio.testing.MockClock) -> None:
    reports: list[protocol.AnyEvent] = []
    supervisor = TaskSupervisor(report=reports.append, give_up=lambda: None)
    token = Secret("AHTSUPERVISIONSECRET123")

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    supervisor.bug("poller", ValueError(f"token {token.reveal()} rejected"))
    supervisor.bug("poller", Unprintable())
    errors = [event.error for event in reports if isinstance(event, protocol.InternalError)]
    assert errors == ["token *** rejected", "<the exception's message could not be read>"]


async def test_reporting_and_giving_up_never_raise_into_the_task(autojump_clock: trio.testing.MockClock) -> None:
    def broken_report(event: protocol.AnyEvent) -> None:
        raise RuntimeError("the outbox is broken too")

    def broken_give_up() -> None:
        raise RuntimeError("so is the stop")

    supervisor = TaskSupervisor(report=broken_report, give_up=broken_give_up, max_failures=2)
    runs = 0

    async def twice() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise KeyError(runs)

    await supervisor.run("poller", twice)
    assert (runs, supervisor.gave_up) == (3, True)


async def test_a_bug_that_comes_with_a_cancellation_is_reported_and_the_cancellation_goes_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reports: list[protocol.AnyEvent] = []
    supervisor = TaskSupervisor(report=reports.append, give_up=lambda: None)

    async def fails_when_cancelled() -> None:
        try:
            await trio.sleep_forever()
        finally:
            raise RuntimeError("a bug met while being cancelled")

    async def with_a_nursery() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fails_when_cancelled)
            await trio.sleep_forever()

    with trio.move_on_after(10) as scope:
        await supervisor.run("poller", with_a_nursery)
    assert scope.cancelled_caught
    assert [event.error_class for event in reports if isinstance(event, protocol.InternalError)] == ["ExceptionGroup"]


async def test_a_bug_met_as_a_job_starts_costs_no_job(
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
        running.agent.driver.observe(broken_observer)
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
    assert (report["task"], report["error_class"]) == ("driver", "RuntimeError")
    assert running.events("job_completed")[0]["result"] == "Succeeded"
    assert "A task of the agent failed" in [record.getMessage() for record in caplog.records]


async def test_a_bug_on_every_line_of_the_runners_output_costs_no_job(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="miglet")

    def broken(record: logging.LogRecord) -> bool:
        if "[WORKER]" in record.getMessage():
            raise RuntimeError("a bug met on a line of the runner's output")
        return True

    relayed = logging.getLogger("miglet.runner.output")
    relayed.addFilter(broken)
    try:
        lines = tuple(f"[WORKER] step {index}" for index in range(50))
        async with running_agent(make_config(), controller, runner) as running:
            await running.reach(Phase.IDLE)
            runner.submit_job(Job("build", "Succeeded", duration_s=600, lines=lines))
    finally:
        relayed.removeFilter(broken)
    assert running.exit_code == exitcodes.OK
    assert running.agent.supervision.bugs == 50
    assert running.events("job_completed")[0]["result"] == "Succeeded"
    # Reported, at most once a minute for the same bug.
    assert 1 <= len(running.events("internal_error")) <= 11


async def test_a_bug_met_as_a_registration_is_taken_costs_no_registration(
    make_config: ConfigFactory, runner: SimulatedRunner, autojump_clock: trio.testing.MockClock
) -> None:
    controller = FakeController(Settings(send_registration=False))
    broken = [True]

    def broken_observer(before: AgentState, after: AgentState) -> None:
        if after.phase is Phase.REGISTERING_RUNNER and broken:
            broken.clear()
            raise RuntimeError("a bug met as the registration is taken")

    async with running_agent(make_config(), controller, runner) as running:
        running.agent.driver.observe(broken_observer)
        await running.reach(Phase.READY)
        controller.enqueue("vm-123", controller.registration_command("vm-123") | {"id": "first"})
        await running.reach(Phase.IDLE)
        running.agent.request_stop("test over")
    [report] = running.events("internal_error")
    assert (report["task"], report["error_class"]) == ("driver", "RuntimeError")
    assert running.events("registration_failed") == []
    assert [call.registration.command_id for call in runner.configure_calls] == ["first"]
    assert running.exit_code == exitcodes.OK


async def test_giving_up_during_a_stop_already_under_way_keeps_its_exit_code(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def broken() -> None:
        raise RuntimeError("a bug in a task that keeps failing")

    async with running_agent(make_config(), controller, runner) as running:
        await running.reach(Phase.IDLE)
        running.agent.request_stop("scale-in")
        with trio.move_on_after(WINDOW_S):
            await running.agent.supervision.run("extra", broken)
        assert running.agent.supervision.gave_up
    assert running.exit_code == exitcodes.OK
    assert running.events("vm_stopping")[0]["reason"] == "scale-in"


async def test_nothing_reaches_the_controller_before_vm_started(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    def fails(request: httpx.Request) -> bool:
        return b'"vm_started"' in request.content and transport.raised == 0

    transport = BuggyTransport(controller, fails)
    async with running_agent(make_config(), controller, runner, transport=transport) as running:
        await running.reach(Phase.IDLE)
        running.agent.request_stop("test over")
    assert running.event_types()[:2] == ["vm_started", "internal_error"]
    assert running.events("internal_error")[0]["task"] == "handshake"


async def test_an_event_whose_delivery_keeps_failing_with_a_bug_does_not_block_the_others(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = BuggyTransport(controller, lambda request: b'"job_completed"' in request.content)
    async with running_agent(make_config(), controller, runner, transport=transport) as running:
        await running.reach(Phase.IDLE)
        runner.submit_job(Job("build", duration_s=5))
    assert transport.raised == MAX_BUG_STRIKES
    assert running.exit_code == exitcodes.UNDELIVERED
    types = running.event_types()
    assert "job_completed" not in types
    assert {"runner_exited", "vm_stopping"} <= set(types)
    [record] = [r for r in caplog.records if r.getMessage().startswith("Stopping without delivering")]
    assert [name.split()[0] for name in record.__dict__["missing"]] == ["job_completed"]


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
    # The same bug, within a minute: reported once, logged once, restarted each time.
    assert len(running.events("internal_error")) == 1
    assert running.events("vm_stopping")[0]["reason"] == "internal_error"
    # The ordinary stop: the job is cancelled and reported, the runner's exit too.
    assert running.events("job_completed")[0]["result"] == "Canceled"
    assert running.events("runner_exited")[0]["reason"] == "stopped"
    assert "Too many internal errors; stopping" in [record.getMessage() for record in caplog.records]
