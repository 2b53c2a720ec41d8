"""Preemption and maintenance notices: each cloud's notice in each phase, against fake metadata services.

Rules: the whole agent in-process on the autojump clock, the controller and the metadata service both fakes
reached through `httpx.ASGITransport` (no socket is opened; the endpoint names loopback all the same).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio

from fake_controller import FakeController, Settings
from fake_controller.fake_runner.behaviour import Job
from fake_controller.metadata import FakeMetadata
from fake_controller.server import serve
from fake_controller.simulated_runner import SimulatedRunner
from miglet.config import Config
from miglet.machine import AgentState, Phase
from miglet.preemption import (
    AwsWatcher,
    AzureWatcher,
    MetadataClient,
    MetadataUnavailable,
    Notice,
    open_metadata_client,
    watch,
)
from miglet.protocol import Provider
from tests.agents import ConfigFactory, Running, running_agent

LOOPBACK = "http://127.0.0.1:9"


def preempting(make_config: ConfigFactory, provider: str, **overrides: Any) -> Config:
    return make_config(preemption=provider, metadata_endpoint=LOOPBACK, **overrides)


@asynccontextmanager
async def watching(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    metadata: FakeMetadata,
    **overrides: Any,
) -> AsyncIterator[Running]:
    """An agent watching `metadata`'s cloud, reached in-process."""
    config = preempting(make_config, metadata.provider, **overrides)
    transport = httpx.ASGITransport(app=metadata)
    async with running_agent(config, controller, runner, metadata_transport=transport) as running:
        yield running


def notices(running: Running) -> list[dict[str, Any]]:
    return running.events("vm_preempted")


async def delivered(running: Running, predicate: Callable[[AgentState], bool]) -> None:
    """Wait until the agent's state satisfies `predicate` and the controller has everything it was owed."""
    await running.agent.driver.wait_for(predicate)
    await running.agent.outbox.wait_empty()


@pytest.mark.parametrize("provider", ["aws", "gcp", "azure"])
async def test_a_notice_when_idle_stops_the_runner_at_once(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
    provider: str,
) -> None:
    metadata = FakeMetadata(provider, vm_name="vm-123")
    async with watching(make_config, controller, runner, metadata) as running:
        await running.reach(Phase.IDLE)
        metadata.notice(action="terminate", preempted=True, event_type="Preempt", in_s=120)
    assert running.exit_code == 0
    [notice] = notices(running)
    assert (notice["provider"], notice["phase"]) == (provider, "Idle")
    assert notice["deadline"] is not None
    assert running.event_types()[-3:] == ["vm_preempted", "vm_stopping", "runner_exited"]
    assert running.events("vm_stopping")[0]["reason"] == "preempted"
    assert not runner.running


@pytest.mark.parametrize(("provider", "in_s", "job_gets"), [("aws", 120, 100), ("gcp", 30, 10), ("azure", 60, 40)])
async def test_a_running_job_goes_on_until_the_margin_then_ends_canceled(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
    provider: str,
    in_s: float,
    job_gets: float,
) -> None:
    metadata = FakeMetadata(provider)
    async with watching(make_config, controller, runner, metadata, preemption_margin=20) as running:
        await running.reach(Phase.IDLE)
        runner.submit_job(Job("long", duration_s=3600))
        await running.reach(Phase.BUSY)
        metadata.notice(action="terminate", preempted=True, event_type="Preempt", in_s=in_s)
        noticed = trio.current_time()
        await running.reach(Phase.STOPPING)
        stopped = trio.current_time()
    # The job had until the deadline less the margin (the notice is seen within a poll of 2 s).
    assert job_gets - 1 <= stopped - noticed <= job_gets + 3
    assert runner.interrupted
    [notice] = notices(running)
    assert (notice["phase"], notice["job_name"]) == ("Busy", "long")
    assert running.events("job_completed")[0]["result"] == "Canceled"
    assert running.events("vm_stopping")[0]["reason"] == "preempted"
    assert running.exit_code == 0


