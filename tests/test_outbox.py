"""The event outbox: order, retries with the same id, final refusals, and its bound.

Rules: the controller is an `httpx.MockTransport`; time is the autojump clock.
"""

from __future__ import annotations

import itertools
import random

import httpx
import msgspec
import pytest
import trio

from miglet import protocol
from miglet.controller import open_controller_client
from miglet.outbox import Outbox
from miglet.retry import RetryPolicy
from miglet.stamp import Stamper
from tests.agents import ConfigFactory


def stamper() -> Stamper:
    counter = itertools.count(1)
    return Stamper("vm-123", "pool-001", "org-001", new_id=lambda: f"e{next(counter)}", now=lambda: "T")


def test_stamping_fills_the_header() -> None:
    event = stamper().stamp(protocol.JobStarted(job_name="build"))
    assert (event.vm_id, event.pool_id, event.org_id, event.event_id, event.timestamp) == (
        "vm-123",
        "pool-001",
        "org-001",
        "e1",
        "T",
    )


async def test_events_leave_in_order_and_failures_keep_their_id(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    statuses = iter([503, 200, 500, 200, 400, 200])
    received: list[tuple[str, str, int]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        body = msgspec.json.decode(request.content)
        status = next(statuses)
        received.append((body["type"], body["event_id"], status))
        return httpx.Response(status, json={})

    outbox = Outbox(stamper(), policy=RetryPolicy(base=1, cap=4), rng=random.Random(1))
    outbox.put(protocol.JobStarted(job_name="a"))
    outbox.put(protocol.JobCompleted(job_name="a", result="Succeeded"))
    outbox.put(protocol.Heartbeat(state="Idle", uptime_s=1.0))
    outbox.put(protocol.VmStopping(reason="signal", runner_name="r"))
    async with (
        open_controller_client(make_config(), httpx.MockTransport(handler)) as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(outbox.serve, client)
        await outbox.wait_empty()
        nursery.cancel_scope.cancel()
    assert received == [
        ("job_started", "e1", 503),
        ("job_started", "e1", 200),
        ("job_completed", "e2", 500),
        ("job_completed", "e2", 200),
        ("heartbeat", "e3", 400),  # refused outright: dropped, not retried
        ("vm_stopping", "e4", 200),
    ]
    assert (outbox.delivered, outbox.dropped) == (3, 1)


async def test_a_long_outage_loses_nothing(make_config: ConfigFactory, autojump_clock: trio.testing.MockClock) -> None:
    up_at = trio.current_time() + 600
    delivered: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if trio.current_time() < up_at:
            raise httpx.ConnectError("connection refused")
        delivered.append(msgspec.json.decode(request.content)["event_id"])
        return httpx.Response(200, json={})

    outbox = Outbox(stamper(), policy=RetryPolicy(base=0.5, cap=30), rng=random.Random(2))
    for index in range(20):
        outbox.put(protocol.JobStarted(job_name=f"job-{index}"))
    async with (
        open_controller_client(make_config(), httpx.MockTransport(handler)) as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(outbox.serve, client)
        await outbox.wait_empty()
        nursery.cancel_scope.cancel()
    assert delivered == [f"e{index}" for index in range(1, 21)]
    assert trio.current_time() < up_at + 31


def test_a_full_outbox_drops_heartbeats_first_and_lifecycle_events_last() -> None:
    outbox = Outbox(stamper(), capacity=3)
    outbox.put(protocol.JobStarted(job_name="a"))
    outbox.put(protocol.Heartbeat(state="Busy", uptime_s=1))
    outbox.put(protocol.Heartbeat(state="Busy", uptime_s=2))
    outbox.put(protocol.JobCompleted(job_name="a", result="Failed"))  # the oldest heartbeat makes room
    outbox.put(protocol.Heartbeat(state="Idle", uptime_s=3))  # a newer heartbeat replaces the older one
    assert [getattr(event, "uptime_s", None) for event in outbox.queued()] == [None, None, 3]
    outbox.put(protocol.VmStopping(reason="signal", runner_name="r"))  # the last heartbeat makes room
    # Only lifecycle events left: the oldest one not in flight goes, and the bound holds.
    outbox.put(protocol.RunnerExited(exit_code=0, reason="stopped"))
    outbox.put(protocol.Heartbeat(state="Stopping", uptime_s=4))  # ranks below everything queued: dropped itself
    kinds = [type(event).__name__ for event in outbox.queued()]
    assert kinds == ["JobStarted", "VmStopping", "RunnerExited"]
    assert (outbox.dropped, dict(outbox.overflow)) == (5, {"heartbeat": 4, "job_completed": 1})
    assert [type(event).__name__ for event in outbox.owed()] == [
        "JobCompleted",
        "JobStarted",
        "VmStopping",
        "RunnerExited",
    ]


def test_the_bound_holds_for_a_flood_of_command_failures_and_keeps_the_job_events() -> None:
    outbox = Outbox(stamper(), capacity=10)
    outbox.put(protocol.RunnerRegistered(runner_name="r", command_id="c"))
    outbox.put(protocol.JobStarted(job_name="a"))
    outbox.put(protocol.InternalError(task="poller", error_class="KeyError", error="'x'"))
    for index in range(25_000):
        outbox.put(protocol.CommandFailed(command_id=f"u{index}", command_type="unknown", error="unknown type"))
    outbox.put(protocol.JobCompleted(job_name="a", result="Succeeded"))
    queued = outbox.queued()
    assert len(queued) == 10
    assert [type(event).__name__ for event in queued if not isinstance(event, protocol.CommandFailed)] == [
        "RunnerRegistered",
        "JobStarted",
        "JobCompleted",
    ]
    # The newest command failures are the ones kept.
    assert [event.command_id for event in queued if isinstance(event, protocol.CommandFailed)][-1] == "u24999"
    assert outbox.overflow == {"internal_error": 1, "command_failed": 25_000 - 7}
    assert outbox.stamped == outbox.delivered + outbox.dropped + len(outbox)


async def test_a_refused_event_is_logged_without_a_traceback(
    make_config: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = Outbox(stamper())
    outbox.put(protocol.JobStarted(job_name="a"))
    handler = httpx.MockTransport(lambda request: httpx.Response(422, json={"error": "unknown field"}))
    async with open_controller_client(make_config(), handler) as client, trio.open_nursery() as nursery:
        nursery.start_soon(outbox.serve, client)
        await outbox.wait_empty()
        nursery.cancel_scope.cancel()
    [record] = [r for r in caplog.records if r.getMessage() == "Controller refused event; dropping it"]
    assert record.levelname == "ERROR"
    assert record.exc_info is None
    assert "HTTP 422" in record.__dict__["error"]


async def test_a_stop_cuts_a_long_backoff_short_and_drops_heartbeats(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    controller_up = False
    delivered: list[tuple[str, float]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if not controller_up:
            return httpx.Response(503)
        delivered.append((msgspec.json.decode(request.content)["type"], trio.current_time()))
        return httpx.Response(200, json={})

    # A first backoff of 19.4 s (full jitter, from a seeded generator); the controller is back during it.
    outbox = Outbox(stamper(), policy=RetryPolicy(base=60, cap=60), rng=random.Random(7))
    outbox.put(protocol.JobStarted(job_name="a"))
    outbox.put(protocol.Heartbeat(state="Busy", uptime_s=1))
    async with (
        open_controller_client(make_config(), httpx.MockTransport(handler)) as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(outbox.serve, client)
        await trio.testing.wait_all_tasks_blocked()  # the first attempt failed: the outbox is backing off
        controller_up = True
        outbox.put(protocol.VmStopping(reason="signal", runner_name="r"))
        outbox.hurry()
        stop_began = trio.current_time()
        await outbox.wait_empty()
        nursery.cancel_scope.cancel()
    assert [kind for kind, _ in delivered] == ["job_started", "vm_stopping"]
    assert delivered[-1][1] - stop_began < 1
    assert outbox.dropped == 1


@pytest.mark.parametrize("status", [400, 404, 409, 410, 413, 415, 422])
async def test_an_answer_that_says_the_event_itself_is_wrong_drops_it_with_a_log_line(
    make_config: ConfigFactory, caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock, status: int
) -> None:
    answers = iter([status, 200])
    received: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        received.append(msgspec.json.decode(request.content)["type"])
        return httpx.Response(next(answers), json={"error": "no such job"})

    outbox = Outbox(stamper())
    outbox.put(protocol.JobCompleted(job_name="a", result="Succeeded"))
    outbox.put(protocol.VmStopping(reason="signal", runner_name="r"))
    async with open_controller_client(make_config(), httpx.MockTransport(handler)) as client, trio.open_nursery() as n:
        n.start_soon(outbox.serve, client)
        await outbox.wait_empty()
        n.cancel_scope.cancel()
    assert received == ["job_completed", "vm_stopping"]
    assert (outbox.delivered, outbox.dropped, outbox.owed()) == (1, 1, [])
    [record] = [r for r in caplog.records if r.getMessage() == "Controller refused event; dropping it"]
    assert f"HTTP {status}" in record.__dict__["error"]
    assert "no such job" in record.__dict__["error"]


@pytest.mark.parametrize("status", [401, 403, 405, 408, 429, 500, 503])
async def test_any_other_refusal_of_a_lifecycle_event_is_retried_until_it_is_taken(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock, status: int
) -> None:
    answers = iter([status] * 20 + [200])

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(answers), json={})

    outbox = Outbox(stamper(), policy=RetryPolicy(base=1, cap=8), rng=random.Random(3))
    outbox.put(protocol.JobStarted(job_name="a"))
    async with open_controller_client(make_config(), httpx.MockTransport(handler)) as client, trio.open_nursery() as n:
        n.start_soon(outbox.serve, client)
        await outbox.wait_empty()
        n.cancel_scope.cancel()
    assert (outbox.delivered, outbox.dropped) == (1, 0)


async def test_a_heartbeat_is_dropped_on_a_refusal_that_would_keep_a_lifecycle_event(
    make_config: ConfigFactory, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={})

    outbox = Outbox(stamper())
    outbox.put(protocol.Heartbeat(state="Idle", uptime_s=1))
    async with open_controller_client(make_config(), httpx.MockTransport(handler)) as client, trio.open_nursery() as n:
        n.start_soon(outbox.serve, client)
        await outbox.wait_empty()
        n.cancel_scope.cancel()
    assert (outbox.delivered, outbox.dropped) == (0, 1)