async def test_a_job_that_ends_before_the_margin_ends_as_usual(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    metadata = FakeMetadata("aws")
    async with watching(make_config, controller, runner, metadata) as running:
        await running.reach(Phase.IDLE)
        runner.submit_job(Job("short", duration_s=30))
        await running.reach(Phase.BUSY)
        metadata.notice(action="stop", in_s=120)
    assert not runner.interrupted
    assert running.events("job_completed")[0]["result"] == "Succeeded"
    assert running.events("vm_stopping")[0]["reason"] == "ephemeral runner finished its job"
    assert [notice["action"] for notice in notices(running)] == ["stop"]


@pytest.mark.parametrize(
    ("provider", "action"),
    [("aws", "terminate"), ("gcp", "TERMINATE_ON_HOST_MAINTENANCE"), ("azure", "Terminate")],
)
async def test_in_ready_no_runner_is_started_and_a_shutdown_still_stops(
    make_config: ConfigFactory,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
    provider: str,
    action: str,
) -> None:
    controller = FakeController(Settings(send_registration=False))
    metadata = FakeMetadata(provider)
    async with watching(make_config, controller, runner, metadata) as running:
        await running.reach(Phase.READY)
        metadata.notice(action=action, maintenance=action, event_type=action, in_s=120)
        await delivered(running, lambda state: state.preempted is not None)
        controller.enqueue("vm-123", controller.registration_command("vm-123") | {"id": "late"})
        await delivered(running, lambda state: state.has_seen("late"))
        assert running.agent.phase is Phase.READY
        controller.enqueue("vm-123", {"type": "shutdown", "parameters": {"reason": "scale-in"}})
    [notice] = notices(running)
    assert (notice["action"], notice["phase"]) == (action, "Ready")
    [refused] = running.events("command_failed")
    assert refused["command_id"] == "late"
    assert refused["error"].startswith("preempted:")
    assert runner.configure_calls == []
    assert running.events("vm_stopping")[0]["reason"] == "scale-in"
    assert running.exit_code == 0


async def test_a_registration_in_progress_is_stopped_and_cleaned(
    make_config: ConfigFactory, controller: FakeController, autojump_clock: trio.testing.MockClock
) -> None:
    runner = SimulatedRunner(configure_delay_s=600)
    metadata = FakeMetadata("aws")
    async with watching(make_config, controller, runner, metadata) as running:
        await running.reach(Phase.REGISTERING_RUNNER)
        metadata.notice(action="terminate", in_s=120)
        await running.reach(Phase.READY)
        running.agent.request_stop("test over")
    [failed] = running.events("registration_failed")
    assert failed["reason"] == "preempted"
    assert runner.runs == 0
    assert not runner.configured
    assert running.event_types().index("vm_preempted") < running.event_types().index("registration_failed")


async def test_an_autoscaling_termination_stops_as_a_shutdown_would(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    metadata = FakeMetadata("aws")
    metadata.lifecycle_state = "InService"
    async with watching(make_config, controller, runner, metadata, shutdown_grace=7) as running:
        await running.reach(Phase.IDLE)
        runner.submit_job(Job("long", duration_s=3600))
        await running.reach(Phase.BUSY)
        metadata.notice(lifecycle="Terminated")
    [notice] = notices(running)
    assert (notice["action"], notice["deadline"]) == ("autoscaling-terminated", None)
    assert running.events("job_completed")[0]["result"] == "Canceled"


async def test_an_azure_event_for_another_vm_is_ignored_and_ours_is_approved_once_stopped(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    metadata = FakeMetadata("azure", vm_name="vm-123")
    async with watching(make_config, controller, runner, metadata) as running:
        await running.reach(Phase.IDLE)
        metadata.notice(event_type="Preempt", resources=["another-vm"], event_id="theirs")
        metadata.notice(event_type="Freeze", resources=["vm-123"], event_id="a-freeze")
        await trio.sleep(30)
        assert notices(running) == []
        assert running.agent.phase is Phase.IDLE
        metadata.notice(event_type="Terminate", resources=["vm-123"], event_id="ours", in_s=300)
        await running.reach(Phase.STOPPED)
        await metadata.approved.wait()
    assert metadata.approvals == ["ours"]
    assert [notice["action"] for notice in notices(running)] == ["Terminate"]
    assert all(request.headers.get("metadata") == "true" for request in metadata.requests)


async def test_a_notice_repeated_on_every_poll_is_reported_once(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    metadata = FakeMetadata("aws")
    async with watching(make_config, controller, runner, metadata) as running:
        await running.reach(Phase.IDLE)
        runner.submit_job(Job("long", duration_s=3600))
        await running.reach(Phase.BUSY)
        metadata.notice(action="hibernate", in_s=300)
        await trio.sleep(60)
        assert len(metadata.requests_to("/latest/meta-data/spot/instance-action")) > 20
        running.agent.request_stop("test over")
    assert len(notices(running)) == 1


async def test_gcp_is_watched_with_wait_for_change_not_a_tight_poll(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    metadata = FakeMetadata("gcp")
    async with watching(make_config, controller, runner, metadata) as running:
        await running.reach(Phase.IDLE)
        await trio.sleep(600)
        metadata.notice(preempted=True)
    # Ten minutes of watching two values: a plain look at each, then a held request a minute.
    assert len(metadata.requests) <= 2 * (1 + 11) + 2
    held = [request for request in metadata.requests if "wait_for_change=true" in request.query]
    assert held
    assert all("last_etag=" in request.query for request in held)
    assert all(request.headers.get("metadata-flavor") == "Google" for request in metadata.requests)
    [notice] = notices(running)
    assert notice["action"] == "preempted"


@pytest.mark.parametrize("provider", ["aws", "gcp", "azure"])
async def test_unusable_metadata_is_logged_at_most_once_a_minute_and_changes_nothing(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    provider: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="miglet")
    metadata = FakeMetadata(provider)
    async with watching(make_config, controller, runner, metadata) as running:
        await running.reach(Phase.IDLE)
        metadata.garbage = True
        await trio.sleep(90)
        metadata.garbage = False
        metadata.status = 503
        await trio.sleep(90)
        assert running.agent.phase is Phase.IDLE
        metadata.status = None
        metadata.notice(action="terminate", preempted=True, event_type="Preempt", in_s=120)
    complaints = [record for record in caplog.records if record.getMessage().startswith("Cannot read the metadata")]
    assert 2 <= len(complaints) <= 4
    assert running.events("internal_error") == []
    assert len(notices(running)) == 1


async def test_imdsv2_tokens_are_renewed_before_they_expire_and_after_a_refusal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metadata = FakeMetadata("aws")
    seen: list[Notice] = []
    async with open_metadata_client(LOOPBACK, httpx.ASGITransport(app=metadata)) as http:
        watcher = AwsWatcher(MetadataClient(http), seen.append, token_ttl_s=90)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher.run)
            await trio.sleep(300)
            metadata.revoke_tokens()
            await trio.sleep(10)
            metadata.notice(action="terminate", in_s=120)
            await trio.sleep(5)
            nursery.cancel_scope.cancel()
    puts = metadata.requests_to("/latest/api/token")
    # Renewed a minute before each expiry (every 30 s with a 90 s token), and at once after the revocation.
    assert 10 <= len(puts) <= 13
    assert all(request.headers["x-aws-ec2-metadata-token-ttl-seconds"] == "90" for request in puts)
    refused = [request for request in metadata.requests if request.method == "GET" and request.at < 300]
    assert refused
    assert all("x-aws-ec2-metadata-token" in request.headers for request in refused)
    assert [notice.action for notice in seen][:1] == ["terminate"]


def test_preemption_is_off_unless_asked_for(make_config: ConfigFactory) -> None:
    config = make_config()
    assert config.preemption == "off"
    assert config.effective_metadata_endpoint is None


@pytest.mark.parametrize("provider", ["aws", "gcp", "azure"])
async def test_each_watcher_over_real_http_on_loopback(provider: Provider) -> None:
    metadata = FakeMetadata(provider, vm_name="vm-123")
    seen: list[Notice] = []
    noticed = trio.Event()

    def notify(notice: Notice) -> None:
        seen.append(notice)
        noticed.set()

    async def never() -> None:
        await trio.sleep_forever()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve, metadata)
            assert url.startswith("http://127.0.0.1:")
            async with open_metadata_client(url) as http:
                nursery.start_soon(watch, provider, MetadataClient(http), notify, never)
                await trio.sleep(0.5)
                metadata.notice(action="terminate", preempted=True, event_type="Preempt", in_s=120)
                await noticed.wait()
                nursery.cancel_scope.cancel()
    assert seen[0].provider == provider
    assert seen[0].deadline is not None


async def test_dates_far_from_now_are_unusable_answers_not_a_crash(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="miglet")
    metadata = FakeMetadata("aws")
    async with watching(make_config, controller, runner, metadata) as running:
        await running.reach(Phase.IDLE)
        runner.submit_job(Job("long", duration_s=3600))
        await running.reach(Phase.BUSY)
        for time in ("9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+01:00", "2001-01-01T00:00:00Z"):
            metadata.spot_action = {"action": "terminate", "time": time}
            await trio.sleep(70)
            assert running.agent.phase is Phase.BUSY
        running.agent.request_stop("test over")
    assert notices(running) == []
    assert running.events("internal_error") == []
    complaints = [record for record in caplog.records if record.getMessage().startswith("Cannot read the metadata")]
    assert 3 <= len(complaints) <= 4  # once a minute, whatever the answer


async def test_an_azure_approval_still_answered_slowly_is_given_before_the_agent_exits(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    metadata = FakeMetadata("azure", vm_name="vm-123")
    metadata.approval_delay_s = 0.5
    async with watching(make_config, controller, runner, metadata) as running:
        await running.reach(Phase.IDLE)
        metadata.notice(event_type="Preempt", event_id="slow")
    assert running.exit_code == 0
    assert metadata.approvals == ["slow"]


async def test_a_gcp_server_that_ignores_wait_for_change_is_not_asked_in_a_tight_loop(
    make_config: ConfigFactory,
    controller: FakeController,
    runner: SimulatedRunner,
    autojump_clock: trio.testing.MockClock,
) -> None:
    metadata = FakeMetadata("gcp")
    metadata.ignore_wait = True
    async with watching(make_config, controller, runner, metadata) as running:
        await running.reach(Phase.IDLE)
        start = len(metadata.requests)
        await trio.sleep(60)
        asked = len(metadata.requests) - start
        running.agent.request_stop("test over")
    assert asked <= 2 * 61  # two values, at most once a second each


async def test_a_compressed_answer_is_refused_before_it_is_inflated() -> None:
    async def gzip_answer(request: httpx.Request) -> httpx.Response:
        body = httpx.ByteStream(b"\x1f\x8b" + b"\0" * 100)
        return httpx.Response(200, stream=body, headers={"Content-Encoding": "gzip"})

    async with open_metadata_client(LOOPBACK, httpx.MockTransport(gzip_answer)) as http:
        with pytest.raises(MetadataUnavailable, match="Content-Encoding 'gzip'"):
            await MetadataClient(http).request("GET", "/latest/meta-data/spot/instance-action")


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"[" * 30_000 + b"]" * 30_000, "unusable answer"),  # deeper than any parser should follow
        (b'{"Events": []}' + b" " * 70_000, "larger than"),
        (b"\xff\xfe not JSON", "unusable answer"),
    ],
)
async def test_a_hostile_scheduled_events_answer_is_unusable_not_a_crash(body: bytes, problem: str) -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        # Streamed, as a real transport answers.
        name = request.url.path.endswith("/name")
        return httpx.Response(200, stream=httpx.ByteStream(b"vm-123" if name else body))

    async def never() -> None:
        await trio.sleep_forever()

    async with open_metadata_client(LOOPBACK, httpx.MockTransport(answer)) as http:
        watcher = AzureWatcher(MetadataClient(http), lambda notice: None, never)
        with pytest.raises(MetadataUnavailable, match=problem):
            await watcher._look()


async def test_a_metadata_service_that_trickles_is_cut_at_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    class Trickle(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            while True:
                await trio.sleep(1)
                yield b" "

    async def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Trickle())

    async with open_metadata_client(LOOPBACK, httpx.MockTransport(answer)) as http:
        with pytest.raises(MetadataUnavailable, match="no answer within 5 s"):
            await MetadataClient(http).request("GET", "/latest/meta-data/spot/instance-action")
